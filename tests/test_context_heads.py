"""head_type="context": EAGLE-style heads attending over the committed context (hf_bpd.context_heads)."""

from __future__ import annotations

import pytest
import torch
from conftest import PAD, batch_prompts, randomize_heads, tiny_base
from test_recurrent_heads import DRAFTERS, SAMPLED, assert_sampling_is_exact, sampling_base
from transformers import DynamicCache

from hf_bpd import BPDConfig, BPDForCausalLM
from hf_bpd.context_heads import ContextCache, ContextPathStates
from hf_bpd.drafters import DraftContext, DraftHeadsView
from hf_bpd.heads import teacher_tokens
from hf_bpd.losses import prefix_accuracy_counts

H = 3


def context(base, **kwargs):
    return BPDForCausalLM.from_base(
        base, num_draft_heads=kwargs.pop("num_draft_heads", H), head_type="context", **kwargs
    )


# --------------------------------------------------------------------------------------------- the module
def test_decode_time_scores_equal_the_training_forward():
    """What drafting computes through the cache (left padding, holes, depth by depth, a skipped depth) is exactly
    what the training forward computes on each row's own unpadded sequence."""
    torch.manual_seed(0)
    model = randomize_heads(context(tiny_base()), std=0.2).eval()
    heads = model.heads
    batch, length, d = 3, 12, 32
    hidden = torch.randn(batch, length, d)
    tokens = torch.randint(3, 90, (batch, length + H + 1))
    pads = [0, 2, 5]  # left padding per row
    first = torch.ones(batch, 6, dtype=torch.bool)
    for b, p in enumerate(pads):
        first[b, :p] = False
    counts = [3, 1, 4]  # the second append: rows commit different numbers of pairs (holes behind the shorter)
    second = torch.arange(4)[None] < torch.tensor(counts)[:, None]
    with torch.no_grad():
        cache = ContextCache(heads, batch, torch.device("cpu"))
        cache.append(hidden[:, :6], tokens[:, 1:7], first)
        cache.append(torch.cat([hidden[:, 6:10]], 1), tokens[:, 7:11], second)
        # each row's real pairs: its unpadded prefix, then its committed entries of the second append
        ends = [6 + c for c in counts]
        states = ContextPathStates(model, cache, tokens[:, 0])
        rows = torch.arange(batch)
        paths = torch.stack([tokens[b, ends[b] + 1 : ends[b] + 1 + H] for b in range(batch)])  # teacher paths
        got = {0: states.features(paths[:, :0], rows), 2: states.features(paths[:, :2], rows)}  # depth 1 skipped
        got[1] = states.features(paths[:, :1], rows)
        for b, p in enumerate(pads):
            seq_hidden = torch.cat([hidden[b, p:6], hidden[b, 6 : 6 + counts[b]]])[None]
            seq_tokens = torch.cat([tokens[b, p:7], tokens[b, 7 : 7 + counts[b]], paths[b]])[None]
            want = heads(seq_hidden, teacher_tokens(seq_tokens, H)[:, : seq_hidden.shape[1]])  # (1, T, H, d)
            for depth in range(H):
                torch.testing.assert_close(got[depth][b], want[0, -1, depth], rtol=1e-4, atol=1e-5)


def test_a_node_sees_only_its_own_path_and_cropping_restores_the_cache():
    torch.manual_seed(1)
    model = randomize_heads(context(tiny_base()), std=0.2).eval()
    with torch.no_grad():
        cache = ContextCache(model.heads, 1, torch.device("cpu"))
        cache.append(torch.randn(1, 5, 32), torch.randint(3, 90, (1, 5)), torch.ones(1, 5, dtype=torch.bool))
        alone = ContextPathStates(model, cache, torch.tensor([4])).features(torch.tensor([[7, 8]]), torch.tensor([0]))
        crowded = ContextPathStates(model, cache, torch.tensor([4]))  # siblings and cousins scored in one call
        paths = torch.tensor([[9, 9], [7, 8], [7, 5], [3, 8]])
        out = crowded.features(paths, torch.zeros(4, dtype=torch.long))
        assert cache.cache.get_seq_length() > cache.committed
        cache.crop()
        assert cache.cache.get_seq_length() == cache.committed == 5
    torch.testing.assert_close(out[1], alone[0], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out[2], alone[0])


