"""Export a recyclegpt checkpoint for serving engines.

`export_hf` writes the full model as a transformers-loadable directory (LlamaForCausalLM, or
Qwen2ForCausalLM when the model has q/k/v biases). `export_eagle` writes the recyclable module as an
EAGLE-1 draft checkpoint for vLLM or SGLang; serve it next to the `export_hf` directory as the target
(`serving_command` prints the command line).

EAGLE-1 draft format, as the engines load it (sources read for this file):

- EAGLE reference, SafeAILab/EAGLE `eagle/model/cnets.py` on branch v1 (4a9cf3a, 2024-06-27) and
  `eagle/model/cnets1.py` at main (cb7e084, 2026-02-19): `Model.fc = nn.Linear(2d, d, bias=config
  "bias", default True)` over `cat((inputs_embeds, hidden_states))` (embedding half first);
  `LlamaDecoderLayer` has no `input_layernorm` when index == 0; no final norm; tensors named
  `embed_tokens.weight`, `fc.weight`, `layers.N.self_attn.{q,k,v,o}_proj.weight`,
  `layers.N.mlp.{gate,up,down}_proj.weight`, `layers.N.input_layernorm.weight` (N > 0),
  `layers.N.post_attention_layernorm.weight`. Released LLaMA-3 drafts ship `"bias": false`,
  `architectures: ["LlamaForCausalLM"]` and include embed_tokens.weight.
- vLLM V1, vllm-project/vllm `vllm/model_executor/models/llama_eagle.py` at e1c4a55 and 00da923:
  `fc = Linear(2d, d, bias=False)`; layer 0's input_layernorm replaced by Identity; the loader
  prefixes `model.` itself (so file names carry no `model.` prefix); at e1c4a55 an `fc.bias` in the
  file raises KeyError (`params_dict[name]`), at 00da923 unknown names are skipped; embed_tokens in the
  file is skipped when pipeline parallelism is off (the target's is shared) and the target's lm_head
  is always used; newer vLLM (`vllm/v1/spec_decode/llm_base_proposer.py`) shares embed_tokens /
  lm_head with the target when the file lacks them or holds identical values (`has_own_embed_tokens`
  + `torch.equal`). `vllm/transformers_utils/configs/eagle.py` (23c5aa9) renames the draft's
  architectures `X` -> `EagleX` (older V1: unconditionally, so a file saying "EagleLlamaForCausalLM"
  would become "EagleEagleLlamaForCausalLM"): the file must say "LlamaForCausalLM", which resolves to
  `EagleLlamaForCausalLM` in the registry. The vLLM V0 `eagle.py` (`EAGLEModel`, 0531c22) expected
  a different, converted layout (its own lm_head, an input norm on layer 0) and is not targeted.
- SGLang, sgl-project/sglang `python/sglang/srt/models/llama_eagle.py` at 3b64d5d and 034b3be:
  `EntryClass = [LlamaForCausalLMEagle]` (config must say architectures ["LlamaForCausalLMEagle"];
  `ModelConfig._config_draft_model` maps no Llama name to it); `fc = torch.nn.Linear(2d, d)` WITH a
  bias (PyTorch default), so the file must carry `fc.bias` (zeros) or the bias stays at its random
  init; layer 0's input_layernorm is the identity; load_weights prefixes `model.` and drops
  `lm_head*`; the EAGLE worker then replaces embed_tokens and lm_head with the target's
  (`set_embed_and_head`).
- Both engines' llama.py read `attention_bias = config.attention_bias or config.bias` and put it on
  q/k/v AND o_proj (SGLang `python/sglang/srt/models/llama.py` at 0023954: `LlamaAttention(bias=...)`
  for qkv_proj and o_proj, no qkv_bias key; vLLM llama.py additionally lets `config.qkv_bias` override
  the q/k/v part), and SGLang silently skips `.bias` tensors its layers lack. So "bias" must never be
  true in the draft config, and a module with Qwen2-style q/k/v biases is written with
  `"attention_bias": true` plus an all-zero `o_proj.bias` (exact in both engines; `"qkv_bias": true`
  is added for EAGLE's own cnets1.py, which reads only that key).
- The target feeds its post-final-norm hidden state (what its lm_head reads); the draft at position t
  reads (x_{t+1}, h_t) and returns its last block's output without a final norm, which the engine
  feeds back for the next chained step: exactly `RecyclableModule`.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file
from torch import Tensor

from ..checkpoint import load_checkpoint, resolve_checkpoint_dir
from ..config import Config, ModelConfig
from ..errors import RecycleError
from ..files import atomic_dir
from ..model import FullModel
from ..module import RecyclableModule
from ..paths import check_not_overlapping
from ..tokenizer import Tokenizer
from .convert import _rope_settings, hf_config_dict, hf_config_from_model_config, to_hf_state_dict

Flavour = Literal["vllm", "sglang"]
FLAVOURS = ("vllm", "sglang")
EAGLE_ARCHITECTURE = {"vllm": "LlamaForCausalLM", "sglang": "LlamaForCausalLMEagle"}

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

APPROXIMATION_NOTE = (
    "EAGLE-1 has no input norms and no final norm: the input norms' weights are folded into fc "
    "with a constant RMS (embedding half: the mean over the vocabulary; hidden half: the RMS of the "
    "full model's final-norm weight) and the final norm is dropped; drafts will differ from the "
    "native module (serving stays lossless, acceptance drops)"
)


# ------------------------------------------------------------------------------------- helpers

def _dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise RecycleError(f"unknown dtype {dtype!r}; choose one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def _save(tensors: Mapping[str, Tensor], file: Path, dtype: torch.dtype) -> None:
    out = {k: v.detach().to("cpu", dtype).contiguous() for k, v in tensors.items()}
    save_file(out, str(file), metadata={"format": "pt"})


def _same_dir(a: Path, b: Path) -> bool:
    return b.exists() and a.resolve() == b.resolve()


def _load(ckpt_dir: str | Path, out_dir: Path) -> tuple[Config, FullModel, RecyclableModule, Tokenizer]:
    if _same_dir(Path(ckpt_dir), out_dir):
        raise RecycleError(f"export target {out_dir} is the checkpoint itself; choose another directory")
    # Replacing a directory that holds the checkpoint (its run) would delete it; one inside it corrupts it.
    check_not_overlapping(out_dir, "export target", [(ckpt_dir, "the checkpoint"),
                                                     (resolve_checkpoint_dir(ckpt_dir), "the checkpoint")])
    return load_checkpoint(ckpt_dir, device="cpu", dtype=torch.float32)


def _eos(cfg: Config, tokenizer: Tokenizer) -> int | None:
    return cfg.eos_token_id if cfg.eos_token_id is not None else tokenizer.eos_id


# ------------------------------------------------------------------------------ compatibility

def check_module_fits(model_cfg: ModelConfig, module_state_or_cfg: Any) -> None:
    """Raise a one-line RecycleError when a module cannot run on `model_cfg`'s full model.

    `module_state_or_cfg`: the module's checkpoint `Config` or its base `ModelConfig`, an HF/EAGLE
    config dict (hidden_size, vocab_size, ...), or a module state dict (native names, or EAGLE names
    such as fc.weight / embed_tokens.weight / layers.0.self_attn.q_proj.weight).
    """
    d, v = model_cfg.dim, model_cfg.vocab_size
    problems: list[str] = []

    def cmp(what: str, got: Any, want: Any) -> None:
        if got is not None and int(got) != int(want):
            problems.append(f"{what} {int(got)} != {int(want)}")

    if isinstance(module_state_or_cfg, Config):
        module_state_or_cfg = module_state_or_cfg.model
    if isinstance(module_state_or_cfg, ModelConfig):
        mc = module_state_or_cfg
        cmp("hidden size", mc.dim, d)
        cmp("vocabulary", mc.vocab_size, v)
        cmp("attention heads", mc.n_head, model_cfg.n_head)
        cmp("key/value heads", mc.n_kv_head, model_cfg.n_kv_head)
    elif isinstance(module_state_or_cfg, Mapping) and not any(
            isinstance(t, Tensor) for t in module_state_or_cfg.values()):
        c = module_state_or_cfg
        cmp("hidden size", c.get("hidden_size", c.get("dim")), d)
        cmp("vocabulary", c.get("vocab_size"), v)
        cmp("attention heads", c.get("num_attention_heads", c.get("n_head")), model_cfg.n_head)
        cmp("key/value heads", c.get("num_key_value_heads", c.get("n_kv_head")), model_cfg.n_kv_head)
    elif isinstance(module_state_or_cfg, Mapping):
        sd = module_state_or_cfg
        fc = sd.get("fc.weight")
        if fc is None:
            raise RecycleError("module weights have no fc.weight: not a recyclable module / EAGLE draft")
        cmp("hidden size", fc.shape[0], d)
        cmp("fc input width (2 x hidden size)", fc.shape[1], 2 * d)
        emb = sd.get("embed_tokens.weight")
        if emb is not None:
            cmp("vocabulary", emb.shape[0], v)
            cmp("embedding width", emb.shape[1], d)
        for q_name in ("layers.0.attention.wq.weight", "layers.0.self_attn.q_proj.weight"):
            if q_name in sd:
                cmp("attention width", sd[q_name].shape[0], model_cfg.n_head * model_cfg.head_dim)
        for k_name in ("layers.0.attention.wk.weight", "layers.0.self_attn.k_proj.weight"):
            if k_name in sd:
                cmp("key/value width", sd[k_name].shape[0], model_cfg.n_kv_head * model_cfg.head_dim)
    else:
        raise TypeError(f"check_module_fits: unsupported {type(module_state_or_cfg).__name__}")
    if problems:
        raise RecycleError(f"module does not fit this model: {'; '.join(problems)}")


# ----------------------------------------------------------------------------------- export_hf

def _tokenizer_config(tokenizer: Tokenizer, max_len: int) -> dict[str, Any]:
    eos = tokenizer.tok.id_to_token(tokenizer.eos_id) if tokenizer.eos_id is not None else None
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": eos,
        "bos_token": None,
        "pad_token": None,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_len,
    }


def export_hf(ckpt_dir: str | Path, out_dir: str | Path, *, dtype: str | torch.dtype | None = None,
              overwrite: bool = False) -> Path:
    """Write the full model of a recyclegpt checkpoint as an HF directory (config.json,
    model.safetensors, generation_config.json, tokenizer.json, tokenizer_config.json), atomically.

    `LlamaForCausalLM.from_pretrained(out_dir)` (Qwen2ForCausalLM when the model has q/k/v biases)
    gives the same logits. `dtype`: "float32" (default), "bfloat16" or "float16".
    """
    out = Path(out_dir)
    cfg, model, _, tokenizer = _load(ckpt_dir, out)
    torch_dtype = _dtype(dtype)
    eos = _eos(cfg, tokenizer)
    hf_cfg = hf_config_from_model_config(cfg.model, eos_token_id=eos, dtype=torch_dtype)
    with atomic_dir(out, overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(hf_config_dict(hf_cfg), indent=2, sort_keys=True) + "\n")
        _save(to_hf_state_dict(model), tmp / "model.safetensors", torch_dtype)
        (tmp / "generation_config.json").write_text(json.dumps(
            {"eos_token_id": eos, "pad_token_id": eos, "do_sample": False}, indent=2) + "\n")
        tokenizer.save(tmp / "tokenizer.json")
        (tmp / "tokenizer_config.json").write_text(
            json.dumps(_tokenizer_config(tokenizer, cfg.model.max_seq_len), indent=2) + "\n")
    return out


# -------------------------------------------------------------------------------- export_eagle

def eagle_config(model_cfg: ModelConfig, module: RecyclableModule, flavour: Flavour,
                 eos_token_id: int | None = None, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """config.json of the EAGLE-1 draft: the target's Llama settings with num_hidden_layers = the
    module's layers and intermediate_size = its FFN width."""
    if flavour not in FLAVOURS:
        raise RecycleError(f"unknown EAGLE flavour {flavour!r}; choose one of {', '.join(FLAVOURS)}")
    hf = hf_config_from_model_config(model_cfg, eos_token_id=eos_token_id, dtype=dtype)
    _, theta, _ = _rope_settings(hf)
    dtype_name = str(dtype).replace("torch.", "")
    d: dict[str, Any] = {
        "architectures": [EAGLE_ARCHITECTURE[flavour]],
        "model_type": "llama",
        "hidden_size": model_cfg.dim,
        "intermediate_size": module.cfg.ffn_dim or model_cfg.ffn_dim,
        "num_hidden_layers": module.cfg.n_layer,
        "num_attention_heads": model_cfg.n_head,
        "num_key_value_heads": model_cfg.n_kv_head,
        "head_dim": model_cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": model_cfg.max_seq_len,
        "rms_norm_eps": model_cfg.norm_eps,
        "rope_theta": theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "vocab_size": model_cfg.vocab_size,
        # The draft has no head of its own (engines use the target's); false keeps SGLang from
        # aliasing lm_head to embed_tokens before it swaps both for the target's.
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": None,
        "eos_token_id": eos_token_id,
        "pad_token_id": None,
        "torch_dtype": dtype_name,
        "dtype": dtype_name,
        "initializer_range": 0.02,
        "use_cache": True,
    }
    if flavour == "vllm":
        d["bias"] = False  # EAGLE's own loader: fc without bias (engines read "bias" as attention bias)
    if model_cfg.qkv_bias:  # q/k/v biases; o_proj gets a zero bias (see the module docstring)
        d["attention_bias"] = True
        d["qkv_bias"] = True
    return d


