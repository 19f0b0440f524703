"""`recyclegpt train`: joint training of the full model and the recyclable module.

Runs through Hugging Face `accelerate`, so `accelerate launch --num_processes N recyclegpt train ...`
trains data-parallel with no code change; each rank samples windows from its own shard.

Run directory:
    run.json             what this run is (config, data, options): a different run refuses --out
    checkpoint/          latest checkpoint (config.json, *.safetensors, tokenizer.json) plus
                         train_state.safetensors / train_state.json for --resume (no pickle)
    metrics.jsonl        one JSON line per log/eval event
    tokens/              tokenized corpus cache (train.bin, val.bin, manifest.json)
    .starting            present until the first checkpoint: a start that fails removes what it wrote

Faults (see rundir.py): --out is checked before any work; --resume refuses a run whose training state is
missing or corrupt (and recovers a checkpoint whose replacement was cut between its two renames);
SIGINT/SIGTERM save a checkpoint at the next step boundary, then raise `Interrupted`; a step whose loss
or gradients are not finite is not applied and stops the run, keeping the last good checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from ..checkpoint import load_checkpoint, save_checkpoint
from ..config import Config, TrainConfig, preset
from ..data import TokenData, iter_documents, prepare_tokens, resolve_files
from ..data.corpus import is_validation
from ..errors import Interrupted, RecycleError
from ..model import FullModel
from ..module import RecyclableModule
from ..paths import check_input, read_error
from ..tokenizer import Tokenizer, iter_texts_chunked
from .joint import JointModel, agreement
from .rundir import RunDir, StopSignals

TOKENIZER_TRAIN_CHARS = 40_000_000


@dataclass
class TrainOptions:
    data: list[str]
    out: str
    preset: str = "small"
    max_minutes: float | None = None
    max_steps: int | None = None
    resume: bool = False
    tokenizer: str | None = None  # an existing tokenizer.json; default: train a BPE on the data
    glob: str = "**/*"
    text_field: str = "text"
    val_fraction: float = 0.05
    overrides: dict = field(default_factory=dict)  # TrainConfig fields (lr, batch_size, ...)
    model_overrides: dict = field(default_factory=dict)  # ModelConfig fields
    module_overrides: dict = field(default_factory=dict)  # ModuleConfig fields
    progress: bool = True
    cpu: bool = False  # force CPU even where CUDA exists
    stop_at_step: int | None = None  # checkpoint and stop early, keeping the schedule of max_steps


class Batches:
    """Random windows from this rank's shard; the generator state is part of the resume state."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int, rank: int, world: int):
        n = len(tokens)
        lo, hi = rank * n // world, (rank + 1) * n // world
        self.tokens, self.seq_len, self.batch_size = tokens[lo:hi], seq_len, batch_size
        if len(self.tokens) < seq_len + 1:
            raise RecycleError(
                f"the training data has {len(self.tokens)} tokens per process, fewer than seq_len+1="
                f"{seq_len + 1}: add data or lower --seq-len"
            )
        self.gen = torch.Generator().manual_seed(seed * 1000 + rank)

    def next(self) -> torch.Tensor:
        starts = torch.randint(0, len(self.tokens) - self.seq_len, (self.batch_size,), generator=self.gen)
        rows = [np.asarray(self.tokens[s:s + self.seq_len], dtype=np.int64) for s in starts.tolist()]
        return torch.from_numpy(np.stack(rows))  # [B, T]


