"""Sampling with use_bpd=True draws from exactly the base model's distribution (statistical tests)."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import randomize_heads, tiny_base
from scipy.stats import chisquare
from test_core_generation import MixedDrafter
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper

from hf_bpd import BPDForCausalLM

VOCAB, NEW, ROWS = 8, 3, 4000
WARPERS = LogitsProcessorList([TemperatureLogitsWarper(0.8), TopKLogitsWarper(5)])


def sampling_model() -> BPDForCausalLM:
    """The tiny `VOCAB`-token llama (no EOS) with two random heads that the sampling tests draw from."""
    base = tiny_base("llama", vocab_size=VOCAB, seed=4, eos_token_id=None, pad_token_id=0, bos_token_id=None)
    base.generation_config.eos_token_id = None
    return randomize_heads(BPDForCausalLM.from_base(base, num_draft_heads=2), std=0.3)


def exact_distribution(base, prompt, processors=WARPERS):
    """P(t1, t2, t3 | prompt) under the processed base model, by enumeration (processors see the full prefix)."""
    probs = {}
    with torch.no_grad():
        for prefix_len in range(NEW):
            for prefix in itertools.product(range(VOCAB), repeat=prefix_len):
                ids = torch.tensor([prompt + list(prefix)])
                probs[prefix] = torch.softmax(processors(ids, base(ids).logits[:, -1].float()), -1)[0]
    dist = {}
    for seq in itertools.product(range(VOCAB), repeat=NEW):
        p = 1.0
        for i in range(NEW):
            p *= float(probs[seq[:i]][seq[i]])
        if p > 0:
            dist[seq] = p
    return dist


def chi_square_pvalue(samples: torch.Tensor, dist: dict, key) -> float:
    """Chi-square goodness of fit of `key(sample)` counts against the exact distribution (small bins merged)."""
    expected, observed = {}, {}
    for seq, p in dist.items():
        expected[key(seq)] = expected.get(key(seq), 0.0) + p * len(samples)
    for row in samples.tolist():
        observed[key(tuple(row))] = observed.get(key(tuple(row)), 0) + 1
    assert set(observed) <= set(expected), "sampled a sequence of probability 0 (outside top-k)"
    bins = sorted(expected, key=expected.get)
    exp, obs, acc_e, acc_o = [], [], 0.0, 0
    for k in bins:  # merge the smallest bins until each has >= 5 expected
        acc_e, acc_o = acc_e + expected[k], acc_o + observed.get(k, 0)
        if acc_e >= 5:
            exp.append(acc_e), obs.append(acc_o)
            acc_e, acc_o = 0.0, 0
    exp[-1] += acc_e
    obs[-1] += acc_o
    total = sum(exp)
    exp = [e * len(samples) / total for e in exp]  # exact sums up to float rounding
    return float(chisquare(obs, exp).pvalue)


@pytest.mark.parametrize("drafts", ["heads", "pbest"])
def test_sampling_matches_base_distribution(drafts):
    model = sampling_model()
    prompt = [3, 5, 7]
    dist = exact_distribution(model.base, prompt)
    ids = torch.tensor([prompt] * ROWS)
    rescorer = MixedDrafter(ids, num_drafts=3) if drafts == "pbest" else None  # random drafts: many match by chance
    torch.manual_seed(0)
    out = model.generate(
        ids,
        max_new_tokens=NEW,
        do_sample=True,
        temperature=0.8,
        top_k=5,
        top_p=1.0,
        use_bpd=True,
        draft_rescorer=rescorer,
        return_dict_in_generate=True,
    )
    samples = out.sequences[:, len(prompt) :]
    assert samples.shape == (ROWS, NEW)
    assert int((out.accepted_lengths > 0).sum()) > 200  # drafts were really accepted, not only bonus tokens
    assert chi_square_pvalue(samples, dist, key=lambda s: s) > 1e-3
    assert chi_square_pvalue(samples, dist, key=lambda s: s[2]) > 1e-3


def test_sampling_detects_a_biased_sampler():
    """The test above can fail: plain argmax decoding is rejected as a sample of the distribution."""
    base = tiny_base("llama", vocab_size=VOCAB, seed=4, eos_token_id=None, pad_token_id=0, bos_token_id=None)
    dist = exact_distribution(base, [3, 5, 7])
    greedy = base.generate(torch.tensor([[3, 5, 7]]), max_new_tokens=NEW, do_sample=False)[:, 3:]
    biased = torch.cat([greedy.repeat(ROWS // 4, 1), _sample_exact(dist, ROWS - ROWS // 4)])
    assert chi_square_pvalue(biased, dist, key=lambda s: s) < 1e-3


def _sample_exact(dist, n):
    keys = list(dist)
    p = torch.tensor([dist[k] for k in keys])
    idx = torch.multinomial(p / p.sum(), n, replacement=True, generator=torch.Generator().manual_seed(1))
    return torch.tensor([keys[i] for i in idx.tolist()])
