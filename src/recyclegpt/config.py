"""Configuration dataclasses and named presets.

A checkpoint's `config.json` is `Config.to_dict()`; everything a run needs to rebuild the
full model, the recyclable module and the tokenizer lives here.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

FORMAT_VERSION = 1


class ConfigError(ValueError):
    """A config value of the wrong type or out of range; the message names the field (e.g. `model.dim`)."""


@dataclass(frozen=True)
class _Field:
    """What one config field accepts: kind 'int' | 'float' | 'bool' | 'str', an inclusive range for numbers
    (floats: `lo` exclusive when `lo_open`), and whether null (None) is allowed."""

    kind: str
    lo: int | float | None = None
    hi: int | float | None = None
    lo_open: bool = False
    nullable: bool = False


def _show(value: Any) -> str:
    """A value as config.json spells it, kept short and on one line."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_field(name: str, value: Any, spec: _Field) -> Any:
    """`value` if it fits `spec` (an int given for a float field comes back as a float); else ConfigError."""
    if value is None:
        if spec.nullable:
            return None
        raise ConfigError(f"{name} must not be null")
    if spec.kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {_show(value)}")
        return value
    if spec.kind == "str":
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {_show(value)}")
        return value
    if spec.kind == "int":
        lo, hi = spec.lo, spec.hi
        if (isinstance(value, bool) or not isinstance(value, int) or (lo is not None and value < lo)
                or (hi is not None and value > hi)):
            want = (f" in [{lo}, {hi}]" if lo is not None and hi is not None else f" >= {lo}" if lo is not None
                    else f" <= {hi}" if hi is not None else "")
            raise ConfigError(f"{name} must be an integer{want}, got {_show(value)}")
        return value
    # float
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if ok and spec.lo is not None:
        ok = value > spec.lo if spec.lo_open else value >= spec.lo
    if ok and spec.hi is not None:
        ok = value <= spec.hi
    if not ok:
        bounds = []
        if spec.lo is not None:
            bounds.append(f"{'>' if spec.lo_open else '>='} {spec.lo:g}")
        if spec.hi is not None:
            bounds.append(f"<= {spec.hi:g}")
        raise ConfigError(f"{name} must be a finite number{' ' + ' and '.join(bounds) if bounds else ''}, "
                          f"got {_show(value)}")
    return float(value)


# Generous upper bounds: far beyond any model this package builds or attaches to, low enough that a
# damaged config.json cannot ask for terabytes before its weights are even read.
_MAX_VOCAB, _MAX_DIM, _MAX_LAYERS, _MAX_HEADS, _MAX_FFN, _MAX_SEQ = 1 << 22, 1 << 16, 1024, 1024, 1 << 20, 1 << 20


