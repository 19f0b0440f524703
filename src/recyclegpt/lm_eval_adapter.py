"""EleutherAI lm-eval adapter: the `recyclegpt` model class, scoring tokens the way a mode makes them.

    recyclegpt lm-eval --model recyclegpt --model_args pretrained=CKPT,mode=recycle --tasks T [...]

or from Python:

    import lm_eval
    from recyclegpt.lm_eval_adapter import RecycleGPTLM   # importing registers "recyclegpt"
    lm_eval.simple_evaluate(model="recyclegpt", model_args="pretrained=CKPT,mode=std", tasks=[...])
    lm_eval.simple_evaluate(model=RecycleGPTLM(pretrained="CKPT", mode="recycle"), tasks=[...])

model_args:
  pretrained   checkpoint or training run directory (required)
  mode         std: every token scored by the full model; recycle: as `recycle` decoding produces
               text -- after the context, new tokens 1, 3, 5, ... come from the full model and 2, 4,
               6, ... from the recyclable module (reading the full model's state one position back
               and the true token in between), so loglikelihood and is_greedy are those of the
               recycle decoder; default std
  gen_mode     decoding mode for generate_until: ar | recycle | verify (default: ar for mode=std,
               recycle for mode=recycle; verify gives ar's output, usually faster)
  k            drafts per verify round (gen_mode=verify; default 3)
  device       cpu | cuda | cuda:N | auto (default auto; lm-eval's --device also sets it)
  dtype        float32 (default: scores comparable across machines) | bfloat16 | auto
  batch_size   sequences per forward pass (default 16; lm-eval's --batch_size sets it, `auto` = 16)
  max_length   context window (default: the model's max_seq_len)
  max_gen_toks default new-token cap for generate_until (default 256; a task's gen_kwargs win)

lm-eval has no plugin discovery: a model class must be registered in the process that runs the
evaluation, which is what `recyclegpt lm-eval` does before handing every other argument to
lm-eval's own command line.
"""

from __future__ import annotations

import json
import sys
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

try:
    import lm_eval.models  # noqa: F401  (fills lm-eval's registry first; it only does so when empty)
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as e:  # pragma: no cover - exercised only without the extra
    from .errors import RecycleError

    raise RecycleError("lm-eval is not installed: pip install 'recyclegpt[eval]' (or pip install lm-eval)") from e

from .errors import RecycleError, RecycleWarning

MODES = ("std", "recycle")
GEN_MODES = ("ar", "recycle", "verify")


def _parse_int(v: Any, name: str, default: int) -> int:
    if v is None or v == "auto" or (isinstance(v, str) and v.startswith("auto")):
        return default
    try:
        n = int(v)
    except (TypeError, ValueError):
        raise RecycleError(f"{name} must be an integer, got {v!r}") from None
    if n < 1:
        raise RecycleError(f"{name} must be >= 1, got {n}")
    return n


