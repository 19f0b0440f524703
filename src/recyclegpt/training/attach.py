"""`recyclegpt attach`: train only a recyclable module on a frozen base model, by self-distillation.

BASE is a local transformers directory (Llama / Mistral / Qwen2 load into the native `FullModel`; any
other causal LM, or one the native model cannot express exactly, runs through the generic backend
`recyclegpt.hf.generic`) or a recyclegpt checkpoint (its full model is the base; a fresh module is
trained, or with `init_from_checkpoint` its existing module: a self-distillation phase after joint
training).

Targets (self-distillation, computed on the fly; nothing but the module is ever written): for each
training window x the frozen base runs once, without gradients, giving its states h and its greedy
predictions y_t = argmax p(x_{t+1} | x_{<=t}). Module step s at index t reads (state, x_{t+s}) and is
scored on y_{t+s}: the base's own prediction of x_{t+s+1} given the true prefix, which is exactly
what `verify` accepts. In `JointModel` terms targets[:, j] = y_{j-1} (targets[:, 0] is never
scored), so its `labels[:, s+1:]` at index t is y_{t+s}. With `distill_kl` = w > 0 the target is the
mixture (1-w)·onehot(y) + w·p_base (cross-entropy to it = (1-w)·CE(y) + w·KL(p_base‖q) + const).

Run directory (as `recyclegpt train`):
    run.json             what this run is (base, data, options): a different run refuses --out
    checkpoint/          config.json, module.safetensors, tokenizer.json, model.safetensors (native
                         bases: the converted full model, hard-linked between saves) or a `base`
                         reference in config.json (generic bases); train_state.* for --resume
    metrics.jsonl        one JSON line per log/eval event
    tokens/              the data tokenized with the base's tokenizer
"""

from __future__ import annotations

import dataclasses
import json
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from ..checkpoint import (
    _load_weights,
    load_checkpoint,
    load_config,
    load_into,
    resolve_checkpoint_dir,
    save_checkpoint,
)
from ..config import Config, ModelConfig, ModuleConfig, TokenizerConfig, TrainConfig
from ..data import prepare_tokens, resolve_files
from ..decoding import GenerationConfig, generate
from ..errors import Interrupted, RecycleError, RecycleWarning
from ..files import link_or_copy
from ..hf.convert import SUPPORTED_MODEL_TYPES
from ..hf.export import check_module_fits
from ..hf.generic import (
    DEFAULT_MAX_SEQ_LEN,
    GenericCausalLM,
    generic_base_ref,
    hf_dir_config,
    load_base_tokenizer,
    load_generic,
)
from ..hf.load import load_hf_model_dir
from ..module import RecyclableModule
from ..paths import check_input
from ..runtime import cpu_has_native_bf16
from ..tokenizer import Tokenizer
from .joint import JointModel
from .loop import (
    Batches,
    StepMeter,
    _load_train_state,
    _make_optimizer,
    _protected,
    _save_train_state,
    _signal_stop,
    lr_at,
    nonfinite_error,
    optimizer_step,
)
from .rundir import RunDir, StopSignals

BACKENDS = ("auto", "native", "generic")
BASE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# Module-only training: the loss is the module's alone (recycle_weight 1), a short schedule.
ATTACH_DEFAULTS = dict(seq_len=256, batch_size=8, lr=1e-3, warmup_steps=50, max_steps=1000, eval_every=100,
                       save_every=100, eval_batches=4, recycle_weight=1.0, unroll_steps=2, unroll_decay=0.5,
                       weight_decay=0.0)


