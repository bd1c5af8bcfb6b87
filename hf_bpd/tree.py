"""
Layout of a verification block holding `p` drafts of `h` tokens that share one root (the last committed token).

Node 0 is the root; node `1 + q*h + (j-1)` is token `j` (1-based) of draft `q`. Node `(q, j)` attends to the root
and to `(q, 1..j)`; its position id is `root_position + j`. With `p == 1` this is the plain causal block.
Drafts with equal prefixes are *not* merged in the block, but every node is mapped to a *canonical* node (the
first draft with the same prefix): targets are read from canonical nodes, so each distinct prefix contributes one
target. That keeps p-best verification lossless for sampling too (one sample per distinct prefix, as in a trie).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ._compat import reorder_cache_tail


@dataclass
class TreeLayout:
    """
    Args:
        node_index (`torch.LongTensor` of shape `(p, h + 1)`): block index of token `j` of draft `q` (`j = 0` the root).
        depth (`torch.LongTensor` of shape `(W,)`): tokens after the root on the path to each node.
        draft_of_node (`torch.LongTensor` of shape `(W,)`): which draft a node belongs to (0 for the root).
        visible (`torch.BoolTensor` of shape `(W, W)`): `visible[w, v]` when node `w` attends to node `v`.
    """

    node_index: torch.LongTensor
    depth: torch.LongTensor
    draft_of_node: torch.LongTensor
    visible: torch.BoolTensor

    @property
    def width(self) -> int:
        return int(self.depth.shape[0])


@functools.lru_cache(maxsize=64)
def tree_layout(num_drafts: int, num_tokens: int, device: torch.device | str = "cpu") -> TreeLayout:
    """
    The [`TreeLayout`] of `num_drafts` drafts of `num_tokens` tokens each. Cached: the decode loop asks for the same
    few shapes every step, and callers only read the tensors.
    """
    p, h = num_drafts, num_tokens
    j = torch.arange(h + 1, device=device)
    node_index = torch.where(j == 0, 0, 1 + torch.arange(p, device=device)[:, None] * h + j - 1)  # (p, h + 1)
    width = 1 + p * h
    depth = torch.zeros(width, dtype=torch.long, device=device)
    draft_of_node = torch.zeros(width, dtype=torch.long, device=device)
    depth[1:] = (torch.arange(p * h, device=device) % h) + 1
    draft_of_node[1:] = torch.arange(p * h, device=device) // h
    same_draft = draft_of_node[:, None] == draft_of_node[None, :]
    visible = (same_draft & (depth[None, :] <= depth[:, None])) | (depth[None, :] == 0)
    return TreeLayout(node_index=node_index, depth=depth, draft_of_node=draft_of_node, visible=visible)


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
