"""The full model as a GGUF file for llama.cpp (`recyclegpt export --format gguf`).

    export_gguf("ckpt/", "out/", dtype="float32")   # out/model.gguf: llama-cli -m out/model.gguf ...

Written with the `gguf` package in llama.cpp's `llama` architecture:
- tensor names as llama.cpp's converter writes them (`token_embd`, `blk.N.attn_q`, `ffn_gate`, ...); norm
  weights stay float32 whatever `dtype` the matrices take (as the converter does);
- q and k rows permuted: llama.cpp's `llama` rope rotates adjacent pairs of a head, ours (and transformers')
  its two halves, so each head's rows are interleaved as convert_hf_to_gguf.py interleaves Llama's;
- the tokenizer declared in full: llama.cpp's converter names a BPE pre-tokenizer by hashing what it makes of
  a fixed text and stops on vocabularies it does not know ("BPE pre-tokenizer was not recognized"), ours are
  trained here, so the file says `gpt-2` itself: GPT-2's byte-level regex, what
  `tokenizers.pre_tokenizers.ByteLevel` splits with. No BOS is added, as recyclegpt adds none.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import RecycleError
from ..files import atomic_dir
from ..model import FullModel
from ..tokenizer import Tokenizer
from .export import _dtype, _eos, _load

GGUF_FILE = "model.gguf"
ARCH = "llama"


def interleave_rope_rows(w: Tensor, n_head: int) -> Tensor:
    """q or k rows [n_head * head_dim, ...] from the rotate-half layout to llama.cpp's adjacent pairs:
    in each head, row i of the first half and row i of the second half become rows 2i and 2i+1."""
    head_dim = w.shape[0] // n_head
    return w.reshape(n_head, 2, head_dim // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_tensors(model: FullModel) -> dict[str, Tensor]:
    """llama.cpp-named tensors of `model` (q/k rows interleaved; `output` only when untied)."""
    cfg = model.cfg
    if cfg.qkv_bias:
        raise RecycleError("GGUF export covers models without q/k/v biases (llama.cpp's `llama` architecture); "
                           "this one has them")
    out = {"token_embd.weight": model.tok_embeddings.weight, "output_norm.weight": model.norm.weight}
    if not cfg.tie_embeddings:
        out["output.weight"] = model.output.weight
    for i, layer in enumerate(model.layers):
        att, ffn = layer.attention, layer.feed_forward
        out |= {f"blk.{i}.attn_norm.weight": layer.attention_norm.weight,
                f"blk.{i}.attn_q.weight": interleave_rope_rows(att.wq.weight, cfg.n_head),
                f"blk.{i}.attn_k.weight": interleave_rope_rows(att.wk.weight, cfg.n_kv_head),
                f"blk.{i}.attn_v.weight": att.wv.weight,
                f"blk.{i}.attn_output.weight": att.wo.weight,
                f"blk.{i}.ffn_norm.weight": layer.ffn_norm.weight,
                f"blk.{i}.ffn_gate.weight": ffn.w1.weight,
                f"blk.{i}.ffn_up.weight": ffn.w3.weight,
                f"blk.{i}.ffn_down.weight": ffn.w2.weight}
    return {k: v.detach() for k, v in out.items()}


def vocabulary(tokenizer: Tokenizer, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens by id, their GGUF token types, BPE merges) of a byte-level BPE tokenizer, padded to the
    model's vocabulary with unused `[PAD{i}]` entries."""
    import gguf

    spec = json.loads(tokenizer.tok.to_str())
    if spec.get("model", {}).get("type") != "BPE":
        raise RecycleError("GGUF export needs a byte-level BPE tokenizer (recyclegpt's own)")
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") != "ByteLevel" or not pre.get("use_regex", True) or pre.get("add_prefix_space") \
            or spec.get("normalizer"):
        # The file declares GPT-2's pre-tokenizer ("gpt-2"): any other split, prefix space or normalizer would
        # make llama.cpp cut text differently from this tokenizer.
        raise RecycleError("GGUF export declares GPT-2's byte-level pre-tokenizer, and this tokenizer splits text "
                           f"another way (pre-tokenizer {pre.get('type')!r}, normalizer "
                           f"{(spec.get('normalizer') or {}).get('type')!r}); convert its model with llama.cpp's "
                           "convert_hf_to_gguf.py instead")
    vocab = tokenizer.tok.get_vocab(with_added_tokens=True)
    if len(vocab) > vocab_size:
        raise RecycleError(f"the tokenizer has {len(vocab)} tokens, more than the model's {vocab_size}")
    by_id = {i: t for t, i in vocab.items()}
    special = {a["content"] for a in spec.get("added_tokens", []) if a.get("special")}
    tokens, types = [], []
    for i in range(vocab_size):
        tok = by_id.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(tok)
            types.append(gguf.TokenType.CONTROL if tok in special else gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    return tokens, [int(t) for t in types], merges


def _array(t: Tensor, dtype: torch.dtype) -> tuple[np.ndarray, Any]:
    """A tensor as the numpy array GGUFWriter takes, and its GGML type (bf16 travels as raw uint16)."""
    import gguf

    if dtype == torch.bfloat16:
        return t.to(torch.bfloat16).view(torch.uint16).numpy(), gguf.GGMLQuantizationType.BF16
    if dtype == torch.float16:
        return t.to(torch.float16).numpy(), gguf.GGMLQuantizationType.F16
    return t.to(torch.float32).numpy(), gguf.GGMLQuantizationType.F32


def write_gguf(model: FullModel, tokenizer: Tokenizer, path: str | Path, *, dtype: torch.dtype = torch.float32,
               eos_id: int | None = None, name: str = "recyclegpt") -> Path:
    """Write `model` and `tokenizer` as one GGUF file (see the module docstring)."""
    try:
        import gguf
    except ImportError:
        raise RecycleError("GGUF export needs the gguf package: pip install gguf") from None
    cfg = model.cfg
    file_type = {torch.float32: gguf.LlamaFileType.ALL_F32, torch.float16: gguf.LlamaFileType.MOSTLY_F16,
                 torch.bfloat16: gguf.LlamaFileType.MOSTLY_BF16}[dtype]
    w = gguf.GGUFWriter(str(path), ARCH)
    w.add_name(name)
    w.add_file_type(file_type)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(cfg.ffn_dim)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_kv_head)
    w.add_rope_dimension_count(cfg.dim // cfg.n_head)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    tokens, types, merges = vocabulary(tokenizer, cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    if eos_id is not None:
        w.add_eos_token_id(eos_id)
        w.add_bos_token_id(eos_id)  # never added (below); llama.cpp wants an id
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    for tname, t in gguf_tensors(model).items():
        array, qtype = _array(t, torch.float32 if t.dim() == 1 else dtype)
        w.add_tensor(tname, array, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


def export_gguf(ckpt_dir: str | Path, out_dir: str | Path, *, dtype: str | torch.dtype | None = None,
                overwrite: bool = False) -> Path:
    """Write OUT/model.gguf (the full model, `dtype` float32 (default), bfloat16 or float16), atomically."""
    out = Path(out_dir)
    cfg, model, _, tokenizer = _load(ckpt_dir, out)
    if not isinstance(model, FullModel):
        raise RecycleError("GGUF export covers recyclegpt's own model; this checkpoint runs a transformers base "
                           "(convert that base with llama.cpp's convert_hf_to_gguf.py)")
    torch_dtype = _dtype(dtype)
    with atomic_dir(out, overwrite) as tmp:
        write_gguf(model, tokenizer, tmp / GGUF_FILE, dtype=torch_dtype, eos_id=_eos(cfg, tokenizer),
                   name=Path(ckpt_dir).resolve().name)
    return out / GGUF_FILE
