"""
Layout of a verification block: a tree of draft tokens under one root (the last committed token).

Any prefix tree is given by parent pointers (`parent[w] < w`, node 0 the root, `parent[0] == -1`): node `w` attends
to the root and its ancestors and to itself, and its position id is `root_position + depth[w]`. Its *paths* are the
root-to-leaf node lists (`node_index`, one row per leaf, padded by repeating the leaf); a draft tree's tokens read
along a path form one chain draft, so the acceptance math of p drafts (`select_best_draft`) applies unchanged.

`tree_layout(p, h)` is the special case of `p` chains of `h` tokens sharing only the root (p-best verification):
node `1 + q*h + (j-1)` is token `j` (1-based) of draft `q`; with `p == 1` it is the plain causal block. Chains with
equal prefixes are *not* merged there, but every node is mapped to a *canonical* node (the first draft with the
same prefix): targets are read from canonical nodes, so each distinct prefix contributes one target. That keeps
p-best verification lossless for sampling too (one sample per distinct prefix, as in a trie). `tree_from_parents`
builds a real trie (from `hf_bpd.drafters.tree`'s drafters), where each prefix has one node.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

from ._compat import reorder_cache_tail


@dataclass(eq=False)
class TreeLayout:
    """
    Args:
        parent (`torch.LongTensor` of shape `(W,)`): parent node of each node, `-1` for the root (node 0);
            `parent[w] < w`.
        depth (`torch.LongTensor` of shape `(W,)`): tokens after the root on the path to each node.
        node_index (`torch.LongTensor` of shape `(P, D + 1)`): the nodes of each root-to-leaf path (`P` paths,
            `D` the deepest leaf), entry `j` at depth `j`; a path shorter than `D` repeats its leaf.
        path_length (`torch.LongTensor` of shape `(P,)`): depth of each path's leaf.
        draft_of_node (`torch.LongTensor` of shape `(W,)`): a path through each node (0 for the root).
        visible (`torch.BoolTensor` of shape `(W, W)`): `visible[w, v]` when node `w` attends to node `v` (an
            ancestor of `w`, or `w` itself).
    """

    parent: torch.LongTensor
    depth: torch.LongTensor
    node_index: torch.LongTensor
    path_length: torch.LongTensor
    draft_of_node: torch.LongTensor
    visible: torch.BoolTensor

    @property
    def width(self) -> int:
        """`W`, the nodes of the block (the root included)."""
        return int(self.depth.shape[0])

    @property
    def num_paths(self) -> int:
        """`P`, root-to-leaf paths (the drafts of a chain layout)."""
        return int(self.node_index.shape[0])

    @property
    def max_depth(self) -> int:
        """`D`, the deepest node's depth."""
        return int(self.node_index.shape[1]) - 1

    @property
    def is_chain(self) -> bool:
        """One path through every node: the plain causal block (no tree mask, no cache compaction)."""
        return self.num_paths == 1 and self.width == self.max_depth + 1

    def path_tokens(self, node_tokens: torch.LongTensor) -> torch.LongTensor:
        """
        The tokens along each path, `-1` (never accepted) past the path's leaf.

        Args:
            node_tokens (`torch.LongTensor` of shape `(batch, W)`): each node's token (the root's is not read).
        Returns:
            `torch.LongTensor` of shape `(batch, P, D)`: one chain draft per path.
        """
        tokens = node_tokens[:, self.node_index[:, 1:]]  # (B, P, D)
        inside = torch.arange(1, self.max_depth + 1, device=tokens.device)[None] <= self.path_length[:, None]
        return torch.where(inside, tokens, -1)


