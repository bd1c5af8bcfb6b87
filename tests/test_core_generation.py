"""The lossless invariant: generate(use_bpd=True) == the base model's own generate."""

from __future__ import annotations

import pytest
import torch
from conftest import EOS, PAD, batch_prompts, randomize_heads, tiny_base
from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from hf_bpd import BPDForCausalLM
from hf_bpd.logits import OracleDrafter

H = 3


def make(arch: str, heads: str = "random", **config):
    model = BPDForCausalLM.from_base(tiny_base(arch), num_draft_heads=H, **config)
    return randomize_heads(model) if heads == "random" else model


@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_random_heads_equals_base(arch, batch):
    model = make(arch)
    ids, mask = batch_prompts(batch)
    ref = model.base.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, use_bpd=True)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_oracle_heads_accept_everything(arch, batch):
    model = make(arch, heads="zero")
    model.generation_config.eos_token_id = None  # full blocks only: no row may stop early
    ids, mask = batch_prompts(batch)
    blocks = 6
    new = 1 + blocks * (H + 1)  # the prefill token, then full blocks only
    ref = model.base.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False)
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=new,
        do_sample=False,
        use_bpd=True,
        draft_rescorer=OracleDrafter(ref, PAD),
        return_dict_in_generate=True,
    )
    assert torch.equal(out.sequences, ref)
    assert out.accepted_lengths.shape == (blocks, batch)
    assert (out.accepted_lengths == H).all()  # every full block: h drafts + 1 bonus token per serial call
    assert out.num_serial_calls == 1 + blocks
    assert out.block_efficiency == pytest.approx(new / (1 + blocks))


def test_block_efficiency_bounds_random_heads():
    model = make("llama")
    ids, mask = batch_prompts(1)
    out = model.generate(ids, max_new_tokens=30, do_sample=False, use_bpd=True, return_dict_in_generate=True)
    assert 1.0 <= out.block_efficiency <= H + 1
    assert out.num_generated_tokens == 30
    assert out.num_serial_calls == 1 + out.accepted_lengths.shape[0]
    assert int((out.accepted_lengths + 1).sum()) + 1 == 30


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("heads", ["random", "oracle"])
def test_eos_rows_finish_at_different_steps(batch, heads):
    model = make("llama", heads="random" if heads == "random" else "zero")
    ids, mask = batch_prompts(batch, seed=3)
    free = model.base.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False)
    eos = int(free[0, ids.shape[1] + 6])  # a token row 0 produces mid-way: rows stop at different steps
    ref = model.base.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False, eos_token_id=eos)
    rescorer = OracleDrafter(ref, PAD) if heads == "oracle" else None
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=30,
        do_sample=False,
        eos_token_id=eos,
        use_bpd=True,
        draft_rescorer=rescorer,
    )
    assert torch.equal(out, ref)
    assert (ref[0, ids.shape[1] :] == eos).any()  # the test really exercises an EOS inside the run


@pytest.mark.parametrize("new", [1, 2, 5, 7, 13])
def test_max_new_tokens_exact(new):
    model = make("llama", heads="zero")
    ids, mask = batch_prompts(2)
    ref = model.base.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False)
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=new, do_sample=False, use_bpd=True, draft_rescorer=OracleDrafter(ref)
    )
    assert out.shape == (2, ids.shape[1] + new)
    assert torch.equal(out, ref)


def test_max_length_honoured():
    model = make("gpt2")
    ids, mask = batch_prompts(2)
    ref = model.base.generate(ids, attention_mask=mask, max_length=20, do_sample=False)
    out = model.generate(ids, attention_mask=mask, max_length=20, do_sample=False, use_bpd=True)
    assert out.shape[1] == 20 and torch.equal(out, ref)


