"""Sampling: argument checks, logits -> probs, the acceptance rule on stub logits, and verify's
sampled distribution against the exact one of the full model (tiny vocabulary, chi-square)."""

from __future__ import annotations

import itertools

import pytest
import torch

from recyclegpt.decoding import GenerationConfig, generate, logits_to_probs
from recyclegpt.decoding.sampling import accept
from recyclegpt.decoding.testing import random_models
from recyclegpt.errors import RecycleError

torch.set_num_threads(1)


# ------------------------------------------------------------------ argument checks
@pytest.mark.parametrize("kw", [
    dict(temperature=-0.1), dict(temperature=float("nan")), dict(temperature=float("inf")),
    dict(top_k=-1), dict(top_k=1.5), dict(top_k=True),
    dict(top_p=0.0), dict(top_p=1.5), dict(top_p=-0.2), dict(top_p=float("nan")),
])
def test_bad_sampling_values_raise(kw):
    with pytest.raises(RecycleError) as err:
        GenerationConfig(**kw).validate()
    assert "\n" not in str(err.value) and str(err.value)
    model, module = random_models(seed=0, vocab_size=16, max_seq_len=16)
    with pytest.raises(RecycleError):
        generate(model, module, [[1, 2]], GenerationConfig(**kw))


def test_good_sampling_values_pass():
    for kw in (dict(temperature=0), dict(temperature=2.0, top_k=0, top_p=1.0), dict(top_k=5, top_p=1e-3)):
        GenerationConfig(**kw).validate()


# ------------------------------------------------------------------ logits -> probs
def test_logits_to_probs_filters():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    assert torch.equal(logits_to_probs(logits, 0.0), torch.tensor([[1.0, 0, 0, 0]]))
    torch.testing.assert_close(logits_to_probs(logits, 1.0), logits.softmax(-1))
    torch.testing.assert_close(logits_to_probs(logits, 0.5), (logits / 0.5).softmax(-1))
    top2 = logits_to_probs(logits, 1.0, top_k=2)
    torch.testing.assert_close(top2, torch.cat([logits[:, :2].softmax(-1), torch.zeros(1, 2)], 1))
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    keep2 = logits_to_probs(probs.log(), 1.0, top_p=0.8)  # 0.5 + 0.3 reaches 0.8: two tokens
    torch.testing.assert_close(keep2, torch.tensor([[0.625, 0.375, 0, 0]]))
    keep3 = logits_to_probs(probs.log(), 1.0, top_p=0.81)
    torch.testing.assert_close(keep3, torch.tensor([[0.5, 0.3, 0.15, 0]]) / 0.95)
    assert torch.equal(logits_to_probs(probs.log(), 1.0, top_p=1e-6), torch.tensor([[1.0, 0, 0, 0]]))
    both = logits_to_probs(probs.log(), 1.0, top_k=3, top_p=0.7)  # top-k first, then top-p
    torch.testing.assert_close(both, torch.tensor([[0.5, 0.3, 0, 0]]) / 0.8)


# ------------------------------------------------------------------ acceptance rule, stub logits
def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> float:
    counts, probs = counts.double().flatten(), probs.double().flatten()
    n = counts.sum()
    expected = probs / probs.sum() * n
    small = expected < min_expected
    obs = torch.cat([counts[~small], counts[small].sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    if exp[-1] == 0:
        if obs[-1] > 0:
            return 0.0
        obs, exp = obs[:-1], exp[:-1]
    stat = ((obs - exp) ** 2 / exp).sum()
    df = len(obs) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.double), stat / 2))


