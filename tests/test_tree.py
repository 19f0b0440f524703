"""Draft trees: greedy output identical to ar (eager, compiled, batches, mixed rows, the context's end),
caches after a round equal a fresh prefill, the acceptance rule on hand-built trees, selection, errors.
(Sampled trees against the exact distribution: tests/test_sampling.py.)"""

from __future__ import annotations

import pytest
import torch

from recyclegpt.decoding import Engine, GenerationConfig, generate
from recyclegpt.decoding.testing import cache_prefix, copy_models, random_models, uncached_logits
from recyclegpt.decoding.tree import Tree, accept_tree, ancestors_of, chain_tree, draft_tree
from recyclegpt.errors import RecycleError

torch.set_num_threads(1)

PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19], [100]]
N = 24
TREES = [(3, 4, 2), (2, 6, 3), (4, 10, 3), (3, 3, 1), (1, 4, 4)]  # (k = depth, nodes, top-k)


def ar(model, prompts, n=N, **kw):
    return generate(model, None, prompts, GenerationConfig(mode="ar", max_new_tokens=n, **kw)).tokens


def tree_cfg(k, nodes, topk, **kw):
    return GenerationConfig(mode="verify", k=k, tree=nodes, tree_topk=topk, max_new_tokens=kw.pop("n", N), **kw)


@pytest.fixture(scope="module")
def models():
    """A random pair (drafts mostly wrong) and a copy pair whose drafts are mostly right."""
    return {"random": random_models(seed=1), "copy": copy_models(context=0.3)}


@pytest.mark.parametrize("kind", ["random", "copy"])
@pytest.mark.parametrize("k,nodes,topk", TREES)
def test_greedy_tree_equals_ar(models, kind, k, nodes, topk):
    model, module = models[kind]
    want = ar(model, PROMPTS)
    for prompts, ref in ((PROMPTS[:1], want[:1]), (PROMPTS, want)):  # batch 1, and rows at different positions
        res = generate(model, module, prompts, tree_cfg(k, nodes, topk))
        assert res.tokens == ref
    if kind == "copy":  # the module is right often: trees accept several tokens per pass
        assert res.stats.tau > 1 + 0.5 * k


def test_tree_accepts_more_than_chain_where_the_chain_stalls():
    """With weakened drafts the runners-up matter: a tree of the same depth accepts more per pass."""
    model, module = copy_models(context=0.6)
    chain = generate(model, module, PROMPTS, GenerationConfig(mode="verify", k=3, max_new_tokens=N))
    tree = generate(model, module, PROMPTS, tree_cfg(3, 12, 3))
    assert tree.tokens == chain.tokens == ar(model, PROMPTS)
    assert tree.stats.tau > chain.stats.tau


@pytest.mark.slow
def test_compiled_tree_equals_ar_and_keeps_exact_caches(models):
    """Inductor: the same tokens as eager `ar`, and the compiled round's moves of the accepted path's
    keys/values leave the caches a fresh prefill would."""
    model, module = models["copy"]
    prompts = PROMPTS[:2]
    eng = run_engine(model, module, prompts, tree_cfg(3, 6, 2, n=12), compile=True)
    assert [eng.request(b).generated for b in range(2)] == ar(model, prompts, n=12)
    assert_caches_match_a_prefill(eng, model, module, prompts)


def test_tree_at_the_end_of_the_context():
    """Nodes whose cache slot would pass the context are not verified; the row still ends exactly."""
    model, module = copy_models(context=0.3, max_seq_len=40)
    prompts = [list(range(1, 30)), list(range(3, 35))]
    res = generate(model, module, prompts, tree_cfg(3, 10, 3, n=20))
    assert res.tokens == ar(model, prompts, n=20)
    assert [len(t) for t in res.tokens] == [11, 8]


def test_tree_rows_mix_with_ar_chain_and_ngram_rows(models):
    model, module = models["copy"]
    want = ar(model, PROMPTS)
    eng = Engine(model, module, slots=4)
    cfgs = [tree_cfg(3, 6, 2), GenerationConfig(mode="ar", max_new_tokens=N),
            GenerationConfig(mode="verify", k=2, max_new_tokens=N),
            GenerationConfig(mode="verify", k=3, drafter="ngram", max_new_tokens=N)]
    admitted = eng.admit_many([(b, p, c) for b, (p, c) in enumerate(zip(PROMPTS, cfgs, strict=True))])
    got = [list(o.tokens) for o in admitted]
    while eng.decoding():
        for b, o in enumerate(eng.step()):
            if o is not None:
                got[b] += o.tokens
    assert got == want


def test_recycle_row_turns_tree_rows_into_chains(models):
    """`recycle` rows force their drafts, which a tree round has no place for: the round is a chain round
    and tree rows draft a chain of k (still lossless)."""
    model, module = models["copy"]
    eng = Engine(model, module, slots=2)
    eng.admit_many([(0, PROMPTS[0], tree_cfg(3, 6, 2)), (1, PROMPTS[1], GenerationConfig(mode="recycle"))])
    plans = {b: eng.request(b).plan(b) for b in eng.decoding()}
    shape = eng._shape(plans)
    assert not shape.tree and shape.chain == 3
    got = list(eng.request(0).generated)
    while 0 in eng.decoding():
        got += eng.step()[0].tokens
    assert got == ar(model, PROMPTS[:1])[0]