@pytest.mark.parametrize("batch", [1, 3])
def test_input_dependent_logits_processors(batch):
    """Processors that read input_ids see each row's true prefix at every verified position."""
    model = make("qwen2")
    ids, mask = batch_prompts(batch)
    kwargs = dict(
        attention_mask=mask,
        max_new_tokens=20,
        do_sample=False,
        repetition_penalty=1.3,
        no_repeat_ngram_size=2,
        min_new_tokens=4,
    )
    procs = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.1)])
    ref = model.base.generate(ids, logits_processor=procs, **kwargs)
    out = model.generate(ids, logits_processor=procs, use_bpd=True, **kwargs)
    assert torch.equal(out, ref)


class StopOnToken(StoppingCriteria):
    def __init__(self, token: int):
        self.token = token

    def __call__(self, input_ids, scores, **kwargs):
        return input_ids[:, -1] == self.token


@pytest.mark.parametrize("eos", [True, False])
def test_custom_stopping_criteria(eos):
    """With an EOS criterion finished rows are padded; without one every row runs until the last one stops."""
    base = tiny_base("llama", eos_token_id=EOS if eos else None)
    base.generation_config.eos_token_id = EOS if eos else None
    model = randomize_heads(BPDForCausalLM.from_base(base, num_draft_heads=H))
    ids, mask = batch_prompts(3, seed=5)
    free = base.generate(ids, attention_mask=mask, max_new_tokens=25, do_sample=False)
    stop = StoppingCriteriaList([StopOnToken(int(free[1, ids.shape[1] + 4]))])
    ref = base.generate(ids, attention_mask=mask, max_new_tokens=25, do_sample=False, stopping_criteria=stop)
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=25, do_sample=False, stopping_criteria=stop, use_bpd=True
    )
    assert torch.equal(out, ref)


class Collect(BaseStreamer):
    def __init__(self):
        self.chunks, self.ended = [], False

    def put(self, value):
        self.chunks.append(value.flatten().tolist())

    def end(self):
        self.ended = True


def test_streamer_gets_prompt_then_every_token():
    model = make("llama", heads="zero")
    ids, _ = batch_prompts(1)
    ref = model.base.generate(ids, max_new_tokens=15, do_sample=False)
    streamer = Collect()
    out = model.generate(
        ids, max_new_tokens=15, do_sample=False, use_bpd=True, streamer=streamer, draft_rescorer=OracleDrafter(ref)
    )
    assert torch.equal(out, ref)
    assert streamer.chunks[0] == ids[0].tolist()
    assert sum(streamer.chunks[1:], []) == out[0, ids.shape[1] :].tolist()
    assert any(len(c) > 1 for c in streamer.chunks[1:]) and streamer.ended


def test_output_scores_match_base():
    model = make("llama")
    ids, _ = batch_prompts(1)
    kw = dict(max_new_tokens=10, do_sample=False, return_dict_in_generate=True, output_scores=True, output_logits=True)
    ref = model.base.generate(ids, **kw)
    out = model.generate(ids, use_bpd=True, **kw)
    assert torch.equal(out.sequences, ref.sequences)
    assert len(out.scores) == len(ref.scores) == 10
    for a, b in zip(out.scores, ref.scores):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    for a, b in zip(out.logits, ref.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_without_use_bpd_is_base_generate():
    model = make("llama")
    ids, mask = batch_prompts(2)
    ref = model.base.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False), ref)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=12, use_bpd=False), ref)


def test_generation_config_use_bpd_flag():
    model = make("llama", heads="zero")
    ids, _ = batch_prompts(1)
    ref = model.base.generate(ids, max_new_tokens=9, do_sample=False)
    model.generation_config.use_bpd = True
    out = model.generate(
        ids, max_new_tokens=9, do_sample=False, draft_rescorer=OracleDrafter(ref), return_dict_in_generate=True
    )
    assert torch.equal(out.sequences, ref) and out.num_serial_calls < 9


