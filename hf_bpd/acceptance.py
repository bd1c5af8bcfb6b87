"""
The acceptance math of blockwise parallel decoding: small, pure, batch-aware functions over tensors.

Conventions for one block of row `b`: the verifier was fed `[x_0, d_1, ..., d_h]` (`x_0` the last committed
token, `d_j` the drafts) and its position `j` yields the target token `g_j` (argmax, or a sample, of the processed
base-model scores) for the token after `x_0, d_1..d_j`. Draft `d_{j+1}` is accepted while `d_{j+1} == g_j`; after
`n` accepted drafts the block commits `g_0 .. g_n` (the accepted drafts are equal to `g_0..g_{n-1}`, and `g_n` is
the base model's own "bonus" token). Sampling targets make this "sample, then match": every committed token is a
sample from the base model's distribution given the committed prefix, so the output distribution is the base
model's.
"""

from __future__ import annotations

import torch


def accepted_lengths(drafts: torch.LongTensor, targets: torch.LongTensor) -> torch.LongTensor:
    """
    Number of leading drafts that equal the verifier's targets.

    Args:
        drafts (`torch.LongTensor` of shape `(..., h)`): `d_1 .. d_h`.
        targets (`torch.LongTensor` of shape `(..., h + 1)` or `(..., h)`): `g_0 .. g_h` (only `g_0..g_{h-1}` are
            compared).
    Returns:
        `torch.LongTensor` of shape `(...)`, values in `[0, h]`.
    """
    h = drafts.shape[-1]
    matches = drafts == targets[..., :h]
    return matches.long().cumprod(dim=-1).sum(dim=-1)


def select_best_draft(
    drafts: torch.LongTensor, targets: torch.LongTensor
) -> tuple[torch.LongTensor, torch.LongTensor]:
    """
    p-best verification: the draft with the longest accepted prefix (the first one on ties).

    Args:
        drafts (`torch.LongTensor` of shape `(batch, p, h)`).
        targets (`torch.LongTensor` of shape `(batch, p, h + 1)`): the verifier's targets along each draft.
    Returns:
        `(best, n)`: index of the chosen draft `(batch,)` and its accepted length `(batch,)`.
    """
    n_all = accepted_lengths(drafts, targets)  # (B, p)
    n, best = n_all.max(dim=-1)  # max returns the first maximal index
    return best, n


def cap_accepted(n: torch.LongTensor, remaining: torch.LongTensor) -> torch.LongTensor:
    """
    Cap accepted lengths so that at most `remaining` tokens are committed (`n + 1 <= remaining`).

    Args:
        n (`torch.LongTensor` of shape `(batch,)`): accepted drafts.
        remaining (`torch.LongTensor` of shape `(batch,)`): tokens each row may still produce (>= 1 for live rows).
    """
    return torch.minimum(n, (remaining - 1).clamp(min=0))


def truncate_at_eos(
    committed: torch.LongTensor, n: torch.LongTensor, eos_token_ids: torch.LongTensor | None
) -> tuple[torch.LongTensor, torch.BoolTensor]:
    """
    Stop each row at the first end-of-sequence token among its committed tokens `committed[b, :n_b + 1]`.

    Args:
        committed (`torch.LongTensor` of shape `(batch, h + 1)`): `g_0 .. g_h`.
        n (`torch.LongTensor` of shape `(batch,)`): accepted lengths; row `b` commits `committed[b, : n_b + 1]`.
        eos_token_ids (`torch.LongTensor` of shape `(num_eos,)`, *optional*): end-of-sequence ids.
    Returns:
        `(n, hit_eos)`: the accepted lengths cut so that the first EOS is the last committed token, and whether a
        row committed an EOS.
    """
    if eos_token_ids is None or eos_token_ids.numel() == 0:
        return n, torch.zeros_like(n, dtype=torch.bool)
    positions = torch.arange(committed.shape[-1], device=committed.device)
    is_eos = torch.isin(committed, eos_token_ids.to(committed.device)) & (positions <= n[:, None])
    hit_eos = is_eos.any(dim=-1)
    first_eos = torch.where(is_eos, positions, committed.shape[-1]).min(dim=-1).values
    return torch.where(hit_eos, first_eos, n), hit_eos
