"""Width from cost: the number of draft nodes that maximises expected tokens per second, on hand-written numbers."""

from __future__ import annotations

import pytest
import torch

from hf_bpd.cost import ForwardCost
from hf_bpd.tree import DraftTree, tree_from_parents
from hf_bpd.verify_width import (
    WidthFromCost,
    choose_num_nodes,
    expected_rates,
    monotone_node_probs,
    prune_tree,
)


def linear(slope: float, base: float = 1.0):
    """cost(W) = base + slope * (W - 1): slope 0 is flat (memory-bound), slope 1 costs a greedy step per token."""
    return lambda width: base + slope * (width - 1)


def test_flat_cost_takes_every_node_with_positive_probability():
    probs = torch.tensor([[0.9, 0.5, 0.1, 0.0, -1.0]])  # -1: a missing node
    assert choose_num_nodes(probs, linear(0.0)).num_nodes == 3


def test_steep_cost_takes_no_node():
    probs = torch.tensor([[0.95, 0.9, 0.8]])  # every node costs a full greedy step, and none is sure
    choice = choose_num_nodes(probs, linear(1.0))
    assert choice.num_nodes == 0 and choice.expected_rate == pytest.approx(1.0)


def test_hand_computed_optimum():
    curve = ForwardCost(widths=(1, 2, 3, 4), seconds=(1.0, 1.2, 1.5, 2.0))
    probs = torch.tensor([[0.3, 0.8, 0.5]])  # any order: sorted to 0.8, 0.5, 0.3
    rates = expected_rates(probs, curve)
    assert rates[0].tolist() == pytest.approx([1.0, 1.8 / 1.2, 2.3 / 1.5, 2.6 / 2.0])
    assert choose_num_nodes(probs, curve).num_nodes == 2
    # the drafter's own cost is paid whatever N is: it makes wider blocks relatively cheaper
    assert choose_num_nodes(probs, curve, draft_cost=1.0).num_nodes == 2  # 2.3/2.5 > 2.6/3.0 > 1.8/2.2
    assert choose_num_nodes(probs, curve, draft_cost=10.0).num_nodes == 3  # 2.6/12 > 2.3/11.5


def test_brute_force_and_never_below_greedy():
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        probs = torch.rand(3, 8, generator=gen) ** 2
        slope = float(torch.rand(1, generator=gen)) * 0.6
        choice = choose_num_nodes(probs, linear(slope))
        for b in range(3):
            c = sorted(probs[b].tolist(), reverse=True)
            rates = [(1 + sum(c[:n])) / (1 + slope * n) for n in range(9)]
            assert int(choice.row_nodes[b]) == max(range(9), key=lambda n: (rates[n], -n))
            assert rates[int(choice.row_nodes[b])] >= rates[0]  # never worse than a greedy step, in expectation
        assert choice.num_nodes == int(choice.row_nodes.max())


def test_monotone_in_slope_and_draft_cost():
    gen = torch.Generator().manual_seed(1)
    for _ in range(30):
        probs = torch.rand(1, 12, generator=gen)
        by_slope = [choose_num_nodes(probs, linear(s)).num_nodes for s in torch.linspace(0, 1.5, 16).tolist()]
        assert by_slope == sorted(by_slope, reverse=True)  # steeper -> never wider
        by_draft = [choose_num_nodes(probs, linear(0.3), draft_cost=d).num_nodes for d in (0, 0.1, 0.5, 2, 10)]
        assert by_draft == sorted(by_draft)  # costlier drafting -> never narrower
    assert by_slope[0] == 12 and by_slope[-1] == 0  # the ends really differ


def test_batch_rules():
    probs = torch.tensor([[0.9, 0.8, 0.7], [0.1, 0.05, 0.0], [0.99, 0.99, 0.99]])
    live = torch.tensor([True, True, False])
    widest = choose_num_nodes(probs, linear(0.5), live=live)
    assert widest.row_nodes.tolist() == [3, 0, 0] and widest.num_nodes == 3  # row 0 decides; row 2 has finished
    # joint: a B-row forward of width W costs cost(B * W) = 1 + 0.5 * (3W - 1); total expected tokens of live rows
    joint = choose_num_nodes(probs, linear(0.5), live=live, batch_rule="joint")
    rows = ([0.9, 0.8, 0.7], [0.1, 0.05, 0.0])
    totals = [(2 + sum(rows[0][:n]) + sum(rows[1][:n])) / (1 + 0.5 * (3 * (n + 1) - 1)) for n in range(4)]
    assert joint.num_nodes == max(range(4), key=lambda n: (totals[n], -n))
    assert joint.expected_rate == pytest.approx(max(totals))
    with pytest.raises(ValueError, match="batch_rule"):
        choose_num_nodes(probs, linear(0.5), batch_rule="mean")


def test_prune_keeps_the_most_probable_ancestor_closed_nodes():
    # root -> 1 -> 2 -> 3, root -> 4 -> 5; node 5 rated above its parent 4 (a calibration quirk)
    layout = tree_from_parents((-1, 0, 1, 2, 0, 4))
    tree = DraftTree(tokens=torch.tensor([[11, 12, 13, 14, 15], [21, 22, 23, 24, 25]]), layout=layout)
    probs = torch.tensor([[0.9, 0.6, 0.2, 0.3, 0.5], [0.1, 0.1, 0.1, 0.1, 0.1]])
    assert monotone_node_probs(probs, layout.parent)[0].tolist() == pytest.approx([0.9, 0.6, 0.2, 0.3, 0.3])
    pruned = prune_tree(tree, probs, 3)
    assert pruned.layout.parent.tolist() == [-1, 0, 1, 0]  # nodes 1, 2, 4
    assert pruned.tokens.tolist() == [[11, 12, 14], [21, 22, 24]]
    only_row1 = prune_tree(tree, probs, 3, live=torch.tensor([False, True]))  # all equal: first nodes win
    assert only_row1.tokens[0].tolist() == [11, 12, 13]
    greedy = prune_tree(tree, probs, 0)
    assert greedy.layout.width == 1 and greedy.tokens.shape == (2, 0)
    assert prune_tree(tree, probs, 9) is tree


def test_width_from_cost_falls_back_when_uncalibrated():
    tree = DraftTree.from_chains(torch.tensor([[[1, 2, 3], [4, 5, 6]]]))
    chooser = WidthFromCost(linear(0.0), fallback_nodes=4)
    assert chooser.num_nodes(None) == 4
    pruned = chooser.apply(tree, None)
    assert pruned.tokens.tolist() == [[1, 2, 3, 4]]
    probs = torch.tensor([[0.9, 0.8, 0.0, 0.7, 0.0, 0.0]])
    assert chooser.apply(tree, probs).tokens.tolist() == [[1, 2, 4]]  # flat cost: every node with c > 0
    assert WidthFromCost(linear(2.0)).apply(tree, probs).layout.width == 1  # steep: a plain greedy step
