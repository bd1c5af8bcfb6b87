"""Context n-gram (prompt lookup) drafting: pure matching against a brute-force reference, merge / switch into draft
trees, and the drafter end to end (lossless against the base model's greedy generate)."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import PAD, batch_prompts, randomize_heads, tiny_base

from hf_bpd import BPDForCausalLM
from hf_bpd.context_ngram import (
    ContextMatch,
    ContextNgramDrafter,
    find_context_match,
    match_chain,
    merge_match,
    prompt_start_of,
    switch_to_match,
)
from hf_bpd.logits import DynamicTreeDrafter, HeadsDrafter
from hf_bpd.tree import DraftTree, tree_from_parents


def reference_match(tokens, lengths, prompt_start, num_tokens, live, max_ngram, min_ngram, cyclic, max_match):
    """Row by row, in plain Python: the most recent earlier occurrence of the longest suffix n-gram."""
    rows = []
    for b in range(tokens.shape[0]):
        ps, length = int(prompt_start[b]), int(lengths[b])
        ctx = tokens[b, ps:length].tolist()
        found = None
        for n in range(max_ngram, min_ngram - 1, -1) if live[b] else []:
            if len(ctx) < n + 1:
                continue
            for s in range(len(ctx) - n - 1, -1, -1):
                if ctx[s : s + n] == ctx[len(ctx) - n :]:
                    found = (s, n)
                    break
            if found:
                break
        if found is None:
            rows.append(([-1] * num_tokens, 0, 0, -1))
            continue
        s, n = found
        cont = s + n
        if cyclic:  # the continuation predicts the row's own next tokens, which the match then predicts again
            extended = list(ctx)
            for _ in range(num_tokens):
                extended.append(extended[len(extended) - (len(ctx) - cont)])
            out = extended[len(ctx) :]
        else:
            out = ctx[cont : cont + num_tokens]
        match_len = 0
        while match_len < max_match and cont - match_len - 1 >= 0 and ctx[cont - match_len - 1] == ctx[-match_len - 1]:
            match_len += 1
        rows.append((out + [-1] * (num_tokens - len(out)), n, match_len, ps + cont))
    return rows


def random_rows(seed: int, batch: int = 5, width: int = 40, vocab: int = 4):
    """Rows with different prompt starts, pad ids (0) as real tokens too, and junk past each row's end."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (batch, width), generator=gen)  # token 0 == PAD is a real token here
    prompt_start = torch.randint(0, 8, (batch,), generator=gen)
    lengths = prompt_start + torch.randint(0, width - 8, (batch,), generator=gen)
    lengths = torch.maximum(lengths, prompt_start)
    for b in range(batch):
        tokens[b, : int(prompt_start[b])] = PAD  # left padding: same value as a real token
    live = torch.rand(batch, generator=gen) > 0.2
    return tokens, lengths, prompt_start, live


@pytest.mark.parametrize("cyclic", [False, True])
@pytest.mark.parametrize("ngram", [(3, 1), (2, 2), (4, 2)])
def test_match_equals_brute_force(cyclic, ngram):
    max_ngram, min_ngram = ngram
    found = []
    for seed in range(40):
        tokens, lengths, prompt_start, live = random_rows(seed, vocab=3 + seed % 5)
        match = find_context_match(tokens, lengths, prompt_start, 6, live, max_ngram, min_ngram, cyclic, max_match=9)
        expected = reference_match(tokens, lengths, prompt_start, 6, live, max_ngram, min_ngram, cyclic, 9)
        for b, (out, n, match_len, start) in enumerate(expected):
            assert match.tokens[b].tolist() == out, (seed, b)
            assert (int(match.ngram[b]), int(match.length[b]), int(match.start[b])) == (n, match_len, start), (seed, b)
        found += match.found.tolist()
    assert any(found) and not all(found)  # both cases really ran


