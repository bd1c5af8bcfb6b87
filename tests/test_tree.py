"""The verification-block layout of p drafts (tree.py): hand-checked layouts, canonical nodes, masks, compaction."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from hf_bpd.tree import (
    DraftTree,
    canonical_nodes,
    check_tree_choices,
    choices_layout,
    compact_block,
    tree_attention_mask,
    tree_from_parents,
    tree_layout,
    truncate_tree,
)


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
    want = torch.tensor(
        [
            [1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [1, 1, 1, 0, 0],
            [1, 0, 0, 1, 0],
            [1, 0, 0, 1, 1],
        ],
        dtype=torch.bool,
    )
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


# ------------------------------------------------------------------------------------------------ prefix trees
def test_prefix_tree_from_parents_hand_checked():
    #        0
    #      /   \
    #     1     2
    #    / \
    #   3   4
    #   |
    #   5
    layout = tree_from_parents((-1, 0, 0, 1, 1, 3))
    assert layout.parent.tolist() == [-1, 0, 0, 1, 1, 3]
    assert layout.depth.tolist() == [0, 1, 1, 2, 2, 3]  # position ids: root position + depth
    assert layout.node_index.tolist() == [[0, 2, 2, 2], [0, 1, 4, 4], [0, 1, 3, 5]]  # leaves 2, 4, 5; padded
    assert layout.path_length.tolist() == [1, 2, 3]
    assert layout.draft_of_node.tolist() == [0, 1, 0, 2, 1, 2]
    want = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 0, 1, 0, 0, 0],
            [1, 1, 0, 1, 0, 0],
            [1, 1, 0, 0, 1, 0],
            [1, 1, 0, 1, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(layout.visible, want)  # ancestors and itself
    assert not layout.is_chain and tree_from_parents((-1, 0, 1)).is_chain
    paths = layout.path_tokens(torch.tensor([[0, 10, 20, 30, 40, 50]]))
    assert paths.tolist() == [[[20, -1, -1], [10, 40, -1], [10, 30, 50]]]  # -1 past a leaf: never accepted
    mask = tree_attention_mask(torch.ones(1, 2, dtype=torch.long), layout, torch.tensor([True]), torch.float32)
    assert torch.equal(mask[0, 0, :, 2:] == 0, want)


def test_chain_layout_parents_and_tree_equivalence():
    chains = tree_layout(2, 2)
    assert chains.parent.tolist() == [-1, 0, 1, 0, 3]
    same = tree_from_parents(tuple(chains.parent.tolist()))
    for name in ("depth", "node_index", "visible", "path_length", "draft_of_node"):
        assert torch.equal(getattr(same, name), getattr(chains, name)), name


def test_truncate_tree_keeps_the_shallow_nodes():
    layout = tree_from_parents((-1, 0, 0, 1, 1, 3))
    small, kept = truncate_tree(layout, 1)
    assert kept.tolist() == [0, 1, 2] and small.parent.tolist() == [-1, 0, 0]
    tree = DraftTree(tokens=torch.tensor([[10, 20, 30, 40, 50]]), layout=layout)
    cut = tree.truncate(2)
    assert cut.tokens.tolist() == [[10, 20, 30, 40]] and cut.layout.max_depth == 2
    assert tree.truncate(3) is tree
    assert tree.truncate(0).layout.width == 1 and tree.truncate(0).layout.is_chain


def test_bad_parents_are_refused():
    for parents in [(), (0,), (-1, 1), (-1, 0, 3, 1)]:
        with pytest.raises(ValueError, match="parents\\[0\\] == -1"):
            tree_from_parents(parents)


def test_choices_layout_orders_like_medusa():
    choices = check_tree_choices([[1], [0, 0], [0], [1, 0]], num_heads=2, top_k=2)
    layout, head, rank = choices_layout(tuple(choices))
    # nodes: (0), (1), (0, 0), (1, 0)
    assert layout.parent.tolist() == [-1, 0, 0, 1, 2]
    assert head.tolist() == [0, 0, 1, 1] and rank.tolist() == [0, 1, 0, 0]
    with pytest.raises(ValueError, match="rank 2, but ranks must be < 2"):
        check_tree_choices([[0], [2]], top_k=2)


def test_compaction_moves_a_tree_path_to_the_front():
    """What roll_back does for a tree: the kept path's nodes first, in depth order, the rest after."""
    layout = tree_from_parents((-1, 0, 0, 1, 1, 3))
    cache = _cache(batch=1, length=2 + layout.width)
    before = cache.layers[0].keys.clone()
    path = layout.node_index[2]  # root, 1, 3, 5
    order = torch.cat([path, torch.tensor([2, 4])])[None]
    compact_block(cache, layout.width, order)
    assert torch.equal(cache.layers[0].keys[0, :, 2:6], before[0, :, 2:][:, path])
