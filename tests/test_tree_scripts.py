"""benchmarks/tree_costs.py and benchmarks/identity.py: their pure helpers (shape parsing, round costs,
first differences); the measurements themselves need a trained checkpoint and are not tests."""

from __future__ import annotations

import argparse

import pytest
from conftest import load_benchmark

from recyclegpt.decoding.auto import DraftShape


@pytest.fixture(scope="module")
def tc():
    return load_benchmark("tree_costs")


def test_tree_shapes_parse_and_label(tc):
    assert tc.tree_shape("12@5") == DraftShape(5, 12, 2)
    assert tc.tree_shape(" 24@5x3 ") == DraftShape(5, 24, 3)
    assert tc.label(DraftShape(5, 24, 3)) == "tree 24@5x3"
    assert tc.label(DraftShape(5, 12)) == "tree 12@5"
    assert tc.label(DraftShape(4)) == "chain k=4"
    assert tc.verified_tokens(DraftShape(4)) == 5 and tc.verified_tokens(DraftShape(5, 12)) == 13


@pytest.mark.parametrize("text", ["12", "12@", "a@5", "12@5x", "3@5", "40@2"])
def test_bad_tree_shapes_are_refused(tc, text):
    with pytest.raises(argparse.ArgumentTypeError):
        tc.tree_shape(text)  # 3@5: fewer nodes than its depth; 40@2: more than the 6 candidates of depth 2


def test_round_cost_counts_the_passes_of_a_round(tc):
    ms = {"full 5": 6.0, "full 13": 8.0, "module 1": 1.0, "module 3": 1.5}
    assert tc.round_ms(DraftShape(4), ms) == 6.0 + 4 * 1.0  # k module passes: k-1 drafts and the catch-up
    # a tree: D-1 expansions over c entries, the catch-up over one
    assert tc.round_ms(DraftShape(5, 12, 3), ms) == 8.0 + 4 * 1.5 + 1.0


def test_first_difference():
    ident = load_benchmark("identity")
    assert ident.first_difference([1, 2, 3], [1, 2, 3]) is None
    assert ident.first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert ident.first_difference([1, 2], [1, 2, 3]) == 2  # one stopped early

