"""
Issue 20: generation state the loop did not create (prefilled caches, every cache class transformers offers) and
user-supplied stopping criteria and logits processors. Each case: exactly plain `generate`'s output, or a
`ValueError` before any model call.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import pytest
import torch
from conftest import EOS, PAD, batch_prompts, randomize_heads, tiny_base
from transformers import (
    AutoTokenizer,
    DynamicCache,
    EosTokenCriteria,
    LogitsProcessor,
    LogitsProcessorList,
    MaxLengthCriteria,
    MaxTimeCriteria,
    MistralConfig,
    MistralForCausalLM,
    StaticCache,
    StoppingCriteria,
    StoppingCriteriaList,
    StopStringCriteria,
    TemperatureLogitsWarper,
)

from hf_bpd import BPDForCausalLM
from hf_bpd.logits import DynamicTreeDrafter, OracleDrafter

H = 3
ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "reference"
needs_reference = pytest.mark.skipif(not (REFERENCE / "heads").is_dir(), reason="reference checkpoint not available")
DRAFTERS = {"chain": lambda: None, "tree": lambda: DynamicTreeDrafter(8, top_k=4)}


def make(arch="llama", eos=True, **overrides):
    base = tiny_base(arch, eos_token_id=EOS if eos else None, **overrides)
    base.generation_config.eos_token_id = EOS if eos else None
    return randomize_heads(BPDForCausalLM.from_base(base, num_draft_heads=H), std=0.3)


def no_forward(model, monkeypatch):
    """Make every forward of the base model fail: what is refused must be refused before any model call."""
    monkeypatch.setattr(model.base, "forward", lambda *a, **k: pytest.fail("the model ran before the refusal"))


def prefilled(model, ids, mask, upto):
    """A DynamicCache holding the first `upto` prompt tokens, filled by the base model as a user would."""
    cache = DynamicCache(config=model.base.config)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        model.base(
            input_ids=ids[:, :upto],
            attention_mask=mask[:, :upto],
            position_ids=positions[:, :upto],
            cache=cache,
            use_cache=True,
        )
    return cache


def assert_same_cache(a, b):
    assert a.get_seq_length() == b.get_seq_length()
    for la, lb in zip(a.layers, b.layers):
        torch.testing.assert_close(la.keys, lb.keys, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(la.values, lb.values, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------ Kind A: caches
@pytest.mark.parametrize("drafter", DRAFTERS)
@pytest.mark.parametrize("batch", [1, 2])
def test_prefilled_cache_is_continued_like_plain_generate(drafter, batch):
    model = make(eos=False)
    ids, mask = batch_prompts(batch, length=16, seed=3)
    kwargs = dict(attention_mask=mask, max_new_tokens=20, do_sample=False)
    free = model.base.generate(ids, **kwargs)
    ref_cache = prefilled(model, ids, mask, 11)
    ref = model.base.generate(ids, cache=ref_cache, **kwargs)
    assert torch.equal(ref, free)  # plain generate continues the cache
    cache = prefilled(model, ids, mask, 11)
    out = model.generate(ids, cache=cache, use_bpd=True, drafter=DRAFTERS[drafter](), **kwargs)
    assert torch.equal(out, ref)
    assert cache.get_seq_length() == ref_cache.get_seq_length() == 16 + 20 - 1
    assert_same_cache(cache, ref_cache)  # reusable as plain generate's (holes of batch > 1 closed)


def test_prefilled_cache_with_only_the_new_tokens():
    """`input_ids` = the new tokens only, the mask over cache + new: plain generate does not slice; neither do we."""
    model = make(eos=False)
    ids, mask = batch_prompts(2, length=14, seed=4)
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False)
    ref = model.base.generate(ids[:, 9:], cache=prefilled(model, ids, mask, 9), **kwargs)
    out = model.generate(ids[:, 9:], cache=prefilled(model, ids, mask, 9), use_bpd=True, **kwargs)
    assert torch.equal(out, ref)


def test_cache_holding_the_whole_prompt_is_refused(monkeypatch):
    model = make()
    ids, mask = batch_prompts(1, length=10)
    cache = prefilled(model, ids, mask, 10)
    no_forward(model, monkeypatch)
    with pytest.raises(ValueError, match="at least one new token"):
        model.generate(ids, cache=cache, max_new_tokens=5, use_bpd=True)


@needs_reference
def test_reference_system_prompt_cache():
    """The issue's repro: a 21-token system prompt cached, 7 more tokens, 40 new, reference heads (fp32)."""
    model = BPDForCausalLM.from_pretrained(REFERENCE / "heads")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.base_vocab_size, (1, 28), generator=gen)
    mask = torch.ones_like(ids)
    kwargs = dict(max_new_tokens=40, do_sample=False, min_new_tokens=40)
    ref_cache = prefilled(model, ids, mask, 21)
    ref = model.base.generate(ids, cache=ref_cache, **kwargs)
    assert torch.equal(ref, model.base.generate(ids, **kwargs))
    cache = prefilled(model, ids, mask, 21)
    assert torch.equal(model.generate(ids, cache=cache, use_bpd=True, **kwargs), ref)
    assert cache.get_seq_length() == ref_cache.get_seq_length() == 67


