"""Quality of `recycle` (lossy): held-out perplexity, standard vs recycle, and module agreement.

Recycle perplexity scores text the way `recycle` decoding produces it: in each pair, the first
token by the full model (logits at t for x_{t+1}) and the second by the recyclable module
(reading h_t and the true x_{t+1}, scoring x_{t+2}).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..data import iter_documents, resolve_files
from ..errors import RecycleError
from ..model import FullModel
from ..module import RecyclableModule
from ..tokenizer import Tokenizer


@dataclass
class QualityReport:
    tokens: int
    ppl_standard: float  # every token by the full model
    ppl_recycle: float  # every second token by the module (as `recycle` decodes)
    ppl_module: float  # every token from position 2 by the module (what it drafts)
    recycle_ppl_increase: float  # ppl_recycle / ppl_standard - 1
    module_agrees_with_full: float  # top-1 of module at t == full model's top-1 at t+1
    # the full model's top-1 among the module's top 2 / top 3 (what a draft tree with 2 or 3 children can catch)
    module_top2_has_full: float
    module_top3_has_full: float
    module_top1_accuracy: float
    full_top1_accuracy: float

    def to_dict(self) -> dict:
        return asdict(self)


def load_eval_tokens(paths: list[str], tokenizer: Tokenizer, max_tokens: int, glob: str = "**/*") -> np.ndarray:
    ids: list[int] = []
    for doc in iter_documents(resolve_files(paths, glob)):
        ids.extend(tokenizer.encode(doc.text))
        if tokenizer.eos_id is not None:
            ids.append(tokenizer.eos_id)
        if len(ids) >= max_tokens:
            break
    if len(ids) < 3:
        raise RecycleError("the evaluation data holds fewer than 3 tokens")
    return np.asarray(ids[:max_tokens], dtype=np.int64)


@torch.inference_mode()
def perplexity(model: FullModel, module: RecyclableModule, tokens: np.ndarray, seq_len: int = 512,
               batch_size: int = 4, progress: bool = True) -> QualityReport:
    seq_len = min(seq_len, model.cfg.max_seq_len, len(tokens))
    n_win = len(tokens) // seq_len
    windows = torch.from_numpy(np.asarray(tokens[: n_win * seq_len])).view(n_win, seq_len)
    device = model.tok_embeddings.weight.device
    sums = dict(full=0.0, recycle=0.0, module=0.0, agree=0.0, top2=0.0, top3=0.0, acc_m=0.0, acc_f=0.0)
    counts = dict(full=0, recycle=0, module=0)
    for i in tqdm(range(0, n_win, batch_size), desc="eval", disable=not progress, leave=False):
        x = windows[i:i + batch_size].to(device)  # [B, T]
        logits, h = model(x)
        mlogits, _ = module(model, x[:, 1:], h[:, :-1])  # [B, T-1, V]: index t scores x_{t+2}
        ce_full = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), x[:, 1:], reduction="none")  # [B,T-1]
        ce_mod = F.cross_entropy(mlogits[:, :-1].float().transpose(1, 2), x[:, 2:], reduction="none")  # [B,T-2]
        # Target j (1..T-1): odd j by the full model (ce_full[j-1]), even j by the module (ce_mod[j-2]).
        odd = ce_full[:, 0::2]
        even = ce_mod[:, 0::2]
        sums["full"] += ce_full.sum().item()
        counts["full"] += ce_full.numel()
        sums["recycle"] += odd.sum().item() + even.sum().item()
        counts["recycle"] += odd.numel() + even.numel()
        sums["module"] += ce_mod.sum().item()
        counts["module"] += ce_mod.numel()
        full_top = logits.argmax(-1)
        mod_top = mlogits[:, :-1].argmax(-1)
        sums["agree"] += (mod_top == full_top[:, 1:-1]).sum().item()
        hits = (mlogits[:, :-1].topk(3, -1).indices == full_top[:, 1:-1, None]).cumsum(-1)  # [B, T-2, 3]
        sums["top2"] += hits[..., 1].sum().item()
        sums["top3"] += hits[..., 2].sum().item()
        sums["acc_m"] += (mod_top == x[:, 2:]).sum().item()
        sums["acc_f"] += (full_top[:, :-1] == x[:, 1:]).sum().item()
    nf, nr, nm = counts["full"], counts["recycle"], counts["module"]
    ppl_std, ppl_rec = math.exp(sums["full"] / nf), math.exp(sums["recycle"] / nr)
    return QualityReport(
        tokens=nf, ppl_standard=ppl_std, ppl_recycle=ppl_rec, ppl_module=math.exp(sums["module"] / nm),
        recycle_ppl_increase=ppl_rec / ppl_std - 1, module_agrees_with_full=sums["agree"] / nm,
        module_top2_has_full=sums["top2"] / nm, module_top3_has_full=sums["top3"] / nm,
        module_top1_accuracy=sums["acc_m"] / nm, full_top1_accuracy=sums["acc_f"] / nf,
    )


def run_tokens_val(path: str | Path) -> np.ndarray | None:
    """The held-out split of a training run directory, if `path` is one."""
    val = Path(path) / "tokens" / "val.bin"
    manifest = Path(path) / "tokens" / "manifest.json"
    if val.is_file() and manifest.is_file():
        import json

        try:
            dtype = np.dtype(json.loads(manifest.read_text())["dtype"])
            return np.fromfile(val, dtype=dtype).astype(np.int64)
        except OSError as e:
            from ..paths import read_error

            raise read_error(e.filename or val, e, "validation split") from None
        except (ValueError, KeyError, TypeError) as e:
            raise RecycleError(f"corrupt validation split in {val.parent} ({e}); pass --data") from None
    return None


@dataclass
class AgreementReport:
    """Greedy `recycle` output against greedy `ar` output on the same prompts (same dtype/device)."""

    prompts: int
    max_new_tokens: int
    token_agreement: float  # share of ar's output positions where recycle emitted the same token
    mean_common_prefix: float  # tokens before the first difference, averaged over prompts
    prefix_agreement: float  # common prefix tokens / ar tokens, over all prompts
    identical_prompts: int  # prompts whose whole output is identical

    def to_dict(self) -> dict:
        return asdict(self)


def compare_outputs(ref: list[list[int]], other: list[list[int]], max_new_tokens: int) -> AgreementReport:
    """Position-wise and common-prefix agreement of `other` with `ref` (one token list per prompt)."""
    same_pos = total = prefix = identical = 0
    prefixes = []
    for a, b in zip(ref, other, strict=True):
        total += len(a)
        same_pos += sum(x == y for x, y in zip(a, b, strict=False))
        n = 0
        for x, y in zip(a, b, strict=False):
            if x != y:
                break
            n += 1
        prefixes.append(n)
        prefix += n
        identical += a == b
    return AgreementReport(
        prompts=len(ref), max_new_tokens=max_new_tokens,
        token_agreement=same_pos / total if total else float("nan"),
        mean_common_prefix=sum(prefixes) / len(prefixes) if prefixes else float("nan"),
        prefix_agreement=prefix / total if total else float("nan"), identical_prompts=identical,
    )


@torch.inference_mode()
def greedy_agreement(model: FullModel, module: RecyclableModule, prompts: list[list[int]], max_new_tokens: int = 64,
                     eos_id: int | None = None, batch_size: int = 8, progress: bool = False) -> AgreementReport:
    """Decode every prompt greedily with `ar` and with `recycle`; how often recycle says what ar says.

    EOS ends a row in both modes (a row that stops early counts its missing positions as different).
    Prompts longer than the model's window minus max_new_tokens keep their last tokens.
    """
    from ..decoding import GenerationConfig, generate

    if not prompts:
        raise RecycleError("no prompts to compare ar and recycle on")
    limit = model.cfg.max_seq_len - max_new_tokens
    if limit < 1:
        raise RecycleError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's window")
    prompts = [p[-limit:] for p in prompts]
    outs: dict[str, list[list[int]]] = {"ar": [], "recycle": []}
    for i in tqdm(range(0, len(prompts), batch_size), desc="ar vs recycle", disable=not progress, leave=False):
        batch = prompts[i:i + batch_size]
        for mode in outs:
            cfg = GenerationConfig(mode=mode, max_new_tokens=max_new_tokens, eos_id=eos_id)
            outs[mode].extend(generate(model, module, batch, cfg).tokens)
    return compare_outputs(outs["ar"], outs["recycle"], max_new_tokens)