def run_engine(model, module, prompts, cfg, compile=False):
    eng = Engine(model, module, slots=len(prompts), compile=compile)
    eng.admit_many([(b, p, cfg) for b, p in enumerate(prompts)])
    while eng.decoding():
        eng.step()
    return eng


def assert_caches_match_a_prefill(eng, model, module, prompts):
    """The full model's and the module's caches hold exactly the true entries (keys/values moved into
    place), as a fresh prefill of the same tokens holds them; the carried module logits equal an
    uncached pass's."""
    for b, prompt in enumerate(prompts):
        seq = prompt + eng.request(b).generated
        n = len(seq) - 1  # the last token is pending: never processed
        fresh = Engine(model, module, slots=1)  # its prefill of x_0..x_{n-1}: the reference entries
        fresh.admit(0, seq[:n], GenerationConfig(mode="verify", max_new_tokens=1))
        eng._install_caches()
        got_model, got_module = cache_prefix(model, b, n), cache_prefix(module, b, n - 1)
        fresh._install_caches()
        ref_model, ref_module = cache_prefix(model, 0, n), cache_prefix(module, 0, n - 1)
        for (k1, v1), (k2, v2) in zip(got_model + got_module, ref_model + ref_module, strict=True):
            torch.testing.assert_close(k1, k2, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(v1, v2, rtol=1e-5, atol=1e-5)
        _, mlogits = uncached_logits(model, module, seq)
        eng._install_caches()
        torch.testing.assert_close(eng.state.mlogits[b].float(), mlogits[n - 1].float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["random", "copy"])
def test_caches_after_tree_rounds_equal_a_fresh_prefill(models, kind):
    model, module = models[kind]
    prompts = [PROMPTS[0], PROMPTS[2]]
    assert_caches_match_a_prefill(run_engine(model, module, prompts, tree_cfg(3, 10, 3, n=16)), model, module,
                                  prompts)


# ------------------------------------------------------------------ the acceptance rule on hand-built trees
#        0 (pending)
#       / \
#  (1) 5   6 (2)
#     / \    \
# (3) 7  8 (4) 9 (5)
#     |
# (6) 4
HAND = Tree(torch.tensor([[5, 6, 7, 8, 9, 4]]), torch.tensor([[0, 0, 0, 1, 1, 2, 3]]),
            torch.tensor([[0, 1, 1, 2, 2, 2, 3]]), torch.tensor([[0, 0, 1, 0, 1, 0, 0]]),
            torch.ones(1, 7, dtype=torch.bool), None)


def accept_hand(targets, lens=3):
    valid = HAND.depth <= lens
    return accept_tree(HAND, torch.tensor([targets]), valid, ancestors_of(HAND.parents, 3), 3)


@pytest.mark.parametrize("targets,path,accepted,nxt", [
    ([5, 7, 9, 4, 0, 0, 2], [0, 1, 3, 6], 3, 2),  # 5 -> 7 -> 4, then the choice at node 6
    ([5, 8, 9, 4, 0, 0, 2], [0, 1, 4], 2, 0),  # 5 -> 8 (node 4), then node 4's choice
    ([6, 7, 9, 4, 0, 0, 2], [0, 2, 5], 2, 0),  # the second child: 6 -> 9
    ([6, 7, 1, 4, 0, 0, 2], [0, 2], 1, 1),  # 6, but node 2's choice 1 is no child
    ([3, 7, 9, 4, 0, 0, 2], [0], 0, 3),  # no child of the root: only the full model's token
])
def test_accept_tree_path_by_path(targets, path, accepted, nxt):
    got_path, got_acc = accept_hand(targets)
    assert int(got_acc[0]) == accepted
    assert got_path[0, :accepted + 1].tolist() == path
    assert targets[path[-1]] == nxt


def test_accept_tree_respects_depth_limit():
    got_path, got_acc = accept_hand([5, 7, 9, 4, 0, 0, 2], lens=2)  # node 6 (depth 3) is past the budget
    assert int(got_acc[0]) == 2 and got_path[0, :3].tolist() == [0, 1, 3]


def test_chain_tree_is_a_chain():
    t = chain_tree(torch.tensor([[4, 5, 6]]), HAND)
    assert t.parents.tolist() == [[0, 0, 1, 2]] and t.depth.tolist() == [[0, 1, 2, 3]]
    anc = ancestors_of(t.parents, 3)
    assert anc[0].long().tolist() == torch.ones(4, 4).tril().long().tolist()


def test_draft_tree_keeps_the_best_nodes_and_is_a_tree(models):
    """Selected nodes: parents before children, every parent selected, the module's top token first."""
    model, module = models["random"]
    eng = Engine(model, module, slots=2)
    eng.admit_many([(0, PROMPTS[0], tree_cfg(3, 10, 3)), (1, PROMPTS[2], tree_cfg(3, 10, 3))])
    with torch.inference_mode():
        t = draft_tree(model, module, 3, 3, 10, eng.state.mlogits, eng.state.g, eng.state.n)
    assert t.tokens.shape == (2, 10)
    assert (t.parents[:, 1:] < torch.arange(1, 11)).all()  # parents come first
    parent_depth = t.depth.gather(1, t.parents)
    assert (t.depth[:, 1:] == parent_depth[:, 1:] + 1).all()
    assert (t.tokens[:, 0] == eng.state.mlogits.argmax(-1)).all()


@pytest.mark.parametrize("kw,msg", [
    (dict(mode="ar", tree=4), "draft trees need mode 'verify'"),
    (dict(drafter="ngram", tree=4), "drafter 'module'"),
    (dict(adaptive_k=True, tree=4), "fixed depth"),
    (dict(k=4, tree=3), "at least k nodes"),
    (dict(tree=-1), r"tree must be an integer in \[0, 256\] or 'auto'"),
    (dict(tree=4, tree_topk=0), r"tree_topk must be an integer in \[1, 16\]"),
])
def test_bad_tree_settings_raise(kw, msg):
    with pytest.raises(RecycleError, match=msg):
        GenerationConfig(**kw).validate()


def test_tree_larger_than_its_candidates_raises(models):
    model, module = models["random"]
    with pytest.raises(RecycleError, match="at most 6 candidate nodes"):
        generate(model, module, PROMPTS[:1], tree_cfg(2, 20, 2))
    with pytest.raises(RecycleError, match="depth 3 .* at most 10 candidate"):  # a fixed-width engine: width deep
        Engine(model, module, slots=1, width=3).admit(0, PROMPTS[0], tree_cfg(1, 20, 2))


def _sample_hand_tree(tokens_of, seed: int, R: int = 20000, V: int = 8):
    """sample_tree on R copies of HAND with random p, q per node; tokens_of(q, g) gives nodes 1..6.
    Returns (p, the first new token, the token after node 1 where the path went through node 1)."""
    from recyclegpt.decoding.tree import sample_tree

    g = torch.Generator().manual_seed(seed)
    c, D = 2, 3
    p = torch.softmax(torch.randn(7, V, generator=g) * 1.5, -1)  # per node of HAND's shape
    q = torch.softmax(torch.randn(7, V, generator=g) * 1.5, -1)
    tokens = tokens_of(q, g)
    tree = HAND._replace(tokens=tokens, parents=HAND.parents.expand(R, -1), depth=HAND.depth.expand(R, -1),
                         rank=HAND.rank.expand(R, -1), live=HAND.live.expand(R, -1), q=q.expand(R, -1, -1))
    path, acc, nxt = sample_tree(tree, p.expand(R, -1, -1), torch.ones(R, 7, dtype=torch.bool),
                                 torch.zeros(R, dtype=torch.bool), torch.rand(R, D * c, generator=g),
                                 torch.empty(R, D + 1, V).exponential_(generator=g), D, c)
    all_tok = torch.cat([torch.zeros(R, 1, dtype=torch.long), tokens], 1)
    first = torch.where(acc >= 1, all_tok.gather(1, path[:, 1:2])[:, 0], nxt)
    second = torch.where(acc >= 2, all_tok.gather(1, path[:, 2:3])[:, 0], nxt)[path[:, 1] == 1]
    return p, first, second, acc


def test_sample_tree_gives_the_target_distribution_on_stub_probs():
    """Recursive rejection over sibling draws (without replacement) from q: the token at depth 1 follows
    p at the root, and the token after node 1 follows p at node 1, whatever q and the tree's shape."""
    from test_sampling import chi2_pvalue

    R, V = 20000, 8

    def drawn(q, g):  # each node's children: draws without replacement from its q (HAND's layout)
        def draws(node: int, count: int) -> torch.Tensor:
            return (q[node] / torch.empty(R, V).exponential_(generator=g)).topk(count, -1).indices
        return torch.cat([draws(0, 2), draws(1, 2), draws(2, 1), draws(3, 1)], 1)

    p, first, second, acc = _sample_hand_tree(drawn, seed=0, R=R, V=V)
    assert chi2_pvalue(torch.bincount(first, minlength=V), p[0]) > 1e-3
    assert len(second) > 2000 and chi2_pvalue(torch.bincount(second, minlength=V), p[1]) > 1e-3
    assert 0.1 < (acc >= 1).float().mean() < 0.9  # siblings are accepted, not always


def test_sample_tree_has_power():
    """The same check fails for children taken as the top-c of q instead of drawn from it."""
    from test_sampling import chi2_pvalue

    def top(q, g):
        return torch.cat([q[0].topk(2).indices, q[1].topk(2).indices, q[2].topk(1).indices,
                          q[3].topk(1).indices]).expand(20000, -1)

    p, first, _, _ = _sample_hand_tree(top, seed=1)
    assert chi2_pvalue(torch.bincount(first, minlength=8), p[0]) < 1e-6