@pytest.mark.parametrize("implementation", ["static", "offloaded_static"])
@pytest.mark.parametrize("drafter", DRAFTERS)
@pytest.mark.parametrize("batch", [1, 2])
def test_static_caches_are_refused_before_any_work(implementation, drafter, batch, monkeypatch):
    model = make()
    ids, mask = batch_prompts(batch)
    no_forward(model, monkeypatch)
    with pytest.raises(ValueError, match="StaticCache with Static.*Layer layers.*default dynamic cache"):
        model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=48,
            cache_implementation=implementation,
            use_bpd=True,
            drafter=DRAFTERS[drafter](),
        )


def test_a_static_cache_object_is_refused(monkeypatch):
    model = make()
    ids, _ = batch_prompts(1)
    cache = StaticCache(config=model.base.config, max_cache_len=64)
    no_forward(model, monkeypatch)
    with pytest.raises(ValueError, match="StaticCache"):
        model.generate(ids, cache=cache, max_new_tokens=8, use_bpd=True)


def test_quantized_cache_is_refused_before_any_work(monkeypatch):
    model = make()
    ids, _ = batch_prompts(1)
    no_forward(model, monkeypatch)
    with pytest.raises(ValueError, match="QuantizedCache"):
        model.generate(
            ids, max_new_tokens=8, cache_implementation="quantized", cache_config={"backend": "fp8"}, use_bpd=True
        )


