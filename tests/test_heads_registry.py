"""
Head types are a registry (`hf_bpd.heads.HEAD_TYPES`): a token-conditioned head type defined here, in the test suite,
works end to end without touching the library (save / load, training, lossless decoding, search and tree drafters),
and the lattice drafters refuse it. The hook path gives the lattice path's drafts where both apply.
"""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch
from conftest import PAD, VOCAB, batch_prompts, randomize_heads, tiny_base
from torch import nn

from hf_bpd import BPDConfig, BPDForCausalLM
from hf_bpd.drafters import (
    DRAFTERS,
    DraftContext,
    Drafter,
    DraftHeadsView,
    DynamicTreeDrafter,
    HeadsDrafter,
    NeuralRescorer,
    PBestRescorer,
    SearchDrafter,
    StaticTreeDrafter,
    build_drafter,
)
from hf_bpd.heads import HEAD_TYPES, DraftHeads, ResBlock
from hf_bpd.logits import NeuralHook

H = 3


class EmbedResHeads(DraftHeads):
    """Token-conditioned (ReDrafter-style, minimal): output `j` is `ResBlock_j(h_t + E(prev_tokens[..., j]))`."""

    independent: ClassVar[bool] = False

    def __init__(self, config, hidden_size, input_embeddings=None):
        super().__init__(config, hidden_size, input_embeddings)
        for i in range(self.num_heads):
            self.add_module(str(i), nn.Sequential(ResBlock(hidden_size)))

    def forward(self, hidden, prev_tokens=None):
        if prev_tokens is None:
            raise ValueError("EmbedResHeads reads prev_tokens")
        embedded = self.embed(prev_tokens).to(hidden.dtype)  # (..., k, d)
        heads = list(self)
        return torch.stack([heads[j](hidden + embedded[..., j, :]) for j in range(prev_tokens.shape[-1])], dim=-2)


@pytest.fixture(autouse=True)
def embed_res_type():
    HEAD_TYPES["embed-res"] = EmbedResHeads
    yield
    HEAD_TYPES.pop("embed-res", None)


def make(arch="llama", std=0.5, **kwargs):
    model = BPDForCausalLM.from_base(tiny_base(arch), num_draft_heads=H, head_type="embed-res", **kwargs)
    return randomize_heads(model, std=std)


def test_registry_builds_the_registered_type_and_config_validates_against_it():
    model = make()
    assert isinstance(model.heads, EmbedResHeads) and not model.independent_heads
    assert "heads.0.0.linear.weight" in model.heads_state_dict()
    assert not any("embed" in k for k in model.heads_state_dict())  # E is the base's, never saved with the heads
    HEAD_TYPES.pop("embed-res")
    with pytest.raises(ValueError, match="head_type"):
        BPDConfig(head_type="embed-res")


def test_save_load_round_trip(tmp_path):
    model = make()
    model.save_pretrained(tmp_path / "ckpt")
    loaded = BPDForCausalLM.from_pretrained(tmp_path / "ckpt", base_model=model.base)
    hidden, prev = torch.randn(2, 32), torch.randint(3, VOCAB, (2, H))
    assert torch.equal(loaded.draft_logits(hidden, prev), model.draft_logits(hidden, prev))


def test_draft_logits_need_prev_tokens_and_follow_the_path():
    model = make()
    hidden = torch.randn(2, 32)
    with pytest.raises(ValueError, match="prev_tokens"):
        model.draft_logits(hidden)
    prev = torch.randint(3, VOCAB, (2, H))
    other = prev.clone()
    other[:, 1] = (other[:, 1] + 1) % VOCAB
    a, b = model.draft_logits(hidden, prev), model.draft_logits(hidden, other)
    assert torch.equal(a[:, 0], b[:, 0]) and not torch.equal(a[:, 1], b[:, 1])  # output j reads x_{t+1..t+1+j}