@dataclass
class AttachOptions:
    base: str  # transformers model directory or recyclegpt checkpoint
    data: list[str]
    out: str
    # None: a fresh module; "": BASE's own module (BASE must be a recyclegpt checkpoint); a path: the
    # module of that recyclegpt checkpoint (it must fit the base: hidden size, vocabulary, heads).
    init_from_checkpoint: str | None = None
    backend: str = "auto"  # auto: native for Llama/Mistral/Qwen2 it can express exactly, else generic
    max_seq_len: int | None = None  # context cap for a transformers BASE (default min(its context, 2048))
    base_dtype: str = "float32"  # the frozen base's weights (bfloat16 halves memory; implies bf16 autocast)
    max_minutes: float | None = None
    max_steps: int | None = None
    resume: bool = False
    glob: str = "**/*"
    text_field: str = "text"
    val_fraction: float = 0.05
    overrides: dict = field(default_factory=dict)  # TrainConfig fields (lr, batch_size, seq_len, ...)
    module_overrides: dict = field(default_factory=dict)  # ModuleConfig fields (n_layer, ffn_dim, ...)
    distill_kl: float = 0.0  # weight of the base's distribution in the target (0: its argmax only)
    val_prompts: int = 4  # validation prompts decoded with `verify` at each eval (0: teacher-forced only)
    progress: bool = True
    cpu: bool = False
    stop_at_step: int | None = None  # checkpoint and stop early, keeping the schedule of max_steps


# ---- targets ----------------------------------------------------------------------------------

def distill_targets(logits: Tensor, idx: Tensor, kl_weight: float = 0.0) -> Tensor:
    """Self-distillation labels for `JointModel(train_full=False)` from the base's logits [B, T, V] on idx.

    targets[:, j] = y_{j-1} = argmax logits[:, j-1] (the base's guess for x_j given x_{<j});
    targets[:, 0] = idx[:, 0] is a placeholder the joint loss never reads. With kl_weight w > 0 the
    result is [B, T, V] distributions (1-w)·onehot(y) + w·softmax(logits).
    """
    pred = logits.argmax(-1)
    if kl_weight <= 0:
        return torch.cat([idx[:, :1], pred[:, :-1]], 1)
    V = logits.shape[-1]
    soft = (1 - kl_weight) * F.one_hot(pred, V).float() + kl_weight * logits.float().softmax(-1)
    return torch.cat([F.one_hot(idx[:, :1], V).float(), soft[:, :-1]], 1)


@torch.no_grad()
def acceptance_by_position(step_logits: list[Tensor], pred: Tensor) -> tuple[list[float], list[int]]:
    """Teacher-forced acceptance: draft i at index t is 'accepted' when module step i's argmax equals the
    base's own prediction pred[:, t+i]; position i counts only indices whose drafts 1..i-1 were all
    accepted (P(draft i accepted | drafts before accepted)). Returns (rates, proposal counts)."""
    K = len(step_logits)
    T = pred.shape[1]
    L = T - K - 1  # indices every step covers
    if L <= 0:
        return [], []
    alive = torch.ones_like(pred[:, :L], dtype=torch.bool)
    rates, counts = [], []
    for s, lg in enumerate(step_logits, 1):
        agree = lg[:, :L].argmax(-1) == pred[:, s:s + L]
        n = int(alive.sum())
        rates.append(float((alive & agree).sum()) / n if n else 0.0)
        counts.append(n)
        alive &= agree
    return rates, counts


@torch.no_grad()
def sampled_acceptance(step_logits: list[Tensor], base_logits: Tensor) -> list[float]:
    """Teacher-forced acceptance when sampling at temperature 1: for module step s at index t, the
    probability that the speculative rule accepts its draft, sum_v min(p, q) = 1 - TV(p, q), with p the
    base's distribution over x_{t+s+1} (base_logits[:, t+s]) and q the module's; the mean per step.
    (Greedy acceptance can be high while this is low: a sharp, overconfident module.)"""
    T = base_logits.shape[1]
    rates = []
    for s, lg in enumerate(step_logits, 1):
        p = base_logits[:, s:T - 1].float().softmax(-1)  # [B, T-s-1, V]
        q = lg.float().softmax(-1)
        rates.append(float(torch.minimum(p, q).sum(-1).mean()))
    return rates


def expected_tau(rates: list[float]) -> float:
    """Tokens per full pass with k = len(rates) chained drafts: 1 (bonus) + sum_i prod_{j<=i} rate_j."""
    tau, p = 1.0, 1.0
    for r in rates:
        p *= r
        tau += p
    return tau


