"""recyclegpt against llama.cpp on this CPU: the same full model, the same weight dtype, batch 1, greedy.

    python benchmarks/llama_cpp.py [CKPT] [--dtype float32] [--num-prompts 4] [--max-new-tokens 128]
                                   [--repeats 3] [--json OUT]

1. Builds llama.cpp once from the sources that the `llama-cpp-python` sdist vendors (`pip download
   --no-binary :all: llama-cpp-python`, then cmake; about 15 minutes on 2 cores), cached outside the
   repository in $RECYCLEGPT_CACHE/llama.cpp (default ~/.cache/recyclegpt/llama.cpp), one build per
   llama-cpp-python version and CPU (GGML_NATIVE: the build uses what this CPU has).
2. Writes the checkpoint's full model as GGUF (`recyclegpt export --format gguf`, the same dtype).
3. Exactness: llama.cpp's tokenization of each prompt equals recyclegpt's, and its greedy text
   (`llama-simple`) equals recyclegpt `ar` in the same run (the check that matters in float32).
4. Speed per decoded token, prefill excluded on both sides: `llama-bench` tg N at depth d (N tokens decoded
   one at a time after d tokens in the context, batch 1, this machine's threads; d = the prompts' mean
   length) against the decode tokens/s of recyclegpt `ar` and `verify` k=3, eager and compiled (`recyclegpt
   bench` lanes over the shipped code prompts, whose prefill is timed apart). Each lane's end-to-end
   tokens/s (prefill included) is in the report too.

Prints one table and writes the report with --json (atomically).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "src" / "recyclegpt" / "assets" / "shipped"
TARGETS = ("llama-bench", "llama-tokenize", "llama-simple", "llama-server")
PACKAGE = "llama-cpp-python"


def cache_root() -> Path:
    from recyclegpt.runtime import cache_dir

    return cache_dir() / "llama.cpp"


def cpu_key() -> str:
    """A short hash of this CPU's model and flags: a native build is only reused on the same kind of CPU."""
    import torch

    from recyclegpt.runtime import cpu_flags, machine_info

    cpu = machine_info(torch.device("cpu"))["cpu"]
    return hashlib.sha256("\n".join([cpu, *sorted(cpu_flags())]).encode()).hexdigest()[:10]


def _sdist(root: Path) -> Path:
    found = sorted(root.glob("llama_cpp_python-*.tar.gz"))
    if found:
        return found[-1]
    print(f"downloading the {PACKAGE} sdist (llama.cpp's sources) into {root} ...", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", PACKAGE, "-d",
                    str(root)], check=True, stdout=subprocess.DEVNULL)
    return sorted(root.glob("llama_cpp_python-*.tar.gz"))[-1]


def built_llama_cpp(root: Path | None = None) -> Path | None:
    """The directory of llama.cpp's binaries when every one of TARGETS is built for this CPU, else None."""
    root = root or cache_root()
    for sdist in sorted(root.glob("llama_cpp_python-*.tar.gz"), reverse=True):
        version = sdist.name.removesuffix(".tar.gz").split("-")[-1]
        build = root / f"build-{version}-{cpu_key()}"
        if (build / ".built").is_file() and all((build / "bin" / t).is_file() for t in TARGETS):
            return build / "bin"
    return None


def build_llama_cpp(root: Path | None = None, jobs: int | None = None) -> Path:
    """The directory of llama.cpp's binaries (TARGETS), built here once and cached."""
    root = root or cache_root()
    root.mkdir(parents=True, exist_ok=True)
    sdist = _sdist(root)
    version = sdist.name.removesuffix(".tar.gz").split("-")[-1]
    src = root / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    build = root / f"build-{version}-{cpu_key()}"
    done = build / ".built"
    if done.is_file() and all((build / "bin" / t).is_file() for t in TARGETS):
        return build / "bin"
    if not src.is_dir():
        with tarfile.open(sdist) as tar:
            tar.extractall(root, filter="data")
    print(f"building llama.cpp {version} in {build} (about 15 minutes on 2 cores) ...", file=sys.stderr)
    subprocess.run(["cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
                    "-DLLAMA_BUILD_TESTS=OFF", "-DGGML_NATIVE=ON"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(build), "--target", *TARGETS, "-j", str(jobs or os.cpu_count() or 1)],
                   check=True, stdout=subprocess.DEVNULL)
    done.write_text(version + "\n")
    return build / "bin"


def _run(args: list[str]) -> str:
    out = subprocess.run(args, capture_output=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{Path(args[0]).name} failed ({out.returncode}): "
                           f"{out.stderr.decode(errors='replace').strip().splitlines()[-1:]}")
    return out.stdout.decode("utf-8", errors="replace")