@register_model("recyclegpt")
class RecycleGPTLM(LM):
    """A RecycleGPT checkpoint as an lm-eval model (see the module docstring for the arguments)."""

    def __init__(self, pretrained: str | None = None, mode: str = "std", gen_mode: str | None = None, k: int = 3,
                 device: str | None = "auto", dtype: str = "float32", batch_size: int | str | None = 16,
                 max_batch_size: int | None = None, max_length: int | None = None, max_gen_toks: int = 256,
                 **unused: Any):
        super().__init__()
        from .api import RecycleGPT

        if not pretrained:
            raise RecycleError("model_args needs pretrained=CHECKPOINT_DIR")
        if mode not in MODES:
            raise RecycleError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        gen_mode = gen_mode or ("recycle" if mode == "recycle" else "ar")
        if gen_mode not in GEN_MODES:
            raise RecycleError(f"gen_mode must be one of {', '.join(GEN_MODES)}, got {gen_mode!r}")
        if unused:
            warnings.warn(f"recyclegpt lm-eval adapter: ignoring model_args {sorted(unused)}", RecycleWarning,
                          stacklevel=2)
        if device and str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's command line defaults --device to cuda:0; like its HF model, fall back.
            warnings.warn(f"recyclegpt lm-eval adapter: device {device} unavailable, using cpu", RecycleWarning,
                          stacklevel=2)
            device = "cpu"
        self.rg = RecycleGPT.from_pretrained(pretrained, device=device or "auto", dtype=dtype)
        self.model, self.module, self.tok = self.rg.model, self.rg.module, self.rg.tokenizer
        self.mode, self.gen_mode, self.k = mode, gen_mode, _parse_int(k, "k", 3)
        self.batch_size = _parse_int(batch_size, "batch_size", 16)
        if max_batch_size:
            self.batch_size = min(self.batch_size, _parse_int(max_batch_size, "max_batch_size", 16))
        self.max_length = min(_parse_int(max_length, "max_length", self.model.cfg.max_seq_len),
                              self.model.cfg.max_seq_len)
        self.max_gen_toks = _parse_int(max_gen_toks, "max_gen_toks", 256)
        self._device = self.rg.device
        eos = self.tok.eos_id
        self.prefix_token_id = eos if eos is not None else 0

    # ------------------------------------------------------------------ lm-eval interface
    @property
    def eot_token_id(self) -> int:
        return self.prefix_token_id

    @property
    def tokenizer_name(self) -> str:
        return "recyclegpt"

    def tok_encode(self, text: str) -> list[int]:
        return self.tok.encode(text)

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        # Trailing spaces of the context belong to the continuation (as lm-eval's HF model does).
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        if not context:
            return [self.prefix_token_id], self.tok_encode(continuation)
        whole = self.tok_encode(context + continuation)
        ctx = self.tok_encode(context)
        if whole[:len(ctx)] != ctx or len(whole) == len(ctx):  # merged across the boundary
            return ctx, self.tok_encode(continuation)
        return ctx, whole[len(ctx):]

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        items = []
        for req in requests:
            context, continuation = req.args
            ctx, cont = self._encode_pair(context, continuation)
            if not cont:
                raise RecycleError(f"continuation {continuation!r} encodes to no tokens")
            items.append(self._window(ctx, cont))
        scored = self._score(items, disable_tqdm, "loglikelihood")
        out = []
        for req, (lp, greedy) in zip(requests, scored, strict=True):
            out.append((lp, greedy))
            self.cache_hook.add_partial("loglikelihood", req.args, (lp, greedy))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        items, owner = [], []
        for i, req in enumerate(requests):
            (text,) = req.args
            full = [self.prefix_token_id] + self.tok_encode(text)
            for it in self._rolling_windows(full):
                items.append(it)
                owner.append(i)
        scored = self._score(items, disable_tqdm, "loglikelihood_rolling")
        sums = [0.0] * len(requests)
        for i, (lp, _) in zip(owner, scored, strict=True):
            sums[i] += lp
        for req, s in zip(requests, sums, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, s)
        return sums

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        bar = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm or not sys.stderr.isatty())
        for key, idxs in groups.items():
            kw = dict(json.loads(key))
            until = kw.pop("until", None) or []
            if isinstance(until, str):
                until = [until]
            max_new = _parse_int(kw.pop("max_gen_toks", None), "max_gen_toks", self.max_gen_toks)
            do_sample = bool(kw.pop("do_sample", False))
            temperature = float(kw.pop("temperature", 1.0 if do_sample else 0.0) or 0.0)
            if not do_sample:
                temperature = 0.0
            top_k = int(kw.pop("top_k", 0) or 0) if do_sample else 0
            top_p = float(kw.pop("top_p", 1.0) or 1.0) if do_sample else 1.0
            max_new = min(max_new, self.max_length - 1)
            keep = self.max_length - max_new
            idxs = sorted(idxs, key=lambda i: -len(requests[i].args[0]))
            for s in range(0, len(idxs), self.batch_size):
                chunk = idxs[s:s + self.batch_size]
                prompts = []
                for i in chunk:
                    ids = self.tok_encode(requests[i].args[0]) or [self.prefix_token_id]
                    prompts.append(ids[-keep:])
                cfg = self.rg.config(self.gen_mode, max_new, k=self.k, temperature=temperature, top_k=top_k,
                                     top_p=top_p, stop=[u for u in until if u] or None)
                from .decoding import generate

                with torch.inference_mode():
                    res = generate(self.model, self.module, prompts, cfg, tokenizer=self.tok)
                for i, text in zip(chunk, res.texts, strict=True):
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(chunk))
        bar.close()
        return results  # type: ignore[return-value]

    # ------------------------------------------------------------------ scoring
    def _window(self, ctx: list[int], cont: list[int]) -> tuple[list[int], int, int]:
        """(tokens, index of the first scored token in them, its 1-based index among new tokens).

        At most max_length + 1 tokens (max_length inputs); a continuation longer than the window
        keeps its last tokens, with at least two tokens before them (the module reads h two back).
        """
        full, L = ctx + cont, self.max_length
        if len(full) <= L + 1:
            return full, len(ctx), 1
        keep = min(len(cont), L - 1)
        full = full[-(L + 1):]
        return full, len(full) - keep, 1 + len(cont) - keep

    def _rolling_windows(self, full: list[int]) -> list[tuple[list[int], int, int]]:
        """Disjoint scored spans covering tokens 1..n-1 of `full`, each with as much context as fits."""
        n, L, out, t = len(full), self.max_length, [], 1
        while t < n:
            e = min(n, t + (L if t == 1 else L - 1))
            s = max(0, e - L - 1)
            out.append((full[s:e], t - s, t))
            t = e
        return out

    @torch.inference_mode()
    def _score(self, items: Sequence[tuple[list[int], int, int]], disable_tqdm: bool, desc: str
               ) -> list[tuple[float, bool]]:
        """Sum of log-probs of the scored tokens of each item, and whether each was the argmax.

        Scored token at index m of an item whose first scored token is new token j0: new-token
        index j = j0 + (m - start); in `recycle` mode an even j is scored by the module entry at
        m-2 (reading h_{m-2} and the true token m-1), an odd j (and every token in `std`) by the
        full model at m-1.
        """
        order = sorted(range(len(items)), key=lambda i: -len(items[i][0]))
        results: list[tuple[float, bool] | None] = [None] * len(items)
        dev = self._device
        bar = tqdm(total=len(items), desc=desc, disable=disable_tqdm or not sys.stderr.isatty())
        for s in range(0, len(order), self.batch_size):
            chunk = order[s:s + self.batch_size]
            T = max(len(items[i][0]) for i in chunk) - 1
            x = torch.zeros(len(chunk), T, dtype=torch.long)
            for r, i in enumerate(chunk):
                toks = items[i][0][:-1]
                x[r, :len(toks)] = torch.tensor(toks, dtype=torch.long)
            x = x.to(dev)
            _, h = self.model(x, logits=False)  # right padding: causal, so real positions never see it
            g = None
            full_sel: list[tuple[int, int, int, int]] = []  # (item row, result slot, position, target)
            mod_sel: list[tuple[int, int, int, int]] = []
            for r, i in enumerate(chunk):
                toks, start, j0 = items[i]
                for m in range(start, len(toks)):
                    j = j0 + (m - start)
                    if self.mode == "recycle" and j % 2 == 0 and m >= 2:
                        mod_sel.append((r, i, m - 2, toks[m]))
                    else:
                        full_sel.append((r, i, m - 1, toks[m]))
            if mod_sel:
                _, g = self.module(self.model, x[:, 1:], h[:, :-1], logits=False)
            sums = {i: 0.0 for i in chunk}
            greedy = {i: True for i in chunk}
            for sel, states in ((full_sel, h), (mod_sel, g)):
                if not sel:
                    continue
                rows = torch.tensor([a[0] for a in sel], device=dev)
                pos = torch.tensor([a[2] for a in sel], device=dev)
                tgt = torch.tensor([a[3] for a in sel], device=dev)
                logp = F.log_softmax(self.model.lm_head(states[rows, pos]).float(), dim=-1)
                lp = logp.gather(1, tgt[:, None])[:, 0].tolist()
                hit = (logp.argmax(-1) == tgt).tolist()
                for a, v, ok in zip(sel, lp, hit, strict=True):
                    sums[a[1]] += v
                    greedy[a[1]] &= ok
            for i in chunk:
                results[i] = (sums[i], greedy[i])
            bar.update(len(chunk))
        bar.close()
        return results  # type: ignore[return-value]


def register() -> type[RecycleGPTLM]:
    """The class is registered as `recyclegpt` on import; this returns it (for explicit call sites)."""
    return RecycleGPTLM


def cli_main(argv: Sequence[str]) -> int:
    """`recyclegpt lm-eval ARGS...`: lm-eval's own command line, with `recyclegpt` registered."""
    argv = list(argv)
    saved = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        try:
            from lm_eval._cli import HarnessCLI
        except ImportError:  # lm-eval < 0.4.10: one flat command line
            from lm_eval.__main__ import cli_evaluate

            cli_evaluate()
            return 0
        parser = HarnessCLI()
        args = parser.parse_args()
        parser.execute(args)
    except SystemExit as e:  # argparse --help / errors
        code = e.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    finally:
        sys.argv = saved
    return 0
