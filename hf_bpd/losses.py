"""Pure loss functions for draft heads (no model, no Trainer): easy to test on hand-written tensors."""

from __future__ import annotations

from typing import NamedTuple

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
    losses = []
    for shift, window in _head_windows(draft_logits):
        if window is None:
            losses.append(draft_logits.new_zeros((), dtype=torch.float32))
            continue
        logits_i = window.flatten(0, 1).float()  # (B * (T - shift), V)
        target_i = labels[:, shift:].flatten()  # (B * (T - shift),)
        if (target_i != ignore_index).any():
            losses.append(F.cross_entropy(logits_i, target_i, ignore_index=ignore_index))
        else:
            losses.append(logits_i.sum() * 0.0)  # keeps the graph connected (DDP) without a NaN
    return _weighted(torch.stack(losses), head_weights)


def _head_windows(draft_logits: torch.Tensor):
    """
    For each head `i`: `(shift, logits)` with `shift = i + 2` and head `i`'s logits `(B, T - shift, V)` at the
    positions whose target (`shift` positions ahead) exists, or `None` when the sequence is too short.
    """
    seq_len = draft_logits.shape[1]
    # `unbind` first: slicing the stacked tensor per head would make each head's backward allocate and zero-fill a
    # gradient of the whole (batch, seq, h, vocab) tensor (h of them; most of a training step on CPU).
    for i, logits in enumerate(draft_logits.unbind(dim=2)):
        shift = i + 2
        yield shift, (logits[:, : seq_len - shift] if seq_len > shift else None)


def _weighted(head_losses: torch.Tensor, head_weights: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    if head_weights is None:
        return head_losses.mean(), head_losses
    head_weights = head_weights.to(head_losses)
    return (head_losses * head_weights).sum() / head_weights.sum(), head_losses


# --------------------------------------------------------------------------------------------- weighting
WEIGHTING_SCHEMES = ("uniform", "geometric", "random")


def sample_head(num_heads: int, generator: torch.Generator | None = None) -> int:
    """
    Stern et al.'s choice: the one head trained at this step, drawn uniformly.

    Args:
        num_heads (`int`): `h`.
        generator (`torch.Generator`, *optional*): source of randomness (seed it for reproducible runs).
    Returns:
        `int` in `[0, num_heads)`.
    """
    return int(torch.randint(num_heads, (1,), generator=generator))


def head_weights(
    num_heads: int, scheme: str = "uniform", decay: float = 0.8, generator: torch.Generator | None = None
) -> torch.Tensor:
    """
    Weights of the per-head losses in the total (before normalisation by their sum, see [`draft_head_loss`]).

    Args:
        num_heads (`int`): `h`.
        scheme (`str`, defaults to `"uniform"`):
            - `"uniform"`: every head weighs 1 (the plain mean).
            - `"geometric"`: head `i` (0-based) weighs `decay**i` (Medusa: `0.8**i`), far heads count less.
            - `"random"`: one head drawn with [`sample_head`] weighs 1, the others 0 (Stern et al.).
        decay (`float`, defaults to 0.8): ratio of the geometric scheme, in `(0, 1]`.
        generator (`torch.Generator`, *optional*): randomness of the `"random"` scheme.
    Returns:
        `torch.FloatTensor` of shape `(num_heads,)`.
    """
    if num_heads < 1:
        raise ValueError(f"num_heads must be >= 1, got {num_heads}.")
    if scheme == "uniform":
        return torch.ones(num_heads)
    if scheme == "geometric":
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"The geometric decay must be in (0, 1], got {decay}.")
        return decay ** torch.arange(num_heads, dtype=torch.float32)
    if scheme == "random":
        weights = torch.zeros(num_heads)
        weights[sample_head(num_heads, generator)] = 1.0
        return weights
    raise ValueError(f"Unknown head loss weighting {scheme!r}; choose one of {WEIGHTING_SCHEMES}.")


# --------------------------------------------------------------------------------------------- base model
def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """
    The base model's own next-token cross-entropy (position `t` predicts `labels[:, t + 1]`).

    Args:
        logits (`torch.Tensor` of shape `(batch, seq_len, vocab)`): base-model logits.
        labels (`torch.LongTensor` of shape `(batch, seq_len)`): unshifted labels, `ignore_index` where masked.
    Returns:
        Scalar `torch.Tensor` (0, still attached to the graph, when no position has a target).
    """
    targets = labels[:, 1:].flatten()
    flat = logits[:, :-1].flatten(0, 1).float()
    if not (targets != ignore_index).any():
        return flat.sum() * 0.0
    return F.cross_entropy(flat, targets, ignore_index=ignore_index)