@pytest.mark.parametrize(
    "implementation",
    [
        "dynamic",
        pytest.param("offloaded", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
    ],
)
@pytest.mark.parametrize("drafter", DRAFTERS)
@pytest.mark.parametrize("batch", [1, 3])
def test_dynamic_and_offloaded_caches_are_exact(implementation, drafter, batch):
    model = make()
    if torch.cuda.is_available():
        model = model.cuda()
    ids, mask = batch_prompts(batch, seed=5)
    kwargs = dict(attention_mask=mask, max_new_tokens=24, do_sample=False, cache_implementation=implementation)
    ref = model.base.generate(ids, **kwargs)
    assert torch.equal(model.generate(ids, use_bpd=True, drafter=DRAFTERS[drafter](), **kwargs), ref)


def sliding_model(window, arch="mistral"):
    if arch == "mistral":
        torch.manual_seed(0)
        config = MistralConfig(
            vocab_size=97,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            pad_token_id=PAD,
            eos_token_id=EOS,
            bos_token_id=2,
            sliding_window=window,
        )
        base = MistralForCausalLM(config).eval()
        return randomize_heads(BPDForCausalLM.from_base(base, num_draft_heads=H), std=0.3)
    # a hybrid: one sliding-window layer, one full-attention layer
    return make(
        "qwen2", use_sliding_window=True, sliding_window=window, layer_types=["sliding_attention", "full_attention"]
    )


@pytest.mark.parametrize("arch", ["mistral", "hybrid"])
@pytest.mark.parametrize("drafter", DRAFTERS)
def test_sliding_window_inside_the_window_is_exact(arch, drafter):
    model = sliding_model(64, arch)
    ids, _ = batch_prompts(1)
    ref = model.base.generate(ids, max_new_tokens=30, do_sample=False)
    assert torch.equal(
        model.generate(ids, max_new_tokens=30, do_sample=False, use_bpd=True, drafter=DRAFTERS[drafter]()), ref
    )


@pytest.mark.parametrize("arch", ["mistral", "hybrid"])
def test_sliding_window_beyond_the_window_or_batched_is_refused(arch, monkeypatch):
    model = sliding_model(32, arch)
    ids, mask = batch_prompts(2)
    no_forward(model, monkeypatch)
    with pytest.raises(ValueError, match="inside the window"):
        model.generate(ids[:1], max_new_tokens=30, use_bpd=True)
    with pytest.raises(ValueError, match="batch size 1"):
        model.generate(ids, attention_mask=mask, max_new_tokens=8, use_bpd=True)


# ------------------------------------------------------------------------------------------ Kind B: criteria
@pytest.mark.parametrize("batch", [1, 2])
def test_custom_max_length_criteria_takes_precedence(batch):
    model = make(eos=False)
    ids, mask = batch_prompts(batch)
    prompt = ids.shape[1]
    stop = StoppingCriteriaList([MaxLengthCriteria(max_length=prompt + 5)])
    kwargs = dict(attention_mask=mask, max_new_tokens=40, do_sample=False, stopping_criteria=stop)
    ref = model.base.generate(ids, **kwargs)
    assert ref.shape[1] == prompt + 5
    assert torch.equal(model.generate(ids, use_bpd=True, **kwargs), ref)


def test_max_time_criteria():
    model = make(eos=False)
    ids, _ = batch_prompts(1)
    for max_time, new in ((0.0, 1), (1000.0, 15)):
        stop = StoppingCriteriaList([MaxTimeCriteria(max_time=max_time, initial_timestamp=time.time())])
        kwargs = dict(max_new_tokens=15, do_sample=False, stopping_criteria=stop)
        ref = model.base.generate(ids, **kwargs)
        assert ref.shape[1] == ids.shape[1] + new
        assert torch.equal(model.generate(ids, use_bpd=True, **kwargs), ref)


@pytest.mark.parametrize("batch", [1, 3])
def test_eos_criteria_given_by_hand(batch):
    """An EosTokenCriteria with a token the generation config does not know as EOS."""
    model = make(eos=True)
    ids, mask = batch_prompts(batch, seed=2)
    free = model.base.generate(ids, attention_mask=mask, max_new_tokens=25, do_sample=False)
    token = int(free[0, ids.shape[1] + 3])
    stop = StoppingCriteriaList([EosTokenCriteria(eos_token_id=token)])
    kwargs = dict(attention_mask=mask, max_new_tokens=25, do_sample=False, stopping_criteria=stop)
    ref = model.base.generate(ids, **kwargs)
    assert not torch.equal(ref, free)
    assert torch.equal(model.generate(ids, use_bpd=True, **kwargs), ref)


def test_stop_string_criteria_given_by_hand():
    tokenizer = AutoTokenizer.from_pretrained(REFERENCE / "tokenizer")
    base = tiny_base("llama", vocab_size=len(tokenizer), pad_token_id=0, eos_token_id=0, bos_token_id=0)
    model = randomize_heads(BPDForCausalLM.from_base(base, num_draft_heads=H), std=0.3)
    enc = tokenizer(["To be, or not to be"], return_tensors="pt")
    free = base.generate(**enc, max_new_tokens=24, do_sample=False)
    stop_text = tokenizer.decode(free[0, enc.input_ids.shape[1] + 5 : enc.input_ids.shape[1] + 7])
    stop = StoppingCriteriaList([StopStringCriteria(tokenizer, [stop_text])])
    ref = base.generate(**enc, max_new_tokens=24, do_sample=False, stopping_criteria=stop)
    assert ref.shape[1] < free.shape[1]
    out = model.generate(**enc, max_new_tokens=24, do_sample=False, stopping_criteria=stop, use_bpd=True)
    assert torch.equal(out, ref)


class StopAtRowLength(StoppingCriteria):
    """Per-row state indexed by batch position: row b stops once it holds `limits[b]` tokens."""

    def __init__(self, limits):
        self.limits = torch.tensor(limits)

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), input_ids.shape[1]) >= self.limits[: input_ids.shape[0]]