def test_config_save_load_first_heads_and_errors(tmp_path):
    base = tiny_base()
    model = randomize_heads(context(base, head_num_attention_heads=4, head_num_key_value_heads=2))
    assert model.heads.layers.config.num_key_value_heads == 2
    model.save_pretrained(tmp_path)
    again = BPDForCausalLM.from_pretrained(tmp_path, base_model=base)
    for (name, a), (_, b) in zip(model.heads.state_dict().items(), again.heads.state_dict().items()):
        assert torch.equal(a, b), name
    two = model.first_heads(2)  # the layers are shared by every depth: all kept
    hidden, prev = torch.randn(1, 6, 32), torch.randint(3, 90, (1, 6, 2))
    torch.testing.assert_close(two.heads(hidden, prev), model.heads(hidden, prev))
    with pytest.raises(ValueError, match="divide the hidden size"):
        context(base, head_num_attention_heads=5)
    with pytest.raises(ValueError, match="applies to head_type='context' only"):
        BPDConfig(head_type="resblock", head_num_attention_heads=4)
    with pytest.raises(ValueError, match="whole sequences"):
        model.heads(torch.randn(4, 32), torch.randint(3, 90, (4, 2)))
    with pytest.raises(ValueError, match="prev_tokens"):
        model.heads(hidden)
    ctx = DraftContext(
        torch.tensor([[5, 6]]), torch.tensor([2]), torch.tensor([True]), DraftHeadsView(model), torch.randn(1, 32), H
    )
    with pytest.raises(ValueError, match="only the decode loop keeps"):
        ctx.path_logits(torch.zeros(1, 0, dtype=torch.long))


# --------------------------------------------------------------------------------------------- lossless
# the recurrent heads' drafters (chain, beam, static tree): the same paths, scored through the context cache
@pytest.mark.parametrize("drafter", sorted(DRAFTERS))
@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_random_context_heads_equal_base(arch, batch, drafter):
    model = randomize_heads(context(tiny_base(arch)), std=0.3)
    ids, mask = batch_prompts(batch)
    ref = model.base.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=20, do_sample=False, use_bpd=True, draft_rescorer=DRAFTERS[drafter]()
    )
    assert torch.equal(out, ref)


def test_a_prompt_partly_in_a_given_cache_stays_lossless():
    """`cache=` holding the prompt's first tokens: no states for them, so the context starts later; same output."""
    base = tiny_base()
    model = randomize_heads(context(base), std=0.3)
    ids = torch.randint(3, 90, (1, 10))
    ref = base.generate(ids, max_new_tokens=12, do_sample=False)
    cache = DynamicCache(config=base.config)
    with torch.no_grad():
        base(ids[:, :6], cache=cache, use_cache=True)
    out = model.generate(ids, cache=cache, max_new_tokens=12, do_sample=False, use_bpd=True)
    assert torch.equal(out, ref)


def fit_to_greedy(model, ids, new, steps=1500):
    """Train the heads (teacher-forced) on the base's own greedy continuations of unpadded prompts until perfect."""
    with torch.no_grad():
        seq = model.base.generate(ids, max_new_tokens=new, do_sample=False)
        hidden = model.base(seq, output_hidden_states=True).hidden_states[-1]
    labels = seq.clone()
    labels[:, : ids.shape[1] - 1] = -100  # drafts from the last prompt position onwards
    opt = torch.optim.Adam(model.heads.parameters(), lr=3e-3)
    for _ in range(steps):
        out = model(
            base_hidden_states=hidden, labels=labels, input_ids=seq, return_draft_logits=True, draft_full_vocab=False
        )
        hits, totals = prefix_accuracy_counts(out.draft_logits.detach(), labels)
        if bool((hits == totals).all()) and out.loss.item() < 0.05:
            break
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    return seq


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_fitted_context_heads_accept_every_draft(arch, batch):
    """Heads trained on the base's own continuations accept every block in full; output unchanged."""
    torch.manual_seed(0)
    model = context(tiny_base(arch))
    model.generation_config.eos_token_id = None
    ids = torch.randint(3, 90, (batch, 7), generator=torch.Generator().manual_seed(batch))
    blocks = 4
    new = 1 + blocks * (H + 1)
    ref = fit_to_greedy(model, ids, new)
    out = model.generate(ids, max_new_tokens=new, do_sample=False, use_bpd=True, return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref)
    assert (out.accepted_lengths == H).all(), out.accepted_lengths


# --------------------------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("drafter", sorted(SAMPLED))
def test_speculative_sampling_with_context_proposals_is_exact(drafter):
    """Each node is drawn from, and accepted against, its own path's q (chi-square against the exact distribution
    of NEW = 4 tokens over 4000 rows; as for the recurrent heads)."""
    model = context(sampling_base(), num_draft_heads=2)
    torch.manual_seed(3)
    with torch.no_grad():  # proposals that really depend on the path and the context, and are often accepted
        model.heads.fc.weight.normal_(0, 0.5)
    assert_sampling_is_exact(model, SAMPLED[drafter]())


def test_padding_token_never_reaches_the_embedding_check():
    """Left padding: pad slots are masked, and their token id is never looked up as a real one."""
    model = randomize_heads(context(tiny_base()), std=0.3)
    ids, mask = batch_prompts(3)
    assert bool((ids == PAD).any())
    ref = model.base.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, use_bpd=True), ref)


