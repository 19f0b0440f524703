"""`recyclegpt` command line. Every subcommand's --help explains its options.

Bad input raises RecycleError anywhere below; main() prints it as one line and exits with 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from .errors import RecycleError

Handler = Callable[[argparse.Namespace], int | None]


def _positive_float(s: str) -> float:
    v = float(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {s}")
    return v


def _positive_int(s: str) -> int:
    v = int(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {s}")
    return v


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
    p.add_argument("--max-minutes", type=_positive_float, help="stop (and checkpoint) after this many minutes")
    p.add_argument("--max-steps", type=_positive_int, help="optimizer steps (also the cosine schedule's length)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--tokenizer", help="use this tokenizer.json instead of training a BPE on the data")
    p.add_argument("--glob", default="**/*", help="file pattern inside data directories (default: all files)")
    p.add_argument("--text-field", default="text", help="JSONL field holding the text (default: text)")
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of documents held out (default 0.05)")
    p.add_argument("--lr", type=_positive_float, help="peak learning rate (default: the preset's)")
    p.add_argument("--batch-size", type=_positive_int, help="sequences per step and process")
    p.add_argument("--seq-len", type=_positive_int, help="tokens per training sequence")
    p.add_argument("--grad-accum", type=_positive_int, help="micro-batches per optimizer step")
    p.add_argument("--recycle-weight", type=float, help="lambda in CE(full) + lambda*CE(module) (default 0.3)")
    p.add_argument("--unroll-steps", type=_positive_int, help="chained module steps trained (default 2)")
    p.add_argument("--vocab-size", type=_positive_int, help="tokenizer/model vocabulary (default: the preset's)")
    p.add_argument("--module-layers", type=_positive_int, help="blocks in the recyclable module (default 1)")
    p.add_argument("--eval-every", type=_positive_int, help="steps between validations")
    p.add_argument("--save-every", type=_positive_int, help="steps between checkpoints")
    p.add_argument("--seed", type=int, help="random seed")
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


# ---- shared options --------------------------------------------------------------------------

def add_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="auto",
                   help="auto (bf16 where the CPU has native bf16 or on CUDA, else fp32), float32 or bfloat16")


def add_decoding_args(p: argparse.ArgumentParser, default_mode: str = "verify") -> None:
    p.add_argument("--mode", default=default_mode, choices=["ar", "recycle", "verify"],
                   help="ar: one full pass per token; recycle: the paper's alternation of full model and "
                   "module (lossy, ~2 tokens per pass); verify: module drafts, full model verifies (lossless)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="new tokens per prompt (default 64)")
    p.add_argument("--k", type=_positive_int, default=3, help="drafts per verify round (default 3)")
    p.add_argument("--adaptive-k", action="store_true", help="grow/shrink k from recent acceptance (verify)")
    p.add_argument("--drafter", default="module", choices=["module", "ngram", "hybrid"],
                   help="verify drafter: the recyclable module, prompt lookup (n-gram), or per round whichever "
                   "promises more (default module)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop a row when this text appears (repeatable); nothing after it is returned")


def decoding_kwargs(a: argparse.Namespace) -> dict:
    return dict(k=a.k, adaptive_k=a.adaptive_k, drafter=a.drafter, temperature=a.temperature, top_k=a.top_k,
                top_p=a.top_p, seed=a.seed, stop=a.stop or None)


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
    p.add_argument("--prompt", action="append", required=True, help="text to continue (repeat for a batch)")
    add_decoding_args(p)
    p.add_argument("--stream", action="store_true", help="print text as tokens are accepted (one prompt)")
    p.add_argument("--stats", action="store_true", help="print tokens/s, full passes per token and tau")
    add_runtime_args(p)
    p.set_defaults(func=run_generate)


def run_generate(a: argparse.Namespace) -> int:
    m = load_model(a.ckpt, a)
    kw = decoding_kwargs(a)
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
    p.add_argument("--max-tokens", type=_positive_int, default=65536, help="tokens to score (default 65536)")
    p.add_argument("--seq-len", type=_positive_int, default=512, help="window length (default 512)")
    p.add_argument("--json", metavar="OUT.json", help="also write the report as JSON")
    add_runtime_args(p)
    p.set_defaults(func=run_eval, dtype="float32")


def run_eval(a: argparse.Namespace) -> int:
    from .bench.quality import load_eval_tokens, perplexity, run_tokens_val
    from .checkpoint import atomic_write_text

    m = load_model(a.ckpt, a)
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
    print(f"top-1 accuracy full/module: {rep.full_top1_accuracy:.3f} / {rep.module_top1_accuracy:.3f}")
    if a.json:
        import json

        atomic_write_text(a.json, json.dumps({"checkpoint": a.ckpt, "dtype": str(m.dtype), **rep.to_dict()},
                                             indent=2))
    return 0


# ---- demo ------------------------------------------------------------------------------------

def add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the shipped checkpoint: ar vs recycle side by side",
                       description="Continue a few code prompts with the checkpoint that ships with recyclegpt, in "
                       "`ar` and `recycle` (and `verify`), and print them side by side with tokens/s, full passes "
                       "per token and speedup. --train reproduces the shipped checkpoint from scratch.")
    p.add_argument("--ckpt", help="use this checkpoint instead of the shipped one")
    p.add_argument("--max-new-tokens", type=_positive_int, default=48, help="new tokens per prompt (default 48)")
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

# ---- entry -----------------------------------------------------------------------------------

COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [add_demo, add_generate, add_train, add_eval]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recyclegpt",
        description="RecycleGPT: a language model with a recyclable module (Yang et al., 2023, arXiv 2308.03421) "
        "for faster decoding — the paper's alternating `recycle` mode and a lossless draft-and-`verify` mode.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except RecycleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
