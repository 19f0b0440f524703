"""Generic backend: any transformers causal LM as the full model (`AutoModelForCausalLM`).

Architectures the native `FullModel` cannot express (GPT-2, Phi, Gemma, Falcon, ... or a Llama with
rope scaling) run through transformers itself. `GenericCausalLM` exposes exactly what the decoding
engine, the training code and the recyclable module use from `FullModel`:

    cfg                      ModelConfig: vocab_size / dim / max_seq_len of the base, and the module's own
                             attention settings (n_head, n_kv_head, ffn_dim, rope_theta, norm_eps)
    forward(idx, input_pos, logits) -> (logits, h)   h = the last hidden state after the final norm
                             (what the base's LM head reads); input_pos None: plain causal pass
    prefill(idx, rows) -> h  prompts from position 0 into the caches of rows `rows`
    setup_caches(batch, dtype), embed(idx), lm_head(h), tok_embeddings, num_params()
    rope_cos / rope_sin / key_pos   tables for the module's own attention (the base's are its own business)

Caching: one transformers `DynamicCache` per batch row. Before each call the row's cache is cropped
back to the call's first position (rollback after rejected drafts: the rejected entries are always
the tail of the previous call), so every mode stays exact. Rows are run one after another, so
batch > 1 works (different rows at different positions included) but costs a pass per row; batch 1
is the fast case. A cache that cannot be cropped (e.g. a sliding window that has already dropped
what is needed) is rebuilt from the row's token history: still exact, only slower. Each call's
positions must be contiguous per row and start at most at the row's cached length (the engine's
calls always are); anything else is refused with a RecycleError. The last position of the context,
max_seq_len - 1, is the decoding engine's junk position (idle slots, padding past the context):
entries there are not computed, so finished and free slots cost no pass.

Checked once when loading (`probe`): the hidden state really is what the head reads (logits equal
lm_head(h); Gemma-2 logit soft-capping and Cohere's logit_scale are applied in `lm_head`, any other
transformation of the logits is refused) and a cropped cache reproduces an uncached pass (otherwise
the backend falls back to recomputing the prefix every call).
"""

from __future__ import annotations

import inspect
import math
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..config import ModelConfig
from ..errors import RecycleError, RecycleWarning
from ..layers import rope_tables
from ..tokenizer import Tokenizer

DEFAULT_MAX_SEQ_LEN = 2048  # context cap when the caller gives none (the module's KV cache is sized by it)


def _text_config(hf_config: Any) -> Any:
    get = getattr(hf_config, "get_text_config", None)
    if get is None:
        return hf_config
    try:
        return get(decoder=True)
    except TypeError:
        return get()