def test_training_forward_feeds_the_labels_as_conditioning_tokens():
    model = make()
    ids = torch.randint(3, VOCAB, (2, 10))
    out = model(input_ids=ids, labels=ids)
    assert out.loss.requires_grad and out.draft_logits.shape == (2, 10, H, VOCAB)
    hidden = out.hidden_states
    t = 4  # draft_logits[:, t, j] = heads given x_{t+1..t+1+j}, predicting x_{t+2+j}
    expected = model.draft_logits(hidden[:, t], ids[:, t + 1 : t + 1 + H])
    torch.testing.assert_close(out.draft_logits[:, t], expected)
    cached = model(base_hidden_states=hidden.detach(), labels=ids)  # the cached-feature path: labels only
    torch.testing.assert_close(cached.loss, out.loss)
    out.loss.backward()
    assert all(p.grad is not None for p in model.heads.parameters())


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2", "mistral"])
@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_decoding_is_lossless(arch, batch):
    model = make(arch)
    model.generation_config.eos_token_id = None
    ids, mask = batch_prompts(batch)
    ref = model.base.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
    for drafter in (
        None,
        SearchDrafter(top_k=4, num_drafts=3),
        DynamicTreeDrafter(8, top_k=3),
        StaticTreeDrafter([[0], [1], [0, 0], [1, 0], [0, 0, 0]]),
    ):
        out = model.generate(
            ids, attention_mask=mask, max_new_tokens=16, do_sample=False, use_bpd=True, draft_rescorer=drafter
        )
        assert torch.equal(out, ref), type(drafter).__name__


def test_untrained_conditioned_heads_are_accepted_like_independent_ones():
    """Zero-initialised blocks: output j is lm_head(h_t + E(x)), a real draft; the chain is drafted autoregressively."""
    model = make(std=0.0)
    ids, mask = batch_prompts(2)
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=12, do_sample=False, use_bpd=True, return_dict_in_generate=True
    )
    assert torch.equal(
        out.sequences, model.base.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    )


def test_heads_chain_is_drafted_token_by_token():
    model = make()
    hidden = torch.randn(2, 32)
    tokens = torch.randint(3, VOCAB, (2, 5))
    ctx = DraftContext(tokens, torch.tensor([5, 5]), torch.tensor([True, True]), DraftHeadsView(model), hidden, H)
    chain = HeadsDrafter().propose(ctx).path_drafts()[:, 0]  # (2, H)
    for j in range(H):
        prev = torch.cat([tokens[:, -1:], chain[:, :j]], dim=1)
        assert torch.equal(chain[:, j], model.draft_logits(hidden, prev)[:, j].argmax(-1))


@pytest.mark.parametrize(
    "make_drafter",
    [lambda: PBestRescorer(top_k=4, num_drafts=2), lambda: NeuralRescorer(tiny_base("llama", seed=3), top_k=4)],
)
def test_lattice_drafters_refuse_token_conditioned_heads(make_drafter):
    model = make()
    ids, _ = batch_prompts(1)
    with pytest.raises(ValueError, match="independent heads.*Use SearchDrafter"):
        model.generate(ids, max_new_tokens=4, use_bpd=True, draft_rescorer=make_drafter())
    with pytest.raises(ValueError, match="embed-res"):
        build_drafter(model, make_drafter())
    with pytest.raises(ValueError, match="PBestRescorer"):
        build_drafter(model, {"type": "pbest", "top_k": 4})


# ------------------------------------------------------------------------------ hook path == lattice path
def _independent(seed=1):
    return randomize_heads(BPDForCausalLM.from_base(tiny_base("llama"), num_draft_heads=H), seed=seed)


def _drafts(model, drafter, ids, mask, **kw):
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=14,
        do_sample=False,
        use_bpd=True,
        draft_rescorer=drafter,
        return_dict_in_generate=True,
        **kw,
    )
    return out


class Recorder(Drafter):
    """Records the drafts of an inner drafter, step by step."""

    def __init__(self, inner):
        self.inner, self.drafts = inner, []

    def reset(self):
        self.inner.reset()
        self.drafts = []

    def update(self, accepted_lengths, chosen):
        self.inner.update(accepted_lengths, chosen)

    def propose(self, ctx):
        tree = self.inner.propose(ctx)
        self.drafts.append(tree.path_drafts())
        return tree


def test_neural_hook_greedy_search_equals_local_neural_rescoring():
    """Kim et al.'s local neural rescoring (lattice walk with a cached LM) and a greedy search with the neural hook
    (the LM run on each node's whole prefix) propose the same drafts at every step, in a padded batch."""
    model = _independent()
    model.generation_config.eos_token_id = None
    lm = tiny_base("llama", seed=5)
    ids, mask = batch_prompts(3)
    lattice = Recorder(NeuralRescorer(lm, top_k=5, alpha=0.7))
    hooks = Recorder(SearchDrafter(top_k=5, num_drafts=1, hooks=[NeuralHook(lm, alpha=0.7)]))
    a, b = _drafts(model, lattice, ids, mask), _drafts(model, hooks, ids, mask)
    assert torch.equal(a.accepted_lengths, b.accepted_lengths) and torch.equal(a.sequences, b.sequences)
    assert len(lattice.drafts) == len(hooks.drafts) > 3
    assert all(torch.equal(x, y) for x, y in zip(lattice.drafts, hooks.drafts))


