"""Weight and config conversion between the native `FullModel` and Hugging Face decoders.

Supported HF families: `LlamaForCausalLM`, `MistralForCausalLM`, `Qwen2ForCausalLM` (q/k/v bias ->
`ModelConfig.qkv_bias=True`). The native RoPE already uses HF's rotate-half layout, so q/k weights
copy across without permutation. Configs the native model cannot express exactly (rope scaling,
an active sliding window, head_dim != hidden/heads, biases other than Qwen2's q/k/v, non-SiLU MLPs)
are refused with a one-line `RecycleError` instead of being loaded approximately.

Name map (native -> HF; N is the layer index):

    tok_embeddings.weight                 model.embed_tokens.weight
    layers.N.attention.wq.{weight,bias}   model.layers.N.self_attn.q_proj.{weight,bias}
    layers.N.attention.wk / wv / wo       ... k_proj / v_proj / o_proj
    layers.N.feed_forward.w1 / w3 / w2    model.layers.N.mlp.gate_proj / up_proj / down_proj
    layers.N.attention_norm.weight        model.layers.N.input_layernorm.weight
    layers.N.ffn_norm.weight              model.layers.N.post_attention_layernorm.weight
    norm.weight                           model.norm.weight
    output.weight                         lm_head.weight   (absent when embeddings are tied)
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..config import ModelConfig
from ..errors import RecycleError
from ..model import FullModel

if TYPE_CHECKING:  # transformers is imported lazily: it is slow to import
    from transformers import PretrainedConfig, PreTrainedModel

SUPPORTED_MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}

# Per-layer names: native suffix -> HF suffix (HF names are under model.layers.N.).
_LAYER_MAP = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_LAYER_MAP_INV = {v: k for k, v in _LAYER_MAP.items()}
_NATIVE_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)\.(weight|bias)$")
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
# HF names that carry no weights of their own (old checkpoints saved the RoPE table).
_HF_IGNORED_RE = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


# ----------------------------------------------------------------------------------------- names

def native_to_hf_name(name: str) -> str:
    """Native `FullModel` parameter name -> HF CausalLM name."""
    if name == "tok_embeddings.weight":
        return "model.embed_tokens.weight"
    if name == "norm.weight":
        return "model.norm.weight"
    if name == "output.weight":
        return "lm_head.weight"
    m = _NATIVE_LAYER_RE.match(name)
    if m and m.group(2) in _LAYER_MAP:
        return f"model.layers.{m.group(1)}.{_LAYER_MAP[m.group(2)]}.{m.group(3)}"
    raise KeyError(f"no Hugging Face name for native parameter {name!r}")


def hf_to_native_name(name: str) -> str | None:
    """HF CausalLM tensor name -> native name; None for tensors that carry nothing (rotary inv_freq).

    Raises KeyError for names the native model has no place for.
    """
    if _HF_IGNORED_RE.search(name):
        return None
    if name == "model.embed_tokens.weight":
        return "tok_embeddings.weight"
    if name == "model.norm.weight":
        return "norm.weight"
    if name == "lm_head.weight":
        return "output.weight"
    m = _HF_LAYER_RE.match(name)
    if m and m.group(2) in _LAYER_MAP_INV:
        return f"layers.{m.group(1)}.{_LAYER_MAP_INV[m.group(2)]}.{m.group(3)}"
    raise KeyError(name)


# ---------------------------------------------------------------------------------------- configs

def _as_hf_config(hf_config: PretrainedConfig | Mapping[str, Any]) -> PretrainedConfig:
    """A dict (parsed config.json) becomes the matching transformers config class."""
    if not isinstance(hf_config, Mapping):
        return hf_config
    from transformers import CONFIG_MAPPING

    model_type = hf_config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise RecycleError(_unsupported_type_msg(model_type, hf_config.get("architectures")))
    try:
        return CONFIG_MAPPING[model_type].from_dict(dict(hf_config))
    except (TypeError, ValueError, KeyError) as e:
        raise RecycleError(f"invalid {model_type} config: {str(e).splitlines()[0]}") from None


def _unsupported_type_msg(model_type: Any, architectures: Any) -> str:
    return (
        f"unsupported architecture {architectures or model_type!r} (model_type={model_type!r}); "
        f"recyclegpt loads {', '.join(SUPPORTED_MODEL_TYPES.values())}"
    )


def _rope_settings(c: PretrainedConfig) -> tuple[str, float, dict[str, Any]]:
    """(rope_type, theta, raw parameters) across transformers 4 (rope_theta/rope_scaling) and 5
    (rope_parameters)."""
    params = getattr(c, "rope_parameters", None)
    if not isinstance(params, Mapping):
        params = {}
    scaling = getattr(c, "rope_scaling", None)
    if isinstance(scaling, Mapping) and scaling:
        params = {**scaling, **params}
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    theta = params.get("rope_theta", getattr(c, "rope_theta", None))
    return str(rope_type), float(theta if theta is not None else 10000.0), dict(params)


def model_config_from_hf(hf_config: PretrainedConfig | Mapping[str, Any],
                         max_seq_len: int | None = None) -> ModelConfig:
    """Native `ModelConfig` for a Llama / Mistral / Qwen2 HF config (object or config.json dict).

    `max_seq_len` caps the context (default: max_position_embeddings); the static KV cache is sized
    by it, and a sliding window at least this long is never active, so the model stays exact.
    Raises `RecycleError` (one line) for anything the native model cannot express exactly.
    """
    c = _as_hf_config(hf_config)
    model_type = getattr(c, "model_type", None)
    archs = getattr(c, "architectures", None) or []
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise RecycleError(_unsupported_type_msg(model_type, archs))
    unknown = [a for a in archs if a not in SUPPORTED_MODEL_TYPES.values()]
    if unknown:
        raise RecycleError(_unsupported_type_msg(model_type, unknown))

    def refuse(why: str) -> RecycleError:
        return RecycleError(f"cannot load this {model_type} model exactly: {why}")

    dim = int(c.hidden_size)
    n_head = int(c.num_attention_heads)
    n_kv_head = int(getattr(c, "num_key_value_heads", None) or n_head)
    head_dim = getattr(c, "head_dim", None)
    if head_dim is not None and int(head_dim) * n_head != dim:
        raise refuse(f"head_dim={head_dim} is not hidden_size/num_attention_heads={dim}/{n_head} "
                     "(the native model derives head_dim from them)")
    act = getattr(c, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise refuse(f"hidden_act={act!r} (the native MLP is SwiGLU with SiLU)")
    if getattr(c, "mlp_bias", False):
        raise refuse("mlp_bias=True (the native MLP has no biases)")
    if model_type == "llama" and getattr(c, "attention_bias", False):
        raise refuse("attention_bias=True puts a bias on o_proj too; only q/k/v biases (Qwen2) are supported")
    rope_type, theta, rope = _rope_settings(c)
    if rope_type != "default":
        raise refuse(f"rope type {rope_type!r} (only plain RoPE is implemented)")
    if float(rope.get("partial_rotary_factor", getattr(c, "partial_rotary_factor", 1.0)) or 1.0) != 1.0:
        raise refuse("partial_rotary_factor != 1")

    max_pos = int(getattr(c, "max_position_embeddings", 2048) or 2048)
    seq = int(max_seq_len) if max_seq_len else max_pos
    window = getattr(c, "sliding_window", None)
    if model_type == "mistral":
        sliding = window is not None
    elif model_type == "qwen2":
        layer_types = getattr(c, "layer_types", None)
        if layer_types is not None:
            sliding = "sliding_attention" in layer_types and window is not None
        else:  # transformers 4: layers >= max_window_layers slide when use_sliding_window
            sliding = bool(getattr(c, "use_sliding_window", False)) and window is not None and int(
                getattr(c, "max_window_layers", 0)) < int(c.num_hidden_layers)
    else:
        sliding = False
    if sliding and int(window) < seq:
        raise refuse(f"sliding_window={window} is shorter than the context {seq}; "
                     f"load with a context of at most {window} tokens (--max-seq-len) to keep the window inactive")

    cfg = ModelConfig(
        vocab_size=int(c.vocab_size),
        dim=dim,
        n_layer=int(c.num_hidden_layers),
        n_head=n_head,
        n_kv_head=n_kv_head,
        ffn_dim=int(c.intermediate_size),
        max_seq_len=seq,
        rope_theta=theta,
        norm_eps=float(getattr(c, "rms_norm_eps", 1e-6)),
        tie_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2",
    )
    try:
        cfg.validate()
    except ValueError as e:
        raise refuse(str(e)) from None
    return cfg


def hf_config_from_model_config(cfg: ModelConfig, *, eos_token_id: int | None = None,
                                bos_token_id: int | None = None,
                                dtype: torch.dtype | None = torch.float32) -> PretrainedConfig:
    """The HF config that reproduces `cfg` exactly.

    A `LlamaConfig` (architectures ["LlamaForCausalLM"]); a model with q/k/v biases becomes a
    `Qwen2Config` instead (Llama's attention_bias would add an o_proj bias too).
    """
    from transformers import LlamaConfig, Qwen2Config

    common: dict[str, Any] = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_kv_head,
        hidden_act="silu",
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        rope_theta=cfg.rope_theta,
        eos_token_id=eos_token_id,
        bos_token_id=bos_token_id,
        pad_token_id=None,
    )
    if cfg.qkv_bias:
        hf = Qwen2Config(**common, use_sliding_window=False, sliding_window=None,
                         max_window_layers=cfg.n_layer)
        hf.architectures = ["Qwen2ForCausalLM"]
    else:
        hf = LlamaConfig(**common, head_dim=cfg.head_dim, attention_bias=False, mlp_bias=False)
        hf.architectures = ["LlamaForCausalLM"]
    if dtype is not None:
        hf.dtype = dtype  # transformers 5 name; to_dict() writes it as a string
    return hf


def hf_config_dict(hf: PretrainedConfig) -> dict[str, Any]:
    """config.json content that both transformers 5 (rope_parameters, dtype) and older readers
    (rope_theta, rope_scaling, torch_dtype) understand; vLLM/SGLang read rope_theta directly."""
    d = {k: (str(v).replace("torch.", "") if isinstance(v, torch.dtype) else v)
         for k, v in hf.to_dict().items()}
    _, theta, _ = _rope_settings(hf)
    d["rope_theta"] = theta
    d.setdefault("rope_scaling", None)
    dtype = d.get("dtype") or d.get("torch_dtype")
    if dtype is not None:
        d["dtype"] = d["torch_dtype"] = dtype
    return d


# ----------------------------------------------------------------------------------- state dicts

def to_hf_state_dict(model: FullModel) -> dict[str, Tensor]:
    """HF-named tensors of `model` (views, not copies); lm_head.weight only when untied."""
    out: dict[str, Tensor] = {}
    for name, t in model.state_dict().items():
        if name.startswith("caches."):
            continue
        if name == "output.weight" and model.cfg.tie_embeddings:
            continue
        out[native_to_hf_name(name)] = t.detach()
    return out


def from_hf_state_dict(sd: Mapping[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Native-named tensors from an HF CausalLM state dict, checked against `cfg`'s shapes.

    Tied models need no lm_head.weight (one that is present is ignored); untied ones do.
    """
    expected = native_shapes(cfg)
    out: dict[str, Tensor] = {}
    unexpected: list[str] = []
    for name, t in sd.items():
        native = native_target(name, tuple(t.shape), cfg, expected, unexpected)
        if native is not None:
            out[native] = t
    missing = sorted(set(expected) - set(out))
    if unexpected or missing:
        raise RecycleError(
            f"HF weights do not fit the config: missing {[native_to_hf_name(m) for m in missing[:3]]}, "
            f"unexpected {unexpected[:3]}"
        )
    return out


def native_target(name: str, shape: tuple[int, ...], cfg: ModelConfig, expected: Mapping[str, tuple[int, ...]],
                  unexpected: list[str]) -> str | None:
    """The native name an HF tensor loads into, None when it is skipped (rotary buffers, a tied head);
    names that fit nowhere are appended to `unexpected`. A wrong shape raises a one-line error."""
    try:
        native = hf_to_native_name(name)
    except KeyError:
        unexpected.append(name)
        return None
    if native is None or (native == "output.weight" and cfg.tie_embeddings):
        return None
    if native not in expected:
        unexpected.append(name)
        return None
    check_shape(name, shape, expected[native])
    return native


def native_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Native parameter names and shapes the full model needs (tied output weight excluded)."""
    d, hd = cfg.dim, cfg.head_dim
    q, kv = cfg.n_head * hd, cfg.n_kv_head * hd
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (cfg.vocab_size, d), "norm.weight": (d,)}
    if not cfg.tie_embeddings:
        shapes["output.weight"] = (cfg.vocab_size, d)
    for i in range(cfg.n_layer):
        p = f"layers.{i}."
        shapes.update({
            p + "attention.wq.weight": (q, d), p + "attention.wk.weight": (kv, d),
            p + "attention.wv.weight": (kv, d), p + "attention.wo.weight": (d, q),
            p + "feed_forward.w1.weight": (cfg.ffn_dim, d), p + "feed_forward.w3.weight": (cfg.ffn_dim, d),
            p + "feed_forward.w2.weight": (d, cfg.ffn_dim),
            p + "attention_norm.weight": (d,), p + "ffn_norm.weight": (d,),
        })
        if cfg.qkv_bias:
            shapes.update({p + "attention.wq.bias": (q,), p + "attention.wk.bias": (kv,),
                           p + "attention.wv.bias": (kv,)})
    return shapes


def check_shape(name: str, got: tuple[int, ...], want: tuple[int, ...]) -> None:
    if got != want:
        raise RecycleError(f"HF tensor {name} has shape {got}, the config implies {want}")


# ------------------------------------------------------------------------------------ whole models

def to_hf_model(model: FullModel, *, eos_token_id: int | None = None) -> PreTrainedModel:
    """A transformers model (LlamaForCausalLM, or Qwen2ForCausalLM with q/k/v biases) holding
    copies of `model`'s weights, in `model`'s dtype, eval mode."""
    from transformers import AutoModelForCausalLM

    p = model.tok_embeddings.weight
    hf_cfg = hf_config_from_model_config(model.cfg, eos_token_id=eos_token_id, dtype=p.dtype)
    hf = AutoModelForCausalLM.from_config(hf_cfg).to(p.dtype)
    result = hf.load_state_dict(to_hf_state_dict(model), strict=False)
    missing = [k for k in result.missing_keys if not (k == "lm_head.weight" and model.cfg.tie_embeddings)]
    if missing or result.unexpected_keys:
        raise RecycleError(
            f"HF model does not fit: missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}")
    if model.cfg.tie_embeddings:
        hf.tie_weights()
    return hf.to(p.device).eval()


def from_hf_model(hf_model: PreTrainedModel, max_seq_len: int | None = None) -> tuple[ModelConfig, FullModel]:
    """Native copy of an in-memory transformers Llama/Mistral/Qwen2 CausalLM (fp32 unless the HF
    model is in another dtype; eval mode)."""
    cfg = model_config_from_hf(hf_model.config, max_seq_len=max_seq_len)
    state = from_hf_state_dict(hf_model.state_dict(), cfg)
    dtype = next(hf_model.parameters()).dtype
    model = FullModel(cfg)
    with torch.no_grad():
        params = dict(model.named_parameters())
        for k, v in state.items():
            params[k].copy_(v)
    return cfg, model.to(dtype).eval()
