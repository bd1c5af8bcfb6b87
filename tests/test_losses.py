"""The pure training math of hf_bpd.losses, on hand-written tensors."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from hf_bpd.losses import (
    bpd_training_loss,
    causal_lm_loss,
    draft_head_loss,
    greedy_targets,
    head_accuracy_counts,
    head_weights,
    sample_head,
    soft_distillation_loss,
)

V = 7


def one_hot_logits(tokens: torch.Tensor, scale: float = 20.0) -> torch.Tensor:
    """Logits that put (almost) all mass on `tokens` (any shape) -> (..., V)."""
    return F.one_hot(tokens, V).float() * scale


def test_head_weights_schemes():
    assert torch.equal(head_weights(3, "uniform"), torch.ones(3))
    assert torch.allclose(head_weights(4, "geometric"), torch.tensor([1.0, 0.8, 0.64, 0.512]))
    assert torch.allclose(head_weights(3, "geometric", decay=0.5), torch.tensor([1.0, 0.5, 0.25]))
    w = head_weights(5, "random", generator=torch.Generator().manual_seed(0))
    assert w.sum() == 1 and ((w == 0) | (w == 1)).all()
    with pytest.raises(ValueError, match="Unknown head loss weighting"):
        head_weights(3, "medusa")
    with pytest.raises(ValueError, match="decay"):
        head_weights(3, "geometric", decay=0.0)


def test_random_head_is_reproducible_and_covers_all_heads():
    picks = [sample_head(4, torch.Generator().manual_seed(s)) for s in range(40)]
    again = [sample_head(4, torch.Generator().manual_seed(s)) for s in range(40)]
    assert picks == again and set(picks) == {0, 1, 2, 3}
    gen = torch.Generator().manual_seed(3)
    draws = [int(head_weights(4, "random", generator=gen).argmax()) for _ in range(200)]
    assert all(30 <= draws.count(i) <= 70 for i in range(4))


def test_draft_head_loss_alignment_and_masking():
    # Head i at position t must predict labels[t + 2 + i]: perfect logits give ~0 loss, shifted ones do not.
    labels = torch.tensor([[3, 1, 4, 1, 5, 2, 6]])
    T, h = labels.shape[1], 2
    draft = torch.zeros(1, T, h, V)
    for i in range(h):
        for t in range(T - 2 - i):
            draft[0, t, i] = one_hot_logits(labels[0, t + 2 + i])
    loss, per_head = draft_head_loss(draft, labels)
    assert per_head.shape == (2,) and loss < 1e-6
    wrong, _ = draft_head_loss(draft.roll(1, dims=1), labels)
    assert wrong > 1.0
    # Masked targets and positions past the end contribute nothing, and a head with no target gives 0, not NaN.
    masked = labels.clone()
    masked[0, 2:] = -100
    loss, per_head = draft_head_loss(draft.roll(1, dims=1), masked)
    assert torch.equal(per_head, torch.zeros(2))
    short, per_head = draft_head_loss(torch.zeros(1, 3, 2, V, requires_grad=True), labels[:, :3])
    assert per_head[1] == 0 and short.requires_grad


def test_weighted_total_is_normalised_weighted_mean():
    gen = torch.Generator().manual_seed(0)
    draft = torch.randn(2, 9, 3, V, generator=gen)
    labels = torch.randint(V, (2, 9), generator=gen)
    w = head_weights(3, "geometric")
    loss, per_head = draft_head_loss(draft, labels, w)
    assert torch.allclose(loss, (per_head * w).sum() / w.sum())
    one = torch.tensor([0.0, 1.0, 0.0])
    loss, per_head = draft_head_loss(draft, labels, one)
    assert torch.allclose(loss, per_head[1])


def test_causal_lm_loss_matches_shifted_cross_entropy():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 6, V, generator=gen)
    labels = torch.randint(V, (2, 6), generator=gen)
    labels[1, 4:] = -100
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(causal_lm_loss(logits, labels), expected)
    assert causal_lm_loss(logits, torch.full_like(labels, -100)) == 0


def test_greedy_targets_shift_and_mask():
    teacher_tokens = torch.tensor([[5, 6, 0, 2, 3]])  # the teacher's argmax at each position
    teacher = one_hot_logits(teacher_tokens)
    labels = torch.tensor([[1, 1, 1, 1, -100]])
    targets = greedy_targets(teacher, labels)
    # Entry s is the teacher's prediction made at s - 1; masked labels stay masked; entry 0 has no prediction.
    assert targets.tolist() == [[-100, 5, 6, 0, -100]]


def test_hard_distillation_trains_head_i_on_teacher_prediction_at_t_plus_1_plus_i():
    gen = torch.Generator().manual_seed(2)
    T, h = 8, 3
    teacher = torch.randn(1, T, V, generator=gen)
    greedy = teacher.argmax(-1)[0]
    draft = torch.zeros(1, T, h, V)
    for i in range(h):
        for t in range(T - 2 - i):
            draft[0, t, i] = one_hot_logits(greedy[t + 1 + i])  # the spec: base_logits[:, t + 1 + i].argmax()
    labels = torch.randint(V, (1, T), generator=gen)  # the text itself is irrelevant to distillation
    out = bpd_training_loss(draft, labels, teacher_logits=teacher, distillation="hard")
    assert out.loss < 1e-6 and out.base_loss is None
    top1, top5, total = head_accuracy_counts(draft, out.targets)
    assert torch.equal(top1, total) and torch.equal(total, torch.tensor([T - 2, T - 3, T - 4]))


def test_soft_distillation_is_zero_on_the_teacher_and_positive_elsewhere():
    gen = torch.Generator().manual_seed(3)
    T, h = 7, 2
    teacher = torch.randn(2, T, V, generator=gen)
    draft = torch.zeros(2, T, h, V)
    for i in range(h):
        draft[:, : T - 2 - i, i] = teacher[:, 1 + i : T - 1]  # head i at t copies the teacher at t + 1 + i
    loss, per_head = soft_distillation_loss(draft, teacher, temperature=2.0)
    assert loss.abs() < 1e-5 and per_head.shape == (2,)
    noisy, _ = soft_distillation_loss(draft + torch.randn(draft.shape, generator=gen), teacher)
    assert noisy > 0.05
    # Masked positions are ignored: corrupting only them leaves the loss at 0.
    labels = torch.zeros(2, T, dtype=torch.long)
    labels[:, 5:] = -100  # targets 5, 6 masked -> head 0 keeps t < 3, head 1 keeps t < 2
    corrupted = draft.clone()
    corrupted[:, 3:, 0] += 5 * torch.randn(2, T - 3, V, generator=gen)
    corrupted[:, 2:, 1] += 5 * torch.randn(2, T - 2, V, generator=gen)
    loss, _ = soft_distillation_loss(corrupted, teacher, labels)
    assert loss.abs() < 1e-5
    with pytest.raises(ValueError, match="temperature"):
        soft_distillation_loss(draft, teacher, temperature=0.0)


def test_soft_distillation_matches_hand_computed_kl():
    teacher = torch.log(torch.tensor([[[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]]]))  # (1, 3, 2)
    draft = torch.log(torch.tensor([[0.25, 0.75], [0.5, 0.5], [0.5, 0.5]]))[None, :, None]  # (1, 3, 1, 2)
    # One head, T = 3: only t = 0 is trained, against the teacher at t + 1 = 1.
    kl = 0.9 * math.log(0.9 / 0.25) + 0.1 * math.log(0.1 / 0.75)
    loss, _ = soft_distillation_loss(draft, teacher)
    assert loss.item() == pytest.approx(kl, rel=1e-5)


def test_bpd_training_loss_adds_weighted_base_loss_and_validates():
    gen = torch.Generator().manual_seed(4)
    draft = torch.randn(2, 6, 2, V, generator=gen)
    base = torch.randn(2, 6, V, generator=gen)
    labels = torch.randint(V, (2, 6), generator=gen)
    heads_only = bpd_training_loss(draft, labels)
    joint = bpd_training_loss(draft, labels, base_logits=base, base_loss_weight=0.5)
    assert torch.allclose(joint.loss, heads_only.loss + 0.5 * causal_lm_loss(base, labels))
    assert torch.equal(joint.targets, labels)
    with pytest.raises(ValueError, match="teacher_logits"):
        bpd_training_loss(draft, labels, distillation="soft")
    with pytest.raises(ValueError, match="base_logits"):
        bpd_training_loss(draft, labels, base_loss_weight=1.0)
    with pytest.raises(ValueError, match="distillation"):
        bpd_training_loss(draft, labels, teacher_logits=base, distillation="medium")


def test_head_accuracy_counts_top1_top5():
    labels = torch.tensor([[0, 1, 2, 3, -100]])
    draft = torch.zeros(1, 5, 1, V)
    ranking = torch.arange(V, 0, -1).float()  # token 0 best, then 1, 2, ...
    draft[0, :, 0] = ranking
    # Head 0 at t targets labels[t + 2]: t=0 -> 2 (rank 3: top-5 only), t=1 -> 3 (rank 4), t=2 -> masked.
    top1, top5, total = head_accuracy_counts(draft, labels, top_k=5)
    assert top1.tolist() == [0] and top5.tolist() == [2] and total.tolist() == [2]
    draft[0, 0, 0, 2] = 100.0
    top1, _, _ = head_accuracy_counts(draft, labels)
    assert top1.tolist() == [1]


def test_topk_distillation_with_the_whole_vocabulary_is_kl_plus_teacher_entropy():
    from hf_bpd.losses import soft_distillation_loss, topk_distillation_loss

    torch.manual_seed(0)
    batch, seq, heads, vocab = 2, 7, 3, 11
    draft = torch.randn(batch, seq, heads, vocab)
    teacher = torch.randn(batch, seq, vocab)
    labels = torch.randint(0, vocab, (batch, seq))
    labels[1, 5:] = -100
    # unshifted top-k tensors: entry s is the teacher's distribution at s - 1
    logp = torch.log_softmax(teacher, -1)
    top = logp.topk(vocab, -1)
    ids = torch.full((batch, seq, vocab), -100, dtype=torch.long)
    lp = torch.full((batch, seq, vocab), float("-inf"))
    ids[:, 1:], lp[:, 1:] = top.indices[:, :-1], top.values[:, :-1]
    sparse, sparse_heads = topk_distillation_loss(draft, ids, lp, labels)
    kl, kl_heads = soft_distillation_loss(draft, teacher, labels)
    entropy = -(logp.exp() * logp).sum(-1)  # (B, T): the teacher's entropy at position s - 1
    for i in range(heads):
        shift = i + 2
        mask = labels[:, shift:] != -100
        expected = kl_heads[i] + (entropy[:, shift - 1 : seq - 1] * mask).sum() / mask.sum()
        torch.testing.assert_close(sparse_heads[i], expected)


def test_topk_distillation_drops_tokens_outside_the_draft_vocab_and_renormalises():
    from hf_bpd.losses import topk_distillation_loss

    draft = torch.zeros(1, 3, 1, 4, requires_grad=True)  # uniform student over 4 columns
    ids = torch.tensor([[[-100, -100], [-100, -100], [1, -100]]])  # one valid teacher token at s = 2
    lp = torch.tensor([[[0.0, 0.0], [0.0, 0.0], [-1.0, -0.5]]])
    loss, heads = topk_distillation_loss(draft, ids, lp)
    torch.testing.assert_close(loss, torch.log(torch.tensor(4.0)))  # all mass on token 1 after renormalising
    loss.backward()
    assert draft.grad[0, 0, 0, 1] < 0 and draft.grad[0, 1].abs().sum() == 0
