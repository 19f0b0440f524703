"""Checkpoint directories: config.json, model.safetensors, module.safetensors, tokenizer.json.

Weights load through safetensors only. Writes are atomic: everything goes to a temporary
sibling directory that is renamed over the target, so a crash never leaves half a checkpoint.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import Config
from .errors import RecycleError
from .files import replacing_dir
from .model import FullModel
from .module import RecyclableModule
from .paths import read_error
from .tokenizer import Tokenizer

CKPT_FILES = ("config.json", "model.safetensors", "module.safetensors", "tokenizer.json")


def _state_for_save(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    # Tied weights share storage; safetensors refuses shared tensors, so save each name once.
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for name, t in module.state_dict().items():
        if name.startswith("caches."):
            continue
        key = t.data_ptr()
        if key in seen:
            continue
        seen.add(key)
        out[name] = t.detach().to("cpu").contiguous()
    return out


def save_checkpoint(path: str | Path, cfg: Config, model: FullModel | None, module: RecyclableModule,
                    tokenizer: Tokenizer, write_extra: Callable[[Path], None] | None = None) -> Path:
    """Write a checkpoint directory atomically (temp dir + rename); returns its path.

    `write_extra(tmp_dir)` may add files (training state, model card) inside the same atomic write.
    `model=None` writes no model.safetensors: the full model is referenced (`cfg.base`), or
    `write_extra` puts the file in place (e.g. a hard link to an unchanged frozen model).
    """
    path = Path(path)
    with replacing_dir(path) as tmp:  # a checkpoint is meant to be shared: 0755 / 0644, as an export
        (tmp / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        if model is not None:
            save_file(_state_for_save(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        save_file(_state_for_save(module), str(tmp / "module.safetensors"), metadata={"format": "pt"})
        tokenizer.save(tmp / "tokenizer.json")
        if write_extra is not None:
            write_extra(tmp)
    return path


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """A checkpoint directory, or a training run directory holding one under `checkpoint/`."""
    path = Path(path)
    if not (path / "config.json").exists() and (path / "checkpoint" / "config.json").exists():
        return path / "checkpoint"
    return path


def load_config(path: str | Path) -> Config:
    path = resolve_checkpoint_dir(path)
    if not path.exists():
        raise RecycleError(f"checkpoint not found: {path}")
    if not path.is_dir():
        raise RecycleError(f"checkpoint must be a directory holding {', '.join(CKPT_FILES)}: {path}")
    missing = [f for f in CKPT_FILES if not (path / f).is_file()]
    if _references_base(path):  # the full model is referenced (config.json "base"), not stored
        missing = [f for f in missing if f != "model.safetensors"]
    if missing:
        raise RecycleError(f"{path} is not a complete checkpoint: missing {', '.join(missing)}")
    unreadable = [f for f in CKPT_FILES if (path / f).is_file() and not os.access(path / f, os.R_OK)]
    if unreadable:  # unreadable is not corrupt: say which
        raise RecycleError(f"cannot read {path}: {', '.join(unreadable)} not readable (permission denied)")
    try:
        raw: Any = json.loads((path / "config.json").read_text())
    except OSError as e:
        raise read_error(path / "config.json", e) from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise RecycleError(f"corrupt {path / 'config.json'}: {e}") from None
    try:
        return Config.from_dict(raw)
    except ValueError as e:  # ConfigError: a field missing, unknown, of the wrong type or out of range
        raise RecycleError(f"invalid {path / 'config.json'}: {e}") from None


def references_base(path: str | Path) -> bool:
    """True when a checkpoint's full model is a referenced transformers model (the generic backend)."""
    return _references_base(resolve_checkpoint_dir(path))


def _references_base(path: Path) -> bool:
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and raw.get("base") is not None


def _load_weights(file: Path) -> dict[str, torch.Tensor]:
    try:
        state = load_file(str(file))
    except (PermissionError, IsADirectoryError, FileNotFoundError) as e:
        raise read_error(file, e, "weights file") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise RecycleError(f"corrupt weights file {file}: {e}") from None
    for name, t in state.items():  # a diverged or damaged save: refuse it rather than decode NaNs
        if not t.is_floating_point():
            raise RecycleError(f"{file} holds {name} as {str(t.dtype).removeprefix('torch.')}, not floating point: "
                               "the checkpoint is damaged or was not written by recyclegpt")
        if not bool(torch.isfinite(t).all()):
            raise RecycleError(f"{file} holds non-finite weights (NaN or inf) in {name}: the checkpoint is damaged "
                               "or was saved from a diverged run; use an earlier checkpoint")
    return state


def load_into(target: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Copy a state dict into `target`, with a one-line error when shapes or names do not fit."""
    expected = {k: v for k, v in target.state_dict().items() if not k.startswith("caches.")}
    # Tied output weight is saved once, under the embedding's name.
    if "output.weight" in expected and "output.weight" not in state and "tok_embeddings.weight" in state:
        state = {**state, "output.weight": state["tok_embeddings.weight"]}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise RecycleError(
            f"{what} does not fit its config: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise RecycleError(
                f"{what} does not fit the model: {k} has shape {tuple(v.shape)}, expected "
                f"{tuple(expected[k].shape)} (hidden size or vocabulary differ)"
            )
    target.load_state_dict(state, strict=False)


def load_tokenizer(path: str | Path, cfg: Config | None = None) -> Tokenizer:
    """A checkpoint's tokenizer (checked against its model's vocabulary), without loading any weights."""
    path = resolve_checkpoint_dir(path)
    cfg = cfg or load_config(path)
    tokenizer = Tokenizer.load(path / "tokenizer.json", cfg.tokenizer.eos_token)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise RecycleError(
            f"tokenizer in {path} has {tokenizer.vocab_size} tokens but the model only {cfg.model.vocab_size}"
        )
    return tokenizer


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
                    ) -> tuple[Config, FullModel, RecyclableModule, Tokenizer]:
    """(config, full model, module, tokenizer). A checkpoint whose config.json has a `base` entry
    (`recyclegpt attach` on a non-Llama model) gets its full model from that transformers directory
    through the generic backend (`recyclegpt.hf.generic.GenericCausalLM`, same interface)."""
    path = resolve_checkpoint_dir(path)
    cfg = load_config(path)
    model = FullModel(cfg.model) if cfg.base is None else None  # load_config checked every field
    module = RecyclableModule(cfg.model, cfg.module)
    if model is None:
        from .hf.generic import load_base_ref

        model = load_base_ref(cfg.base, cfg.model, device=device, dtype=dtype)
    else:
        load_into(model, _load_weights(path / "model.safetensors"), f"{path}/model.safetensors")
    load_into(module, _load_weights(path / "module.safetensors"), f"{path}/module.safetensors")
    tokenizer = load_tokenizer(path, cfg)
    model.to(device=device, dtype=dtype).eval()
    module.to(device=device, dtype=dtype).eval()
    return cfg, model, module, tokenizer
