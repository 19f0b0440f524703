"""Corpus reading and tokenization into cached token files (numpy memmap)."""

from .corpus import Document, iter_documents, resolve_files, stdlib_files
from .tokens import TokenData, prepare_tokens

__all__ = ["Document", "iter_documents", "resolve_files", "stdlib_files", "TokenData", "prepare_tokens"]
