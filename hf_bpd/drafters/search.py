"""
A beam search over draft paths with refinement hooks: the drafter that works for every head type.

Depth by depth, every kept path is expanded: the heads score the next token given the path (independent heads: head
`d`'s distribution; token-conditioned heads: their output given `[x_{t+1}, path]`), the top-k of those scores are
considered, and the hooks (`hf_bpd.logits.NgramHook`, `NeuralHook`, ...) rescore them given the path's whole prefix.
The `num_drafts` best paths by summed score are verified as chains. With `num_drafts=1` it is a greedy chain; over
independent heads without hooks it is exactly Kim et al.'s p-best (a beam of `p` is exact for a sum of independent
per-position scores), and with a `NeuralHook` and `num_drafts=1` exactly their local neural rescoring.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..logits.lattice import check_num_drafts, check_top_k
from ..tree import DraftTree, tree_from_parents
from .base import ChainDrafter, DraftContext, Drafts, TimingStats


class SearchDrafter(TimingStats, ChainDrafter):
    """
    Beam search over the heads' per-path scores, rescored by hooks.

    Args:
        top_k (`int`, defaults to 8): tokens considered per expansion.
        num_drafts (`int`, defaults to 1): `p`, beam width and chains verified per step.
        hooks (`Sequence[Callable]`, defaults to `()`): refinement hooks `hook(input_ids, scores, attention_mask)`,
            applied in order to every expansion.

    With speculative sampling, each of the `p` chains is drawn token by token from its own proposal: the hooked
    scores of its path through the generation's position-free warpers, then softmax (`0` outside the top-k).
    """

    def __init__(self, top_k: int = 8, num_drafts: int = 1, hooks: Sequence[Any] = ()):
        self.top_k = check_top_k(top_k)
        self.num_drafts = check_num_drafts(num_drafts)
        self.hooks = list(hooks)
        self.reset_timing()

    def reset(self) -> None:
        self.reset_timing()

    def _scores(
        self,
        ctx: DraftContext,
        paths: torch.LongTensor,
        rows: torch.LongTensor,
        prefix: tuple[torch.LongTensor, torch.LongTensor],
    ) -> tuple[torch.Tensor, torch.LongTensor]:
        """Hooked scores `(N, V)` of the token after each path `(N, d)` of row `rows` (`-inf` outside the top-k)."""
        logprobs = torch.log_softmax(ctx.path_logits(paths, rows).float(), dim=-1)
        values, top = logprobs.topk(min(self.top_k, logprobs.shape[-1]), dim=-1)
        scores = torch.full_like(logprobs, float("-inf")).scatter_(-1, top, values)
        if self.hooks:
            ids, mask = prefix
            ids = torch.cat([ids[rows], paths], dim=1)
            mask = torch.cat([mask[rows], torch.ones_like(paths)], dim=1)
            for hook in self.hooks:
                scores = hook(ids, scores, attention_mask=mask)
        return scores, top

    def _chains(self, ctx: DraftContext) -> torch.LongTensor | Drafts:
        with self.timed(), torch.no_grad():
            prefix = committed_prefixes(ctx) if self.hooks else (None, None)
            if ctx.sampling:
                return self._sample(ctx, prefix)
            batch, device = ctx.batch_size, ctx.tokens.device
            paths = ctx.tokens.new_zeros(batch, 1, 0)
            totals = torch.zeros(batch, 1, device=device)
            for depth in range(ctx.num_tokens):
                m = paths.shape[1]
                rows = torch.arange(batch, device=device).repeat_interleave(m)
                scores, top = self._scores(ctx, paths.reshape(batch * m, depth), rows, prefix)
                cand = (totals.reshape(-1, 1) + scores.gather(-1, top).to(device)).view(batch, -1)  # (B, m * k)
                keep = min(self.num_drafts, cand.shape[1])
                totals, best = cand.topk(keep, dim=-1)
                k = top.shape[-1]
                parent, token = best // k, top.to(device).view(batch, -1).gather(1, best)
                paths = torch.cat([paths.gather(1, parent[..., None].expand(-1, -1, depth)), token[..., None]], 2)
            return _pad(paths, ctx.num_heads)

    def propose(self, ctx: DraftContext) -> DraftTree:
        """The beams as chains; greedy with one row, their shared prefixes merged into one prefix tree."""
        tree = super().propose(ctx)
        if ctx.sampling or ctx.batch_size != 1 or self.num_drafts == 1:
            return tree
        return prefix_tree(tree.path_drafts()[0])

    def _sample(self, ctx: DraftContext, prefix: tuple[Any, Any]) -> Drafts:
        """`p` independent chains per row, each token drawn from its path's own hooked proposal."""
        batch, p, device = ctx.batch_size, self.num_drafts, ctx.tokens.device
        rows = torch.arange(batch, device=device).repeat_interleave(p)
        paths = ctx.tokens.new_zeros(batch * p, 0)
        proposals = []
        for _ in range(ctx.num_tokens):
            q = ctx.proposal_probs(self._scores(ctx, paths, rows, prefix)[0])
            proposals.append(q)
            paths = torch.cat([paths, torch.multinomial(q, 1).to(device)], dim=1)
        q = torch.stack(proposals, 1) if proposals else paths.new_zeros(batch * p, 0, ctx.vocab_size).float()
        pad = ctx.num_heads - paths.shape[1]
        tokens = torch.nn.functional.pad(paths, (0, pad)).view(batch, p, -1)
        return Drafts(tokens, torch.nn.functional.pad(q, (0, 0, 0, pad)).view(batch, p, ctx.num_heads, -1))


def prefix_tree(paths: torch.LongTensor) -> DraftTree:
    """
    One row's draft paths `(p, D)` (`-1` past a leaf) as a prefix tree: paths that share a prefix share its nodes,
    so the verify block holds each distinct prefix once (beams of a search often agree on their first tokens).
    """
    nodes: dict[tuple[int, ...], int] = {(): 0}
    parents, tokens = [-1], []
    for path in paths.tolist():
        prefix: tuple[int, ...] = ()
        for token in path:
            if token < 0:
                break
            key = prefix + (token,)
            if key not in nodes:
                nodes[key] = len(parents)
                parents.append(nodes[prefix])
                tokens.append(token)
            prefix = key
    layout = tree_from_parents(tuple(parents), paths.device)
    return DraftTree(tokens=torch.tensor([tokens], dtype=torch.long, device=paths.device), layout=layout)


def _pad(paths: torch.LongTensor, length: int) -> torch.LongTensor:
    """Chains `(B, p, d)` padded to `length` tokens (the loop keeps the first `num_tokens`)."""
    return torch.nn.functional.pad(paths, (0, length - paths.shape[2]))


def committed_prefixes(ctx: DraftContext) -> tuple[torch.LongTensor, torch.LongTensor]:
    """
    Each row's real committed tokens, right-aligned: `(ids, mask)` of shape `(batch, L)` with `L` the longest row;
    `mask` is 1 on real tokens (from `ctx.prompt_start`, never from pad-token values).
    """
    starts, lengths = ctx.prompt_start.to(ctx.tokens.device), ctx.lengths
    real = lengths - starts
    width = max(int(real.max()), 1)
    offsets = torch.arange(width, device=ctx.tokens.device)[None] - width  # -width .. -1
    index = (lengths[:, None] + offsets).clamp(min=0)
    mask = (offsets >= -real[:, None]).long()
    return ctx.tokens.gather(1, index) * mask, mask