def _max_positions(c: Any) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        v = getattr(c, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def module_model_config(hf_config: Any, vocab_size: int, dim: int, max_seq_len: int | None = None,
                        n_layer: int | None = None) -> ModelConfig:
    """The `ModelConfig` a recyclable module on this base uses: dim and vocabulary of the base, the
    module's own attention (the base's head count when it divides the width into even heads, else
    64-wide heads), FFN width (the base's intermediate_size, else ~8/3 d) and RoPE theta."""
    c = _text_config(hf_config)
    max_pos = _max_positions(c)
    if max_seq_len is None:
        seq = min(max_pos or DEFAULT_MAX_SEQ_LEN, DEFAULT_MAX_SEQ_LEN)
    else:
        seq = int(max_seq_len)
        if max_pos is not None and seq > max_pos:
            raise RecycleError(f"a context of {seq} tokens (--max-seq-len) exceeds the base model's context "
                               f"({max_pos} positions)")
    n_head = getattr(c, "num_attention_heads", None)
    if not isinstance(n_head, int) or n_head <= 0 or dim % n_head or (dim // n_head) % 2:
        n_head = next((dim // hd for hd in (128, 64, 32, 16, 8, 4, 2) if dim % hd == 0), None)
        if n_head is None:
            raise RecycleError(f"the base's hidden size {dim} cannot be split into attention heads of even width")
    n_kv = getattr(c, "num_key_value_heads", None)
    if not isinstance(n_kv, int) or n_kv <= 0 or n_head % n_kv:
        n_kv = n_head
    ffn = getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None)
    if not isinstance(ffn, int) or ffn <= 0:
        ffn = int(math.ceil(8 * dim / 3 / 64) * 64)
    theta = 10000.0
    params = getattr(c, "rope_parameters", None)
    if isinstance(params, dict) and isinstance(params.get("rope_theta"), int | float):
        theta = float(params["rope_theta"])
    elif isinstance(getattr(c, "rope_theta", None), int | float):
        theta = float(c.rope_theta)
    eps = next((float(v) for v in (getattr(c, n, None) for n in ("rms_norm_eps", "layer_norm_epsilon",
                                                                   "layer_norm_eps", "norm_eps"))
                if isinstance(v, int | float)), 1e-5)
    layers = n_layer or getattr(c, "num_hidden_layers", None) or getattr(c, "n_layer", None) or 1
    cfg = ModelConfig(vocab_size=vocab_size, dim=dim, n_layer=int(layers), n_head=n_head, n_kv_head=n_kv,
                      ffn_dim=int(ffn), max_seq_len=seq, rope_theta=theta, norm_eps=eps,
                      tie_embeddings=bool(getattr(c, "tie_word_embeddings", False)), qkv_bias=False)
    try:
        cfg.validate()
    except ValueError as e:
        raise RecycleError(f"cannot fit a recyclable module to this base: {e}") from None
    return cfg


@dataclass
class _Row:
    """One batch row's transformers cache and the tokens it holds (positions 0..len-1)."""

    cache: Any = None
    tokens: Tensor | None = None
    rebuilds: int = 0

    @property
    def length(self) -> int:
        return 0 if self.tokens is None else int(self.tokens.shape[0])


class GenericCausalLM(nn.Module):
    """A transformers causal LM behind the `FullModel` interface (see the module docstring)."""

    def __init__(self, hf_model: nn.Module, cfg: ModelConfig, source: str = "", check: bool = True):
        super().__init__()
        emb, head = hf_model.get_input_embeddings(), hf_model.get_output_embeddings()
        if emb is None or head is None or not hasattr(emb, "weight") or not hasattr(head, "weight"):
            raise RecycleError(f"{source or 'the base model'}: needs an input embedding and a linear LM head "
                               "(get_input_embeddings / get_output_embeddings)")
        self.hf = hf_model.eval().requires_grad_(False)
        self.tok_embeddings = emb
        self.head = head
        self.cfg = cfg
        self.source = source
        self._check_fits(cfg)
        dev = emb.weight.device
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos.to(dev), persistent=False)
        self.register_buffer("rope_sin", sin.to(dev), persistent=False)
        self.register_buffer("key_pos", torch.arange(cfg.max_seq_len, device=dev), persistent=False)
        self.caches = nn.ModuleList()  # holds no modules: `caches.rows` are the per-row transformers caches
        self.caches.rows = []
        self.use_backbone = True  # base_model(...).last_hidden_state; else hidden_states[-1]
        self.cache_mode = "dynamic"  # or "recompute" (no usable cache: rerun the prefix every call)
        self._pos_ok: dict[bool, bool] = {}
        tc = _text_config(hf_model.config)
        scale, cap = getattr(tc, "logit_scale", None), getattr(tc, "final_logit_softcapping", None)
        self._logit_scale = float(scale) if isinstance(scale, int | float) and scale != 1 else None
        self._softcap = float(cap) if isinstance(cap, int | float) and cap > 0 else None
        if check:
            self.probe()

    # ------------------------------------------------------------------ FullModel interface
    def _check_fits(self, cfg: ModelConfig) -> None:
        v, d = self.head.weight.shape
        problems = []
        if self.tok_embeddings.weight.shape[1] != d:
            problems.append(f"embedding width {self.tok_embeddings.weight.shape[1]} != hidden size {d} "
                            "(factorised embeddings are not supported)")
        if self.tok_embeddings.weight.shape[0] < v:
            problems.append(f"embedding rows {self.tok_embeddings.weight.shape[0]} < LM head rows {v}")
        if cfg.dim != d:
            problems.append(f"hidden size {d} != {cfg.dim} expected by the module")
        if cfg.vocab_size != v:
            problems.append(f"vocabulary {v} != {cfg.vocab_size} expected by the module")
        if problems:
            raise RecycleError(f"base model {self.source} does not fit: {'; '.join(problems)}")

    def reconfigure(self, cfg: ModelConfig) -> None:
        """Serve a module with other attention settings (heads, RoPE theta, context): new tables, same base."""
        self._check_fits(cfg)
        self.cfg = cfg
        dev, dt = self.rope_cos.device, self.rope_cos.dtype
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.rope_cos, self.rope_sin = cos.to(dev, dt), sin.to(dev, dt)
        self.key_pos = torch.arange(cfg.max_seq_len, device=dev)

    def embed(self, idx: Tensor) -> Tensor:
        return self.tok_embeddings(idx)

    def lm_head(self, h: Tensor) -> Tensor:
        logits = self.head(h)
        if self._logit_scale is not None:  # Cohere
            logits = logits * self._logit_scale
        if self._softcap is not None:  # Gemma 2
            logits = torch.tanh(logits / self._softcap) * self._softcap
        return logits

    def num_params(self) -> int:
        return sum(p.numel() for p in self.hf.parameters())

    def train(self, mode: bool = True) -> GenericCausalLM:
        """The base is frozen: it stays in eval mode (no dropout) whatever the caller asks."""
        super().train(mode)
        self.hf.eval()
        return self

    def setup_caches(self, batch: int, dtype: torch.dtype | None = None) -> None:
        """Fresh per-row caches (transformers keeps them in the model's own dtype). They live on `caches` as
        a native model's do, so whoever installs a `caches` object (the decoding engine) installs these."""
        self.caches = nn.ModuleList()
        self.caches.rows = [_Row() for _ in range(batch)]

    def forward(self, idx: Tensor, input_pos: Tensor | None = None, logits: bool = True
                ) -> tuple[Tensor | None, Tensor]:
        """idx [B, T]; input_pos [B, T] (per-row caches) or None (plain causal pass, no cache)."""
        if input_pos is None:
            h = self._run(idx, None, None)
        else:
            if len(self.caches.rows) != idx.shape[0]:
                raise RecycleError(f"generic backend: caches are set up for batch {len(self.caches.rows)}, "
                                   f"called with {idx.shape[0]} rows (call setup_caches first)")
            h = torch.cat([self._live_row_forward(b, idx[b], input_pos[b]) for b in range(idx.shape[0])], 0)
        return (self.lm_head(h) if logits else None), h

    def _live_row_forward(self, b: int, idx: Tensor, pos: Tensor) -> Tensor:
        """Row b of a decoding round: only its positions before max_seq_len - 1 are computed. That last
        position is the engine's junk position (idle slots and padding past the context go there; no
        true token is ever processed at it), so an idle row costs nothing and its junk rows are zeros."""
        live = int((pos < self.cfg.max_seq_len - 1).sum())
        dim = self.head.weight.shape[1]
        if live == 0:
            return self.head.weight.new_zeros(1, idx.shape[0], dim)
        h = self._row_forward(b, idx[:live], pos[:live])
        if live < idx.shape[0]:
            h = torch.cat([h, h.new_zeros(1, idx.shape[0] - live, dim)], 1)
        return h

    def prefill(self, idx: Tensor, rows: Tensor) -> Tensor:
        """Prompts idx [G, T] (right-padded; the next call crops the padding) from position 0 into rows
        `rows` [G]; returns h [G, T, d]."""
        pos = torch.arange(idx.shape[1], device=idx.device)
        return torch.cat([self._row_forward(int(b), idx[i], pos) for i, b in enumerate(rows.tolist())], 0)

    # ------------------------------------------------------------------ internals
    def _new_cache(self) -> Any:
        from transformers import DynamicCache

        try:
            cache = DynamicCache(config=self.hf.config)
        except TypeError:  # older transformers
            cache = DynamicCache()
        if hasattr(cache, "activate_past_recording"):  # sliding-window layers keep what a rollback needs
            cache.activate_past_recording()
        return cache

    def _run(self, idx: Tensor, pos: Tensor | None, cache: Any) -> Tensor:
        kw: dict[str, Any] = {"input_ids": idx, "use_cache": cache is not None}
        if cache is not None:
            kw["past_key_values"] = cache
        if pos is not None and self._takes_position_ids():
            kw["position_ids"] = pos  # (after the crop they equal the cache length anyway: models without
            # position_ids, e.g. ALiBi ones, derive the same positions from it)
        if self.use_backbone:
            out = self.hf.base_model(**kw)
            h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        else:
            h = self.hf(**kw, output_hidden_states=True).hidden_states[-1]
        return h

    def _takes_position_ids(self) -> bool:
        known = self._pos_ok.get(self.use_backbone)
        if known is None:
            fn = (self.hf.base_model if self.use_backbone else self.hf).forward
            try:
                params = inspect.signature(fn).parameters
                known = "position_ids" in params or any(p.kind == p.VAR_KEYWORD for p in params.values())
            except (TypeError, ValueError):
                known = True
            self._pos_ok[self.use_backbone] = known
        return known

    @staticmethod
    def _crop(cache: Any, length: int, remove: int) -> None:
        # A negative argument means "remove this many" in every transformers version; crop(0) is only
        # meaningful (restrict sliding windows) where past recording exists.
        if remove > 0 or (remove == 0 and hasattr(cache, "activate_past_recording")):
            cache.crop(-remove)
        if cache.get_seq_length() != length:
            raise RuntimeError(f"cache holds {cache.get_seq_length()} entries after crop, expected {length}")

    def _row_forward(self, b: int, idx: Tensor, pos: Tensor) -> Tensor:
        """Row b: tokens idx [T] at contiguous positions pos [T]; returns h [1, T, d]."""
        row = self.caches.rows[b]
        T = idx.shape[0]
        p0 = int(pos[0])
        if T > 1 and int(pos[-1]) - p0 != T - 1:
            raise RecycleError("generic backend: positions within a call must be contiguous")
        if p0 > row.length:
            raise RecycleError(f"generic backend: row {b} is called at position {p0} but holds only "
                               f"{row.length} tokens")
        prefix = idx.new_zeros(0) if row.tokens is None else row.tokens[:p0]
        tokens = torch.cat([prefix, idx])
        row.tokens = tokens
        if self.cache_mode == "recompute":
            return self._run(tokens[None], None, None)[:, p0:]
        if p0 == 0 or row.cache is None:
            row.cache = self._new_cache()
            if p0 > 0:  # (not reached by the engine) fill the cache with the prefix first
                self._run(prefix[None], torch.arange(p0, device=idx.device)[None], row.cache)
        else:
            try:
                self._crop(row.cache, p0, row.cache.get_seq_length() - p0)
            except (RuntimeError, ValueError, NotImplementedError, AttributeError, IndexError):
                row.rebuilds += 1  # rebuild from the token history: exact, just slower
                row.cache = self._new_cache()
                h = self._run(tokens[None], torch.arange(p0 + T, device=idx.device)[None], row.cache)
                return h[:, p0:]
        return self._run(idx[None], pos[None], row.cache)

    @torch.no_grad()
    def probe(self) -> None:
        """Check the head reads our h, and that a cropped cache reproduces an uncached pass."""
        dev = self.tok_embeddings.weight.device
        dtype = self.tok_embeddings.weight.dtype
        tol = 1e-3 if dtype == torch.float32 else 5e-2
        gen = torch.Generator().manual_seed(0)
        T = min(8, self.cfg.max_seq_len)
        x = torch.randint(0, self.cfg.vocab_size, (1, T), generator=gen).to(dev)

        def close(a: Tensor, b: Tensor) -> bool:
            a, b = a.float(), b.float()
            return bool(torch.allclose(a, b, rtol=tol, atol=tol * max(1.0, b.abs().max().item())))

        try:
            ref = self.hf(input_ids=x, use_cache=False).logits
        except Exception as e:  # a broken model is the user's to fix; say what transformers said
            raise RecycleError(f"base model {self.source} fails a forward pass: {str(e).splitlines()[0]}") from None
        h = None
        try:
            h = self._run(x, None, None)
        except Exception:
            h = None
        if h is None or h.shape[:2] != x.shape or not close(self.lm_head(h), ref):
            self.use_backbone = False
            try:
                h = self._run(x, None, None)
            except Exception as e:
                raise RecycleError(f"base model {self.source} returns no hidden states: "
                                   f"{str(e).splitlines()[0]}") from None
            if not close(self.lm_head(h), ref):
                raise RecycleError(
                    f"base model {self.source}: its logits are not its LM head applied to the last hidden "
                    "state (an unknown logit soft-capping or scaling); the recyclable module cannot share this head")
        if T < 4:
            return
        try:
            self.setup_caches(1)
            cut = T // 2
            self._row_forward(0, x[0, : cut + 1], torch.arange(cut + 1, device=dev))
            h2 = self._row_forward(0, x[0, cut:], torch.arange(cut, T, device=dev))  # rolls back one entry
            ok = close(h2[0], h[0, cut:])
        except Exception:
            ok = False
        if not ok:
            self.cache_mode = "recompute"
        self.caches.rows = []


# ----------------------------------------------------------------------------------- loading

def hf_dir_config(path: Path) -> dict[str, Any] | None:
    """config.json of a transformers model directory, or None when `path` is not one."""
    from .load import read_json

    f = path / "config.json"
    if not f.is_file():
        return None
    d = read_json(f, "model config")
    return d if ("model_type" in d or "architectures" in d) else None


def load_generic(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 max_seq_len: int | None = None, cfg: ModelConfig | None = None) -> GenericCausalLM:
    """Load a local transformers causal-LM directory (safetensors weights only) behind the generic
    backend. `cfg`: the module's ModelConfig recorded in a checkpoint (checked against the base);
    default: derived from the base (`module_model_config`)."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not path.is_dir():
        raise RecycleError(f"base model directory not found: {path}")
    if hf_dir_config(path) is None:
        raise RecycleError(f"{path} is not a transformers model directory (no config.json with model_type)")
    if not any(path.glob("*.safetensors")):
        if any(path.glob("*.bin")) or any(path.glob("*.pt")):
            raise RecycleError(f"{path} has only pickle weights; recyclegpt loads safetensors only: re-save the "
                               "model with save_pretrained (transformers writes safetensors)")
        raise RecycleError(f"no weights (*.safetensors) in {path}")
    try:
        hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True,
                                                  use_safetensors=True)
    except TypeError:  # transformers 4 spells it torch_dtype
        hf = AutoModelForCausalLM.from_pretrained(str(path), torch_dtype=dtype, local_files_only=True,
                                                  use_safetensors=True)
    except (OSError, ValueError, KeyError) as e:
        raise RecycleError(f"transformers cannot load {path} as a causal LM: {str(e).splitlines()[0]}") from None
    hf = hf.to(device=device, dtype=dtype)
    head = hf.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise RecycleError(f"{path}: the model has no linear LM head")
    vocab, dim = head.weight.shape
    if cfg is None:
        cfg = module_model_config(hf.config, vocab, dim, max_seq_len)
    model = GenericCausalLM(hf, cfg, source=str(path))
    if model.cache_mode != "dynamic":
        warnings.warn(f"{path}: its transformers cache cannot be rolled back exactly; every pass recomputes the "
                      "whole prefix (exact, but slow)", RecycleWarning, stacklevel=2)
    return model


def load_base_tokenizer(path: str | Path) -> Tokenizer:
    """The base's tokenizer as a recyclegpt `Tokenizer` (tokenizer.json, or the fast tokenizer
    transformers builds from vocab/merges files); EOS from the tokenizer/model configs."""
    from .load import load_tokenizer, read_json

    path = Path(path)
    raw = hf_dir_config(path) or {}
    tok, _ = load_tokenizer(path, raw)
    if tok is not None:
        return tok
    try:
        from transformers import AutoTokenizer

        at = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # transformers raises many kinds here
        raise RecycleError(f"no usable tokenizer in {path} (no tokenizer.json; transformers: "
                           f"{str(e).splitlines()[0]})") from None
    backend = getattr(at, "backend_tokenizer", None)
    if backend is None:
        raise RecycleError(f"the tokenizer in {path} is a slow (Python) tokenizer; recyclegpt needs a fast one "
                           "(tokenizer.json): convert it with transformers and save_pretrained")
    eos = at.eos_token if isinstance(at.eos_token, str) else None
    if eos is None:
        gen = path / "generation_config.json"
        ids = raw.get("eos_token_id", read_json(gen, "generation config").get("eos_token_id")
                      if gen.is_file() else None)
        first = ids[0] if isinstance(ids, list) and ids else ids
        if isinstance(first, int):
            eos = backend.id_to_token(first)
    return Tokenizer(backend, eos)


def copy_base_dir(base: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """`export --format hf` for a generic-base checkpoint: its full model is the transformers directory
    it references; copy that (atomically) so the export is self-contained."""
    from ..files import atomic_dir

    base, out = Path(base), Path(out_dir)
    if not base.is_dir():
        raise RecycleError(f"the checkpoint's base model directory is missing: {base}")
    if out.exists() and out.resolve() == base.resolve():
        raise RecycleError(f"export target {out} is the base model itself; choose another directory")
    from ..paths import check_not_overlapping

    check_not_overlapping(out, "export target", [(base, "the base model")])
    with atomic_dir(out, overwrite) as tmp:
        for f in sorted(base.iterdir()):
            if f.name.startswith("."):
                continue
            if f.is_dir():
                shutil.copytree(f, tmp / f.name)
            else:
                shutil.copy2(f, tmp / f.name)
    return out


def generic_base_ref(model: GenericCausalLM) -> dict[str, Any]:
    """What a checkpoint's config.json records about a generic base (`Config.base`)."""
    c = model.hf.config
    return {"backend": "generic", "path": str(Path(model.source).resolve()),
            "model_type": getattr(c, "model_type", None),
            "architectures": list(getattr(c, "architectures", None) or [])}


def load_base_ref(base: dict[str, Any], cfg: ModelConfig, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32) -> GenericCausalLM:
    """The full model a checkpoint's `base` entry points at, checked against the module's config."""
    backend = base.get("backend", "generic")
    if backend != "generic":
        raise RecycleError(f"unknown base backend {backend!r} in config.json (this recyclegpt knows 'generic')")
    path = base.get("path")
    if not isinstance(path, str) or not Path(path).is_dir():
        raise RecycleError(f"this checkpoint's base model is not at {path!r} any more: put it back, or edit "
                           "\"base\": {\"path\": ...} in the checkpoint's config.json")
    return load_generic(path, dtype=dtype, device=device, cfg=cfg)
