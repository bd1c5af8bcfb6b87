"""The verification-block layout of p drafts (tree.py): hand-checked layouts, canonical nodes, masks, compaction."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from hf_bpd.tree import canonical_nodes, compact_block, tree_attention_mask, tree_layout


def test_single_draft_is_a_causal_block():
    layout = tree_layout(1, 3)
    assert layout.width == 4
    assert layout.node_index.tolist() == [[0, 1, 2, 3]]
    assert layout.depth.tolist() == [0, 1, 2, 3]
    assert torch.equal(layout.visible, torch.tril(torch.ones(4, 4, dtype=torch.bool)))


def test_two_drafts_share_the_root_only():
    layout = tree_layout(2, 2)  # nodes: root, (q0, 1), (q0, 2), (q1, 1), (q1, 2)
    assert layout.width == 5
    assert layout.node_index.tolist() == [[0, 1, 2], [0, 3, 4]]
    assert layout.depth.tolist() == [0, 1, 2, 1, 2]
    assert layout.draft_of_node.tolist() == [0, 0, 0, 1, 1]
    want = torch.tensor([
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 0, 0, 1, 0],
        [1, 0, 0, 1, 1],
    ], dtype=torch.bool)  # fmt: skip
    assert torch.equal(layout.visible, want)


def test_layout_is_cached():
    assert tree_layout(3, 4) is tree_layout(3, 4)


def test_canonical_nodes_map_equal_prefixes_to_the_first_draft():
    layout = tree_layout(3, 2)  # draft q's token j is node 1 + 2q + (j - 1)
    drafts = torch.tensor([[[5, 6], [5, 7], [8, 6]]])  # q1 shares q0's first token; q2 shares nothing
    canon = canonical_nodes(drafts, layout)
    assert canon.tolist() == [[[0, 1, 2], [0, 1, 4], [0, 5, 6]]]


def test_canonical_nodes_identical_drafts_and_batch():
    layout = tree_layout(2, 3)
    drafts = torch.tensor([[[1, 2, 3], [1, 2, 3]], [[1, 2, 3], [4, 2, 3]]])
    canon = canonical_nodes(drafts, layout)
    assert canon[0].tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]  # a duplicate draft reads the first one's targets
    assert canon[1].tolist() == [[0, 1, 2, 3], [0, 4, 5, 6]]  # a prefix differs from the first token on


def test_tree_attention_mask_past_block_and_finished_rows():
    layout = tree_layout(2, 1)  # root, q0, q1
    past = torch.tensor([[1, 1], [0, 1]])  # row 1 has a padded (or hole) slot
    live = torch.tensor([True, False])
    mask = tree_attention_mask(past, layout, live, torch.float32)
    assert mask.shape == (2, 1, 3, 5)
    allowed = mask[:, 0] == 0
    assert allowed[0].tolist() == [
        [True, True, True, False, False],
        [True, True, True, True, False],
        [True, True, True, False, True],
    ]
    assert not allowed[1, :, 0].any() and allowed[1, :, 1].all()  # the masked past slot is masked for every node
    assert torch.equal(allowed[1, :, 2:], torch.eye(3, dtype=torch.bool))  # a finished row sees only itself
    assert (mask[~(mask == 0)] == torch.finfo(torch.float32).min).all()


def _cache(batch: int, length: int, layers: int = 2) -> DynamicCache:
    cache = DynamicCache()
    for layer in range(layers):
        keys = torch.arange(batch * length, dtype=torch.float32).view(batch, 1, length, 1).expand(-1, 2, -1, 3)
        cache.update(keys.clone() + 100 * layer, -keys.clone(), layer)
    return cache


def test_compact_block_reorders_only_the_tail():
    cache = _cache(batch=2, length=6)
    before = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
    order = torch.tensor([[2, 0, 1, 3], [3, 2, 1, 0]])  # the last 4 slots, per row
    compact_block(cache, 4, order)
    for (keys, values), layer in zip(before, cache.layers):
        assert torch.equal(layer.keys[:, :, :2], keys[:, :, :2])  # the committed past is untouched
        for b in range(2):
            assert torch.equal(layer.keys[b, :, 2:], keys[b, :, 2:][:, order[b]])
            assert torch.equal(layer.values[b, :, 2:], values[b, :, 2:][:, order[b]])


def test_compact_block_refuses_sliding_window_layers():
    class Sliding:
        sliding_window = 4
        is_initialized = True

    class Cache:
        layers = [Sliding()]

    with pytest.raises(ValueError, match="dynamic full-attention cache"):
        compact_block(Cache(), 2, torch.zeros(1, 2, dtype=torch.long))