def tokenize(bin_dir: Path, gguf: Path, text: str) -> list[int]:
    """llama.cpp's token ids of `text` (no BOS: the file says none is added)."""
    out = _run([str(bin_dir / "llama-tokenize"), "-m", str(gguf), "--prompt", text, "--ids", "--log-disable",
                "--no-escape"])
    return json.loads(out.strip().splitlines()[-1])


def greedy_text(bin_dir: Path, gguf: Path, prompt: str, n: int) -> str:
    """llama.cpp's greedy continuation of `prompt` (llama-simple prints the prompt, then the new text, then a
    newline), stopping at n tokens or EOS."""
    out = _run([str(bin_dir / "llama-simple"), "-m", str(gguf), "-n", str(n), prompt])
    out = out.removesuffix("\n")
    if not out.startswith(prompt):
        raise RuntimeError(f"llama-simple did not echo the prompt first: {out[:60]!r}")
    return out[len(prompt):]


def bench_tg(bin_dir: Path, gguf: Path, n: int, threads: int, repeats: int, depth: int = 0) -> dict[str, Any]:
    """llama-bench's decoding speed: tg n at depth d (n tokens decoded one at a time, batch 1, after d tokens
    already in the context, which llama-bench fills untimed), the median of `repeats` runs; recyclegpt's lanes
    are compared by their decode_tokens_per_s (seconds after the prefill) over prompts of about d tokens."""
    out = _run([str(bin_dir / "llama-bench"), "-m", str(gguf), "-p", "0", "-n", str(n), "-d", str(depth),
                "-t", str(threads), "-r", str(repeats), "-o", "json"])
    return parse_bench(out) | {"threads": threads}