def eagle_state_dict(model: FullModel, module: RecyclableModule, flavour: Flavour, *,
                     allow_approximate: bool = False, include_embeddings: bool = True) -> dict[str, Tensor]:
    """EAGLE-1 draft tensors (names without a `model.` prefix) for `module`."""
    if flavour not in FLAVOURS:
        raise RecycleError(f"unknown EAGLE flavour {flavour!r}; choose one of {', '.join(FLAVOURS)}")
    mcfg = module.cfg
    if not mcfg.is_eagle_layout and not allow_approximate:
        raise RecycleError(
            f"this module variant (input_norms={mcfg.input_norms}, final_norm={mcfg.final_norm}) has no "
            "exact EAGLE-1 form; export a default-layout module, or pass allow_approximate=True ("
            + APPROXIMATION_NOTE + ")"
        )
    d = model.cfg.dim
    fc = module.fc.weight.detach().clone()
    if mcfg.input_norms:  # approximate: fold weights with a constant RMS (see APPROXIMATION_NOTE)
        with torch.no_grad():
            emb = model.tok_embeddings.weight.float()
            eps = model.cfg.norm_eps
            inv_rms_e = torch.rsqrt(emb.pow(2).mean(-1) + eps).mean()
            w_f = model.norm.weight.float()
            inv_rms_h = torch.rsqrt(w_f.pow(2).mean() + eps)
            fc[:, :d] *= (module.enorm.weight.float() * inv_rms_e).to(fc.dtype)
            fc[:, d:] *= (module.hnorm.weight.float() * inv_rms_h).to(fc.dtype)
    out: dict[str, Tensor] = {"fc.weight": fc}
    if flavour == "sglang":
        out["fc.bias"] = torch.zeros(d, dtype=fc.dtype)
    if include_embeddings:
        out["embed_tokens.weight"] = model.tok_embeddings.weight.detach()
    for i, block in enumerate(module.layers):
        p = f"layers.{i}."
        att, ff = block.attention, block.feed_forward
        for ours, theirs in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj")):
            lin = getattr(att, ours)
            out[f"{p}self_attn.{theirs}.weight"] = lin.weight.detach()
            if lin.bias is not None:
                out[f"{p}self_attn.{theirs}.bias"] = lin.bias.detach()
            elif ours == "wo" and model.cfg.qkv_bias:  # attention_bias=true also biases o_proj
                out[f"{p}self_attn.o_proj.bias"] = torch.zeros(d, dtype=lin.weight.dtype)
        out[p + "mlp.gate_proj.weight"] = ff.w1.weight.detach()
        out[p + "mlp.up_proj.weight"] = ff.w3.weight.detach()
        out[p + "mlp.down_proj.weight"] = ff.w2.weight.detach()
        if i > 0:
            out[p + "input_layernorm.weight"] = block.attention_norm.weight.detach()
        out[p + "post_attention_layernorm.weight"] = block.ffn_norm.weight.detach()
    return out


