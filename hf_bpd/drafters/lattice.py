"""The base of the lattice drafters (Kim et al.'s p-best, n-gram and neural rescoring): exact for independent heads."""

from __future__ import annotations

import torch

from ..logits.lattice import TopKLattice, check_alpha, check_num_drafts, check_top_k, leading_pads
from .base import ChainDrafter, DraftContext, Drafts, TimingStats


class LatticeRescorer(TimingStats, ChainDrafter):
    """
    Base of the lattice rescorers: validates the shared hyper-parameters, builds the [`TopKLattice`] at each call,
    and keeps timing statistics. Subclasses implement `_rescore`.

    Args:
        top_k (`int`): `k`, tokens kept per head.
        alpha (`float`, defaults to 0.0): weight of the rescoring LM, `(1 - alpha) * head + alpha * lm`.
        num_drafts (`int`, defaults to 1): `p`, drafts returned per row.

    Attributes:
        time_s (`float`): seconds spent in `__call__` since the last `reset()`.
        calls (`int`): calls since the last `reset()`.
    """

    requires_independent_heads = True
    instead = "SearchDrafter (hf_bpd.drafters: a beam search over the heads' own per-path scores, with the same hooks)"

    def __init__(self, top_k: int, alpha: float = 0.0, num_drafts: int = 1):
        self.top_k = check_top_k(top_k)
        self.alpha = check_alpha(alpha)
        self.num_drafts = check_num_drafts(num_drafts)
        self.reset_timing()

    def reset(self) -> None:
        """Start a new `generate` call: clear the statistics (subclasses also drop their per-call state)."""
        self.reset_timing()

    def __call__(
        self,
        input_ids: torch.LongTensor,
        lengths: torch.LongTensor,
        draft_logits: torch.FloatTensor,
        prompt_start: torch.LongTensor | None = None,
    ) -> torch.LongTensor:
        """
        The best paths of the lattice (the older functional interface; `propose` calls it when greedy).

        Args:
            input_ids (`torch.LongTensor` of shape `(batch, buffer_len)`): committed tokens; row `b` is
                `input_ids[b, prompt_start[b] : lengths[b]]`.
            lengths (`torch.LongTensor` of shape `(batch,)`): committed length of each row.
            draft_logits (`torch.FloatTensor` of shape `(batch, h, vocab)`): draft-head logits.
            prompt_start (`torch.LongTensor` of shape `(batch,)`, *optional*): first real token of each row; without
                it, the leading `pad_token_id`s of a row (when the drafter was given one) are taken as padding.
        Returns:
            `torch.LongTensor` of shape `(batch, num_drafts, h)`: the drafts, best first, on `draft_logits`' device.
        """
        with self.timed():
            lattice = TopKLattice.from_logits(draft_logits, self.top_k)
            check_num_drafts(self.num_drafts, self.top_k, lattice.num_heads)
            if prompt_start is None:
                prompt_start = leading_pads(input_ids, lengths, getattr(self, "pad_token_id", None))
            with torch.no_grad():
                paths = self._rescore(input_ids, lengths, lattice, draft_logits.shape[-1], prompt_start)  # (B, p, h)
            return lattice.path_tokens(paths)

    def _rescore(
        self,
        input_ids: torch.LongTensor,
        lengths: torch.LongTensor,
        lattice: TopKLattice,
        vocab_size: int,
        prompt_start: torch.LongTensor,
    ) -> torch.LongTensor:
        """Return lattice indices `(batch, num_drafts, h)`, best first."""
        raise NotImplementedError

    def _chains(self, ctx: DraftContext) -> torch.LongTensor | Drafts:
        """
        Greedy decoding: `__call__` (the `p` best paths). Speculative sampling (`ctx.sampling`): `_sample`, drafts
        drawn token by token from the rescorer's own reweighted distribution over the lattice, returned with it
        (see `hf_bpd.logits.lattice.lattice_proposal`); a subclass without `_sample` proposes its best paths
        (verified by "sample, then match").
        """
        if not ctx.sampling:
            return self(ctx.tokens, ctx.lengths, ctx.draft_logits().float(), ctx.prompt_start)
        with self.timed():
            draft_logits = ctx.draft_logits().float()
            lattice = TopKLattice.from_logits(draft_logits, self.top_k)
            check_num_drafts(self.num_drafts, self.top_k, lattice.num_heads)
            with torch.no_grad():
                return self._sample(ctx, lattice, draft_logits.shape[-1])

    def _sample(self, ctx: DraftContext, lattice: TopKLattice, vocab_size: int) -> torch.LongTensor | Drafts:
        """Drafts sampled from the rescorer's proposal with their proposals; default: the deterministic best paths."""
        return lattice.path_tokens(self._rescore(ctx.tokens, ctx.lengths, lattice, vocab_size, ctx.prompt_start))