# ---- the base ---------------------------------------------------------------------------------

@dataclass
class LoadedBase:
    model: nn.Module  # FullModel or GenericCausalLM
    model_cfg: ModelConfig
    tokenizer: Tokenizer
    backend: str  # "native" | "generic"
    base_ref: dict[str, Any] | None  # Config.base for a generic base
    ckpt_cfg: Config | None = None  # BASE is a recyclegpt checkpoint: its config ...
    module: RecyclableModule | None = None  # ... and its module


def _is_checkpoint(p: Path) -> bool:
    ck = resolve_checkpoint_dir(p)
    return (ck / "config.json").is_file() and (ck / "module.safetensors").is_file()


def load_base(base: str | Path, backend: str = "auto", max_seq_len: int | None = None,
              dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> LoadedBase:
    """Load BASE (see the module docstring) frozen, in eval mode."""
    if backend not in BACKENDS:
        raise RecycleError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    p = Path(base)
    if not p.exists():
        raise RecycleError(f"base model not found: {p}")
    if _is_checkpoint(p):
        if backend != "auto" or max_seq_len is not None:
            raise RecycleError("--backend and --max-seq-len apply to a transformers BASE; this BASE is a recyclegpt "
                               "checkpoint and keeps its own")
        cfg, model, module, tok = load_checkpoint(p, device, dtype)
        kind = "generic" if cfg.base is not None else "native"
        return LoadedBase(model, cfg.model, tok, kind, cfg.base, cfg, module)
    raw = hf_dir_config(p) if p.is_dir() else None
    if raw is None:
        raise RecycleError(f"{p} is neither a transformers model directory (config.json + *.safetensors) nor a "
                           "recyclegpt checkpoint")
    max_pos = raw.get("max_position_embeddings") or raw.get("n_positions")
    seq = max_seq_len or min(int(max_pos) if isinstance(max_pos, int) else DEFAULT_MAX_SEQ_LEN, DEFAULT_MAX_SEQ_LEN)
    native_ok = raw.get("model_type") in SUPPORTED_MODEL_TYPES
    if backend == "native" and not native_ok:
        raise RecycleError(f"--backend native loads {', '.join(SUPPORTED_MODEL_TYPES.values())}; this is "
                           f"{raw.get('architectures') or raw.get('model_type')!r}: use --backend generic")
    if backend != "generic" and native_ok:
        try:
            cfg, model, tok, _ = load_hf_model_dir(p, dtype=dtype, device=device, max_seq_len=seq)
        except RecycleError as e:
            if backend == "native" or "cannot load this" not in str(e):
                raise
            warnings.warn(f"{e}; using the generic transformers backend", RecycleWarning, stacklevel=2)
        else:
            return LoadedBase(model, cfg, tok or load_base_tokenizer(p), "native", None)
    model = load_generic(p, dtype=dtype, device=device, max_seq_len=seq)
    return LoadedBase(model, model.cfg, load_base_tokenizer(p), "generic", generic_base_ref(model))


def _module_source(path: str) -> tuple[Config, RecyclableModule]:
    """The module of another recyclegpt checkpoint (its full model is not loaded)."""
    ck = resolve_checkpoint_dir(path)
    cfg = load_config(ck)
    try:
        module = RecyclableModule(cfg.model, cfg.module)
    except ValueError as e:
        raise RecycleError(f"invalid config in {ck}: {e}") from None
    load_into(module, _load_weights(ck / "module.safetensors"), f"{ck}/module.safetensors")
    return cfg, module


def build_module(lb: LoadedBase, init_from: str | None, module_overrides: dict, seed: int
                 ) -> tuple[ModelConfig, ModuleConfig, RecyclableModule, LoadedBase]:
    """(model config, module config, module, base) for a fresh run: fresh, BASE's own, or another's."""
    model_cfg = lb.model_cfg
    if init_from is None:
        base_mod = lb.ckpt_cfg.module if lb.ckpt_cfg is not None else ModuleConfig()
        try:
            module_cfg = dataclasses.replace(base_mod, **module_overrides)
        except TypeError as e:
            raise RecycleError(f"invalid module option: {e}") from None
        torch.manual_seed(seed)
        return model_cfg, module_cfg, RecyclableModule(model_cfg, module_cfg), lb
    if module_overrides:
        raise RecycleError("--module-layers / module options conflict with --init-from-checkpoint (the module "
                           "keeps its own shape)")
    if init_from == "":
        if lb.module is None:
            raise RecycleError("--init-from-checkpoint without a path needs BASE to be a recyclegpt checkpoint "
                               "(its module is trained further); give a checkpoint path, or drop the flag")
        return model_cfg, lb.ckpt_cfg.module, lb.module, lb
    src_cfg, module = _module_source(init_from)
    sm = src_cfg.model
    if lb.backend == "generic":  # the module's attention settings are its own: adopt them
        model_cfg = dataclasses.replace(model_cfg, n_head=sm.n_head, n_kv_head=sm.n_kv_head, ffn_dim=sm.ffn_dim,
                                        rope_theta=sm.rope_theta, norm_eps=sm.norm_eps, qkv_bias=sm.qkv_bias)
    check_module_fits(model_cfg, src_cfg)
    module_cfg = dataclasses.replace(src_cfg.module, ffn_dim=src_cfg.module.ffn_dim or sm.ffn_dim)
    fitted = RecyclableModule(model_cfg, module_cfg)
    load_into(fitted, {k: v for k, v in module.state_dict().items() if not k.startswith("caches.")},
              f"module of {init_from}")
    if lb.backend == "generic" and model_cfg != lb.model_cfg:
        assert isinstance(lb.model, GenericCausalLM)
        lb.model.reconfigure(model_cfg)
        lb = dataclasses.replace(lb, model_cfg=model_cfg)
    return model_cfg, module_cfg, fitted, lb


# ---- validation -------------------------------------------------------------------------------

@torch.no_grad()
def evaluate_attach(base: nn.Module, module: RecyclableModule, val: np.ndarray, tc: TrainConfig, autocast,
                    steps: int, val_prompts: int = 0, eos_id: int | None = None) -> dict[str, Any]:
    """Validation on held-out windows: the distillation loss per module step, teacher-forced acceptance
    by draft position against the base's own greedy predictions (and the tau it implies), and with
    val_prompts > 0 real `verify` decoding of that many held-out prompts (tau, acceptance by position)."""
    module.eval()
    dev = next(module.parameters()).device
    gen = torch.Generator().manual_seed(0)  # the same windows every time: comparable curves
    T = min(tc.seq_len, len(val) - 1)
    if T < steps + 2:
        module.train()
        return {}
    sums: dict[str, float] = {}
    accepted = [0.0] * steps
    proposed = [0] * steps
    sampled = [0.0] * steps
    n = 0
    for _ in range(tc.eval_batches):
        starts = torch.randint(0, max(1, len(val) - T), (tc.batch_size,), generator=gen).tolist()
        idx = torch.from_numpy(np.stack([np.asarray(val[s:s + T], dtype=np.int64) for s in starts])).to(dev)
        with autocast():
            logits, h = base(idx)
            pred = logits.argmax(-1)
            step_logits = module.forward_unrolled(base, idx, h, steps)
        for s, lg in enumerate(step_logits[:tc.unroll_steps], 1):
            ce = F.cross_entropy(lg.flatten(0, 1).float(), pred[:, s:-1].flatten())
            sums[f"ce_module_{s}"] = sums.get(f"ce_module_{s}", 0.0) + float(ce)
        rates, counts = acceptance_by_position(step_logits, pred)
        for i, (r, c) in enumerate(zip(rates, counts, strict=True)):
            accepted[i] += r * c
            proposed[i] += c
        for i, r in enumerate(sampled_acceptance(step_logits, logits)):
            sampled[i] += r
        n += 1
    out: dict[str, Any] = {f"val_{k}": v / n for k, v in sums.items()}
    rates = [a / p if p else 0.0 for a, p in zip(accepted, proposed, strict=True)]
    out["val_acceptance_by_position"] = rates
    out["val_tau_teacher_forced"] = expected_tau(rates)
    out["val_sampled_acceptance_by_position"] = [r / n for r in sampled[:len(step_logits)]]
    out["val_sampled_tau_teacher_forced"] = expected_tau(out["val_sampled_acceptance_by_position"])
    if val_prompts > 0:
        P = min(32, max(1, (base.cfg.max_seq_len - 1) // 2), len(val) // max(1, val_prompts) - 1)
        if P >= 2:
            stride = len(val) // val_prompts
            prompts = [np.asarray(val[i * stride:i * stride + P], dtype=np.int64).tolist() for i in range(val_prompts)]
            new = min(32, base.cfg.max_seq_len - P - 1)
            gc = GenerationConfig(mode="verify", k=steps, max_new_tokens=new, eos_id=eos_id)
            with torch.inference_mode(), autocast():
                res = generate(base, module, prompts, gc)
            out["val_decode_tau"] = res.stats.tau
            out["val_decode_acceptance_by_position"] = res.stats.acceptance_by_position
    module.train()
    return out


# ---- the run ----------------------------------------------------------------------------------

def _train_config(opts: AttachOptions) -> TrainConfig:
    try:
        tc = TrainConfig(**{**ATTACH_DEFAULTS, **opts.overrides})
    except TypeError as e:
        raise RecycleError(f"invalid training option: {e}") from None
    if opts.max_steps is not None:
        tc.max_steps = opts.max_steps
    if tc.unroll_steps < 1:
        raise RecycleError(f"--unroll-steps must be >= 1, got {tc.unroll_steps}")
    if not 0.0 <= opts.distill_kl <= 1.0:
        raise RecycleError(f"--distill-kl must be within [0, 1], got {opts.distill_kl}")
    if opts.base_dtype not in BASE_DTYPES:
        raise RecycleError(f"--base-dtype must be one of {', '.join(BASE_DTYPES)}, got {opts.base_dtype!r}")
    if opts.base_dtype == "bfloat16":
        tc.bf16 = True  # the fp32 module meets bf16 states only under autocast
    elif "bf16" not in opts.overrides:
        tc.bf16 = cpu_has_native_bf16() or torch.cuda.is_available()
    return tc


def _identity(opts: AttachOptions, tc: TrainConfig) -> dict[str, Any]:
    def absolute(p: str) -> str:
        return str(Path(p).resolve())

    return {
        "command": "attach",
        "base": absolute(opts.base),
        "backend": opts.backend,
        "init_from_checkpoint": None if opts.init_from_checkpoint is None else (
            "" if opts.init_from_checkpoint == "" else absolute(opts.init_from_checkpoint)),
        "data": [absolute(d) if d != "stdlib" else "stdlib" for d in opts.data],
        "glob": opts.glob,
        "max_seq_len": opts.max_seq_len,
        "base_dtype": opts.base_dtype,
        "distill_kl": opts.distill_kl,
        "module": dict(sorted(opts.module_overrides.items())),
        "train": {k: v for k, v in dataclasses.asdict(tc).items() if k != "max_steps"},
    }


def attach(opts: AttachOptions) -> Path:
    """Run (or resume) an attach run; returns the checkpoint directory (OUT/checkpoint)."""
    tc = _train_config(opts)
    identity = _identity(opts, tc)
    check_input(opts.base, "BASE", "dir")
    init_from = opts.init_from_checkpoint or None
    if init_from:
        check_input(init_from, "--init-from-checkpoint", "dir")
    files = resolve_files(opts.data, opts.glob)
    protect = _protected(opts.data, BASE=opts.base, **{"--init-from-checkpoint": init_from})
    rd = RunDir(opts.out, identity, opts.resume, protect)
    rd.check()
    with StopSignals() as sig:
        try:
            return _attach(opts, tc, rd, files, sig)
        except BaseException:
            rd.failed()
            raise


def _attach(opts: AttachOptions, tc: TrainConfig, rd: RunDir, files: list[Path], sig: StopSignals) -> Path:
    out, identity = rd.out, rd.identity
    ckpt_dir = out / "checkpoint"
    device = torch.device("cuda" if torch.cuda.is_available() and not opts.cpu else "cpu")
    base_dtype = BASE_DTYPES[opts.base_dtype]

    resuming = not rd.fresh
    if resuming:
        rd.begin()  # a save interrupted between its two renames: its previous copy moves back
        cfg, base, module, tokenizer = load_checkpoint(ckpt_dir, device, base_dtype)
        backend = "generic" if cfg.base is not None else "native"
        if base_dtype != torch.float32:  # the module trains in fp32: reload it without the round trip
            module = RecyclableModule(cfg.model, cfg.module)
            load_into(module, _load_weights(ckpt_dir / "module.safetensors"), f"{ckpt_dir}/module.safetensors")
    else:
        lb = load_base(opts.base, opts.backend, opts.max_seq_len, base_dtype, device)
        model_cfg, module_cfg, module, lb = build_module(lb, opts.init_from_checkpoint, opts.module_overrides,
                                                         tc.seed)
        base, tokenizer, backend = lb.model, lb.tokenizer, lb.backend
        if tokenizer.eos_id is None:
            raise RecycleError("the base's tokenizer has no end-of-sequence token (needed to separate documents)")
        if tokenizer.vocab_size > model_cfg.vocab_size:
            raise RecycleError(f"the base's tokenizer has {tokenizer.vocab_size} tokens, more than its model's "
                               f"vocabulary {model_cfg.vocab_size}")
        eos_text = tokenizer.tok.id_to_token(tokenizer.eos_id)
        cfg = Config(model=model_cfg, module=module_cfg,
                     tokenizer=TokenizerConfig(vocab_size=tokenizer.vocab_size, eos_token=eos_text),
                     eos_token_id=tokenizer.eos_id, base=lb.base_ref)
    if "seq_len" not in opts.overrides:
        tc.seq_len = min(tc.seq_len, cfg.model.max_seq_len)
    if tc.seq_len > cfg.model.max_seq_len:
        raise RecycleError(f"--seq-len {tc.seq_len} exceeds the base's context {cfg.model.max_seq_len} "
                           "(raise --max-seq-len where the base allows)")

    if not resuming:
        rd.begin()  # creates --out, marked as starting until the first checkpoint
    data = prepare_tokens(files, tokenizer, out / "tokens", opts.val_fraction, opts.text_field,
                          progress=opts.progress)
    (out / "run.json").write_text(json.dumps(identity, indent=1))

    base.requires_grad_(False)
    base.eval()
    module.to(device=device, dtype=torch.float32).train()
    joint = JointModel(base, module, tc.recycle_weight, tc.unroll_steps, tc.unroll_decay, train_full=False)
    opt = _make_optimizer(joint, tc)
    batches = Batches(data.train, tc.seq_len, tc.batch_size, tc.seed, 0, 1)
    step, tokens_seen, last_saved = 0, 0, None
    if resuming:
        info = _load_train_state(ckpt_dir, opt, batches)
        step, tokens_seen = info["step"], info["tokens_seen"]
        last_saved = step

    def autocast():
        if not tc.bf16:
            return nullcontext()
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)

    eval_steps = max(3, tc.unroll_steps)

    def log(rec: dict) -> None:
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")

    def checkpoint() -> None:
        info = {"step": step, "tokens_seen": tokens_seen, "train": dataclasses.asdict(tc)}
        old_model = ckpt_dir / "model.safetensors"
        reuse = backend == "native" and old_model.is_file()

        def extra(d: Path) -> None:
            if reuse:  # the frozen base never changes: link the file the last save wrote
                link_or_copy(old_model, d / "model.safetensors")
            _save_train_state(d, opt, batches, info)

        full = base if backend == "native" and not reuse else None
        save_checkpoint(ckpt_dir, cfg, full, module, tokenizer, write_extra=extra)
        rd.saved()

    n_base = base.num_params()
    n_mod = module.num_params()
    log({"event": "start", "step": step, "backend": backend, "base": identity["base"], "params_base": n_base,
         "params_module": n_mod, "module_share": n_mod / (n_base + n_mod), "train_tokens": int(len(data.train)),
         "val_tokens": int(len(data.val)), "distill_kl": opts.distill_kl})
    t0 = time.time()
    deadline = t0 + opts.max_minutes * 60 if opts.max_minutes else None
    bar = tqdm(total=tc.max_steps, initial=step, disable=not opts.progress, unit="step", dynamic_ncols=True,
               desc="attach")
    tok_per_step = tc.batch_size * tc.seq_len * tc.grad_accum
    meter = StepMeter(step, tok_per_step, bar, log, {"module": "ce_module_1"}, deadline, opts.stop_at_step)
    last_eval: dict[str, Any] = {}
    saved_at = step if resuming else -1
    sig.deferred = True  # from here a signal checkpoints at the next step boundary
    while step < tc.max_steps:
        lr = lr_at(step, tc)
        for g in opt.param_groups:
            g["lr"] = lr
        loss_sum = None
        for _ in range(tc.grad_accum):
            idx = batches.next().to(device)
            with autocast():
                with torch.no_grad():
                    logits, h = base(idx)
                targets = distill_targets(logits, idx, opts.distill_kl)
                loss, metrics = joint(idx, targets, h=h)
            (loss / tc.grad_accum).backward()
            loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
        if not optimizer_step(opt, (lambda: torch.nn.utils.clip_grad_norm_(module.parameters(), tc.grad_clip))
                              if tc.grad_clip > 0 else None, loss_sum):
            raise nonfinite_error(step, last_saved, ckpt_dir)
        step += 1
        tokens_seen += tok_per_step
        stop = meter.update(step, lr, tokens_seen, metrics, last=step == tc.max_steps)
        signum = _signal_stop(sig)
        if signum is not None:  # SIGINT/SIGTERM: keep this step, then stop
            bar.close()
            checkpoint()
            raise Interrupted(signum, step, str(ckpt_dir))
        if step % tc.eval_every == 0 or step == tc.max_steps or stop:
            last_eval = evaluate_attach(base, module, data.val, tc, autocast, eval_steps, opts.val_prompts,
                                        tokenizer.eos_id)
            log({"event": "eval", "step": step, "tokens_seen": tokens_seen, "minutes": (time.time() - t0) / 60,
                 **last_eval})
            bar.write(_eval_line(step, last_eval))
        if step % tc.save_every == 0 or step == tc.max_steps or stop:
            checkpoint()
            saved_at = last_saved = step
        if stop:
            break
    bar.close()
    if saved_at != step:
        checkpoint()
    log({"event": "end", "step": step, "tokens_seen": tokens_seen, "minutes": (time.time() - t0) / 60})
    return ckpt_dir


def _eval_line(step: int, ev: dict[str, Any]) -> str:
    parts = [f"step {step}:"]
    if "val_ce_module_1" in ev:
        parts.append(f"val module {ev['val_ce_module_1']:.3f}")
    if ev.get("val_acceptance_by_position"):
        parts.append("accept (teacher-forced) " + " ".join(f"{r:.2f}" for r in ev["val_acceptance_by_position"]))
    if ev.get("val_sampled_acceptance_by_position"):
        parts.append("at T=1 " + " ".join(f"{r:.2f}" for r in ev["val_sampled_acceptance_by_position"]))
    if "val_decode_tau" in ev:
        acc = " ".join(f"{r:.2f}" for r in ev.get("val_decode_acceptance_by_position", []))
        parts.append(f"verify: tau {ev['val_decode_tau']:.2f}, accept {acc}")
    return "  ".join(parts)


__all__ = ["AttachOptions", "attach", "distill_targets", "acceptance_by_position", "sampled_acceptance",
           "expected_tau", "load_base", "evaluate_attach"]
