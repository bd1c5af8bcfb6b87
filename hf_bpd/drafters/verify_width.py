"""
How many draft nodes to verify this step: the width that maximises expected tokens per second.

Named for what it decides (the width of the verify block), not for a drafter: it prunes any drafter's tree, so it
belongs beside the loop's drafting step (it moves into `hf_bpd/drafters/` with the drafter contract).

A verify step over a tree of `N` draft nodes feeds the base model `N + 1` tokens (the root too) and commits
`1 + (accepted drafts)` tokens. With `c_i` the probability that node `i` is accepted (its *path* probability: the
product of its own and its ancestors' conditional acceptance rates, calibrated per depth), the expected tokens of the
step are `1 + sum_i c_i` (for greedy decoding with distinct siblings, node acceptances are nested events, so the
expected accepted length is the sum over nodes). Taking the `N` most probable nodes (`c_1 >= c_2 >= ...`, an
ancestor-closed set because a child is never more probable than its parent), the expected rate is

    rate(N) = (1 + sum_{i <= N} c_i) / (cost(N + 1) + draft_cost)

with `cost` the measured forward cost ([`hf_bpd.cost.ForwardCost`]) and `draft_cost` the seconds the drafter spent
(paid whatever `N` is). `N = 0` is a plain greedy step, so a drafter whose nodes are unlikely costs at most its
`draft_cost` over greedy. Ties go to the smaller `N`.

Batches share one tree shape: by default (`batch_rule="widest"`) every row chooses its own `N_b` as if alone, and the
widest live row decides the block's width (the other rows verify extra nodes they would not have paid for; their
accepted tokens are still correct). `batch_rule="joint"` maximises the batch's total expected tokens per second
instead, costing a forward over `B` rows of `W` tokens as one over `B * W` tokens (compute-bound CPU).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..cost import ForwardCost
from ..tree import DraftTree, tree_from_parents

BATCH_RULES = ("widest", "joint")


def _cost_fn(cost: ForwardCost | Callable[[float], float]) -> Callable[[float], float]:
    return cost.cost if isinstance(cost, ForwardCost) else cost


def sorted_node_probs(node_probs: torch.Tensor) -> torch.DoubleTensor:
    """`(batch, M)` acceptance probabilities, clamped to `[0, 1]` (NaN and missing nodes' `-1` count as 0), sorted
    in decreasing order per row, in float64."""
    probs = torch.nan_to_num(node_probs.double(), nan=0.0).clamp(0.0, 1.0)
    return probs.sort(dim=-1, descending=True).values


def expected_rates(
    node_probs: torch.Tensor,
    cost: ForwardCost | Callable[[float], float],
    draft_cost: float = 0.0,
    batch_size: int = 1,
) -> torch.DoubleTensor:
    """
    Expected tokens per second of verifying the `N` most probable nodes, for every `N` in `0 .. M`.

    Args:
        node_probs (`torch.Tensor` of shape `(batch, M)`): calibrated acceptance (path) probabilities of the candidate
            nodes of each row, in any order; values `<= 0` (e.g. `-1` for missing nodes) add nothing.
        cost ([`~hf_bpd.cost.ForwardCost`] or `Callable[[float], float]`): seconds of one forward over `W` tokens.
        draft_cost (`float`): seconds the drafter took this step.
        batch_size (`int`): rows of the forward; a width-`W` block costs `cost(batch_size * W)`.
    Returns:
        `torch.DoubleTensor` of shape `(batch, M + 1)`: `rate[b, N]` in tokens per second for row `b`.
    """
    probs = sorted_node_probs(node_probs)
    batch, m = probs.shape
    fn = _cost_fn(cost)
    seconds = torch.tensor([fn(batch_size * (n + 1)) + draft_cost for n in range(m + 1)], dtype=torch.float64)
    if bool((seconds <= 0).any()):
        raise ValueError(f"Step costs must be positive seconds, got {seconds.tolist()}.")
    tokens = 1.0 + torch.cat([probs.new_zeros(batch, 1), probs.cumsum(dim=-1)], dim=-1)  # (B, M + 1)
    return tokens / seconds.to(probs.device)


@dataclass
class WidthChoice:
    """
    Args:
        num_nodes (`int`): draft nodes the block verifies (its width is `num_nodes + 1`).
        row_nodes (`torch.LongTensor` of shape `(batch,)`): each row's own best `N` (0 for rows that are not live).
        expected_rate (`float`): expected tokens per second of the chosen width (summed over live rows).
    """

    num_nodes: int
    row_nodes: torch.LongTensor
    expected_rate: float


def choose_num_nodes(
    node_probs: torch.Tensor,
    cost: ForwardCost | Callable[[float], float],
    draft_cost: float = 0.0,
    live: torch.BoolTensor | None = None,
    batch_rule: str = "widest",
) -> WidthChoice:
    """
    The number of draft nodes maximising expected tokens per second (see the module docstring).

    Args:
        node_probs (`torch.Tensor` of shape `(batch, M)`): calibrated acceptance probabilities of each row's
            candidate nodes (any order; `<= 0` for missing nodes).
        cost ([`~hf_bpd.cost.ForwardCost`] or `Callable[[float], float]`): seconds of a forward over `W` tokens.
        draft_cost (`float`): the drafter's seconds this step.
        live (`torch.BoolTensor` of shape `(batch,)`, *optional*): rows still generating (others are ignored).
        batch_rule (`str`): `"widest"` (each row alone, the widest live row decides) or `"joint"` (the batch's total
            rate, a `B`-row forward costed as `B` times the width).
    Returns:
        [`WidthChoice`].
    """
    if batch_rule not in BATCH_RULES:
        raise ValueError(f"batch_rule must be one of {BATCH_RULES}, got {batch_rule!r}.")
    batch = node_probs.shape[0]
    live = torch.ones(batch, dtype=torch.bool) if live is None else live.cpu().bool()
    rates = expected_rates(node_probs, cost, draft_cost).cpu()  # (B, M + 1), each row as if alone
    row_nodes = torch.where(live, rates.argmax(dim=-1), 0)  # argmax: the first maximum, i.e. the smaller N
    if not bool(live.any()):
        return WidthChoice(0, row_nodes, 0.0)
    if batch_rule == "widest":
        n = int(row_nodes.max())
        return WidthChoice(n, row_nodes, float(rates[live, n].sum()))
    joint = expected_rates(node_probs, cost, draft_cost, batch_size=batch).cpu()[live].sum(dim=0)  # (M + 1,)
    n = int(joint.argmax())
    return WidthChoice(n, row_nodes, float(joint[n]))


def monotone_node_probs(node_probs: torch.Tensor, parent: torch.LongTensor) -> torch.Tensor:
    """
    Path probabilities made non-increasing from parent to child (`c[w] <- min(c[w], c[parent[w]])`), so that the
    most probable nodes always form an ancestor-closed set (a calibration may rate a child above its parent).

    Args:
        node_probs (`torch.Tensor` of shape `(batch, W - 1)`): one value per node but the root.
        parent (`torch.LongTensor` of shape `(W,)`): the tree's parent pointers (`TreeLayout.parent`).
    """
    width = node_probs.shape[1] + 1
    parents = parent.tolist()
    ancestor = torch.eye(width, dtype=torch.bool)
    for w in range(1, width):  # topological order: a node's ancestors are its parent's and the parent
        ancestor[w] |= ancestor[parents[w]]
    return _min_over(node_probs, ancestor[1:, 1:])


def _min_over(node_probs: torch.Tensor, ancestor: torch.BoolTensor) -> torch.Tensor:
    """`(batch, W - 1)`: per node, the least probability on its path (`ancestor[w, v]`: `v` on `w`'s path)."""
    inf = torch.tensor(float("inf"), dtype=node_probs.dtype, device=node_probs.device)
    return torch.where(ancestor.to(node_probs.device)[None], node_probs[:, None, :], inf).amin(dim=-1)


def prune_tree(
    tree: DraftTree, node_probs: torch.Tensor, num_nodes: int, live: torch.BoolTensor | None = None
) -> DraftTree:
    """
    The sub-tree of the `num_nodes` most probable nodes (one shape for the batch: a node's score is its highest
    probability over live rows, the widest row's choice). Ties keep the earlier node, so a parent comes before a
    child of equal probability and the kept set is ancestor-closed.

    Args:
        tree ([`~hf_bpd.tree.DraftTree`]): the drafter's tree.
        node_probs (`torch.Tensor` of shape `(batch, W - 1)`): each node's acceptance (path) probability per row.
        num_nodes (`int`): nodes to keep (`0`: the root alone, a plain greedy step).
        live (`torch.BoolTensor` of shape `(batch,)`, *optional*): rows still generating.
    Returns:
        [`~hf_bpd.tree.DraftTree`] with `min(num_nodes, W - 1)` nodes, in their original order.
    """
    width = tree.layout.width
    if num_nodes >= width - 1:
        return tree
    return keep_columns(tree, kept_columns(tree, node_probs, num_nodes, live))


def keep_columns(tree: DraftTree, kept: list[int]) -> DraftTree:
    """The sub-tree of the node columns `kept` (ascending, ancestor-closed; node `w` is column `w - 1`)."""
    if len(kept) == tree.layout.width - 1:
        return tree
    new_index = {old + 1: new + 1 for new, old in enumerate(kept)}
    new_index[0] = 0
    parent = tree.layout.parent.tolist()
    parents = (-1,) + tuple(new_index[parent[old + 1]] for old in kept)
    columns = torch.tensor(kept, dtype=torch.long, device=tree.tokens.device)
    proposals = None if tree.proposals is None else tree.proposals[:, columns]
    layout = tree_from_parents(parents, tree.layout.depth.device)
    return DraftTree(tokens=tree.tokens[:, columns], layout=layout, proposals=proposals)


def kept_columns(
    tree: DraftTree, node_probs: torch.Tensor, num_nodes: int, live: torch.BoolTensor | None = None
) -> list[int]:
    """The node columns (node `w` is column `w - 1`) [`prune_tree`] keeps, ascending."""
    if num_nodes >= tree.layout.width - 1:
        return list(range(tree.layout.width - 1))
    probs = _min_over(torch.nan_to_num(node_probs.double().cpu(), nan=0.0), tree.layout.visible[1:, 1:].cpu())
    if live is not None and bool(live.any()):
        probs = probs[live.cpu().bool()]
    score = probs.max(dim=0).values  # (W - 1,)
    order = torch.argsort(score, descending=True, stable=True)  # ties: the earlier node first
    return sorted(order[: max(num_nodes, 0)].tolist())


@dataclass
class WidthFromCost:
    """
    Chooses each step's width from the measured cost curve and the drafter's calibrated node probabilities.

    Args:
        cost ([`~hf_bpd.cost.ForwardCost`] or `Callable[[float], float]`): the base forward's cost per width
            (`ForwardCost.for_model(model)`).
        fallback_nodes (`int`): nodes verified when the drafter has no calibrated probabilities (a fixed budget).
        batch_rule (`str`): see [`choose_num_nodes`].
    """

    cost: ForwardCost | Callable[[float], float]
    fallback_nodes: int = 4
    batch_rule: str = "widest"

    def num_nodes(
        self, node_probs: torch.Tensor | None, draft_cost: float = 0.0, live: torch.BoolTensor | None = None
    ) -> int:
        """`N` for this step; `fallback_nodes` when `node_probs` is None (uncalibrated)."""
        if node_probs is None:
            return self.fallback_nodes
        return choose_num_nodes(node_probs, self.cost, draft_cost, live, self.batch_rule).num_nodes

    def apply(
        self,
        tree: DraftTree,
        node_probs: torch.Tensor | None,
        draft_cost: float = 0.0,
        live: torch.BoolTensor | None = None,
    ) -> DraftTree:
        """`tree` cut to the chosen number of nodes (by probability; uncalibrated: the first `fallback_nodes` nodes,
        which is ancestor-closed because parents precede children)."""
        n = self.num_nodes(node_probs, draft_cost, live)
        if node_probs is None:  # rank by node order: a decreasing score keeps the first n nodes
            node_probs = torch.linspace(1.0, 0.5, tree.layout.width - 1, dtype=torch.float64)[None]
            live = None
        return prune_tree(tree, node_probs, n, live)
