"""Draft vocabulary (`draft_vocab_size` + `draft_token_map`): cheaper heads, same lossless output."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, batch_prompts, randomize_heads, tiny_base
from torch.nn import functional as F

from hf_bpd import BPDConfig, BPDForCausalLM

H, K = 3, 24


def make(arch: str = "llama", share: bool = True, seed: int = 1) -> BPDForCausalLM:
    model = BPDForCausalLM.from_base(tiny_base(arch), num_draft_heads=H, draft_vocab_size=K, share_lm_head=share)
    model.set_draft_vocab(torch.randperm(VOCAB, generator=torch.Generator().manual_seed(seed))[:K])
    return randomize_heads(model)


@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_with_draft_vocab_equals_base(arch, batch):
    model = make(arch)
    ids, mask = batch_prompts(batch)
    ref = model.base.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, use_bpd=True)
    assert torch.equal(out, ref)


def test_drafts_only_come_from_the_draft_vocab():
    model = make()
    hidden = torch.randn(5, 32)
    full = model.draft_logits(hidden)
    assert full.shape == (5, H, VOCAB)
    compact = model.draft_logits(hidden, full_vocab=False)
    assert compact.shape == (5, H, K)
    allowed = set(model.draft_token_map.tolist())
    drafts = model.draft_argmax(hidden)
    assert set(drafts.flatten().tolist()) <= allowed
    assert torch.equal(drafts, full.argmax(-1))
    # outside the draft vocabulary: probability 0, log-probabilities finite
    outside = torch.ones(VOCAB, dtype=torch.bool)
    outside[model.draft_token_map] = False
    probs = full.softmax(-1)
    assert float(probs[..., outside].max()) == 0.0
    assert torch.isfinite(full.log_softmax(-1)).all()
    # the compact logits are the lm_head rows of the mapped tokens
    states = torch.stack([head(hidden) for head in model.heads], dim=-2)
    expected = states @ model.base.get_output_embeddings().weight[model.draft_token_map].T
    torch.testing.assert_close(compact, expected)


def test_projection_cache_follows_the_map():
    model = make()
    hidden = torch.randn(2, 32)
    model.draft_argmax(hidden)  # fills the cache of projection rows for the first map
    model.set_draft_vocab(torch.arange(K))  # a new map must not reuse the cached rows of the old one
    compact = model.draft_logits(hidden, full_vocab=False)
    states = torch.stack([head(hidden) for head in model.heads], dim=-2)
    torch.testing.assert_close(compact, states @ model.base.get_output_embeddings().weight[:K].T)
    assert set(model.draft_argmax(hidden).flatten().tolist()) <= set(range(K))


def test_own_projections_start_from_the_mapped_lm_head_rows():
    model = make(share=False)
    rows = model.base.get_output_embeddings().weight[model.draft_token_map]
    for proj in model.draft_lm_heads:
        assert proj.weight.shape == (K, 32)
        torch.testing.assert_close(proj.weight, rows)


def test_save_and_load_keep_the_map(tmp_path):
    model = make()
    model.save_pretrained(tmp_path)
    loaded = BPDForCausalLM.from_pretrained(tmp_path, base_model=model.base)
    assert torch.equal(loaded.draft_token_map, model.draft_token_map)
    hidden = torch.randn(4, 32)
    assert torch.equal(loaded.draft_argmax(hidden), model.draft_argmax(hidden))


def test_loss_is_computed_in_the_draft_space_and_ignores_outside_tokens():
    model = make()
    ids, _ = batch_prompts(2, length=12)
    inside = model.draft_token_map[torch.randint(0, K, (2, 12), generator=torch.Generator().manual_seed(0))]
    labels = inside.clone()
    labels[:, 5] = int(next(t for t in range(VOCAB) if t not in set(model.draft_token_map.tolist())))
    out = model(input_ids=ids, labels=labels)
    compact = model.draft_logits(out.hidden_states, full_vocab=False)
    mapped = model.to_draft_ids(labels)
    assert int((mapped == -100).sum()) == 2  # the outside token in both rows
    expected = torch.stack(
        [
            F.cross_entropy(
                compact[:, : 12 - (i + 2), i].flatten(0, 1), mapped[:, i + 2 :].flatten(), ignore_index=-100
            )
            for i in range(H)
        ]
    )
    torch.testing.assert_close(out.head_losses, expected)
    assert out.draft_logits.shape[-1] == VOCAB
    assert model(input_ids=ids, draft_full_vocab=False).draft_logits.shape[-1] == K


def test_cached_hidden_states_give_the_same_heads_output():
    model = make()
    ids, _ = batch_prompts(2, length=10)
    labels = ids.clone()
    direct = model(input_ids=ids, labels=labels)
    cached = model(base_hidden_states=direct.hidden_states.to(torch.bfloat16).float(), labels=labels)
    assert cached.logits is None
    torch.testing.assert_close(cached.draft_logits, direct.draft_logits, atol=0.05, rtol=0.05)
    assert cached.loss is not None


def test_bad_draft_vocab_values():
    with pytest.raises(ValueError, match="draft_vocab_size"):
        BPDConfig(draft_vocab_size=0)
    with pytest.raises(ValueError, match="exceed"):
        BPDConfig(draft_vocab_size=200, base_vocab_size=100)
    with pytest.raises(ValueError, match="exceeds"):
        BPDForCausalLM.from_base(tiny_base(), num_draft_heads=2, draft_vocab_size=VOCAB + 1)
    model = make()
    with pytest.raises(ValueError, match="distinct"):
        model.set_draft_vocab([1] * K)
    with pytest.raises(ValueError, match="must lie in"):
        model.set_draft_vocab(list(range(VOCAB, VOCAB + K)))
    plain = BPDForCausalLM.from_base(tiny_base(), num_draft_heads=2)
    with pytest.raises(ValueError, match="no draft vocabulary"):
        plain.set_draft_vocab([1, 2])
    assert plain.draft_token_map is None


def test_first_heads_keeps_weights_and_map():
    model = make()
    two = model.first_heads(2)
    assert two.config.num_draft_heads == 2 and two.base is model.base
    assert torch.equal(two.draft_token_map, model.draft_token_map)
    hidden = torch.randn(3, 32)
    assert torch.equal(two.draft_argmax(hidden), model.draft_argmax(hidden)[:, :2])
    with pytest.raises(ValueError, match="num_heads"):
        model.first_heads(H + 1)


@pytest.mark.parametrize("share", [True, False])
def test_compact_top_k_equals_the_full_vocabulary_ranking(share):
    """`DraftContext.draft_topk` (the tree drafters' path: the first `depth` heads, draft vocabulary only) gives the
    log-probabilities and base ids of the full-vocabulary ranking, and runs only the heads it needs."""
    from hf_bpd.drafters.base import DraftContext, DraftHeadsView

    model = make(share=share)
    hidden = torch.randn(2, 32)

    def ctx():
        tokens = torch.zeros(2, 4, dtype=torch.long)
        return DraftContext(
            tokens, torch.full((2,), 4), torch.ones(2, dtype=torch.bool), DraftHeadsView(model), hidden, H
        )

    full = torch.log_softmax(model.draft_logits(hidden).float(), dim=-1).topk(5, dim=-1)
    values, ids = ctx().draft_topk(2, 5)
    assert torch.allclose(values, full.values[:, :2], atol=1e-5) and torch.equal(ids, full.indices[:, :2])
    calls = []
    hooks = [head.register_forward_hook(lambda *a, i=i: calls.append(i)) for i, head in enumerate(model.heads)]
    ctx().draft_topk(2, 5)
    for hook in hooks:
        hook.remove()
    assert calls == [0, 1]  # the third head never ran
    many = ctx().draft_topk(H, K + 3)  # more than the draft vocabulary holds: the full ranking
    assert many[1].shape == (2, H, K + 3)


def test_num_heads_out_of_range_is_refused():
    model = make()
    assert model.draft_logits(torch.randn(2, 32), num_heads=2).shape == (2, 2, VOCAB)
    for bad in (0, H + 1):
        with pytest.raises(ValueError, match="num_heads must be in"):
            model.draft_logits(torch.randn(2, 32), num_heads=bad)
