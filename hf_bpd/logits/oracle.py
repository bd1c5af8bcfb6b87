"""An oracle drafter: proposes a known continuation. For measuring the decode loop, never for real decoding."""

from __future__ import annotations

import torch

from .base import DraftRescorer


class OracleDrafter(DraftRescorer):
    """
    Proposes the tokens that follow in `reference` (e.g. the base model's own greedy output), so every draft is
    accepted: the loop's best case, `h + 1` tokens per serial call. Used by the tests and the core benchmark to
    separate the loop's overhead from the heads' quality.

    Args:
        reference (`torch.LongTensor` of shape `(batch, length)`): full sequences (prompt with the same left
            padding as the `generate` input, then the continuation).
        pad_token_id (`int`, defaults to 0): proposed past the end of `reference`.
    """

    def __init__(self, reference: torch.LongTensor, pad_token_id: int = 0):
        self.reference = reference
        self.pad_token_id = pad_token_id

    def __call__(
        self, input_ids: torch.LongTensor, lengths: torch.LongTensor, draft_logits: torch.FloatTensor
    ) -> torch.LongTensor:
        batch, num_heads, _ = draft_logits.shape
        if self.reference.shape[0] != batch:
            raise ValueError(f"OracleDrafter holds {self.reference.shape[0]} rows, generate has {batch}.")
        padded = torch.nn.functional.pad(self.reference, (0, num_heads), value=self.pad_token_id)
        index = lengths[:, None] + torch.arange(num_heads, device=lengths.device)  # (B, h)
        return padded.to(lengths.device).gather(1, index.clamp(max=padded.shape[1] - 1))[:, None]