@functools.lru_cache(maxsize=64)
def tree_layout(num_drafts: int, num_tokens: int, device: torch.device | str = "cpu") -> TreeLayout:
    """
    The [`TreeLayout`] of `num_drafts` drafts of `num_tokens` tokens each, sharing only the root. Cached: the decode
    loop asks for the same few shapes every step, and callers only read the tensors.
    """
    p, h = num_drafts, num_tokens
    j = torch.arange(h + 1, device=device)
    node_index = torch.where(j == 0, 0, 1 + torch.arange(p, device=device)[:, None] * h + j - 1)  # (p, h + 1)
    width = 1 + p * h
    depth = torch.zeros(width, dtype=torch.long, device=device)
    draft_of_node = torch.zeros(width, dtype=torch.long, device=device)
    depth[1:] = (torch.arange(p * h, device=device) % h) + 1
    draft_of_node[1:] = torch.arange(p * h, device=device) // h
    parent = torch.arange(width, device=device) - 1
    parent[1:] = torch.where(depth[1:] == 1, 0, parent[1:])
    same_draft = draft_of_node[:, None] == draft_of_node[None, :]
    visible = (same_draft & (depth[None, :] <= depth[:, None])) | (depth[None, :] == 0)
    path_length = torch.full((p,), h, dtype=torch.long, device=device)
    return TreeLayout(
        parent=parent,
        depth=depth,
        node_index=node_index,
        path_length=path_length,
        draft_of_node=draft_of_node,
        visible=visible,
    )


@functools.lru_cache(maxsize=256)
def tree_from_parents(parents: tuple[int, ...], device: torch.device | str = "cpu") -> TreeLayout:
    """
    The [`TreeLayout`] of any tree given by parent pointers. Cached by shape (a static tree is built once).

    Args:
        parents (`tuple[int, ...]`): `parents[w]` for every node `w` (the root first, `-1`), each `< w`.
    Raises:
        ValueError: when `parents` is not a tree in topological order.
    """
    width = len(parents)
    if width == 0 or parents[0] != -1 or any(not 0 <= q < w for w, q in enumerate(parents) if w > 0):
        raise ValueError(
            f"A tree layout needs parents[0] == -1 (the root) and 0 <= parents[w] < w for every other node; got "
            f"{list(parents)[:20]}."
        )
    depth = [0] * width
    for w in range(1, width):
        depth[w] = depth[parents[w]] + 1
    has_child = [False] * width
    for w in range(1, width):
        has_child[parents[w]] = True
    leaves = [w for w in range(width) if not has_child[w]]  # the root alone is a leaf of the empty tree
    max_depth = max(depth)
    paths = []
    for leaf in leaves:
        path = [leaf]
        while path[-1] != 0:
            path.append(parents[path[-1]])
        paths.append(path[::-1] + [leaf] * (max_depth + 1 - len(path)))
    through = [0] * width  # the first path through each node: fill from the last path back
    for q in range(len(leaves) - 1, -1, -1):
        for w in paths[q]:
            through[w] = q
    visible = [[False] * width for _ in range(width)]
    for w in range(width):
        node = w
        while node != -1:
            visible[w][node] = True
            node = parents[node]
    as_long = functools.partial(torch.tensor, dtype=torch.long, device=device)
    return TreeLayout(
        parent=as_long(parents),
        depth=as_long(depth),
        node_index=as_long(paths),
        path_length=as_long([depth[leaf] for leaf in leaves]),
        draft_of_node=as_long(through),
        visible=torch.tensor(visible, dtype=torch.bool, device=device),
    )


def truncate_tree(layout: TreeLayout, max_depth: int) -> tuple[TreeLayout, torch.LongTensor]:
    """
    The sub-tree of the nodes at depth `<= max_depth` (near `max_length` the loop verifies fewer tokens).

    Returns:
        `(layout, kept)`: the smaller layout and the old index of each of its nodes `(W',)`.
    """
    if layout.max_depth <= max_depth:
        return layout, torch.arange(layout.width, device=layout.depth.device)
    kept = torch.nonzero(layout.depth <= max_depth).flatten()
    new_index = {int(old): new for new, old in enumerate(kept.tolist())}
    parents = tuple(-1 if new == 0 else new_index[int(layout.parent[old])] for new, old in enumerate(kept.tolist()))
    return tree_from_parents(parents, layout.depth.device), kept


