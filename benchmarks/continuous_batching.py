"""Continuous batching: a fixed number of engine slots serving a longer stream of requests of mixed lengths.

    python benchmarks/continuous_batching.py                                   # shipped checkpoint, compiled
    python benchmarks/continuous_batching.py --no-compile --requests 8 --slots 4 --max-tokens 48 --repeats 1
    python benchmarks/continuous_batching.py --dtype float32 --k 2 --json cb.json

`--requests` requests (prompt i is prompt i mod the set's size, `code` by default) each get a token budget
drawn from `--min-tokens`..`--max-tokens` by a seeded RNG, so rows finish at different steps. One
`Engine` with `--slots` slots serves the stream per lane (`ar`, `verify k`): while slots are free and
requests are queued they are admitted (prefilled) into the free slots, then the engine steps once (one
full-model pass over every slot), then finished requests are collected and their slots released, so
queued requests take them before the next step. Decoding is greedy and EOS does not stop a request
(no eos_id), so every request produces exactly its budget (less only where prompt + budget would pass
the model's context).

Per lane: its round graphs are compiled first (`engine.warm_up` for `engine.shapes_for(cfg)`; no-op
eagerly) and a short stream is run once; then `--repeats` rounds each run every lane over the whole
stream (lane order rotated per round). Reported per lane: the median over rounds of generated tokens /
wall seconds of the whole stream (admission prefills included), engine steps, mean busy slots per
step (occupancy), and tau = sum over requests of (produced - 1) / sum of their decoding rounds (1 for
`ar`). `identical` says whether every request's `verify` tokens equal its `ar` tokens in every round
(same dtype, both eager or both compiled). `--json OUT` writes the numbers with the machine, torch
version, date and settings.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

LANES = ("ar", "verify")


@dataclass
class Settings:
    """What one benchmark run does (the command line's options, without the model and prompts)."""

    slots: int = 8
    requests: int = 32
    min_tokens: int = 32
    max_tokens: int = 160
    k: int = 3
    compile: bool = True
    repeats: int = 3
    seed: int = 0
    warmup_requests: int | None = None  # the warm-up stream's length (None: 2 x slots, at most `requests`)
    warmup_tokens: int = 16  # the warm-up stream's largest budget

    def validate(self) -> None:
        for name in ("slots", "requests", "min_tokens", "max_tokens", "k", "repeats", "warmup_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) is larger than max_tokens ({self.max_tokens})")

    def lane_config(self, lane: str, budget: int):
        from recyclegpt.decoding import GenerationConfig

        if lane == "ar":
            return GenerationConfig(mode="ar", max_new_tokens=budget)
        return GenerationConfig(mode="verify", k=self.k, max_new_tokens=budget)


@dataclass
class Request:
    prompt: list[int]
    budget: int


@dataclass
class StreamRun:
    """One lane's pass over one request stream."""

    outputs: list[list[int]]  # generated tokens per request, in stream order
    wall_s: float
    steps: int  # engine steps (full-model passes of decoding rounds)
    busy_slot_steps: int  # sum over steps of the slots decoding in that step
    rounds: int  # sum over requests of their decoding rounds
    produced: int  # sum over requests of tokens produced
    module_passes: int
    prefill_passes: int
    prefill_s: float
    decode_s: float

    @property
    def tokens(self) -> int:
        return sum(len(o) for o in self.outputs)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else float("nan")

    @property
    def occupancy(self) -> float:
        """Mean busy (decoding) slots per step."""
        return self.busy_slot_steps / self.steps if self.steps else float("nan")

    @property
    def tau(self) -> float:
        """Tokens produced by decoding rounds per row-round (the prefill's first token excluded)."""
        return (self.produced - len(self.outputs)) / self.rounds if self.rounds else float("nan")


def make_stream(prompts: Sequence[Sequence[int]], n: int, min_tokens: int, max_tokens: int, seed: int = 0
                ) -> list[Request]:
    """n requests cycling through `prompts`, budgets drawn uniformly from min_tokens..max_tokens (seeded)."""
    if not prompts:
        raise ValueError("no prompts given")
    rng = random.Random(seed)
    return [Request(list(prompts[i % len(prompts)]), rng.randint(min_tokens, max_tokens)) for i in range(n)]


def warmup_stream(stream: Sequence[Request], settings: Settings) -> list[Request]:
    """A short stream of the first requests with small, varied budgets (1..warmup_tokens)."""
    n = settings.warmup_requests if settings.warmup_requests is not None else 2 * settings.slots
    n = min(n, len(stream))
    top = settings.warmup_tokens
    return [Request(r.prompt, min(r.budget, 1 + (4 + 5 * i) % top)) for i, r in enumerate(stream[:n])]


def run_stream(engine, stream: Sequence[Request], config_for: Callable[[int], Any],
               on_done: Callable[[], None] | None = None) -> StreamRun:
    """Serve `stream` on `engine` (all its slots free): admit into free slots, step, collect, until done."""
    if engine.free_slots() != list(range(engine.slots)):
        raise RuntimeError("run_stream needs an engine with every slot free")
    before = asdict(engine.stats)
    queue = deque(enumerate(stream))
    live: dict[int, int] = {}  # slot -> request index
    outputs: list[list[int] | None] = [None] * len(stream)
    rounds = produced = busy = 0
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    while queue or live:
        admit = []
        for slot in engine.free_slots():
            if not queue:
                break
            i, req = queue.popleft()
            live[slot] = i
            admit.append((slot, req.prompt, config_for(req.budget)))
        if admit:
            engine.admit_many(admit)
        decoding = len(engine.decoding())
        if decoding:
            busy += decoding
            engine.step()
        for slot, i in list(live.items()):
            r = engine.request(slot)
            if r.finish is None:
                continue
            outputs[i] = list(r.generated)
            rounds += r.stats.rounds
            produced += r.stats.produced
            engine.release(slot)
            del live[slot]
            if on_done is not None:
                on_done()
    sync()
    wall = time.perf_counter() - t0
    after = asdict(engine.stats)
    delta = {key: after[key] - before[key] for key in after if not isinstance(after[key], dict)}
    return StreamRun(outputs, wall, delta["steps"], busy, rounds, produced, delta["module_passes"],
                     delta["prefill_passes"], delta["prefill_s"], delta["decode_s"])


def first_mismatch(a: Sequence[list[int]], b: Sequence[list[int]]) -> dict | None:
    """The first request (and token position) where two streams' outputs differ, or None."""
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if x != y:
            pos = next((j for j, (u, v) in enumerate(zip(x, y, strict=False)) if u != v), min(len(x), len(y)))
            return {"request": i, "position": pos, "lengths": [len(x), len(y)]}
    return None


def _progress(enabled: bool):
    if not enabled:
        return nullcontext(None)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=Console(stderr=True), transient=True, refresh_per_second=4)