def _settings(R: int, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.full((R,), temperature), torch.zeros(R, dtype=torch.long), torch.ones(R)


def accept_greedy(drafts, targets, draft_len=None, force=None):
    """`accept` of a greedy round whose full model's argmax at each position is `targets` [R, K+1]."""
    R, K = drafts.shape
    logits = torch.nn.functional.one_hot(targets, 16).float() * 10
    lens = draft_len if draft_len is not None else torch.full((R,), K)
    force = force if force is not None else torch.zeros(R, dtype=torch.bool)
    return accept(logits, drafts, lens, force, False, _settings(R, 0.0), None, torch.zeros(R, K),
                  torch.ones(R, 16))


def accept_speculative(drafts, q, p, g, draft_len=None, force=None):
    """`accept` of a sampled round with target probabilities p [R, K+1, V] (as logits log p) and draft
    probabilities q [R, K, V]; the noise comes from generator g."""
    R, K = drafts.shape
    V = p.shape[-1]
    lens = draft_len if draft_len is not None else torch.full((R,), K)
    force = force if force is not None else torch.zeros(R, dtype=torch.bool)
    u = torch.rand(R, K, generator=g)
    e = torch.empty(R, V).exponential_(generator=g)
    return accept(p.log(), drafts, lens, force, True, _settings(R), q, u, e)


def test_greedy_accept_rule():
    drafts = torch.tensor([[4, 5, 6], [4, 9, 6], [1, 5, 6], [4, 5, 6]])
    targets = torch.tensor([[4, 5, 6, 7]] * 4)
    acc, nxt = accept_greedy(drafts, targets)
    assert acc.tolist() == [3, 1, 0, 3] and nxt.tolist() == [7, 5, 4, 7]
    acc, nxt = accept_greedy(drafts, targets, draft_len=torch.tensor([3, 3, 3, 2]))
    assert acc.tolist() == [3, 1, 0, 2] and nxt.tolist() == [7, 5, 4, 6]
    # recycle: forced rows take their real drafts unverified, then the full model's next token
    force = torch.tensor([False, True, True, True])
    acc, nxt = accept_greedy(drafts, targets, draft_len=torch.tensor([3, 1, 1, 0]), force=force)
    assert acc.tolist() == [3, 1, 1, 0] and nxt.tolist() == [7, 5, 5, 4]


def test_speculative_accept_rule_on_stub_probs():
    R = 20000
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1]]).expand(R, 3, 4)
    q = torch.tensor([[0.1, 0.1, 0.4, 0.4], [0.5, 0.5, 0.0, 0.0]]).expand(R, 2, 4)
    drafts = torch.tensor([[1, 0]]).expand(R, 2)
    # d1: p >= q, always accepted. d2: accepted with p/q = 0.5; if rejected, the next token comes
    # from norm(max(0, p - q)) = [0, 0, .5, .5]; if accepted, the bonus comes from p_3.
    acc, nxt = accept_speculative(drafts, q, p, g)
    assert set(acc.tolist()) <= {1, 2}
    frac2 = (acc == 2).double().mean().item()
    assert abs(frac2 - 0.5) < 0.02
    assert set(nxt[acc == 1].tolist()) <= {2, 3}
    assert chi2_pvalue(torch.bincount(nxt[acc == 1], minlength=4), torch.tensor([0, 0, 0.5, 0.5])) > 1e-3
    assert chi2_pvalue(torch.bincount(nxt[acc == 2], minlength=4), p[0, 2]) > 1e-3
    # a draft the target gives probability 0 is always rejected
    p0 = p[:, 1:].clone()
    p0[:, 0, 2] = 0
    p0 = p0 / p0.sum(-1, keepdim=True)
    acc0, nxt0 = accept_speculative(torch.tensor([[2]]).expand(R, 1), q[:, :1], p0, g)
    assert acc0.max() == 0 and 2 not in nxt0.tolist()
    # draft_len: past a row's real drafts nothing is accepted and the next token comes from p alone
    acc1, nxt1 = accept_speculative(drafts, q, p, g, draft_len=torch.zeros(R, dtype=torch.long))
    assert acc1.max() == 0
    assert chi2_pvalue(torch.bincount(nxt1, minlength=4), p[0, 0]) > 1e-3


@pytest.mark.parametrize("q_row", [[0.1, 0.1, 0.4, 0.4], [0.97, 0.01, 0.01, 0.01], [0.0, 0.0, 0.0, 1.0]])
def test_speculative_rule_first_token_has_target_distribution(q_row):
    """d ~ q, then accept-or-resample: the emitted token is distributed as p, whatever q is."""
    R = 40000
    g = torch.Generator().manual_seed(1)
    p = torch.tensor([0.1, 0.2, 0.3, 0.4])
    q = torch.tensor(q_row).expand(R, 1, 4)
    drafts = torch.multinomial(q[:, 0], 1, replacement=True, generator=g)
    acc, nxt = accept_speculative(drafts, q, p.expand(R, 2, 4), g)
    first = torch.where(acc > 0, drafts[:, 0], nxt)
    assert chi2_pvalue(torch.bincount(first, minlength=4), p) > 1e-3


