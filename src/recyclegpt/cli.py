"""`recyclegpt` command line. Every subcommand's --help explains its options.

Bad input raises RecycleError anywhere below; main() prints it as one line and exits with 2.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from collections.abc import Callable, Iterator

from . import argtypes as A
from .decoding.limits import MAX_STOPS
from .errors import Interrupted, RecycleError, RecycleWarning

Handler = Callable[[argparse.Namespace], int | None]


# ---- train -----------------------------------------------------------------------------------

def add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="jointly train a full model and its recyclable module on your text",
        description="Train a RecycleGPT from scratch: a byte-level BPE tokenizer, then the full model and the "
        "recyclable module with the joint loss CE(full) + lambda*CE(module). Checkpoints land in OUT/checkpoint "
        "(usable by generate/eval/bench while training runs); --resume continues an interrupted run. "
        "Data-parallel (DDP; gloo on CPU, NCCL on GPUs): "
        "`accelerate launch --multi_gpu --num_processes N -m recyclegpt.cli train ...`.",
    )
    p.add_argument("--data", nargs="+", required=True, metavar="PATH",
                   help="text files, directories (searched recursively with --glob), .jsonl files, or the word "
                   "'stdlib' for the Python standard library's own .py sources")
    p.add_argument("--out", required=True, help="run directory (must be new or empty unless --resume)")
    p.add_argument("--preset", default="small", help="model size preset: tiny, small (default, ~19M), base (~51M)")
    p.add_argument("--max-minutes", type=A.positive_float, help="stop (and checkpoint) after this many minutes")
    p.add_argument("--max-steps", type=A.positive_int, help="optimizer steps (also the cosine schedule's length)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--tokenizer", help="use this tokenizer.json instead of training a BPE on the data")
    p.add_argument("--glob", default="**/*", help="file pattern inside data directories (default: all files)")
    p.add_argument("--text-field", type=A.text, default="text", help="JSONL field holding the text (default: text)")
    p.add_argument("--val-fraction", type=A.fraction, default=0.05,
                   help="share of documents held out, in [0, 1) (default 0.05)")
    p.add_argument("--lr", type=A.positive_float, help="peak learning rate (default: the preset's)")
    p.add_argument("--batch-size", type=A.positive_int, help="sequences per step and process")
    p.add_argument("--seq-len", type=A.positive_int, help="tokens per training sequence")
    p.add_argument("--grad-accum", type=A.positive_int, help="micro-batches per optimizer step")
    p.add_argument("--recycle-weight", type=A.nonneg_float,
                   help="lambda in CE(full) + lambda*CE(module), >= 0 (default 0.3)")
    p.add_argument("--unroll-steps", type=A.positive_int, help="chained module steps trained (default 2)")
    p.add_argument("--vocab-size", type=A.vocab_size, help="tokenizer/model vocabulary (default: the preset's)")
    p.add_argument("--module-layers", type=A.positive_int, help="blocks in the recyclable module (default 1)")
    p.add_argument("--eval-every", type=A.positive_int, help="steps between validations")
    p.add_argument("--save-every", type=A.positive_int, help="steps between checkpoints")
    p.add_argument("--seed", type=A.seed, help="random seed")
    p.add_argument("--fp32", action="store_true", help="train in fp32 (default: bf16 autocast, fp32 weights)")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even where a GPU exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_train)


def run_train(a: argparse.Namespace) -> int:
    from .runtime import set_threads
    from .training.loop import TrainOptions, train

    set_threads()
    overrides = {k: getattr(a, k) for k in ("lr", "batch_size", "seq_len", "grad_accum", "recycle_weight",
                                             "unroll_steps", "eval_every", "save_every", "seed")
                 if getattr(a, k) is not None}
    if a.fp32:
        overrides["bf16"] = False
    _check_train_vocab(a)
    model_overrides = {"vocab_size": a.vocab_size} if a.vocab_size else {}
    module_overrides = {"n_layer": a.module_layers} if a.module_layers else {}
    opts = TrainOptions(data=a.data, out=a.out, preset=a.preset, max_minutes=a.max_minutes,
                        max_steps=a.max_steps, resume=a.resume, tokenizer=a.tokenizer, glob=a.glob,
                        text_field=a.text_field, val_fraction=a.val_fraction, overrides=overrides,
                        model_overrides=model_overrides, module_overrides=module_overrides,
                        progress=not a.no_progress, cpu=a.cpu)
    ckpt = train(opts)
    print(f"checkpoint: {ckpt}")
    return 0


def _check_train_vocab(a: argparse.Namespace) -> None:
    """Before any work: the tokenizer (--tokenizer, or a BPE trained to --vocab-size) must fit the model's
    vocabulary. A resumed run keeps its own tokenizer and config, checked when they load."""
    from .config import PRESETS

    if a.resume or a.preset not in PRESETS:  # an unknown preset: train() names it
        return
    vocab = a.vocab_size or PRESETS[a.preset]["model"]["vocab_size"]
    if a.tokenizer:
        from .tokenizer import Tokenizer

        n = Tokenizer.load(a.tokenizer).vocab_size
        if n > vocab:
            source = f"--vocab-size {vocab}" if a.vocab_size else f"preset {a.preset}: {vocab}"
            raise RecycleError(f"--tokenizer {a.tokenizer} has {n} tokens, more than the model's vocabulary "
                               f"({source}); pass --vocab-size {n} or more, or another tokenizer")
    elif vocab < 300:
        raise RecycleError(f"--vocab-size {vocab} is too small for a byte-level BPE tokenizer (need >= 300)")


# ---- shared options --------------------------------------------------------------------------

def add_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="auto",
                   help="auto (bf16 where the CPU has native bf16 or on CUDA, else fp32), float32 or bfloat16")


def add_decoding_args(p: argparse.ArgumentParser, default_mode: str = "verify") -> None:
    p.add_argument("--mode", default=default_mode, choices=["ar", "recycle", "verify"],
                   help="ar: one full pass per token; recycle: the paper's alternation of full model and "
                   "module (lossy, ~2 tokens per pass); verify: module drafts, full model verifies (lossless)")
    p.add_argument("--max-new-tokens", type=A.setting("max_new_tokens"), default=64,
                   help="new tokens per prompt (default 64; the model's context caps it)")
    p.add_argument("--k", type=A.draft_k, default=3, help="drafts per verify round, 1 to 64 (default 3)")
    p.add_argument("--adaptive-k", action="store_true", help="grow/shrink k from recent acceptance (verify)")
    p.add_argument("--tree", type=A.tree_or_auto, default=0, metavar="N|auto",
                   help="verify with a draft tree of N nodes and depth --k instead of a chain of k drafts: the "
                   "module's top --tree-topk tokens per node (drawn from its distribution when sampling), the N most "
                   "probable kept, all verified in one pass (lossless; default 0 = chain). auto: decode the prompts "
                   "with a few chains and trees first and keep the fastest on this machine (cached; see `recyclegpt "
                   "tune`)")
    p.add_argument("--tree-topk", type=A.tree_topk, default=2, metavar="C",
                   help="children per expanded tree node, and nodes expanded per level (default 2)")
    p.add_argument("--drafter", default="module", choices=["module", "ngram", "hybrid"],
                   help="verify drafter: the recyclable module, prompt lookup (n-gram), or per round whichever "
                   "promises more (default module)")
    p.add_argument("--temperature", type=A.setting("temperature"), default=0.0,
                   help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-k", type=A.setting("top_k"), default=0,
                   help="sample among the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=A.setting("top_p"), default=1.0, help="nucleus sampling mass in (0, 1] (1 = off)")
    p.add_argument("--seed", type=A.setting("seed"), default=None,
                   help="sampling seed, a signed 64-bit integer: the same seed gives the same text (default: fresh "
                   "randomness every run)")
    p.add_argument("--stop", type=A.stop_text, action="append", default=[], metavar="TEXT",
                   help=f"stop a row when this text appears (up to {MAX_STOPS}); nothing after it is returned")
    p.add_argument("--compile", action="store_true",
                   help="run each decoding round as a torch.compile'd graph (faster per token; the first run "
                   "compiles once per mode/k, a start-up cost; later processes reuse inductor's disk cache)")


def decoding_kwargs(a: argparse.Namespace) -> dict:
    if len(a.stop) > MAX_STOPS:  # argparse's append has no count limit: the API's, said with the flag's name
        raise RecycleError(f"--stop: at most {MAX_STOPS} stop strings, got {len(a.stop)}")
    return dict(k=a.k, adaptive_k=a.adaptive_k, tree=a.tree, tree_topk=a.tree_topk, drafter=a.drafter,
                temperature=a.temperature, top_k=a.top_k,
                top_p=a.top_p, seed=a.seed, stop=a.stop or None, compile=a.compile)


def load_model(path: str, a: argparse.Namespace):
    from .api import RecycleGPT
    from .runtime import set_threads

    set_threads()
    return RecycleGPT.from_pretrained(path, device=a.device, dtype=a.dtype)


# ---- generate --------------------------------------------------------------------------------

def add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="continue a prompt with a checkpoint",
                       description="Continue prompts with a checkpoint (a checkpoint directory or a training run "
                       "directory) in any decoding mode. Several --prompt flags decode as one batch.")
    p.add_argument("ckpt", help="checkpoint directory (or a `recyclegpt train` run directory)")
    p.add_argument("--prompt", type=A.text, action="append", required=True,
                   help="text to continue (repeat for a batch)")
    add_decoding_args(p)
    p.add_argument("--stream", action="store_true", help="print text as tokens are accepted (one prompt)")
    p.add_argument("--stats", action="store_true", help="print tokens/s, full passes per token and tau")
    add_runtime_args(p)
    p.set_defaults(func=run_generate)


def run_generate(a: argparse.Namespace) -> int:
    m = load_model(a.ckpt, a)
    kw = decoding_kwargs(a)
    if kw["tree"] == "auto":
        if a.mode != "verify":
            raise RecycleError(f"--tree auto chooses a verify draft; it does nothing with --mode {a.mode}")
        with _bar("auto: measuring draft shapes") as progress:
            choice = m.choose_draft(a.prompt, progress=progress, **kw)
        _say(f"note: {choice.describe()}")
        kw.update(k=choice.best.k, tree=choice.best.tree, tree_topk=choice.best.tree_topk)
    if a.stream:
        if len(a.prompt) != 1:
            raise RecycleError("--stream takes exactly one --prompt")
        sys.stdout.write(a.prompt[0])
        for piece in m.stream(a.prompt[0], mode=a.mode, max_new_tokens=a.max_new_tokens, **kw):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0
    res = m.generate_with_stats(a.prompt, mode=a.mode, max_new_tokens=a.max_new_tokens, **kw)
    texts = res.texts if res.texts is not None else [m.tokenizer.decode(t) for t in res.tokens]
    for i, (prompt, text) in enumerate(zip(a.prompt, texts, strict=True)):
        if len(texts) > 1:
            print(f"--- [{i}] ({res.finish_reasons[i]})")
        print(prompt + text)
    if a.stats:
        st = res.stats
        print(f"[{a.mode}] {st.total_new_tokens} tokens, {st.tokens_per_s:.1f} tok/s, "
              f"{st.full_passes / max(1, st.total_new_tokens):.2f} full passes/token, tau {st.tau:.2f}, "
              f"dtype {str(m.dtype).removeprefix('torch.')}", file=sys.stderr)
    return 0


@contextlib.contextmanager
def _bar(description: str, enabled: bool = True) -> Iterator[Callable[[int, int], None] | None]:
    """A progress bar on stderr (when it is a terminal), driven by a `progress(done, total)` callback."""
    from .bench.report import progress_bar

    with progress_bar(enabled and sys.stderr.isatty()) as bar:
        if bar is None:
            yield None
            return
        task = bar.add_task(description, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


# ---- tune ------------------------------------------------------------------------------------

def add_tune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tune", help="measure chains and draft trees here and pick the fastest (--tree auto)",
                       description="Decode calibration prompts with a few verify drafts (chains of k = 2..4, trees of "
                       "6..16 nodes), each in the setting given (batch size, sampling, --compile), and print their τ, "
                       "milliseconds per round and tokens/s; the fastest becomes what `--tree auto` uses for this "
                       "checkpoint on this machine in this setting (cached in $RECYCLEGPT_CACHE, default "
                       "~/.cache/recyclegpt/auto.json). Use prompts like the ones you will decode: acceptance, and "
                       "with it the best draft, depends on the text.")
    p.add_argument("ckpt", help="checkpoint directory (or a `recyclegpt train` run directory)")
    p.add_argument("--prompts", default="code", metavar="NAME|FILE",
                   help="calibration prompts: code (default), prose, all, or a file (one prompt per line, or JSONL)")
    p.add_argument("--num-prompts", type=A.positive_int, default=4,
                   help="calibration prompts, the set's first N (default 4; repeated when the set has fewer)")
    p.add_argument("--batch-size", type=A.number(int, 1, 256), default=1,
                   help="prompts decoded together, as you will decode them (default 1)")
    p.add_argument("--max-new-tokens", type=A.number(int, 8, 4096), default=48,
                   help="tokens decoded per prompt and candidate (default 48)")
    p.add_argument("--repeats", type=A.positive_int, default=2, help="timed runs per candidate; the best counts "
                   "(default 2)")
    p.add_argument("--temperature", type=A.setting("temperature"), default=0.0,
                   help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-k", type=A.setting("top_k"), default=0, help="sampling top-k (0 = off)")
    p.add_argument("--top-p", type=A.setting("top_p"), default=1.0, help="sampling top-p (1 = off)")
    p.add_argument("--compile", action="store_true",
                   help="measure compiled rounds (compiles every candidate once: minutes on a small CPU)")
    p.add_argument("--refresh", action="store_true", help="measure again even if a cached choice exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_runtime_args(p)
    p.set_defaults(func=run_tune)


def run_tune(a: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from .prompts import load_prompts

    ps = load_prompts(a.prompts)  # a bad file fails before the model loads
    m = load_model(a.ckpt, a)
    n = max(a.num_prompts, a.batch_size)
    prompts = [ps.prompts[i % len(ps.prompts)] for i in range(n)]
    with _bar("tune: measuring draft shapes", not a.no_progress) as progress:
        choice = m.choose_draft(prompts, batch_size=a.batch_size, refresh=a.refresh, progress=progress,
                                max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k,
                                top_p=a.top_p, compile=a.compile)
    table = Table(title=f"verify drafts, {a.prompts} prompts, batch {a.batch_size}, "
                  f"{'compiled' if a.compile else 'eager'}, T={a.temperature:g}")
    for col in ("draft", "τ", "ms / round", "tokens/s", ""):
        table.add_column(col, justify="left" if col in ("draft", "") else "right")
    for t in choice.trials:
        table.add_row(t.shape.label, f"{t.tau:.2f}", f"{t.round_ms:.2f}", f"{t.tokens_per_s:.0f}",
                      "<- --tree auto" if t.shape == choice.best else "")
    Console().print(table)
    print(choice.describe())
    return 0


# ---- eval ------------------------------------------------------------------------------------

def add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="held-out perplexity: standard vs recycle",
                       description="Perplexity on held-out text, standard (every token by the full model) and "
                       "recycle (every second token by the recyclable module, as `recycle` decodes), with the "
                       "module's top-1 agreement with the full model. Without --data, a training run "
                       "directory's own validation split is used.")
    p.add_argument("ckpt", help="checkpoint or training run directory")
    p.add_argument("--data", nargs="+", metavar="PATH", help="held-out text files/directories/.jsonl")
    p.add_argument("--glob", default="**/*", help="file pattern inside data directories")
    p.add_argument("--max-tokens", type=A.positive_int, default=65536, help="tokens to score (default 65536)")
    p.add_argument("--seq-len", type=A.positive_int, default=512, help="window length (default 512)")
    p.add_argument("--json", metavar="OUT.json", help="also write the report as JSON")
    p.add_argument("--prompts", default="code", metavar="NAME|FILE",
                   help="prompt set for the greedy agreement of `recycle` with `ar`: code (default), prose, all, "
                   "or a file (one prompt per line, or JSONL)")
    p.add_argument("--agreement-tokens", type=A.nonneg_int, default=64, metavar="N",
                   help="new tokens per prompt for the agreement check (default 64; 0 skips it)")
    add_runtime_args(p)
    p.set_defaults(func=run_eval, dtype="float32")


def _check_outputs(a: argparse.Namespace, *flags: str) -> None:
    """Output files of a command that reads the checkpoint a.ckpt: checked before any work (writable, not a
    directory, not inside the checkpoint, not one of its input files)."""
    from pathlib import Path

    from .checkpoint import resolve_checkpoint_dir
    from .paths import check_input, check_output_file

    check_input(a.ckpt, "checkpoint", "dir")
    protect = [(str(resolve_checkpoint_dir(a.ckpt)), "the checkpoint")]
    protect += [(d, "a --data file") for d in getattr(a, "data", None) or [] if Path(d).is_file()]
    protect += [(a.prompts, "the --prompts file")] if Path(getattr(a, "prompts", "") or "").is_file() else []
    for flag in flags:
        check_output_file(getattr(a, flag.removeprefix("--").replace("-", "_")), flag, protect)


def run_eval(a: argparse.Namespace) -> int:
    from .bench.quality import load_eval_tokens, perplexity, run_tokens_val
    from .files import atomic_write_text

    _check_outputs(a, "--json")  # before the long part, not after it
    if a.data:
        from .data import resolve_files

        resolve_files(a.data, a.glob)
    prompts = None
    if a.agreement_tokens > 0:
        from .prompts import load_prompts

        prompts = load_prompts(a.prompts)  # fail on a bad file before the long part
    m = load_model(a.ckpt, a)
    if prompts is not None and a.agreement_tokens >= m.model.cfg.max_seq_len:
        raise RecycleError(f"--agreement-tokens {a.agreement_tokens} leaves no room for a prompt in the model's "
                           f"context of {m.model.cfg.max_seq_len} tokens")
    if a.data:
        tokens = load_eval_tokens(a.data, m.tokenizer, a.max_tokens, a.glob)
    else:
        tokens = run_tokens_val(a.ckpt)
        if tokens is None:
            raise RecycleError("no --data given and the checkpoint is not a training run with a validation split")
        tokens = tokens[: a.max_tokens]
    rep = perplexity(m.model, m.module, tokens, a.seq_len, progress=sys.stderr.isatty())
    print(f"tokens scored:              {rep.tokens}")
    print(f"perplexity, standard:       {rep.ppl_standard:.3f}")
    print(f"perplexity, recycle:        {rep.ppl_recycle:.3f}  ({100 * rep.recycle_ppl_increase:+.1f}%)")
    print(f"perplexity, module only:    {rep.ppl_module:.3f}")
    print(f"module top-1 = full top-1:  {rep.module_agrees_with_full:.3f}")
    print(f"full top-1 in module top-2 / top-3: {rep.module_top2_has_full:.3f} / {rep.module_top3_has_full:.3f}")
    print(f"top-1 accuracy full/module: {rep.full_top1_accuracy:.3f} / {rep.module_top1_accuracy:.3f}")
    agree = None
    if prompts is not None:
        from .bench.quality import greedy_agreement

        agree = greedy_agreement(m.model, m.module, m.encode(prompts.prompts), a.agreement_tokens,
                                 m.tokenizer.eos_id, progress=sys.stderr.isatty())
        print(f"greedy recycle = ar, tokens: {agree.token_agreement:.3f}  ({len(prompts)} prompts from "
              f"{prompts.name}, {a.agreement_tokens} new tokens each)")
        print(f"  first difference after:   {agree.mean_common_prefix:.1f} tokens on average; "
              f"{agree.identical_prompts}/{agree.prompts} outputs identical")
    if a.json:
        import json
        from pathlib import Path

        extra = {"greedy_agreement": {"prompt_set": prompts.name, **agree.to_dict()}} if agree else {}
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(a.json, json.dumps({"checkpoint": a.ckpt, "dtype": str(m.dtype), **rep.to_dict(),
                                              **extra}, indent=2))
    return 0


# ---- bench -----------------------------------------------------------------------------------

def _mode_list(s: str) -> list[str]:
    from .bench.speed import ALL_MODES

    modes = [m.strip() for m in s.split(",") if m.strip()]
    bad = [m for m in modes if m not in ALL_MODES]
    if bad or not modes:
        raise argparse.ArgumentTypeError(f"unknown mode(s) {bad or s!r}; choose from {','.join(ALL_MODES)}")
    return modes


def add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench", help="decoding speed of every mode vs plain ar and transformers; `bench serve`: load-test a server",
        description="Measure tokens/s of `ar`, `recycle`, `verify` (k, optionally adaptive or hybrid), transformers' "
        "`generate` on the same weights (hf_generate) and its prompt-lookup decoding (hf_assisted): same weights, "
        "dtype, device, prompts, batch and max_new_tokens, warmed up, rounds interleaved, median reported. "
        "Per mode: speedup vs `ar`, full passes per token, tau, acceptance by draft position, and whether the "
        "output is identical to `ar`'s. To load-test a running OpenAI-compatible server instead (recyclegpt's own or "
        "vLLM): `recyclegpt bench serve --url URL` (TTFT, TPOT, inter-token latency, tokens/s by concurrency; see "
        "`recyclegpt bench serve --help`; a checkpoint directory named `serve` is then written ./serve).")
    p.add_argument("ckpt", help="checkpoint directory (or a `recyclegpt train` run directory)")
    p.add_argument("--prompts", default="code", metavar="NAME|FILE",
                   help="shipped set (code: held-out stdlib functions, prose, all) or a file: one prompt per line, "
                   "or JSONL with a \"prompt\" field per line (default code)")
    p.add_argument("--num-prompts", type=A.nonneg_int, default=8, metavar="N",
                   help="use the first N prompts of the set (default 8, to keep a default run short; 0 = all)")
    p.add_argument("--max-new-tokens", type=A.positive_int, default=128, help="new tokens per prompt (default 128)")
    p.add_argument("--batch-size", type=A.positive_int, default=1, help="prompts decoded together (default 1)")
    p.add_argument("--temperature", type=A.setting("temperature"), default=0.0,
                   help="0 = greedy (default); e.g. 1 to sample")
    p.add_argument("--seed", type=A.seed, default=0, help="sampling seed (default 0)")
    p.add_argument("--repeats", type=A.positive_int, default=3, help="timed rounds per mode (default 3)")
    p.add_argument("--modes", type=_mode_list, default=None, metavar="M1,M2",
                   help="modes to run (default all: ar,recycle,verify,hf_generate,hf_assisted)")
    p.add_argument("--k", type=A.draft_k, nargs="+", default=[3], metavar="K",
                   help="verify draft lengths, one lane each (default 3; e.g. --k 1 2 3 4)")
    p.add_argument("--tree", type=A.tree_or_auto, nargs="+", default=[], metavar="N|auto",
                   help="add `verify tree N` lanes: a draft tree of N nodes per round, depth --tree-depth, "
                   "--tree-topk children per node (compiled too under --compile headline/all; e.g. --tree 8 16); "
                   "auto adds a `verify auto` lane: the chain or tree `--tree auto` picks, measured on these prompts "
                   "first (as `recyclegpt tune` does)")
    p.add_argument("--tree-depth", type=A.draft_k, default=None, metavar="D",
                   help="depth of the tree lanes (default: the largest --k)")
    p.add_argument("--tree-topk", type=A.tree_topk, default=2, metavar="C",
                   help="children per expanded node in the tree lanes (default 2)")
    p.add_argument("--adaptive", action=argparse.BooleanOptionalAction, default=False,
                   help="add a `verify adaptive` lane: k moves within 1..max(--k) from recent acceptance (default off)")
    p.add_argument("--hybrid", action=argparse.BooleanOptionalAction, default=False,
                   help="add a `verify hybrid` lane: per row and round, the module's chain or a prompt-lookup match "
                   "of up to --prompt-lookup tokens (default off)")
    p.add_argument("--prompt-lookup", type=A.positive_int, default=10,
                   help="hf_assisted: prompt_lookup_num_tokens (default 10)")
    p.add_argument("--hf-cache", default="auto", choices=["auto", "static", "dynamic"],
                   help="hf_generate KV cache; auto measures both once and keeps the faster (default)")
    p.add_argument("--compile", default="headline", choices=["none", "ar", "headline", "all"],
                   help="compiled lanes (each decoding round one torch.compile'd graph; compiling is a start-up cost "
                   "per lane, reported apart from tokens/s): headline (default) adds compiled `ar` (the baseline "
                   "where it is faster) and compiled `verify` for each --k, the comparison that matters on CPU; "
                   "all: every native lane compiled too; ar: only `ar`; none: eager only")
    p.add_argument("--stop-at-eos", action="store_true",
                   help="let EOS end a row (default: ignored, so every mode produces exactly --max-new-tokens)")
    p.add_argument("--json", metavar="OUT.json", help="write the report as JSON (keys listed in docs/definitions.md)")
    p.add_argument("--plot", metavar="OUT.png", help="write a plot: tokens/s by mode, acceptance by draft position")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_runtime_args(p)
    p.set_defaults(func=run_bench)


def run_bench(a: argparse.Namespace) -> int:
    import os

    from .bench.report import print_table, write_json, write_plot
    from .bench.speed import ALL_MODES, BenchOptions
    from .bench.speed import run_bench as bench
    from .prompts import load_prompts

    prompts = load_prompts(a.prompts, a.num_prompts or None)  # fail on a bad file before loading the model
    _check_outputs(a, "--json", "--plot")  # before the long part, not after it
    if a.json and a.plot and os.path.abspath(a.json) == os.path.abspath(a.plot):
        raise RecycleError(f"--json and --plot name the same file {a.json}")
    m = load_model(a.ckpt, a)
    opts = BenchOptions(max_new_tokens=a.max_new_tokens, batch_size=a.batch_size, temperature=a.temperature,
                        seed=a.seed, repeats=a.repeats, modes=a.modes or list(ALL_MODES), ks=a.k,
                        adaptive=a.adaptive, hybrid=a.hybrid, prompt_lookup=a.prompt_lookup,
                        trees=[t for t in a.tree if t and t != "auto"],
                        auto="auto" in a.tree, tree_depth=a.tree_depth or max(a.k), tree_topk=a.tree_topk,
                        hf_cache=a.hf_cache, compile=a.compile,
                        ignore_eos=not a.stop_at_eos, progress=not a.no_progress and sys.stderr.isatty())
    report = bench(m.model, m.module, m.tokenizer, prompts, opts, checkpoint=a.ckpt)
    return _report(a, report, print_table, write_json, write_plot)


def _report(a: argparse.Namespace, report, print_table, write_json, write_plot, **json_kw) -> int:
    """Print a bench report's table and write its --json and --plot files (both bench commands)."""
    print_table(report)
    if a.json:
        write_json(report, a.json, **json_kw)
        print(f"json: {a.json}")
    if a.plot:
        write_plot(report, a.plot)
        print(f"plot: {a.plot}")
    return 0