@pytest.mark.parametrize("eos", [True, False])
def test_custom_per_row_criteria(eos):
    model = make(eos=eos)
    ids, mask = batch_prompts(3, seed=6)
    crit = StopAtRowLength([ids.shape[1] + 4, ids.shape[1] + 9, ids.shape[1] + 6])
    kwargs = dict(
        attention_mask=mask, max_new_tokens=20, do_sample=False, stopping_criteria=StoppingCriteriaList([crit])
    )
    ref = model.base.generate(ids, **kwargs)
    assert ref.shape[1] < ids.shape[1] + 20  # the criterion did stop the batch
    with pytest.warns(UserWarning, match="once per committed token"):
        out = model.generate(ids, use_bpd=True, **kwargs)
    assert torch.equal(out, ref)


# ------------------------------------------------------------------------------------------ Kind B: processors
class ForceEosAfter(LogitsProcessor):
    """A stateful processor (counts its calls): forces EOS on call `n + 1`."""

    def __init__(self, n):
        self.n, self.calls = n, 0

    def __call__(self, input_ids, scores):
        self.calls += 1
        if self.calls > self.n:
            scores = torch.full_like(scores, -float("inf"))
            scores[:, EOS] = 0
        return scores


class ShiftTowardsLastToken(LogitsProcessor):
    """A pure function of (input_ids, scores) that is not one of transformers' own."""

    def __call__(self, input_ids, scores):
        return scores.scatter_add(1, input_ids[:, -1:], torch.full_like(scores[:, :1], 0.5))


class CountingTemperature(TemperatureLogitsWarper):
    """A subclass of a position-free warper that adds state: no longer known to be pure."""

    def __init__(self, temperature):
        super().__init__(temperature)
        self.calls = 0

    def __call__(self, input_ids, scores):
        self.calls += 1
        return super().__call__(input_ids, scores) if self.calls % 2 else scores


@pytest.mark.parametrize("drafter", ["heads", "oracle", "tree"])
def test_stateful_processor_sees_plain_generates_calls_at_batch_one(drafter):
    model = make(eos=True)
    ids, _ = batch_prompts(1, seed=8)
    ref_proc = ForceEosAfter(10)
    ref = model.base.generate(
        ids, max_new_tokens=30, do_sample=False, logits_processor=LogitsProcessorList([ref_proc])
    )
    assert ref.shape[1] == ids.shape[1] + 11 and int(ref[0, -1]) == EOS
    free = model.base.generate(ids, max_new_tokens=30, do_sample=False)
    chosen = {"heads": None, "oracle": OracleDrafter(free), "tree": DynamicTreeDrafter(8, top_k=4)}[drafter]
    proc = ForceEosAfter(10)
    out = model.generate(
        ids,
        max_new_tokens=30,
        do_sample=False,
        logits_processor=LogitsProcessorList([proc]),
        use_bpd=True,
        drafter=chosen,
    )
    assert torch.equal(out, ref)
    assert proc.calls == ref_proc.calls == 11


def test_subclass_of_a_known_warper_is_not_trusted():
    model = make(eos=False)
    ids, _ = batch_prompts(1)
    kwargs = dict(max_new_tokens=16, do_sample=False)
    ref = model.base.generate(ids, logits_processor=LogitsProcessorList([CountingTemperature(0.5)]), **kwargs)
    out = model.generate(ids, logits_processor=LogitsProcessorList([CountingTemperature(0.5)]), use_bpd=True, **kwargs)
    assert torch.equal(out, ref)


def test_unknown_processor_is_refused_where_it_cannot_be_exact(monkeypatch):
    model = make()
    ids, mask = batch_prompts(2)
    no_forward(model, monkeypatch)
    procs = LogitsProcessorList([ForceEosAfter(10)])
    with pytest.raises(ValueError, match="bpd_pure_processors=True"):
        model.generate(ids, attention_mask=mask, max_new_tokens=8, logits_processor=procs, use_bpd=True)
    with pytest.raises(ValueError, match="not known to be pure"):
        model.generate(ids[:1], max_new_tokens=8, logits_processor=procs, do_sample=True, use_bpd=True)


