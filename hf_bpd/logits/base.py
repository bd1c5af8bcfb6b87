"""The draft-rescorer interface: one `__call__` shape, like transformers' `LogitsProcessor`."""

from __future__ import annotations

import torch


class DraftRescorer:
    """
    Turns the draft heads' logits into the draft(s) that the base model verifies. It changes only the draft: the
    verifier, and so the output of `generate`, are untouched.

    Pass an instance to `model.generate(..., use_bpd=True, draft_rescorer=...)`. Subclasses implement `__call__`;
    `reset` is called once at the start of every `generate` call (drop per-call state such as a KV cache).

    Attributes:
        num_drafts (`int`): `p`, how many drafts `__call__` returns per row (verified together in one call).
    """

    num_drafts: int = 1

    def reset(self) -> None:
        """Forget per-`generate` state. The default keeps none."""

    def __call__(
        self, input_ids: torch.LongTensor, lengths: torch.LongTensor, draft_logits: torch.FloatTensor
    ) -> torch.LongTensor:
        """
        Args:
            input_ids (`torch.LongTensor` of shape `(batch, buffer_len)`): committed tokens of each row (prompt with
                its left padding, then generated tokens); only `input_ids[b, : lengths[b]]` is meaningful. The
                last committed token `input_ids[b, lengths[b] - 1]` is the one the drafts continue.
            lengths (`torch.LongTensor` of shape `(batch,)`): committed length of each row.
            draft_logits (`torch.FloatTensor` of shape `(batch, h, vocab)`): head `i` scores the token `i + 1`
                positions after the last committed token.
        Returns:
            `torch.LongTensor` of shape `(batch, num_drafts, h)`: the drafts, best first.
        """
        raise NotImplementedError