@dataclass(eq=False)
class DraftTree:
    """
    What a tree drafter returns: one tree shape for the whole batch, each row with its own tokens.

    Args:
        tokens (`torch.LongTensor` of shape `(batch, W - 1)`): the token of every node but the root (node `w` is
            column `w - 1`); siblings should carry distinct tokens (equal ones waste width, but stay lossless).
        layout ([`TreeLayout`]): the shape, shared by the rows.
        proposals (`torch.FloatTensor` of shape `(batch, W - 1, vocab)`, *optional*): for sampled drafts, the
            distribution each node's token was drawn from, given its parent's path (and the siblings before it when
            siblings are drawn one after another, e.g. without replacement): the `q` of speculative sampling
            (`hf_bpd.sampling.tree_rejection_sample`). None: deterministic drafts ("sample, then match").
        candidate (`torch.BoolTensor` of shape `(W,)`, *optional*): nodes the loop may accept (the root is always
            one); the other nodes are verified in the same call but never chosen, and what their paths would have
            accepted is reported (a diagnostic such as `hf_bpd.drafters.CompareUnrefined`). None: every node.
        log_scores (`torch.FloatTensor` of shape `(batch, W - 1)`, *optional*): each node's own log-score when its
            drafter chose it (its head's log-probability of its token given its parent's path, mixed with an n-gram
            when the drafter mixes one): what a confidence calibration reads. None: not recorded.
    """

    tokens: torch.LongTensor
    layout: TreeLayout
    proposals: torch.FloatTensor | None = None
    candidate: torch.BoolTensor | None = None
    log_scores: torch.FloatTensor | None = None

    @classmethod
    def from_chains(cls, drafts: torch.LongTensor, proposals: torch.FloatTensor | None = None) -> DraftTree:
        """`(batch, p, h)` chain drafts sharing the root (the p-best layout of [`tree_layout`]), with their
        `(batch, p, h, vocab)` proposals if they were sampled."""
        batch, p, h = drafts.shape
        flat = None if proposals is None else proposals.reshape(batch, p * h, proposals.shape[-1])
        return cls(tokens=drafts.reshape(batch, p * h), layout=tree_layout(p, h, drafts.device), proposals=flat)

    def truncate(self, max_depth: int) -> DraftTree:
        """The nodes at depth `<= max_depth`."""
        layout, kept = truncate_tree(self.layout, max_depth)
        if layout is self.layout:
            return self
        proposals = None if self.proposals is None else self.proposals[:, kept[1:] - 1]
        candidate = None if self.candidate is None else self.candidate[kept.to(self.candidate.device)]
        log_scores = None if self.log_scores is None else self.log_scores[:, kept[1:].to(self.log_scores.device) - 1]
        return DraftTree(
            tokens=self.tokens[:, kept[1:] - 1],
            layout=layout,
            proposals=proposals,
            candidate=candidate,
            log_scores=log_scores,
        )

    def candidate_paths(self) -> torch.BoolTensor | None:
        """`(P,)`: the paths made only of candidate nodes (None when every node is one)."""
        if self.candidate is None:
            return None
        return self.candidate.to(self.layout.node_index.device)[self.layout.node_index].all(-1)

    def path_drafts(self) -> torch.LongTensor:
        """`(batch, P, D)`: the tokens along each root-to-leaf path, `-1` past its leaf (`TreeLayout.path_tokens`)."""
        root = self.tokens.new_zeros(self.tokens.shape[0], 1)
        return self.layout.path_tokens(torch.cat([root, self.tokens], dim=1))


def canonical_nodes(drafts: torch.LongTensor, layout: TreeLayout) -> torch.LongTensor:
    """
    For each draft and depth, the block index of the first draft's node with the same prefix.

    Args:
        drafts (`torch.LongTensor` of shape `(batch, p, h)`).
    Returns:
        `torch.LongTensor` of shape `(batch, p, h + 1)`.
    """
    batch, p, h = drafts.shape
    same = torch.ones(batch, p, p, dtype=torch.bool, device=drafts.device)  # equal prefixes of length j
    first = [torch.zeros(batch, p, dtype=torch.long, device=drafts.device)]
    for j in range(1, h + 1):
        same = same & (drafts[:, :, None, j - 1] == drafts[:, None, :, j - 1])
        first.append(same.long().argmax(dim=-1))  # first True (the diagonal is always True)
    first_draft = torch.stack(first, dim=-1)  # (B, p, h + 1)
    depth = torch.arange(h + 1, device=drafts.device).expand_as(first_draft)
    return layout.node_index[first_draft, depth]


