"""The one drafter interface: get_drafts(state) -> (B, p, h), update(accepted, chosen) after each step, reset per call."""

from __future__ import annotations

import pytest
import torch
from conftest import PAD, batch_prompts, randomize_heads, tiny_base

from hf_bpd import BPDForCausalLM
from hf_bpd.logits import Drafter, DraftRescorer, DraftState, HeadsDrafter, OracleDrafter

H = 3


def make(heads: str = "random") -> BPDForCausalLM:
    model = BPDForCausalLM.from_base(tiny_base("llama"), num_draft_heads=H)
    return randomize_heads(model) if heads == "random" else model


class Recording(HeadsDrafter):
    """The heads' argmax, recording every call the loop makes."""

    def __init__(self):
        self.resets, self.updates, self.states = 0, [], []

    def reset(self):
        self.resets += 1
        self.updates, self.states = [], []

    def get_drafts(self, state):
        self.states.append((state.lengths.clone(), state.live.clone(), state.num_tokens))
        return super().get_drafts(state)

    def update(self, accepted_lengths, chosen):
        self.updates.append((accepted_lengths.clone(), chosen.clone()))


class LegacyArgmax(DraftRescorer):
    """A rescorer written for the `__call__` interface, as users subclassed it before `Drafter`."""

    def __call__(self, input_ids, lengths, draft_logits):
        return draft_logits.argmax(-1)[:, None]


@pytest.mark.parametrize("batch", [1, 3])
def test_heads_drafter_and_legacy_rescorer_equal_plain_bpd(batch):
    model = make()
    ids, mask = batch_prompts(batch)
    kw = dict(attention_mask=mask, max_new_tokens=20, do_sample=False, use_bpd=True, return_dict_in_generate=True)
    plain = model.generate(ids, **kw)
    assert torch.equal(
        plain.sequences, model.base.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    )
    for drafter in (HeadsDrafter(), LegacyArgmax()):
        out = model.generate(ids, draft_rescorer=drafter, **kw)
        assert torch.equal(out.sequences, plain.sequences)
        assert torch.equal(out.accepted_lengths, plain.accepted_lengths)  # the same drafts, step by step


def test_update_reports_the_accepted_lengths_and_reset_runs_per_call():
    model = make()
    ids, mask = batch_prompts(3)
    drafter = Recording()
    for call in range(2):
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=17,
            do_sample=False,
            use_bpd=True,
            draft_rescorer=drafter,
            return_dict_in_generate=True,
        )
        assert drafter.resets == call + 1
        assert len(drafter.updates) == len(drafter.states) == out.accepted_lengths.shape[0]
        assert torch.equal(torch.stack([a for a, _ in drafter.updates]), out.accepted_lengths)
        assert all((chosen == 0).all() for _, chosen in drafter.updates)  # one draft: always the first
    assert drafter.states[0][2] == H  # drafts the loop verifies: h, fewer near max_length
    assert all(0 <= num_tokens <= H and live.any() for _, live, num_tokens in drafter.states)


def test_draft_state_computes_head_logits_once_and_only_on_demand():
    model = make()
    hidden = torch.randn(2, model.config.base_hidden_size)
    state = DraftState(
        model, torch.zeros(2, 5, dtype=torch.long), torch.tensor([5, 5]), torch.tensor([True, True]), hidden, H
    )
    assert state._logits is None  # nothing computed yet (an oracle never pays for the heads)
    logits = state.draft_logits()
    assert logits.shape == (2, H, model.config.base_vocab_size) and state.draft_logits() is logits
    assert torch.equal(state.head_argmax(), model.draft_logits(hidden).argmax(-1))
    assert state.vocab_size == model.config.base_vocab_size and state.num_heads == H


def test_oracle_drafter_runs_no_heads():
    model = make("zero")
    model.generation_config.eos_token_id = None
    ids, mask = batch_prompts(2)
    ref = model.base.generate(ids, attention_mask=mask, max_new_tokens=13, do_sample=False)
    calls = []
    handle = model.heads.register_forward_hook(lambda *a: calls.append(1))
    for head in model.heads:
        head.register_forward_hook(lambda *a: calls.append(1))
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=13,
        do_sample=False,
        use_bpd=True,
        draft_rescorer=OracleDrafter(ref, PAD),
        return_dict_in_generate=True,
    )
    handle.remove()
    assert torch.equal(out.sequences, ref) and (out.accepted_lengths == H).all()
    assert calls == []


def test_oracle_top_k_follows_the_reference_inside_the_top_k():
    model = make()
    ids, mask = batch_prompts(2)
    ref = model.base.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
    kw = dict(attention_mask=mask, max_new_tokens=16, do_sample=False, use_bpd=True, return_dict_in_generate=True)
    effs = []
    for k in (1, 8, model.config.base_vocab_size):
        out = model.generate(ids, draft_rescorer=OracleDrafter(ref, PAD, top_k=k), **kw)
        assert torch.equal(out.sequences, ref)
        effs.append(out.block_efficiency)
    plain = model.generate(ids, **kw)
    assert effs[0] == pytest.approx(plain.block_efficiency)  # top-1: the heads' own argmax
    perfect = model.generate(ids, draft_rescorer=OracleDrafter(ref, PAD), **kw).block_efficiency
    assert effs[0] <= effs[1] <= effs[2] == pytest.approx(perfect)  # the whole vocabulary: the reference itself


def test_drafter_without_get_drafts_and_rescorer_without_call_explain_themselves():
    model = make()
    ids, _ = batch_prompts(1)
    with pytest.raises(NotImplementedError):
        model.generate(ids, max_new_tokens=4, use_bpd=True, draft_rescorer=Drafter())
    with pytest.raises(NotImplementedError, match="get_drafts"):
        model.generate(ids, max_new_tokens=4, use_bpd=True, draft_rescorer=DraftRescorer())


@pytest.mark.parametrize("batch", [1, 3])
def test_generate_takes_a_drafter_by_name_or_spec(batch):
    """`drafter=` also takes what `BPDConfig.drafter` takes (a registered name or a spec dict, built by the registry
    against the model's heads); the output is the base model's own greedy output either way."""
    model = make()
    ids, mask = batch_prompts(batch)
    ref = model.base.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    for spec in ("heads", {"type": "tree", "num_nodes": 4, "top_k": 2}, {"type": "context-ngram"}):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, use_bpd=True, drafter=spec)
        assert torch.equal(out, ref), spec
    with pytest.raises(ValueError, match="Unknown drafter spec 'no-such-drafter'"):
        model.generate(ids, attention_mask=mask, max_new_tokens=4, use_bpd=True, drafter="no-such-drafter")
    with pytest.raises(ValueError, match="a registered drafter name"):
        model.generate(ids, attention_mask=mask, max_new_tokens=4, use_bpd=True, drafter=3)
    with pytest.raises(ValueError, match="Bad option in the drafter spec.*num_node"):  # a typo, not a TypeError
        model.generate(
            ids, attention_mask=mask, max_new_tokens=4, use_bpd=True, drafter={"type": "tree", "num_node": 4}
        )
    untrained = BPDForCausalLM.from_base(tiny_base(), num_draft_heads=H)
    for spec in (None, "heads", {"type": "heads"}):  # the heads' own chain from untrained heads: warned
        with pytest.warns(UserWarning, match="untrained"):
            untrained.generate(ids, attention_mask=mask, max_new_tokens=2, use_bpd=True, drafter=spec)
