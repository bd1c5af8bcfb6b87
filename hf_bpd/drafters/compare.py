"""`compare_unrefined=True` as a wrapper drafter: the heads' own chain verified beside the drafts, never chosen."""

from __future__ import annotations

import torch

from ..tree import DraftTree
from .base import DraftContext, Drafter, checked_tree


class CompareUnrefined(Drafter):
    """
    A diagnostic wrapper: verifies `drafter`'s chains plus the heads' own greedy chain in the same call; the extra
    chain is marked never-chosen (`DraftTree.candidate`), and the loop reports what it would have accepted
    (`BPDGenerateOutput.unrefined_accepted_lengths`). The output is unchanged.
    """

    def __init__(self, drafter: Drafter):
        self.drafter = drafter
        self.num_drafts = drafter.num_drafts
        self.hidden_states = drafter.hidden_states
        self.requires_independent_heads = drafter.requires_independent_heads
        self.instead = drafter.instead

    def reset(self) -> None:
        self.drafter.reset()

    def update(self, accepted_lengths: torch.LongTensor, chosen: torch.LongTensor) -> None:
        self.drafter.update(accepted_lengths, chosen)

    def propose(self, ctx: DraftContext) -> DraftTree:
        tree = checked_tree(self.drafter.propose(ctx), ctx)
        if not _is_chains(tree):
            raise ValueError("`compare_unrefined=True` compares chain drafts; it does not support tree drafters.")
        drafts = tree.path_drafts()  # (B, p, D)
        depth = drafts.shape[2]
        heads = ctx.head_argmax()[:, None, :depth].to(drafts.device)
        proposals = None
        if tree.proposals is not None:  # the heads' chain is never a candidate: any proposal will do
            vocab = tree.proposals.shape[-1]
            own = torch.nn.functional.one_hot(heads, vocab).float()
            proposals = torch.cat([tree.proposals.view(*drafts.shape, vocab), own], dim=1)
        merged = DraftTree.from_chains(torch.cat([drafts, heads], dim=1), proposals)
        candidate = merged.layout.draft_of_node != merged.layout.num_paths - 1
        candidate[0] = True
        return DraftTree(merged.tokens, merged.layout, merged.proposals, candidate)


def _is_chains(tree: DraftTree) -> bool:
    """Whether a tree is `p` chains of equal length sharing only the root (the `DraftTree.from_chains` layout)."""
    layout = tree.layout
    if layout.width == 1:
        return True
    p, d = layout.num_paths, layout.max_depth
    expected = torch.arange(layout.width, device=layout.parent.device) - 1
    expected = torch.where(layout.depth == 1, 0, expected)
    expected[0] = -1
    return layout.width == 1 + p * d and bool((layout.path_length == d).all()) and torch.equal(layout.parent, expected)