def test_padding_is_skipped_by_position_not_value():
    # row 0: the suffix (0, 5) also occurs inside the left padding region (which holds 0s) -> must not match there;
    # row 1: no padding, token 0 is real, and (0, 5) occurs earlier -> match.
    tokens = torch.tensor([[0, 5, 9, 0, 3, 0, 5], [0, 5, 9, 0, 3, 0, 5]])
    lengths = torch.tensor([7, 7])
    prompt_start = torch.tensor([2, 0])
    match = find_context_match(tokens, lengths, prompt_start, 3, max_ngram=2, min_ngram=2)
    assert match.ngram.tolist() == [0, 2]
    assert match.tokens.tolist() == [[-1, -1, -1], [9, 0, 3]]
    # one-grams: the last token 0 occurs earlier only in the padding of row 0; in row 1 that position is real
    tokens = torch.tensor([[0, 0, 9, 4, 3, 7, 0], [0, 0, 9, 4, 3, 7, 0]])
    match = find_context_match(tokens, lengths, prompt_start, 3, max_ngram=2, min_ngram=1)
    assert match.ngram.tolist() == [0, 1] and match.start.tolist() == [-1, 2]
    assert match.tokens.tolist() == [[-1, -1, -1], [9, 4, 3]]


def test_prompt_start_of_mask():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0]])
    assert prompt_start_of(mask).tolist() == [2, 0, 4]


def test_match_chain_and_greedy_step():
    match = find_context_match(torch.tensor([[4, 5, 6, 4], [1, 2, 3, 7]]), torch.tensor([4, 4]), torch.zeros(2), 3)
    chain = match_chain(match, max_depth=2, fill_token=9)
    assert chain.layout.is_chain and chain.layout.width == 3
    assert chain.tokens.tolist() == [[5, 6], [9, 9]]
    none = find_context_match(torch.tensor([[1, 2, 3, 7]]), torch.tensor([4]), torch.zeros(1), 3)
    root_only = match_chain(none, max_depth=3)
    assert root_only.layout.width == 1 and root_only.tokens.shape == (1, 0)


def _match_of(rows: list[list[int]], length: int | None = None):
    """A hand-made ContextMatch whose continuations are `rows` (-1 padded; an empty row has no match)."""
    num = max(1, max(len(r) for r in rows))
    return ContextMatch(
        tokens=torch.tensor([r + [-1] * (num - len(r)) for r in rows]),
        ngram=torch.tensor([1 if r else 0 for r in rows]),
        length=torch.tensor([(length or 1) if r else 0 for r in rows]),
        start=torch.tensor([0 if r else -1 for r in rows]),
    )


def test_merge_shares_existing_prefix():
    tree = DraftTree.from_chains(torch.tensor([[[5, 6, 7]]]))
    merged = merge_match(tree, _match_of([[5, 6, 9]]), max_depth=3)
    assert merged.layout.parent.tolist() == [-1, 0, 1, 2, 2]  # one new node under "5 6"
    assert merged.tokens.tolist() == [[5, 6, 7, 9]]
    assert sorted(merged.path_drafts()[0].tolist()) == [[5, 6, 7], [5, 6, 9]]
    fresh = merge_match(tree, _match_of([[8, 9, 10]]), max_depth=3)
    assert fresh.layout.parent.tolist() == [-1, 0, 1, 2, 0, 4, 5] and fresh.tokens[0, 3:].tolist() == [8, 9, 10]
    assert merge_match(tree, _match_of([[5, 6]]), max_depth=3) is tree  # nothing new
    assert merge_match(tree, _match_of([[]]), max_depth=3) is tree  # no match
    capped = merge_match(tree, _match_of([[8, 9, 10]]), max_depth=2)
    assert capped.layout.max_depth == 3 and capped.tokens[0, 3:].tolist() == [8, 9]


def test_merge_batch_attaches_where_all_matching_rows_agree():
    tree = DraftTree.from_chains(torch.tensor([[[5, 6, 7]], [[5, 6, 7]], [[1, 2, 3]]]))
    merged = merge_match(tree, _match_of([[5, 6, 9], [5, 8, 4], []]), max_depth=3, fill_token=11)
    assert merged.layout.parent.tolist() == [-1, 0, 1, 2, 1, 4]  # under "5": rows 0 and 1 agree up to there
    assert merged.tokens[:, 3:].tolist() == [[6, 9], [8, 4], [11, 11]]  # row 2 (no match) gets fill tokens


