"""The acceptance math on hand-written tensors."""

import torch

from hf_bpd.acceptance import accepted_lengths, cap_accepted, select_best_draft, truncate_at_eos

T = torch.tensor


def test_all_accepted():
    assert accepted_lengths(T([[5, 6, 7]]), T([[5, 6, 7, 8]])).tolist() == [3]


def test_none_accepted():
    assert accepted_lengths(T([[5, 6, 7]]), T([[4, 6, 7, 8]])).tolist() == [0]


def test_mismatch_mid_block_stops_even_if_later_tokens_match():
    assert accepted_lengths(T([[5, 9, 7]]), T([[5, 6, 7, 8]])).tolist() == [1]


def test_mixed_acceptance_across_batch():
    drafts = T([[1, 2, 3], [1, 2, 3], [1, 2, 3], [9, 9, 9]])
    targets = T([[1, 2, 3, 0], [1, 2, 0, 0], [0, 2, 3, 0], [9, 9, 9, 9]])
    assert accepted_lengths(drafts, targets).tolist() == [3, 2, 0, 3]


def test_cap_accepted_by_remaining_budget():
    assert cap_accepted(T([3, 3, 0, 2]), T([10, 2, 1, 1])).tolist() == [3, 1, 0, 0]


def test_eos_inside_block_cuts_the_commit():
    committed = T([[4, 1, 5, 6], [4, 5, 6, 7], [1, 5, 6, 7], [4, 5, 6, 1]])
    n = T([3, 3, 3, 2])  # row 3's EOS lies after what it accepted
    cut, hit = truncate_at_eos(committed, n, T([1]))
    assert cut.tolist() == [1, 3, 0, 2]
    assert hit.tolist() == [True, False, True, False]


def test_several_eos_ids_and_none():
    committed = T([[4, 8, 1, 6]])
    assert truncate_at_eos(committed, T([3]), T([1, 8]))[0].tolist() == [1]
    assert truncate_at_eos(committed, T([3]), None)[0].tolist() == [3]


def test_select_best_draft_prefers_longest_then_first():
    drafts = T([[[1, 2, 3], [1, 2, 9], [1, 5, 5]], [[7, 7, 7], [8, 8, 8], [8, 8, 8]]])
    targets = T([[[1, 2, 0, 0], [1, 2, 9, 0], [1, 2, 0, 0]], [[0, 0, 0, 0], [8, 8, 0, 0], [8, 8, 0, 0]]])
    best, n = select_best_draft(drafts, targets)
    assert best.tolist() == [1, 1] and n.tolist() == [3, 2]
