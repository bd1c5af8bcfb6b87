"""Pure loss functions for draft heads (no model, no Trainer): easy to test on hand-written tensors."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def draft_head_loss(
    draft_logits: torch.Tensor,
    labels: torch.Tensor,
    head_weights: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Cross-entropy of every draft head against its target token.

    Head `i` (0-based) at position `t` predicts the token `t + 2 + i`, i.e. it is trained against
    `labels[:, t + 2 + i]`: `i + 1` positions after the base model's own next token. Positions whose target is
    `ignore_index` (padding) or falls past the end of the sequence are masked.

    Args:
        draft_logits (`torch.Tensor` of shape `(batch, seq_len, num_heads, vocab)`): draft-head logits.
        labels (`torch.LongTensor` of shape `(batch, seq_len)`): token ids aligned with the inputs (the usual
            causal-LM labels, *not* shifted), `ignore_index` where masked.
        head_weights (`torch.Tensor` of shape `(num_heads,)`, *optional*): weights of the per-head losses in the
            total; defaults to the uniform mean.
        ignore_index (`int`, defaults to -100): label value that is masked.
    Returns:
        `(loss, head_losses)`: the weighted total (scalar) and the per-head mean losses `(num_heads,)`. A head with
        no valid target contributes 0.
    """
    _, seq_len, num_heads, _ = draft_logits.shape
    losses = []
    for i in range(num_heads):
        shift = i + 2
        if seq_len <= shift:
            losses.append(draft_logits.new_zeros((), dtype=torch.float32))
            continue
        logits_i = draft_logits[:, : seq_len - shift, i].flatten(0, 1).float()  # (B * (T - shift), V)
        target_i = labels[:, shift:].flatten()  # (B * (T - shift),)
        if (target_i != ignore_index).any():
            losses.append(F.cross_entropy(logits_i, target_i, ignore_index=ignore_index))
        else:
            losses.append(logits_i.sum() * 0.0)  # keeps the graph connected (DDP) without a NaN
    head_losses = torch.stack(losses)
    if head_weights is None:
        return head_losses.mean(), head_losses
    head_weights = head_weights.to(head_losses)
    return (head_losses * head_weights).sum() / head_weights.sum(), head_losses