# ---- serve -----------------------------------------------------------------------------------

def run_bench_serve(a: argparse.Namespace) -> int:
    """`recyclegpt bench serve` (its parser: `bench.serve_load.build_parser`)."""
    from .bench.serve_load import ServeLoadOptions, print_table, run_serve_load, write_json, write_plot
    from .paths import check_output_file

    for flag in ("--json", "--plot"):  # before the load test, not after it
        check_output_file(getattr(a, flag[2:]), flag)
    opts = ServeLoadOptions(url=a.url, model=a.model, api_key=a.api_key, prompts=a.prompts,
                            num_requests=a.num_requests, max_tokens=a.max_tokens, temperature=a.temperature,
                            ignore_eos=a.ignore_eos, extra=a.extra, endpoint=a.endpoint, concurrency=a.concurrency,
                            request_rate=a.request_rate, duration=a.duration, timeout=a.timeout, seed=a.seed,
                            progress=not a.no_progress and sys.stderr.isatty())
    return _report(a, run_serve_load(opts), print_table, write_json, write_plot, save_texts=a.save_texts)


def add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="an OpenAI-compatible HTTP server with continuous batching",
        description="Serve a checkpoint over the OpenAI API (/v1/completions, /v1/chat/completions, /v1/models; "
        "streaming by server-sent events), plus /health and /metrics (Prometheus). An engine process decodes "
        "up to --slots requests together; requests join and leave between rounds, and each round runs over the "
        "smallest of --batches that holds the requests in flight. If the engine dies or hangs, the requests it "
        "was decoding get a 503 and a fresh engine serves the rest. Needs the serve extra: "
        "pip install -e \".[serve]\".")
    p.add_argument("ckpt", help="checkpoint directory (or a `recyclegpt train` run directory)")
    p.add_argument("--host", type=A.text, default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes it)")
    p.add_argument("--port", type=A.port, default=8000, help="port (default 8000)")
    p.add_argument("--model-name", type=A.text, default=None,
                   help="the model id clients send (default: the checkpoint's name)")
    p.add_argument("--slots", type=A.number(int, 1, 4096), default=8,
                   help="requests decoded together in one batch, 1 to 4096 (default 8)")
    p.add_argument("--batches", type=A.batch_sizes, default=None, metavar="B,B,...",
                   help="the batch sizes a round may run at, each with its own compiled graphs (default: powers "
                   "of two below --slots, then --slots: 1,2,4,8). A round runs at the smallest that holds the "
                   "requests in flight; --slots is always one")
    p.add_argument("--max-k", type=A.draft_k, default=3,
                   help="most drafts per round a request may ask for (`k`); every verify round is this wide "
                   "(default 3)")
    p.add_argument("--k", type=A.draft_k, default=3, help="drafts per round when a request gives no k (default 3)")
    p.add_argument("--tree", type=A.tree_or_auto, default=0, metavar="N|auto",
                   help="verify requests draft a tree of N nodes, --max-k deep, instead of a chain (default 0: "
                   "chains); N >= --max-k. auto: at start, measure chains and trees with every slot busy (the "
                   "shipped code and prose prompts; cached like `recyclegpt tune`) and serve the fastest; its "
                   "depth replaces --max-k")
    p.add_argument("--tree-topk", type=A.tree_topk, default=2, metavar="C", help="children per tree node (default 2)")
    p.add_argument("--load-aware", action=argparse.BooleanOptionalAction, default=True,
                   help="a greedy round whose drafts cost more than they bring at the current load (many rows, "
                   "low acceptance) runs without them, judged from the rounds' measured seconds and the live "
                   "acceptance (default on; the text is the same either way; sampled rounds always draft)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="compile the decoding rounds (default on: the greedy ones of the smallest and the widest "
                   "batch and the sampled ones of the widest at start, /health answering ready once done, the rest "
                   "while the server is idle; --no-compile starts at once and decodes eagerly, slower)")
    p.add_argument("--api-key", type=A.text, default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $RECYCLEGPT_API_KEY if set, else none)")
    p.add_argument("--max-queue", type=A.positive_int, default=256,
                   help="requests that may wait for a slot; more get 429 (default 256)")
    p.add_argument("--max-tokens-limit", type=A.positive_int, default=None,
                   help="largest max_tokens a request may ask for (default: the model's context)")
    p.add_argument("--max-body-bytes", type=A.positive_int, default=1 << 20, help="request size limit (default 1 MiB)")
    p.add_argument("--request-timeout", type=A.positive_float, default=600.0,
                   help="seconds a request may take, queue included (default 600)")
    p.add_argument("--engine-timeout", type=A.positive_float, default=120.0,
                   help="an engine that holds requests and sends nothing for this many seconds is taken as hung: "
                   "killed (its requests get a 503) and restarted (default 120)")
    p.add_argument("--engine", choices=["process", "thread"], default="process",
                   help="where decoding runs: a process of its own (default; this one does HTTP, tokenizing and "
                   "detokenizing, and outlives an engine crash) or a thread of this process (one process, "
                   "for debugging)")
    p.add_argument("--engine-cpus", type=A.text, default="none", metavar="none|auto|LIST",
                   help="bind the engine process's decoding threads, one to each CPU: none (default: one thread per "
                   "physical core, scheduled by the OS), "
                   "auto (one CPU of each physical core this process may use) or a list such as 0-3 (e.g. to keep "
                   "cores free for the API process). OMP_NUM_THREADS, OMP_PLACES and OMP_PROC_BIND, when set, win")
    add_runtime_args(p)
    p.set_defaults(func=run_serve)


def run_serve(a: argparse.Namespace) -> int:
    import logging
    import os

    from .runtime import set_threads
    from .serve import run_server
    from .serve.options import parse_cpus

    if a.k > a.max_k:
        raise RecycleError(f"--k {a.k} is larger than --max-k {a.max_k}")
    if a.tree and a.tree != "auto":
        from .decoding.tree import tree_candidates

        most = tree_candidates(a.max_k, a.tree_topk)
        if a.tree < a.max_k:
            raise RecycleError(f"--tree {a.tree} is smaller than --max-k {a.max_k}; a tree holds at least its depth")
        if a.tree > most:
            raise RecycleError(f"--tree {a.tree}: a tree {a.max_k} deep with --tree-topk {a.tree_topk} has at most "
                               f"{most} nodes; raise --max-k or --tree-topk")
    if a.request_timeout <= 0:
        raise RecycleError(f"--request-timeout must be > 0, got {a.request_timeout}")
    if a.batches is not None and max(a.batches) > a.slots:
        raise RecycleError(f"--batches {','.join(map(str, a.batches))}: each must be at most --slots {a.slots}")
    parse_cpus(a.engine_cpus)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    set_threads()
    run_server(a.ckpt, a.host, a.port, engine=a.engine, cpus=a.engine_cpus, device=a.device, dtype=a.dtype,
               model_name=a.model_name, slots=a.slots, batches=a.batches, load_aware=a.load_aware,
               compile=a.compile, width=a.max_k, default_k=a.k, tree=a.tree, tree_topk=a.tree_topk,
               api_key=a.api_key or os.environ.get("RECYCLEGPT_API_KEY") or None, max_queue=a.max_queue,
               max_body_bytes=a.max_body_bytes, max_tokens_limit=a.max_tokens_limit,
               request_timeout_s=a.request_timeout, engine_timeout_s=a.engine_timeout)
    return 0


# ---- lm-eval ---------------------------------------------------------------------------------

def add_lm_eval(sub: argparse._SubParsersAction) -> None:
    # Everything after `lm-eval` goes to lm-eval's own command line untouched (its --help included):
    # prefix_chars that no option uses keeps argparse from reading lm-eval's options itself.
    p = sub.add_parser("lm-eval", help="EleutherAI lm-eval with the `recyclegpt` model registered",
                       add_help=False, prefix_chars="\x00")
    p.add_argument("args", nargs=argparse.REMAINDER)
    p.set_defaults(func=run_lm_eval)


def run_lm_eval(a: argparse.Namespace) -> int:
    from .lm_eval_adapter import cli_main

    return cli_main(a.args)


# ---- demo ------------------------------------------------------------------------------------

def add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the shipped checkpoint: ar vs recycle side by side",
                       description="Continue a few code prompts with the checkpoint that ships with recyclegpt, in "
                       "`ar` and `recycle` (and `verify`), and print them side by side with tokens/s, full passes "
                       "per token and speedup. --train reproduces the shipped checkpoint from scratch.")
    p.add_argument("--ckpt", help="use this checkpoint instead of the shipped one")
    p.add_argument("--max-new-tokens", type=A.positive_int, default=48, help="new tokens per prompt (default 48)")
    p.add_argument("--train", action="store_true",
                   help="reproduce the shipped checkpoint by its recorded train command into the cache directory")
    p.add_argument("--out", help="with --train: run directory (default: ~/.cache/recyclegpt/demo-run)")
    add_runtime_args(p)
    p.set_defaults(func=run_demo)