@torch.inference_mode()
def benchmark(model, module, prompts: Sequence[Sequence[int]], settings: Settings, progress: bool = False,
              log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run both lanes over the same request stream; returns the per-lane numbers and the identity check.

    `prompts` are token-id lists; `module` may be None only if verify is not wanted (it is needed here).
    """
    from recyclegpt.decoding import Engine

    settings.validate()
    stream = make_stream(prompts, settings.requests, settings.min_tokens, settings.max_tokens, settings.seed)
    warm = warmup_stream(stream, settings)
    engines, configs, warmup = {}, {}, {}
    with _progress(progress) as bar:
        def say(msg: str) -> None:  # through the progress console while it is live
            if bar is not None:
                bar.console.print(msg, highlight=False, markup=False)
            elif log is not None:
                log(msg)

        for lane in LANES:
            cfg = settings.lane_config(lane, settings.max_tokens)
            configs[lane] = (lambda budget, lane=lane: settings.lane_config(lane, budget))
            engine = engines[lane] = Engine(model, module if cfg.uses_module else None, settings.slots,
                                            compile=settings.compile)
            t0 = time.perf_counter()
            compile_s = sum(engine.warm_up(shape) for shape in engine.shapes_for(cfg))
            task = bar.add_task(f"warm-up {lane}", total=len(warm)) if bar else None
            tick = (lambda task=task: bar.advance(task)) if bar else None
            run_stream(engine, warm, configs[lane], tick)
            if bar:
                bar.remove_task(task)
            warmup[lane] = {"compile_s": compile_s, "total_s": time.perf_counter() - t0}
            say(f"warm-up {lane}: {warmup[lane]['total_s']:.1f}s (compile {compile_s:.1f}s)")
        runs: dict[str, list[StreamRun]] = {lane: [] for lane in LANES}
        for r in range(settings.repeats):
            order = LANES[r % len(LANES):] + LANES[:r % len(LANES)]
            for lane in order:
                task = bar.add_task(f"round {r + 1}/{settings.repeats} {lane}", total=len(stream)) if bar else None
                tick = (lambda task=task: bar.advance(task)) if bar else None
                run = run_stream(engines[lane], stream, configs[lane], tick)
                if bar:
                    bar.remove_task(task)
                runs[lane].append(run)
                say(f"round {r + 1}/{settings.repeats} {lane}: {run.tokens} tokens in {run.wall_s:.2f}s "
                    f"({run.tokens_per_s:.1f} tok/s)")

    mismatch = None
    for r, (a, v) in enumerate(zip(runs["ar"], runs["verify"], strict=True)):
        mismatch = first_mismatch(a.outputs, v.outputs)
        if mismatch is not None:
            mismatch["round"] = r
            break
    lanes: dict[str, dict[str, Any]] = {}
    for lane in LANES:
        last = runs[lane][-1]
        lanes[lane] = {
            "label": lane if lane == "ar" else f"verify k={settings.k}",
            "tokens_per_s": statistics.median(x.tokens_per_s for x in runs[lane]),
            "tokens_per_s_runs": [x.tokens_per_s for x in runs[lane]],
            "wall_s_runs": [x.wall_s for x in runs[lane]],
            "tokens": last.tokens,
            "steps": last.steps,
            "occupancy": last.occupancy,
            "occupancy_fraction": last.occupancy / settings.slots,
            "tau": last.tau,
            "row_rounds": last.rounds,
            "module_passes": last.module_passes,
            "prefill_passes": last.prefill_passes,
            "prefill_s": last.prefill_s,
            "decode_s": last.decode_s,
            "warmup": warmup[lane],
        }
    return {
        "requests": len(stream),
        "budgets": [q.budget for q in stream],
        "prompt_tokens": [len(q.prompt) for q in stream],
        "lanes": lanes,
        "speedup": lanes["verify"]["tokens_per_s"] / lanes["ar"]["tokens_per_s"],
        "identical": mismatch is None,
        "first_mismatch": mismatch,
        "outputs": {lane: runs[lane][-1].outputs for lane in LANES},
    }


# ------------------------------------------------------------------------------ command line

def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "platform": platform.platform(), "python": platform.python_version()}


def default_checkpoint() -> Path:
    import recyclegpt

    return Path(recyclegpt.__file__).parent / "assets" / "shipped"


def build_parser() -> argparse.ArgumentParser:
    d = Settings()
    ap = argparse.ArgumentParser(
        prog="continuous_batching.py",
        description="Continuous batching on recyclegpt's decoding Engine: SLOTS slots serve REQUESTS requests "
                    "with different token budgets (finished requests free their slot for queued ones between "
                    "steps); compares the `ar` and `verify` lanes on the same stream (greedy, EOS ignored).",
        epilog="Example: python benchmarks/continuous_batching.py --no-compile --requests 8 --slots 4 "
               "--max-tokens 48 --repeats 1",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=default_checkpoint(),
                    help="checkpoint directory (or a run directory holding checkpoint/)")
    ap.add_argument("--prompts", default="code", help="prompt set (code, prose, all) or a prompt file; "
                    "requests cycle through it")
    ap.add_argument("--slots", type=int, default=d.slots, help="engine slots (rows decoded per step)")
    ap.add_argument("--requests", type=int, default=d.requests, help="requests in the stream")
    ap.add_argument("--min-tokens", type=int, default=d.min_tokens, help="smallest token budget of a request")
    ap.add_argument("--max-tokens", type=int, default=d.max_tokens, help="largest token budget of a request")
    ap.add_argument("--seed", type=int, default=d.seed, help="seed of the budgets' RNG")
    ap.add_argument("--k", type=int, default=d.k, help="drafts per verify round")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=d.compile,
                    help="torch.compile'd rounds for both lanes (--no-compile: eager)")
    ap.add_argument("--repeats", type=int, default=d.repeats,
                    help="timed rounds (lanes interleaved); tokens/s is the median")
    ap.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                    help="weights' dtype (auto: bfloat16 where the CPU has native bf16, else float32)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--json", metavar="OUT", type=Path, help="write the report (machine, settings, numbers) here")
    ap.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                    help="progress bars and per-round lines on stderr")
    return ap


def print_table(report: dict[str, Any], out=sys.stdout) -> None:
    s = report["settings"]
    print(f"{report['machine']['cpu']}, {report['machine']['threads']} thread(s), torch {report['torch']}, "
          f"{report['dtype']}, {'compiled' if s['compile'] else 'eager'}", file=out)
    print(f"{s['slots']} slots, {report['requests']} requests, budgets {s['min_tokens']}..{s['max_tokens']} "
          f"(seed {s['seed']}), {s['repeats']} round(s)", file=out)
    print(f"{'lane':<12}{'tok/s':>9}{'speedup':>9}{'tokens':>8}{'steps':>7}{'busy/step':>11}{'tau':>6}"
          f"{'warm-up s':>11}", file=out)
    base = report["lanes"]["ar"]["tokens_per_s"]
    for lane in LANES:
        r = report["lanes"][lane]
        print(f"{r['label']:<12}{r['tokens_per_s']:>9.1f}{r['tokens_per_s'] / base:>8.2f}x{r['tokens']:>8d}"
              f"{r['steps']:>7d}{r['occupancy']:>11.2f}{r['tau']:>6.2f}{r['warmup']['total_s']:>11.1f}", file=out)
    ident = "yes" if report["identical"] else f"NO (first difference: {report['first_mismatch']})"
    print(f"verify output identical to ar for every request: {ident}", file=out)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = Settings(slots=args.slots, requests=args.requests, min_tokens=args.min_tokens,
                        max_tokens=args.max_tokens, k=args.k, compile=args.compile, repeats=args.repeats,
                        seed=args.seed)
    try:
        settings.validate()
    except ValueError as e:
        build_parser().error(str(e).replace("_", "-"))

    from recyclegpt.checkpoint import load_checkpoint
    from recyclegpt.prompts import load_prompts
    from recyclegpt.runtime import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    _, model, module, tok = load_checkpoint(args.checkpoint, device, dtype)
    prompt_set = load_prompts(args.prompts)
    prompts = [tok.encode(p) for p in prompt_set.prompts]
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if args.progress else None
    result = benchmark(model, module, prompts, settings, progress=args.progress, log=log)
    outputs = result.pop("outputs")
    report = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "torch": torch.__version__,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "checkpoint": str(args.checkpoint),
        "prompts": prompt_set.name,
        "settings": {**asdict(settings), "threads": torch.get_num_threads()},
        **result,
    }
    print_table(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    report["outputs"] = outputs
    return report


if __name__ == "__main__":
    main()