class MixedDrafter(OracleDrafter):
    """p drafts per row: random ones, with the oracle continuation (optionally corrupted) hidden at a random slot."""

    def __init__(self, reference, num_drafts, corrupt_at=None, seed=0):
        super().__init__(reference, PAD)
        self.num_drafts, self.corrupt_at = num_drafts, corrupt_at
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, input_ids, lengths, draft_logits):
        oracle = super().__call__(input_ids, lengths, draft_logits)[:, 0]  # (B, h)
        batch, h, vocab = draft_logits.shape
        drafts = torch.randint(3, vocab, (batch, self.num_drafts, h), generator=self.gen)
        drafts[:, 1, :1] = oracle[:, :1]  # a draft sharing only the oracle's first token
        if self.corrupt_at is not None:
            oracle = oracle.clone()
            oracle[:, self.corrupt_at] = (oracle[:, self.corrupt_at] + 1) % vocab
        slot = torch.randint(0, self.num_drafts, (batch,), generator=self.gen)
        drafts[torch.arange(batch), slot] = oracle
        return drafts


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_pbest_verification_finds_the_right_draft(arch, batch):
    model = make(arch)
    model.generation_config.eos_token_id = None
    ids, mask = batch_prompts(batch)
    new = 1 + 5 * (H + 1)
    ref = model.base.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False)
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=new,
        do_sample=False,
        use_bpd=True,
        draft_rescorer=MixedDrafter(ref, num_drafts=4),
        return_dict_in_generate=True,
    )
    assert torch.equal(out.sequences, ref)
    assert (out.accepted_lengths == H).all()


@pytest.mark.parametrize("batch", [1, 3])
def test_pbest_partial_drafts_stay_lossless(batch):
    """The best draft is right only up to token 2: rows accept 1 draft token; random drafts elsewhere."""
    model = make("qwen2")
    ids, mask = batch_prompts(batch, seed=7)
    ref = model.base.generate(ids, attention_mask=mask, max_new_tokens=22, do_sample=False)
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=22,
        do_sample=False,
        use_bpd=True,
        draft_rescorer=MixedDrafter(ref, num_drafts=3, corrupt_at=1),
        return_dict_in_generate=True,
    )
    assert torch.equal(out.sequences, ref)
    live = out.accepted_lengths[:-1] >= 0
    assert (out.accepted_lengths[:-1][live] >= 1).all()


def test_pbest_with_input_dependent_processors():
    model = make("llama")
    ids, mask = batch_prompts(2, seed=2)
    kwargs = dict(attention_mask=mask, max_new_tokens=16, do_sample=False, repetition_penalty=1.4)
    ref = model.base.generate(ids, **kwargs)
    out = model.generate(ids, use_bpd=True, draft_rescorer=MixedDrafter(ref, num_drafts=3), **kwargs)
    assert torch.equal(out, ref)


def test_compare_unrefined_reports_both_accepted_lengths():
    """The heads' own drafts are verified beside the refined ones: oracle drafts accept everything, random heads less."""
    model = make("llama")
    model.generation_config.eos_token_id = None
    ids, mask = batch_prompts(2)
    ref = model.base.generate(ids, attention_mask=mask, max_new_tokens=13, do_sample=False)
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=13,
        do_sample=False,
        use_bpd=True,
        return_dict_in_generate=True,
        draft_rescorer=OracleDrafter(ref),
        compare_unrefined=True,
    )
    assert torch.equal(out.sequences, ref)
    assert (out.accepted_lengths == H).all()
    assert out.unrefined_accepted_lengths.shape == out.accepted_lengths.shape
    assert (out.unrefined_accepted_lengths < H).any()
    plain = model.generate(
        ids, attention_mask=mask, max_new_tokens=13, do_sample=False, use_bpd=True, return_dict_in_generate=True
    )
    assert int(out.unrefined_accepted_lengths[0, 0]) == int(plain.accepted_lengths[0, 0])  # same first step
    with pytest.raises(ValueError, match="compare_unrefined"):
        model.generate(ids, max_new_tokens=5, use_bpd=True, compare_unrefined=True)