def run_demo(a: argparse.Namespace) -> int:
    from .demo import demo, train_shipped

    if a.train:
        return train_shipped(a.out)
    return demo(a.ckpt, a.max_new_tokens, a.device, a.dtype)

# ---- attach ----------------------------------------------------------------------------------

def add_attach(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "attach", help="train a recyclable module on your own (frozen) model",
        description="Attach a recyclable module to an existing model: the base stays frozen and only the module "
        "trains, by self-distillation (its targets are the base's own greedy predictions on your data, computed "
        "on the fly). BASE is a local transformers directory (Llama, Mistral and Qwen2 load natively; any other "
        "causal LM runs through transformers itself: slower, every mode still exact) or a recyclegpt "
        "checkpoint (its full model is the base). OUT/checkpoint is usable by generate/bench/eval/export; "
        "--resume continues an interrupted run.",
    )
    p.add_argument("base", help="transformers model directory (config.json + *.safetensors + tokenizer) or a "
                   "recyclegpt checkpoint / training run directory")
    p.add_argument("--data", nargs="+", required=True, metavar="PATH",
                   help="text files, directories (searched recursively with --glob), .jsonl files, or 'stdlib'")
    p.add_argument("--out", required=True, help="run directory (must be new or empty unless --resume)")
    p.add_argument("--init-from-checkpoint", nargs="?", const="", default=None, metavar="CKPT",
                   help="start from an existing module instead of a fresh one: BASE's own (no value; BASE must "
                   "be a recyclegpt checkpoint) or CKPT's (it must fit the base)")
    p.add_argument("--backend", default="auto", choices=["auto", "native", "generic"],
                   help="auto (default): native for Llama/Mistral/Qwen2 it can express exactly, else transformers")
    p.add_argument("--max-seq-len", type=A.positive_int,
                   help="context for a transformers BASE (default: its own, at most 2048)")
    p.add_argument("--base-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="precision of the frozen base's weights (bfloat16 halves its memory)")
    p.add_argument("--max-minutes", type=A.positive_float, help="stop (and checkpoint) after this many minutes")
    p.add_argument("--max-steps", type=A.positive_int, help="optimizer steps (default 1000; the schedule's length)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--lr", type=A.positive_float, help="peak learning rate (default 1e-3)")
    p.add_argument("--batch-size", type=A.positive_int, help="sequences per step (default 8)")
    p.add_argument("--seq-len", type=A.positive_int, help="tokens per training window (default 256)")
    p.add_argument("--grad-accum", type=A.positive_int, help="micro-batches per optimizer step")
    p.add_argument("--unroll-steps", type=A.positive_int,
                   help="chained module steps trained (default 2: drafts 2+ see the module's own state)")
    p.add_argument("--module-layers", type=A.positive_int, help="blocks in a fresh module (default 1)")
    p.add_argument("--distill-kl", type=A.unit, default=0.0, metavar="W",
                   help="mix the base's full distribution into the target with weight W in [0, 1] (a KL term; "
                   "default 0: its greedy token only)")
    p.add_argument("--val-prompts", type=A.nonneg_int, default=4,
                   help="held-out prompts decoded with verify at each validation (default 4; 0: off)")
    p.add_argument("--eval-every", type=A.positive_int, help="steps between validations (default 100)")
    p.add_argument("--save-every", type=A.positive_int, help="steps between checkpoints (default 100)")
    p.add_argument("--seed", type=A.seed, help="random seed")
    p.add_argument("--fp32", action="store_true",
                   help="no bf16 autocast (default: autocast where the CPU has native bf16, or on CUDA)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even where a GPU exists")
    p.add_argument("--glob", default="**/*", help="file pattern inside data directories (default: all files)")
    p.add_argument("--text-field", type=A.text, default="text", help="JSONL field holding the text (default: text)")
    p.add_argument("--val-fraction", type=A.fraction, default=0.05,
                   help="share of documents held out, in [0, 1) (default 0.05)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_attach)


def run_attach(a: argparse.Namespace) -> int:
    from .runtime import set_threads
    from .training.attach import AttachOptions, attach

    set_threads()
    overrides = {k: getattr(a, k) for k in ("lr", "batch_size", "seq_len", "grad_accum", "unroll_steps",
                                             "eval_every", "save_every", "seed") if getattr(a, k) is not None}
    if a.fp32:
        overrides["bf16"] = False
    opts = AttachOptions(base=a.base, data=a.data, out=a.out, init_from_checkpoint=a.init_from_checkpoint,
                         backend=a.backend, max_seq_len=a.max_seq_len, base_dtype=a.base_dtype,
                         max_minutes=a.max_minutes, max_steps=a.max_steps, resume=a.resume, glob=a.glob,
                         text_field=a.text_field, val_fraction=a.val_fraction, overrides=overrides,
                         module_overrides={"n_layer": a.module_layers} if a.module_layers else {},
                         distill_kl=a.distill_kl, val_prompts=max(0, a.val_prompts), progress=not a.no_progress,
                         cpu=a.cpu)
    ckpt = attach(opts)
    print(f"checkpoint: {ckpt}")
    print(f"try: recyclegpt generate {a.out} --prompt 'Hello' --mode verify --stats")
    return 0


# ---- export ----------------------------------------------------------------------------------

def add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="export for serving engines: the full model (transformers) or the module (EAGLE draft)",
        description="--format hf writes the full model as a transformers directory (LlamaForCausalLM, or "
        "Qwen2ForCausalLM with q/k/v biases; for a checkpoint attached to another architecture, a copy of its "
        "base). --format eagle writes the recyclable module as an EAGLE-1 draft for vLLM or SGLang (--flavour). "
        "--format gguf writes OUT/model.gguf, the full model for llama.cpp (its `llama` architecture, the tokenizer "
        "declared in full). --format all writes OUT/hf, OUT/eagle-vllm and OUT/eagle-sglang. The serving commands "
        "are printed.",
    )
    p.add_argument("ckpt", help="checkpoint directory (or a train/attach run directory)")
    p.add_argument("--format", required=True, choices=["hf", "eagle", "gguf", "all"], help="what to export")
    p.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    p.add_argument("--flavour", default="vllm", choices=["vllm", "sglang"], help="EAGLE draft flavour (default vllm)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="precision of the written weights (default float32)")
    p.add_argument("--target", help="with --format eagle: the served full model's directory, for the printed "
                   "command (default: the base for attached checkpoints, else TARGET_HF_DIR)")
    p.add_argument("--num-speculative-tokens", type=A.positive_int, default=3,
                   help="drafts per step in the printed commands (default 3)")
    p.add_argument("--allow-approximate", action="store_true",
                   help="export a module variant (input/final norms) approximately as EAGLE-1")
    p.add_argument("--no-embeddings", action="store_true",
                   help="leave embed_tokens out of the EAGLE draft (engines share the target's)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=run_export)


def _check_export_out(a: argparse.Namespace, ckpt, cfg, out) -> None:
    """--out before any work: never the checkpoint (or its run, or a referenced base), never inside or
    around one of them; with --overwrite only an earlier export is replaced."""
    from .paths import check_output_dir

    protect = [(a.ckpt, "the checkpoint"), (str(ckpt), "the checkpoint")]
    if cfg.base is not None and cfg.base.get("path"):
        protect.append((cfg.base["path"], "the checkpoint's base model"))
    if a.format == "all":  # OUT is written into; OUT/hf, OUT/eagle-* are replaced
        check_output_dir(a.out, "--out", overwrite=None if a.overwrite else False, protect=protect)
        for sub in ("hf", "eagle-vllm", "eagle-sglang"):
            check_output_dir(out / sub, "--out", overwrite=a.overwrite, protect=protect)
    else:
        check_output_dir(a.out, "--out", overwrite=a.overwrite, protect=protect)


def run_export(a: argparse.Namespace) -> int:
    from pathlib import Path

    from .checkpoint import load_config, resolve_checkpoint_dir
    from .hf import export_eagle, export_hf, serving_command, serving_commands
    from .hf.generic import copy_base_dir

    ckpt = resolve_checkpoint_dir(a.ckpt)
    cfg = load_config(ckpt)
    out = Path(a.out)
    _check_export_out(a, ckpt, cfg, out)
    if a.format in ("eagle", "all") and not cfg.module.is_eagle_layout and not a.allow_approximate:  # the flag
        raise RecycleError(f"this module variant (input norms: {cfg.module.input_norms}, final norm: "
                           f"{cfg.module.final_norm}) has no exact EAGLE-1 form; export a default-layout module, "
                           "or pass --allow-approximate")
    k = a.num_speculative_tokens

    def write_hf(dst: Path) -> Path:
        if cfg.base is not None:
            return copy_base_dir(cfg.base["path"], dst, overwrite=a.overwrite)
        return export_hf(ckpt, dst, dtype=a.dtype, overwrite=a.overwrite)

    def write_eagle(dst: Path, flavour: str) -> Path:
        return export_eagle(ckpt, dst, flavour, allow_approximate=a.allow_approximate,
                            include_embeddings=not a.no_embeddings, dtype=a.dtype, overwrite=a.overwrite)

    if a.format == "gguf":
        from .hf.gguf import export_gguf

        if cfg.base is not None:
            raise RecycleError("--format gguf writes recyclegpt's own full model; this checkpoint runs a "
                               f"transformers base ({cfg.base.get('path')}): convert that with llama.cpp's "
                               "convert_hf_to_gguf.py")
        path = export_gguf(ckpt, out, dtype=a.dtype, overwrite=a.overwrite)
        print(f"full model (GGUF, llama.cpp): {path}")
        print(f"run it: llama-cli -m {path} -p 'def add(a, b):' -n 64 --temp 0")
        return 0
    if a.format == "hf":
        print(f"full model (transformers): {write_hf(out)}")
        print("serve it with its recyclable module as an EAGLE draft (recyclegpt export CKPT --format eagle):")
        print(serving_commands(target_path=str(out), num_speculative_tokens=k), end="")
    elif a.format == "eagle":
        target = a.target or (cfg.base["path"] if cfg.base is not None else "TARGET_HF_DIR")
        print(f"EAGLE-1 draft ({a.flavour}): {write_eagle(out, a.flavour)}")
        if target == "TARGET_HF_DIR":
            print("target: the full model as a transformers directory (recyclegpt export CKPT --format hf)")
        print(serving_command(a.flavour, target_path=target, draft_path=str(out), num_speculative_tokens=k))
    else:
        hf_dir = write_hf(out / "hf")
        vllm_dir, sglang_dir = write_eagle(out / "eagle-vllm", "vllm"), write_eagle(out / "eagle-sglang", "sglang")
        print(f"full model (transformers): {hf_dir}\nEAGLE-1 drafts: {vllm_dir}, {sglang_dir}")
        print(serving_commands(target_path=str(hf_dir), vllm_draft=str(vllm_dir), sglang_draft=str(sglang_dir),
                               num_speculative_tokens=k), end="")
    if cfg.base is not None:
        print(f"note: the full model is a {cfg.base.get('model_type')} model; vLLM/SGLang run EAGLE drafts only "
              "for target architectures they support EAGLE on (Llama, Qwen, Mistral, ...)", file=sys.stderr)
    return 0


# ---- entry -----------------------------------------------------------------------------------

COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [add_demo, add_generate, add_train, add_eval,
                                                               add_bench, add_tune, add_serve, add_lm_eval,
                                                               add_attach, add_export]


def build_parser() -> argparse.ArgumentParser:
    parser = A.Parser(
        prog="recyclegpt",
        description="RecycleGPT: a language model with a recyclable module (Yang et al., 2023, arXiv 2308.03421) "
        "for faster decoding — the paper's alternating `recycle` mode and a lossless draft-and-`verify` mode.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def _say(line: str) -> None:
    """One line on stderr whatever it holds: bytes of paths that are not UTF-8 as \\xNN, newlines escaped."""
    try:
        line = line.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that no command-line byte makes
        line = line.encode("utf-8", "backslashreplace").decode("utf-8")
    print(line.replace("\r", "\\r").replace("\n", "\\n"), file=sys.stderr)


@contextlib.contextmanager
def _notes() -> Iterator[None]:
    """While a command runs, each RecycleWarning prints as one `note: ...` line on stderr; others as usual."""
    with warnings.catch_warnings():
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, RecycleWarning):
                _say(f"note: {message}")
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        warnings.simplefilter("always", RecycleWarning)
        yield


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:2] == ["bench", "serve"]:  # load-testing a running server: a parser of its own; `bench CKPT` stays
        from .bench.serve_load import build_parser as build_bench_serve_parser

        parser, argv = build_bench_serve_parser(A.Parser), argv[2:]
        parser.set_defaults(func=run_bench_serve)
    else:
        parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except A.UsageError as e:
        _say(f"error: {e}")
        return 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        with _notes():
            return args.func(args) or 0
    except RecycleError as e:
        _say(f"error: {e}")
        return 2
    except Interrupted as e:  # SIGINT/SIGTERM in train/attach: the checkpoint is saved; say how to go on
        _say(_interrupted_line(e, argv))
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # a file-system fault no check foresaw: still one line, never a traceback
        where = f"{e.filename}: " if e.filename else ""
        _say(f"error: {where}{e.strerror or e}")
        return 2


def _interrupted_line(e: Interrupted, argv: list[str]) -> str:
    import shlex

    if e.step is None or argv[:1] not in (["train"], ["attach"]):
        return str(e)
    again = argv if "--resume" in argv else [*argv, "--resume"]
    return f"{e}; continue with: recyclegpt {shlex.join(again)}"


if __name__ == "__main__":
    sys.exit(main())