def export_eagle(ckpt_dir: str | Path, out_dir: str | Path, flavour: Flavour = "vllm", *,
                 allow_approximate: bool = False, include_embeddings: bool = True,
                 dtype: str | torch.dtype | None = None, overwrite: bool = False) -> Path:
    """Write the checkpoint's recyclable module as an EAGLE-1 draft directory for vLLM or SGLang
    (config.json + model.safetensors, atomically). Serve it with the `export_hf` directory of the same
    checkpoint as the target; see `serving_command`.

    Refuses module variants (input norms, final norm) unless `allow_approximate=True`, which folds
    or drops the norms as `APPROXIMATION_NOTE` states and records it in recyclegpt_export.json.
    `include_embeddings` writes embed_tokens.weight (the full model's, as released EAGLE drafts do;
    engines share the target's when they match).
    """
    out = Path(out_dir)
    cfg, model, module, tokenizer = _load(ckpt_dir, out)
    torch_dtype = _dtype(dtype)
    tensors = eagle_state_dict(model, module, flavour, allow_approximate=allow_approximate,
                               include_embeddings=include_embeddings)
    config = eagle_config(cfg.model, module, flavour, eos_token_id=_eos(cfg, tokenizer), dtype=torch_dtype)
    note = {
        "format": "EAGLE-1 draft",
        "flavour": flavour,
        "exact": module.cfg.is_eagle_layout,
        "approximation": None if module.cfg.is_eagle_layout else APPROXIMATION_NOTE,
        "module": {"n_layer": module.cfg.n_layer, "ffn_dim": module.cfg.ffn_dim,
                   "input_norms": module.cfg.input_norms, "final_norm": module.cfg.final_norm},
        "serve": serving_command(flavour, draft_path=str(out)),
    }
    with atomic_dir(out, overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        _save(tensors, tmp / "model.safetensors", torch_dtype)
        (tmp / "recyclegpt_export.json").write_text(json.dumps(note, indent=2) + "\n")
    return out


# ------------------------------------------------------------------------------ serving commands

def serving_command(flavour: Flavour, *, target_path: str = "TARGET_HF_DIR", draft_path: str = "DRAFT_DIR",
                    num_speculative_tokens: int = 3, port: int = 8000) -> str:
    """The shell command that serves `target_path` (an `export_hf` directory) with the EAGLE draft
    at `draft_path` (an `export_eagle` directory of the same flavour). Chain drafting (top-k 1)."""
    k = int(num_speculative_tokens)
    if k < 1:
        raise RecycleError(f"num_speculative_tokens must be >= 1, got {k}")
    if flavour == "vllm":
        spec = json.dumps({"method": "eagle", "model": draft_path, "num_speculative_tokens": k})
        return f"vllm serve {shlex.quote(target_path)} --port {port} --speculative-config {shlex.quote(spec)}"
    if flavour == "sglang":
        return (
            f"python -m sglang.launch_server --model-path {shlex.quote(target_path)} --port {port} "
            f"--speculative-algorithm EAGLE --speculative-draft-model-path {shlex.quote(draft_path)} "
            f"--speculative-num-steps {k} --speculative-eagle-topk 1 --speculative-num-draft-tokens {k + 1}"
        )
    raise RecycleError(f"unknown EAGLE flavour {flavour!r}; choose one of {', '.join(FLAVOURS)}")


def serving_commands(target_path: str = "TARGET_HF_DIR", vllm_draft: str = "DRAFT_VLLM_DIR",
                     sglang_draft: str = "DRAFT_SGLANG_DIR", num_speculative_tokens: int = 3) -> str:
    """Both engines' commands as README/CLI text."""
    return (
        "# vLLM (EAGLE-1 draft, method eagle)\n"
        + serving_command("vllm", target_path=target_path, draft_path=vllm_draft,
                          num_speculative_tokens=num_speculative_tokens)
        + "\n# SGLang (EAGLE, chain drafting)\n"
        + serving_command("sglang", target_path=target_path, draft_path=sglang_draft,
                          num_speculative_tokens=num_speculative_tokens)
        + "\n"
    )