def tree_attention_mask(
    past_mask: torch.LongTensor, layout: TreeLayout, live: torch.BoolTensor, dtype: torch.dtype
) -> torch.Tensor:
    """
    Additive 4D mask `(batch, 1, W, past + W)`: 0 where a node may attend, the dtype's minimum elsewhere.

    Args:
        past_mask (`torch.LongTensor` of shape `(batch, past)`): 1 for cached positions a row attends to.
        live (`torch.BoolTensor` of shape `(batch,)`): finished rows attend only to themselves in the block.
    """
    batch = past_mask.shape[0]
    width = layout.width
    past = past_mask.bool()[:, None, :].expand(batch, width, -1)
    eye = torch.eye(width, dtype=torch.bool, device=past_mask.device)
    block = torch.where(live[:, None, None], layout.visible[None], eye[None])
    allowed = torch.cat([past, block], dim=-1)[:, None]  # (B, 1, W, past + W)
    zero = torch.zeros((), dtype=dtype, device=past_mask.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


def compact_block(cache, width: int, order: torch.LongTensor) -> None:
    """
    Reorder the last `width` cache slots of every layer by `order` `(batch, width)` (kept nodes first), so that
    cropping the tail removes the nodes no row kept. Supports the dynamic cache's full-attention layers (the in-place
    cache write is a private transformers API: it lives in `hf_bpd._compat`).
    """
    reorder_cache_tail(cache, width, order)


# ------------------------------------------------------------------------------------------------ static trees
def check_tree_choices(choices: Any, num_heads: int | None = None, top_k: int | None = None) -> list[tuple[int, ...]]:
    """
    Validate a static draft tree given as index paths (Medusa's `medusa_choices`): `[[0], [1], [0, 0], ...]`, path
    `(r_1, .., r_d)` = the node whose token at depth `j` is head `j`'s rank-`r_j` token.

    Args:
        choices: a non-empty list of non-empty lists of integers.
        num_heads (`int`, *optional*): `h`; no path may be deeper.
        top_k (`int`, *optional*): every index must be `< top_k`.
    Returns:
        The paths as tuples, in the given order.
    Raises:
        ValueError: saying which path is wrong and why.
    """
    fix = "calibrate a tree for these heads with `hf-bpd tune --tree` (hf_bpd_bench.tree_tune)"
    if not isinstance(choices, (list, tuple)) or not choices:
        raise ValueError(
            f"A draft tree must be a non-empty list of index paths like [[0], [1], [0, 0]], got {choices!r}."
        )
    paths: list[tuple[int, ...]] = []
    for path in choices:
        if (
            not isinstance(path, (list, tuple))
            or not path
            or any(isinstance(r, bool) or not isinstance(r, int) or r < 0 for r in path)
        ):
            raise ValueError(f"Draft tree path {path!r} must be a non-empty list of integers >= 0 (top-k ranks).")
        paths.append(tuple(path))
    seen = set(paths)
    if len(seen) != len(paths):
        duplicate = next(p for p in paths if paths.count(p) > 1)
        raise ValueError(f"Draft tree path {list(duplicate)} appears twice: each node must be listed once.")
    for path in paths:
        if len(path) > 1 and path[:-1] not in seen:
            raise ValueError(
                f"Draft tree path {list(path)} has no parent: its prefix {list(path[:-1])} is missing (every prefix "
                "of a path must be a node of the tree)."
            )
        if num_heads is not None and len(path) > num_heads:
            raise ValueError(
                f"Draft tree path {list(path)} is {len(path)} tokens deep but the model has {num_heads} draft heads: "
                f"the tree does not match these heads; {fix}."
            )
        if top_k is not None and max(path) >= top_k:
            raise ValueError(f"Draft tree path {list(path)} uses rank {max(path)}, but ranks must be < {top_k}.")
    return paths


def choices_layout(
    choices: tuple[tuple[int, ...], ...], device: torch.device | str = "cpu"
) -> tuple[TreeLayout, torch.LongTensor, torch.LongTensor]:
    """
    The layout of a static tree (nodes ordered by depth, then by path, as Medusa orders them).

    Returns:
        `(layout, head, rank)`: for every node but the root, which head (0-based, `depth - 1`) and which of its
        top-k ranks gives the node's token, `(W - 1,)` each.
    """
    ordered = sorted(choices, key=lambda path: (len(path), path))
    index = {path: w + 1 for w, path in enumerate(ordered)}
    parents = (-1,) + tuple(index[path[:-1]] if len(path) > 1 else 0 for path in ordered)
    head = torch.tensor([len(path) - 1 for path in ordered], dtype=torch.long, device=device)
    rank = torch.tensor([path[-1] for path in ordered], dtype=torch.long, device=device)
    return tree_from_parents(parents, device), head, rank