@dataclass
class ModelConfig:
    """The full model: a LLaMA-family decoder (RMSNorm, RoPE, SwiGLU, grouped-query attention)."""

    vocab_size: int = 4096
    dim: int = 384
    n_layer: int = 10
    n_head: int = 6
    n_kv_head: int = 2
    ffn_dim: int = 1024
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    qkv_bias: bool = False  # Qwen2 puts a bias on q/k/v

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    def validate(self, where: str = "") -> None:
        """Types and ranges of every field first, then how they fit together; ConfigError (a ValueError)
        names the field, prefixed with `where` (e.g. "model.")."""
        check_fields(self, where)
        if self.dim % self.n_head:
            raise ConfigError(f"{where}dim={self.dim} is not divisible by {where}n_head={self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ConfigError(f"{where}n_head={self.n_head} is not divisible by {where}n_kv_head={self.n_kv_head}")
        if self.head_dim % 2:
            raise ConfigError(f"head width {where}dim/{where}n_head={self.head_dim} must be even for RoPE")


@dataclass
class ModuleConfig:
    """The recyclable module: Linear(2d->d) over [embed(x_{t+1}); h_t], then M blocks, shared head.

    The default layout is EAGLE-1's draft layout (no input norm on block 0, no final norm), so a
    module exports exactly to engines that load EAGLE drafts.
    """

    n_layer: int = 1
    ffn_dim: int | None = None  # None: same as the full model
    # Variants (multi-token-prediction style); they export to EAGLE only approximately.
    input_norms: bool = False  # RMSNorm on both halves before the Linear
    final_norm: bool = False  # RMSNorm before the shared head

    @property
    def is_eagle_layout(self) -> bool:
        return not self.input_norms and not self.final_norm

    def validate(self, where: str = "") -> None:
        check_fields(self, where)


@dataclass
class TrainConfig:
    """Joint training: loss = CE(full) + recycle_weight * sum_i unroll_decay^(i-1) * CE(module step i)."""

    seq_len: int = 256
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    warmup_steps: int = 100
    max_steps: int = 4000
    grad_clip: float = 1.0
    recycle_weight: float = 0.3  # lambda; drafted better than 1.0 in trials (DeepSeek-V3's MTP began at 0.3)
    unroll_steps: int = 2  # module steps trained per position (>=2 for chain drafting)
    unroll_decay: float = 0.5
    eval_every: int = 200
    eval_batches: int = 8
    save_every: int = 200
    seed: int = 1234
    bf16: bool = True  # autocast on CPU; master weights stay fp32


@dataclass
class TokenizerConfig:
    vocab_size: int = 4096
    eos_token: str = "<|endoftext|>"

    def validate(self, where: str = "") -> None:
        check_fields(self, where)


_FIELDS: dict[type, dict[str, _Field]] = {
    ModelConfig: {
        "vocab_size": _Field("int", 1, _MAX_VOCAB),
        "dim": _Field("int", 1, _MAX_DIM),
        "n_layer": _Field("int", 1, _MAX_LAYERS),
        "n_head": _Field("int", 1, _MAX_HEADS),
        "n_kv_head": _Field("int", 1, _MAX_HEADS),
        "ffn_dim": _Field("int", 1, _MAX_FFN),
        "max_seq_len": _Field("int", 1, _MAX_SEQ),
        "rope_theta": _Field("float", 0, lo_open=True),
        "norm_eps": _Field("float", 0, 1, lo_open=True),
        "tie_embeddings": _Field("bool"),
        "qkv_bias": _Field("bool"),
    },
    ModuleConfig: {
        "n_layer": _Field("int", 1, _MAX_LAYERS),
        "ffn_dim": _Field("int", 1, _MAX_FFN, nullable=True),
        "input_norms": _Field("bool"),
        "final_norm": _Field("bool"),
    },
    TokenizerConfig: {
        "vocab_size": _Field("int", 1, _MAX_VOCAB),
        "eos_token": _Field("str"),
    },
}


def check_fields(obj: Any, where: str = "") -> None:
    """Check (and normalize: ints in float fields become floats) every field of a config dataclass."""
    for name, spec in _FIELDS[type(obj)].items():
        value = check_field(where + name, getattr(obj, name), spec)
        if value is not getattr(obj, name):
            object.__setattr__(obj, name, value)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    module: ModuleConfig = field(default_factory=ModuleConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    eos_token_id: int | None = None
    format_version: int = FORMAT_VERSION
    # A full model that is not stored in the checkpoint but referenced (`recyclegpt attach` on a base the
    # native model cannot express): {"backend": "generic", "path": "/abs/hf/dir", ...}. None: model.safetensors.
    base: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["base"] is None:  # native checkpoints keep their config.json exactly as before
            del d["base"]
        return d

    @classmethod
    def from_dict(cls, d: Any) -> Config:
        """A Config from a parsed config.json, every field checked for presence, type and range first.

        Every key `to_dict` writes is required (a missing one is a ConfigError, never a default); the one
        exception is "base", which `to_dict` leaves out of native checkpoints (absent means null).
        """
        _keys(d, "", ("model", "module", "tokenizer", "eos_token_id", "format_version"), ("base",))
        version = check_field("format_version", d["format_version"], _Field("int", 1))
        if version > FORMAT_VERSION:
            raise ConfigError(
                f"checkpoint format_version {version} is newer than this recyclegpt supports "
                f"({FORMAT_VERSION}); upgrade recyclegpt"
            )
        cfg = cls(
            model=_build(ModelConfig, d["model"], "model"),
            module=_build(ModuleConfig, d["module"], "module"),
            tokenizer=_build(TokenizerConfig, d["tokenizer"], "tokenizer"),
            eos_token_id=d["eos_token_id"],
            format_version=version,
            base=_base(d.get("base")),
        )
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Every field's type and range, then the cross-field constraints; ConfigError names the field."""
        self.model.validate("model.")
        self.module.validate("module.")
        self.tokenizer.validate("tokenizer.")
        check_field("eos_token_id", self.eos_token_id, _Field("int", 0, self.model.vocab_size - 1, nullable=True))
        # tokenizer.vocab_size is a record, not a constraint: load_checkpoint compares the tokenizer itself.


def _keys(d: Any, where: str, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> None:
    if not isinstance(d, dict):
        raise ConfigError(f"{where.rstrip('.') or 'the top level'} must be a JSON object, got {_show(d)}")
    missing = [k for k in required if k not in d]
    if missing:
        raise ConfigError(f"missing {', '.join(where + k for k in missing)}")
    unknown = sorted(set(d) - set(required) - set(optional))
    if unknown:
        raise ConfigError(f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(where + k for k in unknown)}")


def _base(b: Any) -> dict[str, Any] | None:
    if b is None:
        return None
    if not isinstance(b, dict) or not isinstance(b.get("path"), str) or not b["path"]:
        raise ConfigError("base must be an object with a non-empty string \"path\"")
    if not isinstance(b.get("backend", "generic"), str):
        raise ConfigError(f"base.backend must be a string, got {_show(b['backend'])}")
    return dict(b)


def _build(cls: type, d: Any, section: str) -> Any:
    """A config dataclass from its config.json section: every field present and no others (checked by
    `validate` afterwards)."""
    _keys(d, section + ".", tuple(f.name for f in dataclasses.fields(cls)))
    return cls(**d)


# Named presets: (model, module, train) overrides. `small` is the shipped checkpoint's size,
# chosen so the module costs little next to a full pass (deep, narrow, small vocabulary).
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        "model": dict(vocab_size=512, dim=64, n_layer=2, n_head=4, n_kv_head=2, ffn_dim=160, max_seq_len=256),
        "module": dict(n_layer=1),
        "train": dict(seq_len=128, batch_size=8, lr=3e-3, warmup_steps=20, max_steps=300, eval_every=50,
                      save_every=50, eval_batches=4),
    },
    "small": {
        "model": dict(vocab_size=4096, dim=384, n_layer=10, n_head=6, n_kv_head=2, ffn_dim=1024, max_seq_len=512),
        "module": dict(n_layer=1),
        "train": dict(seq_len=256, batch_size=16, lr=1.5e-3, warmup_steps=100, max_steps=6000),
    },
    "base": {
        "model": dict(vocab_size=8192, dim=576, n_layer=12, n_head=9, n_kv_head=3, ffn_dim=1536, max_seq_len=1024),
        "module": dict(n_layer=1),
        "train": dict(seq_len=512, batch_size=8, lr=1e-3, warmup_steps=200, max_steps=20000),
    },
}


def preset(name: str) -> tuple[Config, TrainConfig]:
    if name not in PRESETS:
        from .errors import RecycleError

        raise RecycleError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    p = PRESETS[name]
    model = ModelConfig(**p["model"])
    cfg = Config(model=model, module=ModuleConfig(**p["module"]),
                 tokenizer=TokenizerConfig(vocab_size=model.vocab_size))
    return cfg, TrainConfig(**p["train"])