def test_beam_search_without_hooks_equals_pbest():
    model = _independent(seed=2)
    ids, mask = batch_prompts(3)
    a = _drafts(model, PBestRescorer(top_k=4, num_drafts=5), ids, mask)
    b = _drafts(model, SearchDrafter(top_k=4, num_drafts=5), ids, mask)
    assert torch.equal(a.accepted_lengths, b.accepted_lengths) and torch.equal(a.sequences, b.sequences)


def test_registry_names_and_checkpoint_drafter(tmp_path):
    assert {"heads", "pbest", "ngram", "neural", "tree", "tree-static", "oracle"} <= set(DRAFTERS)
    model = _independent()
    assert isinstance(build_drafter(model, None), HeadsDrafter)
    assert isinstance(build_drafter(model, {"type": "tree", "num_nodes": 6, "top_k": 3}), DynamicTreeDrafter)
    with pytest.raises(ValueError, match="Unknown drafter"):
        build_drafter(model, "nope")
    model.config.drafter = {"type": "pbest", "top_k": 4, "num_drafts": 3}
    model.save_pretrained(tmp_path / "ckpt")
    loaded = BPDForCausalLM.from_pretrained(tmp_path / "ckpt", base_model=model.base)
    assert loaded.config.drafter == {"type": "pbest", "top_k": 4, "num_drafts": 3}
    ids, mask = batch_prompts(2)
    by_config = _drafts(loaded, None, ids, mask)  # the checkpoint's drafter, built from the registry
    by_hand = _drafts(loaded, PBestRescorer(top_k=4, num_drafts=3), ids, mask)
    assert torch.equal(by_config.accepted_lengths, by_hand.accepted_lengths)
    with pytest.raises(ValueError, match="drafter"):
        BPDConfig(drafter="tree")


def test_ngram_context_starts_at_the_attention_mask_not_at_pad_values():
    """A real prompt token equal to the pad id stays in the context (it was dropped when read from pad values)."""
    from hf_bpd.drafters.search import committed_prefixes

    tokens = torch.tensor([[PAD, PAD, PAD, 5, 6], [7, PAD, 8, 9, 4]])  # row 1: no padding, a real token = PAD
    ctx = DraftContext(
        tokens, torch.tensor([5, 5]), torch.tensor([True, True]), None, None, H, prompt_start=torch.tensor([2, 0])
    )  # row 0: the 3rd token is a real PAD-valued token
    ids, mask = committed_prefixes(ctx)
    assert mask.sum(-1).tolist() == [3, 5]
    assert ids[0, -3:].tolist() == [PAD, 5, 6] and ids[1].tolist() == [7, PAD, 8, 9, 4]
    from hf_bpd.logits.ngram import committed_contexts

    assert committed_contexts(tokens, ctx.lengths, ctx.prompt_start, 4) == [[PAD, 5, 6], [PAD, 8, 9, 4]]


@pytest.mark.parametrize("kind", ["heads", "search", "tree"])
def test_speculative_sampling_with_conditioned_heads_is_exact(kind):
    """Each node's children are drawn from that node's own q (the heads given its path): the output distribution
    is the base model's (chi-square over the first three tokens)."""
    from test_sampling import ROWS, chi_square_pvalue, exact_distribution
    from test_sampling_speculative import PROMPT, SETTINGS

    base = tiny_base("llama", vocab_size=8, seed=4, eos_token_id=None, pad_token_id=0, bos_token_id=None)
    base.generation_config.eos_token_id = None
    model = randomize_heads(BPDForCausalLM.from_base(base, num_draft_heads=2, head_type="embed-res"), std=0.3)
    drafter = {"heads": None, "search": SearchDrafter(top_k=4, num_drafts=2), "tree": DynamicTreeDrafter(5, top_k=3)}[
        kind
    ]
    kwargs, processors = SETTINGS["temperature-topk"]
    dist = exact_distribution(model.base, PROMPT, processors)
    torch.manual_seed(0)
    out = model.generate(
        torch.tensor([PROMPT] * ROWS),
        max_new_tokens=3,
        do_sample=True,
        use_bpd=True,
        draft_rescorer=drafter,
        return_dict_in_generate=True,
        top_p=1.0,
        **kwargs,
    )
    assert int((out.accepted_lengths > 0).sum()) > ROWS // 8  # drafts were really accepted
    assert chi_square_pvalue(out.sequences[:, len(PROMPT) :], dist, key=lambda s: s) > 1e-3