def parse_bench(out: str) -> dict[str, Any]:
    """llama-bench's JSON output (one test) -> its median tokens/s, the samples, n and depth."""
    row = json.loads(out)[0]
    samples = sorted(row.get("samples_ts") or [row["avg_ts"]])
    return {"tokens_per_s": samples[len(samples) // 2], "samples": samples, "n": row["n_gen"],
            "depth": row.get("n_depth", 0)}


def compare_greedy(bin_dir: Path, ckpt: Path, gguf: Path, prompts: list[str], max_new_tokens: int,
                   dtype: str = "float32") -> list[dict[str, Any]]:
    """Per prompt: llama.cpp's greedy text and recyclegpt `ar`'s (same dtype, stopping at EOS), identical?"""
    from recyclegpt import RecycleGPT

    m = RecycleGPT.from_pretrained(ckpt, device="cpu", dtype=dtype)
    rows = []
    for p in prompts:
        ours = m.generate(p, mode="ar", max_new_tokens=max_new_tokens)[0]
        theirs = greedy_text(bin_dir, gguf, p, max_new_tokens)
        same_ids = tokenize(bin_dir, gguf, p) == m.tokenizer.encode(p)
        rows.append({"prompt": p[:40], "identical": ours == theirs, "same_prompt_tokens": same_ids,
                     **({} if ours == theirs else {"recyclegpt": ours, "llama_cpp": theirs})})
    return rows


def recyclegpt_lanes(ckpt: Path, dtype: str, prompts, max_new_tokens: int, repeats: int
                     ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """recyclegpt `ar` and `verify` k=3, eager and compiled, batch 1, greedy (`recyclegpt bench` lanes), and the
    memory floor that bench measured."""
    from recyclegpt import RecycleGPT
    from recyclegpt.bench.speed import BenchOptions, run_bench
    from recyclegpt.runtime import set_threads

    set_threads()
    m = RecycleGPT.from_pretrained(ckpt, device="cpu", dtype=dtype)
    opts = BenchOptions(max_new_tokens=max_new_tokens, repeats=repeats, modes=["ar", "verify"], ks=[3],
                        adaptive=False, hybrid=False, compile="headline", progress=False)
    report = run_bench(m.model, m.module, m.tokenizer, prompts, opts, checkpoint=str(ckpt))
    return [{"lane": r["label"], "decode_tokens_per_s": r["decode_tokens_per_s"], "tokens_per_s": r["tokens_per_s"],
             "identical_to_ar": r["identical_to_ar"], "bandwidth_share": r["bandwidth_share"]}
            for r in report["results"]], report["floor"]


def main(argv: list[str] | None = None) -> int:
    from recyclegpt.bench.report import write_json

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("ckpt", nargs="?", default=str(SHIPPED), help="checkpoint (default: the shipped one)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="weights on both sides (default float32)")
    ap.add_argument("--num-prompts", type=int, default=4, help="shipped code prompts decoded (default 4)")
    ap.add_argument("--max-new-tokens", type=int, default=128, help="tokens per prompt, and llama-bench's tg N")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats on both sides (default 5)")
    ap.add_argument("--json", type=Path, help="write the report here")
    ap.add_argument("--build-only", action="store_true", help="build (or find) llama.cpp and stop")
    ap.add_argument("--print-bin-dir", action="store_true",
                    help="print the directory of llama.cpp's binaries if they are built (exit 1 if not), build nothing")
    a = ap.parse_args(argv)
    if a.print_bin_dir:
        found = built_llama_cpp()
        if found is not None:
            print(found)
        return 0 if found is not None else 1

    import torch

    from recyclegpt.hf.gguf import export_gguf
    from recyclegpt.prompts import load_prompts
    from recyclegpt.runtime import machine_info
    from recyclegpt.tokenizer import Tokenizer

    bin_dir = build_llama_cpp()
    print(f"llama.cpp binaries: {bin_dir}")
    if a.build_only:
        return 0
    prompts = load_prompts("code", a.num_prompts)
    threads = os.cpu_count() or 1
    tok = Tokenizer.load(a.ckpt)
    depth = round(sum(len(tok.encode(p)) for p in prompts.prompts) / len(prompts.prompts))
    with tempfile.TemporaryDirectory() as tmp:
        gguf = export_gguf(a.ckpt, Path(tmp) / "gguf", dtype=a.dtype)
        exact = compare_greedy(bin_dir, Path(a.ckpt), gguf, prompts.prompts, a.max_new_tokens, a.dtype)
        # llama.cpp before and after recyclegpt's lanes: a shared VM's speed drifts over minutes, the mean of the
        # two brackets it
        before = bench_tg(bin_dir, gguf, a.max_new_tokens, threads, a.repeats, depth)
        lanes, floor = recyclegpt_lanes(Path(a.ckpt), a.dtype, prompts, a.max_new_tokens, a.repeats)
        after = bench_tg(bin_dir, gguf, a.max_new_tokens, threads, a.repeats, depth)
        shutil.rmtree(Path(tmp) / "gguf")
    base = (before["tokens_per_s"] + after["tokens_per_s"]) / 2
    llama = {"tokens_per_s": base, "before": before, "after": after}
    bw, weights = floor["memory_bandwidth_gb_s"] * 1e9, floor["weight_bytes"]
    print(f"\n{'runtime (decoding, prefill excluded)':40s} {'tokens/s':>9s} {'x llama.cpp':>12s} {'of floor':>9s}")
    print(f"{f'llama.cpp llama-bench tg{a.max_new_tokens} @ d{depth}':40s} {base:9.1f} {1.0:12.2f} "
          f"{base * weights / bw:9.0%}")
    for r in lanes:
        print(f"{'recyclegpt ' + r['lane']:40s} {r['decode_tokens_per_s']:9.1f} "
              f"{r['decode_tokens_per_s'] / base:12.2f} {r['bandwidth_share']:9.0%}")
    print(f"(llama.cpp {before['tokens_per_s']:.1f} before and {after['tokens_per_s']:.1f} after recyclegpt's lanes; "
          f"floor: {floor['memory_bandwidth_gb_s']:.1f} GB/s read by a GEMV here, {weights / 1e6:.1f} MB of weights)")
    same = sum(r["identical"] for r in exact)
    print(f"\nllama.cpp greedy text = recyclegpt ar ({a.dtype}): {same}/{len(exact)} prompts; "
          f"prompt tokens equal: {sum(r['same_prompt_tokens'] for r in exact)}/{len(exact)}")
    if a.json:
        write_json({"checkpoint": a.ckpt, "dtype": a.dtype, "max_new_tokens": a.max_new_tokens,
                    "prompts": len(prompts.prompts), "machine": machine_info(torch.device("cpu")),
                    "compile_mode": os.environ.get("RECYCLEGPT_COMPILE_MODE", "auto"), "floor": floor,
                    "llama_cpp": {**llama, "build": str(bin_dir)}, "recyclegpt": lanes, "exactness": exact}, a.json)
    # Tokenization must always agree; greedy texts must in float32 (in bf16 the two round activations
    # differently, so texts may part at near ties).
    tokens_ok = all(r["same_prompt_tokens"] for r in exact)
    return 0 if tokens_ok and (same == len(exact) or a.dtype != "float32") else 1


if __name__ == "__main__":
    sys.exit(main())