# ------------------------------------------------------------------ verify vs exact distribution
V, S = 16, 16
PROMPT = [1, 2, 3, 1, 2, 3, 1]  # repetitive, so the n-gram drafter finds matches


@pytest.fixture(scope="module")
def tiny_vocab():
    return random_models(seed=0, vocab_size=V, max_seq_len=S)


@torch.no_grad()
def exact_distributions(model, temperature, top_k, top_p):
    """Exact P(t1), P(t2), P(t3) marginals and P(t1, t2) of the sampled continuation."""
    seqs = torch.tensor([PROMPT + [a, b] for a, b in itertools.product(range(V), repeat=2)])
    logits, _ = model(seqs)
    probs = logits_to_probs(logits[:, len(PROMPT) - 1:], temperature, top_k, top_p).double()
    p1 = probs[0, 0]  # [V]
    p2 = probs[::V, 1]  # [V(t1), V]: row a = sequences starting with t1 = a
    p3 = probs[:, 2].view(V, V, V)  # [t1, t2, t3]
    joint12 = p1[:, None] * p2
    return p1, joint12.sum(0), (joint12[..., None] * p3).sum((0, 1)), joint12


def sampled(model, module, R, **kw):
    res = generate(model, module, [PROMPT] * R, GenerationConfig(max_new_tokens=3, seed=123, **kw))
    toks = torch.tensor(res.tokens)
    assert toks.shape == (R, 3)
    return toks, res.stats


SETTINGS = [dict(temperature=1.0), dict(temperature=0.7, top_k=5), dict(temperature=1.3, top_p=0.8),
            dict(temperature=1.0, top_k=6, top_p=0.9)]


RUNS = [dict(mode="ar"), dict(mode="verify", k=2), dict(mode="verify", k=1),
        dict(mode="verify", k=2, drafter="ngram"), dict(mode="verify", k=2, drafter="hybrid"),
        dict(mode="verify", k=2, tree=4, tree_topk=2), dict(mode="verify", k=2, tree=6, tree_topk=3)]


# Every run with every setting; the fast suite takes one setting per run (each setting still comes up), the
# slow marker the other pairings.
PAIRS = [pytest.param(run, sampling, id=f"run{i}-sampling{j}",
                      marks=() if j == i % len(SETTINGS) else pytest.mark.slow)
         for i, run in enumerate(RUNS) for j, sampling in enumerate(SETTINGS)]


@pytest.mark.parametrize("run,sampling", PAIRS)
def test_sampled_distribution_matches_exact(tiny_vocab, sampling, run):
    model, module = tiny_vocab
    R = 3000
    toks, stats = sampled(model, module, R, **run, **sampling)
    p1, p2, p3, p12 = exact_distributions(model, sampling["temperature"], sampling.get("top_k", 0),
                                          sampling.get("top_p", 1.0))
    for got, want in ((toks[:, 0], p1), (toks[:, 1], p2), (toks[:, 2], p3)):
        assert chi2_pvalue(torch.bincount(got, minlength=V), want) > 1e-3
    assert chi2_pvalue(torch.bincount(toks[:, 0] * V + toks[:, 1], minlength=V * V), p12.flatten()) > 1e-3
    if run["mode"] == "verify":  # the random module / n-gram drafts are sometimes right, sometimes not
        assert 0.02 < stats.acceptance_by_position[0] < 0.98


def test_chi_square_has_power(tiny_vocab):
    """The lossy recycle mode (second token from the module, unverified) fails the same check."""
    model, module = tiny_vocab
    toks, _ = sampled(model, module, 3000, mode="recycle", temperature=1.0)
    _, p2, _, _ = exact_distributions(model, 1.0, 0, 1.0)
    assert chi2_pvalue(torch.bincount(toks[:, 1], minlength=V), p2) < 1e-6


def test_seed_reproducible_and_greedy_ignores_seed(tiny_vocab):
    model, module = tiny_vocab
    a = generate(model, module, [PROMPT] * 4, GenerationConfig(mode="verify", temperature=1.0, seed=7))
    b = generate(model, module, [PROMPT] * 4, GenerationConfig(mode="verify", temperature=1.0, seed=7))
    assert a.tokens == b.tokens
    g1 = generate(model, module, [PROMPT], GenerationConfig(mode="verify", seed=1, max_new_tokens=8))
    g2 = generate(model, module, [PROMPT], GenerationConfig(mode="verify", seed=2, max_new_tokens=8))
    assert g1.tokens == g2.tokens