@pytest.mark.parametrize("do_sample", [False, True])
def test_declared_pure_processor_at_batch_three(do_sample):
    model = make()
    ids, mask = batch_prompts(3, seed=9)
    procs = LogitsProcessorList([ShiftTowardsLastToken()])
    kwargs = dict(attention_mask=mask, max_new_tokens=18, do_sample=do_sample, logits_processor=procs)
    if not do_sample:
        ref = model.base.generate(ids, **kwargs)
        assert torch.equal(model.generate(ids, use_bpd=True, bpd_pure_processors=True, **kwargs), ref)
    else:  # runs (the distribution is the sampling tests' business); the flag is what lets it through
        out = model.generate(ids, use_bpd=True, bpd_pure_processors=True, **kwargs)
        assert out.shape[0] == 3


def test_guidance_processor_given_by_hand_is_refused(monkeypatch):
    from transformers.generation.logits_process import UnbatchedClassifierFreeGuidanceLogitsProcessor

    model = make()
    ids, _ = batch_prompts(1)
    proc = UnbatchedClassifierFreeGuidanceLogitsProcessor(1.5, model.base)
    no_forward(model, monkeypatch)
    with pytest.raises(ValueError, match="classifier-free guidance"):
        model.generate(ids, max_new_tokens=5, logits_processor=LogitsProcessorList([proc]), use_bpd=True)


# ------------------------------------------------------------------------------------------ one entry
def test_drafter_argument_and_its_old_name():
    model = make(eos=False)
    ids, _ = batch_prompts(1)
    ref = model.base.generate(ids, max_new_tokens=12, do_sample=False)
    for key in ("drafter", "draft_rescorer"):
        out = model.generate(
            ids,
            max_new_tokens=12,
            do_sample=False,
            use_bpd=True,
            return_dict_in_generate=True,
            **{key: OracleDrafter(ref)},
        )
        assert torch.equal(out.sequences, ref) and (out.accepted_lengths[:-1] == H).all()
    with pytest.raises(ValueError, match="once"):
        model.generate(
            ids, max_new_tokens=4, use_bpd=True, drafter=OracleDrafter(ref), draft_rescorer=OracleDrafter(ref)
        )
    with pytest.raises(ValueError, match="only applies with `use_bpd=True`"):
        model.generate(ids, max_new_tokens=4, drafter=OracleDrafter(ref))


def test_prompt_lookup_is_refused_once_before_any_work(monkeypatch):
    model = make()
    ids, _ = batch_prompts(1)
    no_forward(model, monkeypatch)
    with pytest.raises(ValueError, match="prompt lookup decoding"):
        model.generate(ids, max_new_tokens=4, use_bpd=True, prompt_lookup_num_tokens=3)
    model.generation_config.prompt_lookup_num_tokens = 3
    with pytest.raises(ValueError, match="prompt lookup decoding"):
        model.generate(ids, max_new_tokens=4, use_bpd=True)


def test_a_refused_call_leaves_the_model_unchanged(monkeypatch):
    model = make()
    model.heads.to(torch.float16)
    ids, _ = batch_prompts(1)
    with pytest.raises(ValueError, match="StaticCache"):
        model.generate(ids, max_new_tokens=4, cache_implementation="static", use_bpd=True)
    assert next(model.heads.parameters()).dtype == torch.float16


def test_generation_never_imports_modeling():
    import ast

    source = (ROOT / "hf_bpd" / "generation.py").read_text()
    modules = [n.module for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ImportFrom)]
    assert not any("modeling" in (m or "") for m in modules)
    assert "BPDGenerationMixin" in [c.__name__ for c in BPDForCausalLM.__mro__]


def test_the_cache_outlives_generate_as_plain_generates_does():
    model = make(eos=False)
    ids, mask = batch_prompts(2, seed=11)
    kwargs = dict(attention_mask=mask, max_new_tokens=14, do_sample=False, return_dict_in_generate=True)
    ref = model.base.generate(ids, **kwargs)
    out = model.generate(ids, use_bpd=True, **kwargs)
    assert torch.equal(out.sequences, ref.sequences)
    assert_same_cache(out.cache, ref.cache)
    assert copy.deepcopy(out.cache).get_seq_length() == ids.shape[1] + 14 - 1


def test_pad_is_not_needed_for_the_refusals():
    assert PAD == 0  # conftest's constants used above
