"""Load a local Hugging Face model directory (Llama / Mistral / Qwen2) into the native `FullModel`.

Reads config.json and safetensors weights (single `model.safetensors` or shards listed in
`model.safetensors.index.json`) lazily: the model is built on the meta device, materialised empty
in the target dtype, and filled one tensor at a time through `safe_open` (memory-mapped), so peak
memory is the model plus one tensor. Pickle checkpoints (`pytorch_model.bin`) are refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ..config import ModelConfig
from ..errors import RecycleError
from ..layers import rope_tables
from ..model import FullModel
from ..tokenizer import Tokenizer
from .convert import model_config_from_hf, native_shapes, native_target, native_to_hf_name

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecycleError(f"{what} not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RecycleError(f"corrupt {what} {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise RecycleError(f"corrupt {what} {path}: expected a JSON object")
    return data


def weight_files(path: Path) -> dict[str, list[str]]:
    """{safetensors file: [tensor names]} for an HF directory (sharded or single file)."""
    index = path / INDEX_FILE
    if index.is_file():
        weight_map = read_json(index, "weight index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise RecycleError(f"corrupt weight index {index}: no weight_map")
        files: dict[str, list[str]] = {}
        for name, file in weight_map.items():
            files.setdefault(str(file), []).append(name)
        for file in files:
            if not (path / file).is_file():
                raise RecycleError(f"{path} is incomplete: shard {file} listed in {INDEX_FILE} is missing")
        return files
    if (path / SINGLE_FILE).is_file():
        return {SINGLE_FILE: []}  # names come from the file itself
    if any(path.glob("pytorch_model*.bin")):
        raise RecycleError(f"{path} has only pickle weights (pytorch_model*.bin); recyclegpt loads "
                           "safetensors only: re-save with save_pretrained (transformers writes safetensors)")
    raise RecycleError(f"no weights in {path}: expected {SINGLE_FILE} or {INDEX_FILE}")


def _materialize(model: FullModel, dtype: torch.dtype, device: torch.device | str) -> FullModel:
    """Allocate a meta-built model empty on `device` in `dtype` and rebuild its computed buffers."""
    model = model.to(dtype=dtype)  # free on meta; floating buffers follow dtype as in load_checkpoint
    model.to_empty(device=device)
    cfg = model.cfg
    if cfg.tie_embeddings:  # to_empty replaces meta parameters one by one and drops the tie
        model.output.weight = model.tok_embeddings.weight
    known = {"rope_cos", "rope_sin", "key_pos"}
    other = [n for n, _ in model.named_buffers() if n not in known]
    if other:  # a new computed buffer would otherwise hold uninitialised memory
        raise RuntimeError(f"recyclegpt.hf.load does not know how to rebuild buffers {other}")
    cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
    with torch.no_grad():
        model.rope_cos.copy_(cos)
        model.rope_sin.copy_(sin)
        model.key_pos.copy_(torch.arange(cfg.max_seq_len))
    return model


def load_weights_lazily(model: FullModel, path: Path) -> None:
    """Copy every tensor of the HF directory into `model`, one at a time."""
    cfg = model.cfg
    expected = native_shapes(cfg)
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    unexpected: list[str] = []
    for file, names in weight_files(path).items():
        try:
            with safe_open(str(path / file), framework="pt", device="cpu") as f:
                keys = list(f.keys())
                missing_in_file = sorted(set(names) - set(keys))
                if missing_in_file:
                    raise RecycleError(f"corrupt shard {path / file}: lacks {missing_in_file[:3]} "
                                       f"that {INDEX_FILE} places there")
                for name in keys:
                    native = native_target(name, tuple(f.get_slice(name).get_shape()), cfg, expected, unexpected)
                    if native is None:
                        continue
                    t = f.get_tensor(name)
                    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                        raise RecycleError(f"{path / file} holds non-finite weights (NaN or inf) in {name}: the "
                                           "model is damaged; use an intact copy")
                    with torch.no_grad():
                        params[native].copy_(t)
                    loaded.add(native)
        except SafetensorError as e:
            raise RecycleError(f"corrupt weights file {path / file}: {str(e).splitlines()[0]}") from None
        except OSError as e:
            raise RecycleError(f"cannot read weights file {path / file}: {e}") from None
    missing = sorted(set(expected) - loaded)
    if missing or unexpected:
        raise RecycleError(
            f"weights in {path} do not fit its config.json: missing "
            f"{[native_to_hf_name(m) for m in missing[:3]]}, unexpected {unexpected[:3]}"
        )


def _token_text(tok: Any) -> str | None:
    if isinstance(tok, str):
        return tok
    if isinstance(tok, dict) and isinstance(tok.get("content"), str):
        return tok["content"]
    return None


def load_tokenizer(path: Path, hf_config: dict[str, Any]) -> tuple[Tokenizer | None, str | None]:
    """(Tokenizer or None when there is no tokenizer.json, chat template or None).

    EOS: tokenizer_config.json's eos_token (the token chat templates end a turn with), else the
    first of config.json's / generation_config.json's eos_token_id.
    """
    tok_cfg_file = path / "tokenizer_config.json"
    tok_cfg = read_json(tok_cfg_file, "tokenizer config") if tok_cfg_file.is_file() else {}
    template = tok_cfg.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    jinja = path / "chat_template.jinja"  # transformers >= 4.43 saves the template separately
    if not template and jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
    if not isinstance(template, str) or not template:
        template = None
    if not (path / "tokenizer.json").is_file():
        return None, template
    tokenizer = Tokenizer.load(path / "tokenizer.json", eos_token=None)
    eos = _token_text(tok_cfg.get("eos_token"))
    if eos is None or tokenizer.tok.token_to_id(eos) is None:
        eos = None
        gen_file = path / "generation_config.json"
        gen = read_json(gen_file, "generation config") if gen_file.is_file() else {}
        for source in (hf_config, gen):
            ids = source.get("eos_token_id")
            first = ids[0] if isinstance(ids, list) and ids else ids
            if isinstance(first, int) and (text := tokenizer.tok.id_to_token(first)) is not None:
                eos = text
                break
    if eos is not None:
        tokenizer = Tokenizer(tokenizer.tok, eos)
    return tokenizer, template


def load_hf_model_dir(path: str | Path, dtype: torch.dtype = torch.float32,
                      device: str | torch.device = "cpu", max_seq_len: int | None = None
                      ) -> tuple[ModelConfig, FullModel, Tokenizer | None, str | None]:
    """Load a local HF Llama/Mistral/Qwen2 directory: (config, model in eval mode, tokenizer or None,
    chat template or None). `max_seq_len` caps the context (default max_position_embeddings)."""
    path = Path(path)
    if not path.is_dir():
        raise RecycleError(f"not a model directory: {path}")
    raw = read_json(path / "config.json", "model config")
    cfg = model_config_from_hf(raw, max_seq_len=max_seq_len)
    with torch.device("meta"):
        model = FullModel(cfg)
    model = _materialize(model, dtype, device)
    load_weights_lazily(model, path)
    tokenizer, template = load_tokenizer(path, raw)
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        raise RecycleError(f"tokenizer in {path} has {tokenizer.vocab_size} tokens but the model only "
                           f"{cfg.vocab_size}")
    return cfg, model.eval(), tokenizer, template