def lr_at(step: int, tc: TrainConfig) -> float:
    """Linear warm-up, then cosine down to min_lr_ratio * lr at max_steps."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    progress = min(1.0, (step - tc.warmup_steps) / max(1, tc.max_steps - tc.warmup_steps))
    return tc.lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class StepMeter:
    """Per optimizer step: smoothed losses on the progress bar, every 10 steps tokens/s and a `train`
    line in metrics.jsonl, and whether the run must stop (time budget `deadline`, a wall-clock
    time, or step `stop_at`). `shown` maps bar labels to metric names."""

    def __init__(self, step: int, tok_per_step: int, bar: tqdm, log, shown: dict[str, str],
                 deadline: float | None = None, stop_at: int | None = None):
        self.tok_per_step, self.bar, self.log, self.shown = tok_per_step, bar, log, shown
        self.deadline, self.stop_at = deadline, stop_at
        self.last_t, self.last_step = time.time(), step
        self.ema: dict[str, float] = {}

    def update(self, step: int, lr: float, tokens_seen: int, metrics: dict, last: bool) -> bool:
        """Record finished step `step`; True when the run must stop after it."""
        for k, v in metrics.items():
            self.ema[k] = float(v) if k not in self.ema else 0.9 * self.ema[k] + 0.1 * float(v)
        if step % 10 == 0 or last:
            now = time.time()
            tps = (step - self.last_step) * self.tok_per_step / max(1e-9, now - self.last_t)
            self.last_t, self.last_step = now, step
            self.bar.set_postfix(tok_s=f"{tps:.0f}", **{s: f"{self.ema[m]:.3f}" for s, m in self.shown.items()})
            self.log({"event": "train", "step": step, "lr": lr, "tokens_seen": tokens_seen, "tok_s": tps,
                      **{k: float(v) for k, v in metrics.items()}})
        self.bar.update(1)
        return (self.deadline is not None and time.time() >= self.deadline) or step == self.stop_at


def optimizer_step(opt: torch.optim.Optimizer, clip: Callable[[], object] | None, loss: torch.Tensor | None = None,
                   all_ranks: Callable[[bool], bool] | None = None) -> bool:
    """Clip the gradients (`clip`, when given), apply the update, clear the gradients.

    When the step's summed `loss` or the gradient norm `clip` returns is not finite (on any rank:
    `all_ranks` combines the verdicts), nothing is applied and False is returned."""
    norm = clip() if clip is not None else None
    finite = loss is None or bool(torch.isfinite(loss).all())
    if finite and isinstance(norm, (torch.Tensor, float)):
        finite = bool(torch.isfinite(torch.as_tensor(norm)).all())
    if all_ranks is not None:
        finite = all_ranks(finite)
    if finite:
        opt.step()
    opt.zero_grad(set_to_none=True)
    return finite


def nonfinite_error(step: int, last_saved: int | None, ckpt_dir: Path) -> RecycleError:
    """The error for a step whose loss or gradients are not finite (the update was not applied)."""
    if last_saved is not None:
        kept = (f"the last good checkpoint (step {last_saved}) is kept in {ckpt_dir}: lower --lr (or check the "
                "data) and continue with --resume")
    else:
        kept = "no checkpoint had been saved yet: lower --lr (or check the data) and start again"
    return RecycleError(f"training stopped at step {step + 1}: the loss or its gradients are not finite (NaN or "
                        f"inf), so the update was not applied; {kept}")


def _signal_stop(sig: StopSignals, accel=None) -> int | None:
    """The signal that asked the run to stop (on any rank), or None."""
    if accel is None or accel.num_processes == 1:
        return sig.signum
    flags = torch.tensor([float(sig.signum == signal.SIGINT), float(sig.signum == signal.SIGTERM)],
                         device=accel.device)
    flags = accel.reduce(flags, reduction="sum").tolist()
    return signal.SIGINT if flags[0] > 0 else signal.SIGTERM if flags[1] > 0 else None


def _make_optimizer(joint: JointModel, tc: TrainConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for p in joint.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(0.9, 0.95), eps=1e-8)


# ---- resume state (safetensors + JSON, no pickle) -------------------------------------------

def _save_train_state(dir_: Path, opt: torch.optim.Optimizer, batches: Batches, info: dict) -> None:
    tensors: dict[str, torch.Tensor] = {"rng.data": batches.gen.get_state(), "rng.torch": torch.get_rng_state()}
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            tensors[f"opt.{i}.{k}"] = torch.as_tensor(v).detach().cpu().contiguous()
    save_file(tensors, str(dir_ / "train_state.safetensors"))
    (dir_ / "train_state.json").write_text(json.dumps(info, indent=1))


def _load_train_state(dir_: Path, opt: torch.optim.Optimizer, batches: Batches) -> dict:
    try:
        tensors = load_file(str(dir_ / "train_state.safetensors"))
        info = json.loads((dir_ / "train_state.json").read_text())
    except PermissionError as e:
        raise read_error(e.filename or dir_, e, "training state") from None
    except (OSError, ValueError) as e:
        raise RecycleError(f"cannot resume: training state in {dir_} is missing or corrupt ({e})") from None
    batches.gen.set_state(tensors.pop("rng.data"))
    torch.set_rng_state(tensors.pop("rng.torch"))
    sd = opt.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        _, i, k = name.split(".", 2)
        state.setdefault(int(i), {})[k] = t
    sd["state"] = state
    opt.load_state_dict(sd)
    return info


# ---- the run ---------------------------------------------------------------------------------

def _run_identity(opts: TrainOptions, cfg: Config, tc: TrainConfig) -> dict:
    return {
        "preset": opts.preset,
        "data": [str(Path(d).resolve()) if d != "stdlib" else "stdlib" for d in opts.data],
        "glob": opts.glob,
        "config": cfg.to_dict(),
        "train": {k: v for k, v in dataclasses.asdict(tc).items() if k != "max_steps"},
    }


def _protected(data: list[str], **named: str | None) -> list[tuple[str, str]]:
    """Inputs the run directory may neither be, hold, nor lie inside."""
    out = [(d, f"the --data path {d}") for d in data if d != "stdlib"]
    return out + [(p, f"the {flag} path {p}") for flag, p in named.items() if p]


def _build_tokenizer(opts: TrainOptions, files: list[Path], vocab_size: int) -> Tokenizer:
    if opts.tokenizer:
        return Tokenizer.load(opts.tokenizer)
    texts = (d.text for d in iter_documents(files, opts.text_field) if not is_validation(d.text, opts.val_fraction))
    budget = TOKENIZER_TRAIN_CHARS

    def limited():
        nonlocal budget
        for t in iter_texts_chunked(texts):
            if budget <= 0:
                return
            budget -= len(t)
            yield t

    return Tokenizer.train(limited(), vocab_size)


@torch.no_grad()
def evaluate(joint: JointModel, data: TokenData, tc: TrainConfig, autocast) -> dict[str, float]:
    joint.eval()
    gen = torch.Generator().manual_seed(0)  # the same windows every time: comparable curves
    val = data.val
    T = min(tc.seq_len, len(val) - 1)
    sums: dict[str, float] = {}
    n = 0
    for _ in range(tc.eval_batches):
        starts = torch.randint(0, max(1, len(val) - T), (tc.batch_size,), generator=gen).tolist()
        idx = torch.from_numpy(np.stack([np.asarray(val[s:s + T], dtype=np.int64) for s in starts]))
        idx = idx.to(joint.model.tok_embeddings.weight.device)
        with autocast():
            _, m = joint(idx)
            a = agreement(joint.model, joint.module, idx, joint.unroll_steps)
        for k, v in {**{k: float(v) for k, v in m.items()}, **a}.items():
            sums[k] = sums.get(k, 0.0) + v
        n += 1
    joint.train()
    return {f"val_{k}": v / n for k, v in sums.items()}


def train(opts: TrainOptions) -> Path:
    from accelerate import Accelerator

    cfg, tc = preset(opts.preset)
    cfg.model = dataclasses.replace(cfg.model, **opts.model_overrides)
    cfg.module = dataclasses.replace(cfg.module, **opts.module_overrides)
    cfg.tokenizer.vocab_size = cfg.model.vocab_size
    try:
        tc = dataclasses.replace(tc, **opts.overrides)
        cfg.model.validate()
    except (TypeError, ValueError) as e:
        raise RecycleError(f"invalid training option: {e}") from None
    if opts.max_steps is not None:
        tc.max_steps = opts.max_steps
    if tc.seq_len > cfg.model.max_seq_len:
        raise RecycleError(f"--seq-len {tc.seq_len} exceeds the model's context {cfg.model.max_seq_len}")

    out = Path(opts.out)
    identity = _run_identity(opts, cfg, tc)
    files = resolve_files(opts.data, opts.glob)
    if opts.tokenizer:
        check_input(opts.tokenizer, "--tokenizer")
    rd = RunDir(opts.out, identity, opts.resume, _protected(opts.data, **{"--tokenizer": opts.tokenizer}))
    if int(os.environ.get("RANK", "0")) == 0:  # validate before any process group or file exists
        rd.check()
    use_cpu = opts.cpu or not torch.cuda.is_available()
    accel = Accelerator(cpu=use_cpu, mixed_precision="bf16" if tc.bf16 else "no")
    try:
        with StopSignals() as sig:
            try:
                return _train(opts, cfg, tc, accel, out, identity, files, rd, sig)
            except BaseException:
                if accel.is_main_process:
                    rd.failed()
                raise
    finally:
        if accel.num_processes == 1:
            # Accelerate keeps a process-wide singleton; reset it so in-process callers (API, tests)
            # can train again with other settings.
            from accelerate.state import AcceleratorState

            AcceleratorState._reset_state(reset_partial_state=True)


def _train(opts: TrainOptions, cfg: Config, tc: TrainConfig, accel, out: Path, identity: dict,
           files: list[Path], rd: RunDir, sig: StopSignals) -> Path:
    if accel.is_main_process:
        rd.begin()  # fresh: create --out (marked as starting); resume: recover an interrupted save
    accel.wait_for_everyone()

    ckpt_dir = out / "checkpoint"
    # Rank 0 checked (and recovered) the run; the others see the result on disk.
    resuming = (not rd.fresh) if accel.is_main_process else opts.resume and (ckpt_dir / "train_state.json").is_file()
    if accel.is_main_process:
        if resuming:
            tokenizer = Tokenizer.load(ckpt_dir / "tokenizer.json")
        else:
            tokenizer = _build_tokenizer(opts, files, cfg.model.vocab_size)
            tokenizer.save(out / "tokenizer.json")
        data = prepare_tokens(files, tokenizer, out / "tokens", opts.val_fraction, opts.text_field,
                              progress=opts.progress)
    accel.wait_for_everyone()
    if not accel.is_main_process:
        tok_path = ckpt_dir / "tokenizer.json" if resuming else out / "tokenizer.json"
        tokenizer = Tokenizer.load(tok_path)
        data = prepare_tokens(files, tokenizer, out / "tokens", opts.val_fraction, opts.text_field, progress=False)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise RecycleError(f"tokenizer has {tokenizer.vocab_size} tokens, more than the model's vocab_size "
                           f"{cfg.model.vocab_size}")
    cfg.eos_token_id = tokenizer.eos_id
    if accel.is_main_process:
        (out / "run.json").write_text(json.dumps(identity, indent=1))

    torch.manual_seed(tc.seed)
    if resuming:
        _, model, module, _ = load_checkpoint(ckpt_dir)
    else:
        model, module = FullModel(cfg.model), RecyclableModule(cfg.model, cfg.module)
    model.train()
    module.train()
    joint = JointModel(model, module, tc.recycle_weight, tc.unroll_steps, tc.unroll_decay)
    opt = _make_optimizer(joint, tc)
    batches = Batches(data.train, tc.seq_len, tc.batch_size, tc.seed, accel.process_index, accel.num_processes)
    step, tokens_seen, last_saved = 0, 0, None
    if resuming:
        info = _load_train_state(ckpt_dir, opt, batches)
        step, tokens_seen = info["step"], info["tokens_seen"]
        last_saved = step
    joint, opt = accel.prepare(joint, opt)
    raw = accel.unwrap_model(joint)

    n_full, n_mod = raw.model.num_params(), raw.module.num_params()
    start_info = {
        "event": "start", "step": step, "params_full": n_full, "params_module": n_mod,
        "module_share": n_mod / (n_full + n_mod), "train_tokens": int(len(data.train)),
        "val_tokens": int(len(data.val)), "processes": accel.num_processes,
    }

    def log(rec: dict) -> None:
        if accel.is_main_process:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")

    def checkpoint() -> None:
        nonlocal last_saved
        accel.wait_for_everyone()
        if accel.is_main_process:
            info = {"step": step, "tokens_seen": tokens_seen, "train": dataclasses.asdict(tc)}
            save_checkpoint(ckpt_dir, cfg, raw.model, raw.module, tokenizer,
                            write_extra=lambda d: _save_train_state(d, opt, batches, info))
            rd.saved()
        last_saved = step
        accel.wait_for_everyone()

    def all_ranks(ok: bool) -> bool:
        if accel.num_processes == 1:
            return ok
        flag = torch.tensor([0.0 if ok else 1.0], device=accel.device)
        return bool(accel.reduce(flag, reduction="sum").item() == 0)

    sig.deferred = True  # from here a signal checkpoints at the next step boundary
    log(start_info)
    t0 = time.time()
    deadline = t0 + opts.max_minutes * 60 if opts.max_minutes else None
    bar = tqdm(total=tc.max_steps, initial=step, disable=not (opts.progress and accel.is_main_process),
               unit="step", dynamic_ncols=True)
    tok_per_step = tc.batch_size * tc.seq_len * tc.grad_accum * accel.num_processes
    meter = StepMeter(step, tok_per_step, bar, log, {"full": "ce_full", "module": "ce_module_1"}, deadline,
                      opts.stop_at_step)
    while step < tc.max_steps:
        lr = lr_at(step, tc)
        for g in opt.param_groups:
            g["lr"] = lr
        loss_sum = None
        for micro in range(tc.grad_accum):
            idx = batches.next().to(accel.device)
            sync = micro == tc.grad_accum - 1
            ctx = accel.no_sync(joint) if not sync and accel.num_processes > 1 else _null()
            with ctx, accel.autocast():
                loss, metrics = joint(idx)
                accel.backward(loss / tc.grad_accum)
            loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
        if not optimizer_step(opt, (lambda: accel.clip_grad_norm_(joint.parameters(), tc.grad_clip))
                              if tc.grad_clip > 0 else None, loss_sum, all_ranks):
            raise nonfinite_error(step, last_saved, ckpt_dir)
        step += 1
        tokens_seen += tok_per_step
        stop = meter.update(step, lr, tokens_seen, metrics, last=step == tc.max_steps)
        if accel.num_processes > 1:  # every rank must stop at the same step
            flag = torch.tensor([1.0 if stop else 0.0], device=accel.device)
            stop = bool(accel.reduce(flag, reduction="sum").item() > 0)
        signum = _signal_stop(sig, accel)
        if signum is not None:  # SIGINT/SIGTERM: keep this step, then stop
            bar.close()
            checkpoint()
            raise Interrupted(signum, step, str(ckpt_dir))
        if step % tc.eval_every == 0 or step == tc.max_steps or stop:
            if accel.is_main_process:
                ev = evaluate(raw, data, tc, accel.autocast)
                log({"event": "eval", "step": step, "tokens_seen": tokens_seen,
                     "minutes": (time.time() - t0) / 60, **ev})
                bar.write(f"step {step}: val full {ev['val_ce_full']:.3f}  module {ev['val_ce_module_1']:.3f}  "
                          f"agree {ev['val_agree_full_1']:.2f}")
        if step % tc.save_every == 0 or step == tc.max_steps or stop:
            checkpoint()
        if stop:
            break
    bar.close()
    if step % tc.save_every and not (step == tc.max_steps):
        checkpoint()
    # Evidence that data-parallel ranks stayed in lock-step: one weight checksum per rank.
    checksum = torch.tensor([sum(float(p.detach().double().sum()) for p in raw.parameters())], device=accel.device)
    sums = accel.gather(checksum).tolist()
    log({"event": "end", "step": step, "tokens_seen": tokens_seen, "minutes": (time.time() - t0) / 60,
         "rank_weight_checksums": sums})
    accel.wait_for_everyone()
    accel.end_training()
    return ckpt_dir


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def read_metrics(run_dir: str | Path, event: str | None = None) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in recs if event is None or r.get("event") == event]


__all__ = ["TrainOptions", "train", "read_metrics", "lr_at"]