def test_shards_store_the_real_tokens_and_older_shards_fall_back_to_the_labels(tmp_path):
    """`input_ids` in a shard become the rows' `draft_input_ids`; a shard written before they were stored still
    loads, its heads teacher-forced on the labels as before."""
    from safetensors.torch import load_file, save_file

    from hf_bpd.features import CachedFeatures, extract_features

    base = tiny_base()
    seqs = torch.randint(3, 90, (4, 10), generator=torch.Generator().manual_seed(0)).tolist()
    paths = extract_features(base, seqs, tmp_path / "new", seq_len=12, shard_size=4)
    rows = CachedFeatures(paths)
    assert torch.equal(rows[1]["draft_input_ids"][:10], torch.tensor(seqs[1]))
    assert (rows[1]["draft_input_ids"][10:] == -100).all()
    tensors = load_file(str(paths[0]))
    del tensors["input_ids"]
    (tmp_path / "old").mkdir()
    save_file(tensors, str(tmp_path / "old" / "f-00000.safetensors"))
    old = CachedFeatures(tmp_path / "old")
    assert old.input_ids is None and "draft_input_ids" not in old[1]
    mixed = CachedFeatures([paths[0], tmp_path / "old" / "f-00000.safetensors"])
    assert mixed.input_ids is None  # all or nothing: the rows keep one kind of conditioning


def test_bpd_trainer_trains_context_heads_on_cached_features_and_writes_a_card(tmp_path):
    """The library's trainer, per-depth loss and model card, unchanged: context heads learn `r -> r + 1` (known
    only from the conditioning token) at every depth."""
    from test_recurrent_heads import pairs_batch
    from test_trainer import training_args

    from hf_bpd.features import CachedFeatures, extract_features
    from hf_bpd.trainer import BPDTrainer

    base = tiny_base()
    seqs = pairs_batch(torch.Generator().manual_seed(0), batch=64, length=24).tolist()
    features = CachedFeatures(extract_features(base, seqs, tmp_path / "f", seq_len=24, shard_size=64))
    model = context(base, num_draft_heads=2)
    trainer = BPDTrainer(
        model,
        training_args(tmp_path / "run", max_steps=80, learning_rate=1e-2, logging_steps=40),
        train_dataset=features,
        eval_dataset=features,
    )
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert after["eval_loss"] < before["eval_loss"], (before, after)
    assert after["eval_head1_top1"] > 0.3 > before["eval_head1_top1"], (before, after)
    model.save_pretrained(tmp_path / "heads")
    card = (tmp_path / "heads" / "README.md").read_text()
    assert "`context`" in card


@pytest.mark.parametrize("drafter", ["chain", "static-tree"])
def test_drafts_inside_generate_equal_the_training_forward(drafter, monkeypatch):
    """Every path the loop scores during a real `generate` (batch 3, left padding, rows accepting different numbers
    of drafts, so holes) equals the training forward on that row's own unpadded text plus the path."""
    import hf_bpd.generation as generation

    base = tiny_base("llama", vocab_size=8, eos_token_id=None)  # a small vocabulary: drafts often accepted
    base.generation_config.eos_token_id = None
    model = randomize_heads(context(base), std=0.3).eval()
    seen, now = [], {}
    draft, features = generation._BlockDecoder.draft, ContextPathStates.features

    def recording_draft(self, state, *args, **kwargs):
        now.update(tokens=state.tokens.clone(), lengths=state.lengths.clone())
        return draft(self, state, *args, **kwargs)

    def recording_features(self, paths, rows):
        out = features(self, paths, rows)
        seen.append((now["tokens"], now["lengths"], paths.clone(), rows.clone(), out.detach().clone()))
        return out

    monkeypatch.setattr(generation._BlockDecoder, "draft", recording_draft)
    monkeypatch.setattr(ContextPathStates, "features", recording_features)
    ids, mask = batch_prompts(3, vocab_size=8)
    ref = base.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=16, do_sample=False, use_bpd=True, draft_rescorer=DRAFTERS[drafter]()
    )
    assert torch.equal(out, ref)
    lengths_seen = {int(length) for _, lengths, *_ in seen for length in lengths}
    assert len(seen) > 5 and len(lengths_seen) > 3  # rows at several lengths: holes between them
    pads = (mask == 0).sum(1)
    with torch.no_grad():
        for tokens, lengths, paths, rows, got in seen:
            for i in range(paths.shape[0]):
                b = int(rows[i])
                text = tokens[b, int(pads[b]) : int(lengths[b])]
                hidden = base(text[None], output_hidden_states=True).hidden_states[-1][:, :-1]
                sequence = torch.cat([text, paths[i]])[None]
                want = model.heads(hidden, teacher_tokens(sequence, H)[:, : hidden.shape[1]])[0, -1, paths.shape[1]]
                torch.testing.assert_close(got[i], want, rtol=1e-4, atol=1e-5)


def test_masks_mean_the_same_under_eager_attention():
    """The masks are additive: switching the wrapper (and so the heads' layers) to eager attention changes nothing
    (a boolean mask would be added as 0/1 there, letting the chain queries see the future)."""
    model = randomize_heads(context(tiny_base()), std=0.3).eval()
    hidden, prev = torch.randn(2, 9, 32), torch.randint(3, 90, (2, 9, H))
    with torch.no_grad():
        sdpa = model.heads(hidden, prev)
        model.heads.layers.set_attn_implementation("eager")
        eager = model.heads(hidden, prev)
    assert model.heads.layers.config._attn_implementation == "eager"
    torch.testing.assert_close(eager, sdpa, rtol=1e-4, atol=1e-5)