def greedy_targets(
    teacher_logits: torch.Tensor, labels: torch.Tensor | None = None, ignore_index: int = -100
) -> torch.LongTensor:
    """
    The teacher's greedy tokens as unshifted labels: entry `s` is `argmax teacher_logits[:, s - 1]`.

    With these labels, [`draft_head_loss`] trains head `i` at position `t` against the base model's greedy prediction
    made at position `t + 1 + i`.

    Args:
        teacher_logits (`torch.Tensor` of shape `(batch, seq_len, vocab)`): the base model's logits.
        labels (`torch.LongTensor` of shape `(batch, seq_len)`, *optional*): where these are `ignore_index`, so are
            the returned targets (padding, masked prompts).
    Returns:
        `torch.LongTensor` of shape `(batch, seq_len)`; entry 0 is always `ignore_index`.
    """
    targets = torch.full(teacher_logits.shape[:2], ignore_index, dtype=torch.long, device=teacher_logits.device)
    targets[:, 1:] = teacher_logits[:, :-1].argmax(dim=-1)
    if labels is not None:
        targets = targets.masked_fill(labels == ignore_index, ignore_index)
    return targets


def soft_distillation_loss(
    draft_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    temperature: float = 1.0,
    head_weights: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    KL divergence of every draft head from the base model's own distribution at the position it drafts for.

    Head `i` (0-based) at position `t` is matched to `softmax(teacher_logits[:, t + 1 + i] / T)`, the base model's
    distribution of token `t + 2 + i`; scaled by `T**2` (Hinton et al.) so gradients keep their size across `T`.

    Args:
        draft_logits (`torch.Tensor` of shape `(batch, seq_len, num_heads, vocab)`): draft-head logits.
        teacher_logits (`torch.Tensor` of shape `(batch, seq_len, vocab)`): the base model's logits (no gradient).
        labels (`torch.LongTensor` of shape `(batch, seq_len)`, *optional*): positions `s` with
            `labels[:, s] == ignore_index` are not trained on (padding); by default every position is.
        temperature (`float`, defaults to 1.0): softening temperature `T`, applied to teacher and student.
        head_weights (`torch.Tensor` of shape `(num_heads,)`, *optional*): as in [`draft_head_loss`].
    Returns:
        `(loss, head_losses)` as in [`draft_head_loss`].
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    seq_len = draft_logits.shape[1]
    teacher_logp = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)  # (B, T, V)
    losses = []
    for shift, window in _head_windows(draft_logits):
        if window is None:
            losses.append(draft_logits.new_zeros((), dtype=torch.float32))
            continue
        student = F.log_softmax(window.float() / temperature, dim=-1)
        teacher = teacher_logp[:, shift - 1 : seq_len - 1]  # (B, T - shift, V): the distribution of token t + 2 + i
        kl = F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1)  # (B, T - shift)
        if labels is None:
            mask = torch.ones_like(kl, dtype=torch.bool)
        else:
            mask = labels[:, shift:] != ignore_index
        if mask.any():
            losses.append((kl * mask).sum() / mask.sum() * temperature**2)
        else:
            losses.append(kl.sum() * 0.0)
    return _weighted(torch.stack(losses), head_weights)