def test_merge_random_trees_contain_every_match():
    rng = random.Random(0)
    for _ in range(200):
        width = rng.randint(1, 8)
        parents = (-1,) + tuple(rng.randrange(w) for w in range(1, width))
        layout = tree_from_parents(parents)
        batch = rng.randint(1, 3)
        tree = DraftTree(torch.randint(0, 3, (batch, width - 1)), layout)
        rows = [[rng.randrange(3) for _ in range(rng.randint(0, 4))] for _ in range(batch)]
        depth = rng.randint(1, 4)
        merged = merge_match(tree, _match_of(rows), max_depth=depth)
        assert torch.equal(merged.tokens[:, : width - 1], tree.tokens)
        assert merged.layout.parent[:width].tolist() == list(parents)
        paths = merged.path_drafts()
        for b, row in enumerate(rows):
            want = row[:depth]
            assert any(paths[b, q, : len(want)].tolist() == want for q in range(paths.shape[1])), (parents, rows)


def test_switch_needs_every_live_row_long():
    tree = DraftTree.from_chains(torch.tensor([[[5, 6, 7]], [[1, 2, 3]]]))
    match = _match_of([[8, 9, 10], [4, 4]], length=5)
    chain = switch_to_match(tree, match, switch_length=4, max_depth=3, fill_token=0)
    assert chain.layout.is_chain and chain.tokens.tolist() == [[8, 9, 10], [4, 4, 0]]
    assert switch_to_match(tree, match, switch_length=6, max_depth=3) is None  # too short
    half = _match_of([[8, 9, 10], []], length=5)
    assert switch_to_match(tree, half, switch_length=4, max_depth=3) is None  # row 1 has no match
    assert switch_to_match(tree, half, 4, 3, live=torch.tensor([True, False])) is not None  # row 1 has finished


# ------------------------------------------------------------------------------------------------ end to end
def make(arch: str = "llama"):
    return randomize_heads(BPDForCausalLM.from_base(tiny_base(arch), num_draft_heads=3))


DRAFTERS = {
    "alone": lambda: ContextNgramDrafter(),
    "alone-cyclic": lambda: ContextNgramDrafter(cyclic=True),
    "heads-merge": lambda: ContextNgramDrafter(HeadsDrafter(), rule="merge"),
    "heads-both": lambda: ContextNgramDrafter(HeadsDrafter(), rule="both", switch_length=2),
    "tree-merge": lambda: ContextNgramDrafter(DynamicTreeDrafter(6, top_k=3), rule="merge"),
}


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("name", sorted(DRAFTERS))
def test_greedy_lossless(name, batch):
    model = make("llama" if batch == 1 else "qwen2")
    ids, mask = batch_prompts(batch)
    ids[:, -3] = PAD  # a real token equal to the pad id (the mask, not the value, says what is padding)
    drafter = DRAFTERS[name]()
    ref = model.base.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False)
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=30, do_sample=False, use_bpd=True, draft_rescorer=drafter
    )
    assert torch.equal(out, ref)
    assert 0 < drafter.matched_steps < drafter.steps  # steps with a match and plain steps both ran


def test_gpt2_lossless_with_switch_and_sampling_runs():
    model = make("gpt2")
    ids, mask = batch_prompts(2, seed=4)
    drafter = ContextNgramDrafter(HeadsDrafter(), rule="switch", switch_length=2)
    ref = model.base.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False)
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=30, do_sample=False, use_bpd=True, draft_rescorer=drafter
    )
    assert torch.equal(out, ref) and drafter.switched_steps > 0
    torch.manual_seed(0)  # sampling: the inner drafter's proposals are verified as they are
    sampled = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=10,
        do_sample=True,
        use_bpd=True,
        draft_rescorer=ContextNgramDrafter(HeadsDrafter()),
    )
    assert sampled.shape[0] == 2


def test_bad_arguments():
    with pytest.raises(ValueError, match="rule must be one of"):
        ContextNgramDrafter(rule="replace")
    with pytest.raises(ValueError, match="min_ngram"):
        ContextNgramDrafter(max_ngram=1, min_ngram=2)
    tree = DraftTree.from_chains(torch.tensor([[[5, 6]]]), proposals=torch.full((1, 1, 2, 4), 0.25))
    with pytest.raises(ValueError, match="proposals"):
        merge_match(tree, _match_of([[1]]), max_depth=2)
