"""Configuration dataclasses and named presets.

A checkpoint's `config.json` is `Config.to_dict()`; everything a run needs to rebuild the
full model, the recyclable module and the tokenizer lives here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

FORMAT_VERSION = 1


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

    def validate(self) -> None:
        if self.dim % self.n_head:
            raise ValueError(f"dim={self.dim} is not divisible by n_head={self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        for name in ("vocab_size", "dim", "n_layer", "n_head", "n_kv_head", "ffn_dim", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


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
    def from_dict(cls, d: dict[str, Any]) -> Config:
        version = d.get("format_version", FORMAT_VERSION)
        if version > FORMAT_VERSION:
            raise ValueError(
                f"checkpoint format_version {version} is newer than this recyclegpt supports "
                f"({FORMAT_VERSION}); upgrade recyclegpt"
            )
        return cls(
            model=_build(ModelConfig, d.get("model", {})),
            module=_build(ModuleConfig, d.get("module", {})),
            tokenizer=_build(TokenizerConfig, d.get("tokenizer", {})),
            eos_token_id=d.get("eos_token_id"),
            format_version=version,
            base=_base(d.get("base")),
        )


def _base(b: Any) -> dict[str, Any] | None:
    if b is None:
        return None
    if not isinstance(b, dict) or not isinstance(b.get("path"), str):
        raise ValueError("\"base\" must be an object with a string \"path\"")
    return dict(b)


def _build(cls: type, d: dict[str, Any]) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields in config.json: {sorted(unknown)}")
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