def topk_distillation_loss(
    draft_logits: torch.Tensor,
    topk_ids: torch.LongTensor,
    topk_logprobs: torch.Tensor,
    labels: torch.Tensor | None = None,
    head_weights: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Sparse soft distillation: cross-entropy of every draft head to the base model's top-`k` distribution (renormalised
    on those `k` tokens), the `KL(p_topk || q)` of sparse knowledge distillation up to a constant. It needs only the
    cached top-`k` of the teacher (`hf_bpd.features.extract_features(top_k=...)`), not the base model.

    Head `i` (0-based) at position `t` is matched to entry `t + 2 + i` of the (unshifted) teacher tensors: the base's
    distribution of token `t + 2 + i`, as in [`soft_distillation_loss`].

    Args:
        draft_logits (`torch.Tensor` of shape `(batch, seq_len, num_heads, vocab)`): draft-head logits.
        topk_ids (`torch.LongTensor` of shape `(batch, seq_len, k)`): the teacher's top-`k` token ids, as columns of
            `draft_logits` (map them into a draft vocabulary first); `ignore_index` for tokens outside it (dropped,
            the rest renormalised).
        topk_logprobs (`torch.Tensor` of shape `(batch, seq_len, k)`): their log-probabilities (`-inf` where none).
        labels (`torch.LongTensor` of shape `(batch, seq_len)`, *optional*): positions with `ignore_index` are masked.
        head_weights (`torch.Tensor` of shape `(num_heads,)`, *optional*): as in [`draft_head_loss`].
    Returns:
        `(loss, head_losses)` as in [`draft_head_loss`].
    """
    valid_ids = topk_ids != ignore_index
    teacher = torch.softmax(topk_logprobs.float().masked_fill(~valid_ids, float("-inf")), dim=-1)  # (B, T, k)
    teacher = torch.nan_to_num(teacher, nan=0.0)  # a position with no valid token: all zero, masked below
    position_ok = valid_ids.any(-1)
    if labels is not None:
        position_ok &= labels != ignore_index
    ids = topk_ids.clamp(min=0)
    losses = []
    for shift, window in _head_windows(draft_logits):
        if window is None:
            losses.append(draft_logits.new_zeros((), dtype=torch.float32))
            continue
        student = F.log_softmax(window.float(), dim=-1)  # (B, T - shift, V)
        picked = student.gather(-1, ids[:, shift:])  # (B, T - shift, k)
        ce = -(teacher[:, shift:] * picked).sum(-1)  # (B, T - shift)
        mask = position_ok[:, shift:]
        losses.append((ce * mask).sum() / mask.sum() if mask.any() else ce.sum() * 0.0)
    return _weighted(torch.stack(losses), head_weights)


# --------------------------------------------------------------------------------------------- metrics
def head_accuracy_counts(
    draft_logits: torch.Tensor, labels: torch.Tensor, top_k: int = 5, ignore_index: int = -100
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    Per-head counts of correct top-1 and top-`k` predictions (sum them over batches, then divide).

    Args:
        draft_logits (`torch.Tensor` of shape `(batch, seq_len, num_heads, vocab)`): draft-head logits.
        labels (`torch.LongTensor` of shape `(batch, seq_len)`): unshifted targets as in [`draft_head_loss`].
        top_k (`int`, defaults to 5): the `k` of the second count.
    Returns:
        `(top1, topk, total)`, each `torch.LongTensor` of shape `(num_heads,)`: head `i`'s correct top-1 and top-`k`
        predictions and its number of valid targets.
    """
    _, _, num_heads, vocab = draft_logits.shape
    k = min(top_k, vocab)
    top1, topk, total = (torch.zeros(num_heads, dtype=torch.long, device=draft_logits.device) for _ in range(3))
    for i, (shift, window) in enumerate(_head_windows(draft_logits)):
        if window is None:
            continue
        target = labels[:, shift:]  # (B, T - shift)
        valid = target != ignore_index
        best = window.topk(k, dim=-1).indices  # (B, T - shift, k)
        hits = best == target[..., None]
        top1[i] = (hits[..., 0] & valid).sum()
        topk[i] = (hits.any(-1) & valid).sum()
        total[i] = valid.sum()
    return top1, topk, total


