"""The oracle drafter: proposes a known continuation. For measuring the loop and the heads, never for real decoding."""

from __future__ import annotations

import torch

from .base import ChainDrafter, DraftContext


class OracleDrafter(ChainDrafter):
    """
    Proposes the tokens that follow in `reference` (e.g. the base model's own greedy output).

    - `top_k=None`: every draft is accepted, the loop's best case (`h + 1` tokens per serial call). The heads are
      not run at all, so the tests and the core benchmark see the loop's own cost.
    - `top_k=k`: Kim et al.'s *oracle top-k*: the best path of the heads' top-k lattice chosen with knowledge of
      the reference: the draft follows the reference while each reference token lies in that head's top-k, then
      the heads' argmax. It measures the headroom of any lattice rescorer with that `k`.

    Args:
        reference (`torch.LongTensor` of shape `(batch, length)`): full sequences (prompt with the same left
            padding as the `generate` input, then the continuation).
        pad_token_id (`int`, defaults to 0): proposed past the end of `reference`.
        top_k (`int`, *optional*): see above.
    """

    def __init__(self, reference: torch.LongTensor, pad_token_id: int = 0, top_k: int | None = None):
        if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"OracleDrafter top_k must be None or an integer >= 1, got {top_k!r}.")
        self.requires_independent_heads = top_k is not None  # the top-k path reads the heads' lattice
        self.reference = reference
        self.pad_token_id = pad_token_id
        self.top_k = top_k

    def continuation(self, lengths: torch.LongTensor, num_heads: int) -> torch.LongTensor:
        """The `num_heads` reference tokens after each row's committed length, `(batch, num_heads)`."""
        if self.reference.shape[0] != lengths.shape[0]:
            raise ValueError(f"OracleDrafter holds {self.reference.shape[0]} rows, generate has {lengths.shape[0]}.")
        padded = torch.nn.functional.pad(self.reference, (0, num_heads), value=self.pad_token_id).to(lengths.device)
        index = lengths[:, None] + torch.arange(num_heads, device=lengths.device)  # (B, h)
        return padded.gather(1, index.clamp(max=padded.shape[1] - 1))

    instead = "OracleDrafter(reference) without top_k"

    def _chains(self, state: DraftContext) -> torch.LongTensor:
        if type(self).__call__ is not OracleDrafter.__call__:  # a subclass written for the functional interface
            return self(state.tokens, state.lengths, state.draft_logits().float())
        wanted = self.continuation(state.lengths, state.num_heads)  # (B, h)
        return wanted[:, None] if self.top_k is None else self._top_k_path(wanted, state.draft_logits())

    def __call__(
        self, input_ids: torch.LongTensor, lengths: torch.LongTensor, draft_logits: torch.FloatTensor
    ) -> torch.LongTensor:
        """The older functional interface: `(batch, 1, h)` drafts (the heads' logits are read only with `top_k`)."""
        wanted = self.continuation(lengths, draft_logits.shape[1])
        return wanted[:, None] if self.top_k is None else self._top_k_path(wanted, draft_logits)

    def _top_k_path(self, wanted: torch.LongTensor, logits: torch.Tensor) -> torch.LongTensor:
        top = logits.topk(min(self.top_k, logits.shape[-1]), dim=-1).indices.to(wanted.device)  # (B, h, k)
        inside = (top == wanted[..., None]).any(-1).long().cumprod(-1).bool()
        return torch.where(inside, wanted, top[..., 0])[:, None]