def prefix_accuracy_counts(
    draft_logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Per-depth top-1 accuracy *given a correct prefix*: at depth `i`, the positions where heads `0 .. i-1` were all
    right, and how many of those head `i` gets right too. `hits[i] / totals[i]` is the chance that a greedy chain,
    having been accepted up to depth `i`, is accepted at depth `i` as well: the figure acceptance depends on.

    Valid for both head kinds: independent heads read `h_t` alone, so their logits are the chain's whatever the
    prefix; token-conditioned heads must be run teacher-forced on `labels` (the trainer does), which is exactly what
    a greedy chain feeds them when its prefix is correct.

    Args:
        draft_logits (`torch.Tensor` of shape `(batch, seq_len, num_heads, vocab)`): draft logits (teacher-forced).
        labels (`torch.LongTensor` of shape `(batch, seq_len)`): unshifted targets as in [`draft_head_loss`].
    Returns:
        `(hits, totals)`, each `torch.LongTensor` of shape `(num_heads,)` (sum over batches, then divide).
    """
    batch, seq_len, num_heads, _ = draft_logits.shape
    hits = torch.zeros(num_heads, dtype=torch.long, device=draft_logits.device)
    totals = torch.zeros_like(hits)
    span = seq_len - 2 - (num_heads - 1)  # positions where every head has a target
    if span <= 0:
        return hits, totals
    prefix_ok = torch.ones(batch, span, dtype=torch.bool, device=draft_logits.device)
    for i in range(num_heads):
        target = labels[:, i + 2 : i + 2 + span]
        valid = target != ignore_index
        right = (draft_logits[:, :span, i].argmax(-1) == target) & valid
        totals[i] = (prefix_ok & valid).sum()
        hits[i] = (prefix_ok & right).sum()
        prefix_ok = prefix_ok & right
    return hits, totals


# --------------------------------------------------------------------------------------------- total
DISTILLATION_MODES = ("none", "hard", "soft")


class BPDLoss(NamedTuple):
    """
    What [`bpd_training_loss`] returns.

    Args:
        loss (`torch.Tensor`, scalar): the total to minimise.
        head_losses (`torch.Tensor` of shape `(num_heads,)`): each head's own loss (cross-entropy, or KL when soft).
        base_loss (`torch.Tensor`, scalar, *optional*): the base LM loss, when it is part of the total.
        targets (`torch.LongTensor` of shape `(batch, seq_len)`): the unshifted hard targets the heads were scored
            against (the labels, or the teacher's greedy tokens when distilling); use them for accuracies.
    """

    loss: torch.Tensor
    head_losses: torch.Tensor
    base_loss: torch.Tensor | None
    targets: torch.Tensor


def bpd_training_loss(
    draft_logits: torch.Tensor,
    labels: torch.Tensor,
    base_logits: torch.Tensor | None = None,
    teacher_logits: torch.Tensor | None = None,
    head_weights: torch.Tensor | None = None,
    distillation: str = "none",
    temperature: float = 1.0,
    base_loss_weight: float = 0.0,
    ignore_index: int = -100,
) -> BPDLoss:
    """
    The training objective of draft heads: weighted head losses, plus optionally the base LM loss (joint training).

    `loss = sum_i w_i L_i / sum_i w_i + base_loss_weight * L_base`, with `L_i` head `i`'s loss against the labels
    (`distillation="none"`), against the teacher's greedy tokens (`"hard"`), or its KL from the teacher's distribution
    (`"soft"`); see [`draft_head_loss`], [`greedy_targets`] and [`soft_distillation_loss`] for the alignment.

    Args:
        draft_logits (`torch.Tensor` of shape `(batch, seq_len, num_heads, vocab)`): draft-head logits.
        labels (`torch.LongTensor` of shape `(batch, seq_len)`): unshifted labels, `ignore_index` where masked.
        base_logits (`torch.Tensor` of shape `(batch, seq_len, vocab)`, *optional*): the (trainable) base model's
            logits; needed when `base_loss_weight > 0`.
        teacher_logits (`torch.Tensor` of shape `(batch, seq_len, vocab)`, *optional*): the frozen base model's logits
            (adapters disabled); needed when distilling.
        head_weights (`torch.Tensor` of shape `(num_heads,)`, *optional*): see [`head_weights`]; uniform by default.
        distillation (`str`, defaults to `"none"`): `"none"`, `"hard"` or `"soft"`.
        temperature (`float`, defaults to 1.0): temperature of soft distillation.
        base_loss_weight (`float`, defaults to 0.0): weight of the base LM loss in the total.
    Returns:
        [`BPDLoss`].
    """
    if distillation not in DISTILLATION_MODES:
        raise ValueError(f"distillation must be one of {DISTILLATION_MODES}, got {distillation!r}.")
    if distillation != "none" and teacher_logits is None:
        raise ValueError(f"distillation={distillation!r} needs `teacher_logits`.")
    if base_loss_weight > 0 and base_logits is None:
        raise ValueError("base_loss_weight > 0 needs `base_logits`.")
    if distillation == "none":
        targets = labels
    else:
        targets = greedy_targets(teacher_logits, labels, ignore_index)
    if distillation == "soft":
        heads_loss, head_losses = soft_distillation_loss(
            draft_logits, teacher_logits, labels, temperature, head_weights, ignore_index
        )
    else:
        heads_loss, head_losses = draft_head_loss(draft_logits, targets, head_weights, ignore_index)
    base_loss = None
    if base_loss_weight > 0:
        base_loss = causal_lm_loss(base_logits, labels, ignore_index)
        heads_loss = heads_loss + base_loss_weight * base_loss
    return BPDLoss(heads_loss, head_losses, base_loss, targets)
