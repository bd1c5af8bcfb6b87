"""
Speculative sampling (`bpd_sampling="speculative"`, the default with `do_sample=True`) draws from exactly the base
model's distribution: the pure math on hand-written distributions, then `generate` on a tiny model (chi-square tests
over the joint distribution of the first tokens), and tests that show those tests can fail.
"""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare
from test_sampling import NEW, ROWS, chi_square_pvalue, exact_distribution, sampling_model
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import hf_bpd.sampling as sampling
from hf_bpd.logits import Drafter, Drafts, DraftState, PBestRescorer
from hf_bpd.sampling import chain_rejection_sample, tree_rejection_sample

# ------------------------------------------------------------------------------------------ the pure math
V = 5
ROWS_MATH = 40000


def _dist(gen, zeros=0):
    """A random distribution over V tokens with `zeros` tokens of probability 0 (like top-k)."""
    p = torch.rand(V, generator=gen) ** 2 + 0.02
    if zeros:
        p[torch.randperm(V, generator=gen)[:zeros]] = 0
    return p / p.sum()


class _Toy:
    """A two-token 'model': P1 for the first token, P2[x1] for the second; a third is never looked at."""

    def __init__(self, seed):
        gen = torch.Generator().manual_seed(seed)
        self.p1 = _dist(gen, zeros=1)
        self.p2 = torch.stack([_dist(gen, zeros=i % 2) for i in range(V)])
        self.gen = gen

    def joint(self):
        return self.p1[:, None] * self.p2  # (V, V)

    def finish(self, n, last_tokens, token):
        """(x1, x2) from an accepted length, the accepted tokens (B, 2) and the drawn token (next step: plain)."""
        x2_plain = torch.multinomial(self.p2[token], 1)[:, 0]
        x1 = torch.where(n == 0, token, last_tokens[:, 0])
        x2 = torch.where(n == 0, x2_plain, torch.where(n == 1, token, last_tokens[:, 1]))
        return x1, x2


def _pvalue(toy, x1, x2):
    counts = torch.bincount(x1 * V + x2, minlength=V * V).double()
    expected = toy.joint().flatten().double() * len(x1)
    assert float(counts[expected == 0].sum()) == 0, "sampled a pair of probability 0"
    keep = expected > 0
    return float(chisquare(counts[keep], expected[keep] * counts.sum() / expected[keep].sum()).pvalue)


def _run_chain(toy, q1, q2, method, claimed=None):
    """One chain per row: d1 ~ q1, d2 ~ q2 drawn independently (as the heads draw), verified by `method`."""
    torch.manual_seed(3)
    b = ROWS_MATH
    d1 = torch.multinomial(q1.expand(b, V), 1)[:, 0]
    d2 = torch.multinomial(q2.expand(b, V), 1)[:, 0]
    p = torch.stack([toy.p1.expand(b, V), toy.p2[d1], torch.full((b, V), 1.0 / V)], dim=1)  # (B, 3, V)
    q = torch.stack([q1.expand(b, V), q2.expand(b, V)], dim=1) if claimed is None else claimed.expand(b, 2, V)
    drafts = torch.stack([d1, d2], dim=1)
    if method == "chain":
        n, token = chain_rejection_sample(p, drafts, q)
    else:
        nodes = torch.cat([torch.zeros(b, 1, dtype=torch.long), drafts], dim=1)
        q_nodes = torch.cat([torch.zeros(b, 1, V), q], dim=1)
        _, n, token = tree_rejection_sample(p, torch.tensor([-1, 0, 1]), nodes, q_nodes)
    return toy.finish(n, drafts, token)


@pytest.mark.parametrize("method", ["chain", "tree"])
@pytest.mark.parametrize("seed", [0, 1])
def test_chain_rejection_sampling_is_exact(method, seed):
    toy = _Toy(seed)
    q1, q2 = _dist(toy.gen), _dist(toy.gen, zeros=2)  # q2 misses tokens that p has: the residual supplies them
    x1, x2 = _run_chain(toy, q1, q2, method)
    assert _pvalue(toy, x1, x2) > 1e-3


def test_chain_rejection_sampling_with_one_hot_proposals_is_exact():
    """Deterministic drafts are q = one-hot: accept with probability p(d), else draw from p without d."""
    toy = _Toy(2)
    q1, q2 = torch.eye(V)[int(toy.p1.argmax())], torch.eye(V)[1]
    x1, x2 = _run_chain(toy, q1, q2, "chain")
    assert _pvalue(toy, x1, x2) > 1e-3


def test_the_math_tests_reject_biased_samplers(monkeypatch):
    """The chi-square test above can fail: a proposal that lies about q, and an 'always accept' sampler."""
    toy = _Toy(0)
    q1, q2 = _dist(toy.gen), _dist(toy.gen, zeros=2)
    x1, x2 = _run_chain(toy, q1, q2, "chain", claimed=torch.full((2, V), 1.0 / V))  # drafts were not uniform
    assert _pvalue(toy, x1, x2) < 1e-3
    monkeypatch.setattr(sampling, "_uniform", lambda shape, device: torch.zeros(shape, device=device))
    for method in ("chain", "tree"):
        x1, x2 = _run_chain(toy, q1, q2, method)
        assert _pvalue(toy, x1, x2) < 1e-3


@pytest.mark.parametrize("seed", [0, 1])
def test_multi_draft_tree_rejection_sampling_is_exact(seed):
    """Three independent chains of two tokens (each its own q, duplicates common), plus a deterministic chain."""
    toy = _Toy(seed)
    torch.manual_seed(7)
    b = ROWS_MATH
    q1s = [_dist(toy.gen), _dist(toy.gen, zeros=2), toy.p1]  # the last chain's first token is drawn from p itself
    q2s = [_dist(toy.gen), _dist(toy.gen), _dist(toy.gen, zeros=3)]
    tokens, q_nodes, parents = [torch.zeros(b, dtype=torch.long)], [torch.zeros(b, V)], [-1]
    for q1, q2 in zip(q1s, q2s):
        d1 = torch.multinomial(q1.expand(b, V), 1)[:, 0]
        d2 = torch.multinomial(q2.expand(b, V), 1)[:, 0]
        parents += [0, len(parents)]
        tokens += [d1, d2]
        q_nodes += [q1.expand(b, V), q2.expand(b, V)]
    parents += [0, len(parents)]  # a deterministic chain: (argmax p1, 2) with one-hot proposals
    tokens += [torch.full((b,), int(toy.p1.argmax())), torch.full((b,), 2)]
    q_nodes += [torch.eye(V)[int(toy.p1.argmax())].expand(b, V), torch.eye(V)[2].expand(b, V)]
    tokens, q_nodes, parent = torch.stack(tokens, 1), torch.stack(q_nodes, 1), torch.tensor(parents)
    # p at each node: after the root P1, after a first-level node P2[its token], deeper: never used for (x1, x2)
    depth1 = torch.tensor([int(x == 0) for x in parents])
    p = torch.where(depth1[None, :, None].bool(), toy.p2[tokens], torch.full((b, len(parents), V), 1.0 / V))
    p[:, 0] = toy.p1
    last, n, token = tree_rejection_sample(p, parent, tokens, q_nodes)
    rows = torch.arange(b)
    accepted = torch.stack(
        [torch.where(n == 2, tokens[rows, parent[last]], tokens[rows, last]), tokens[rows, last]], 1
    )
    assert bool((n >= 1).float().mean() > 0.5)  # most rows accept a draft: the test exercises acceptance
    x1, x2 = toy.finish(n, accepted, token)
    assert _pvalue(toy, x1, x2) > 1e-3


# ------------------------------------------------------------------------------------------ generate, end to end
PROMPT = [3, 5, 7]


# generate's own processor order: repetition penalty first, then temperature, top-k, top-p
SETTINGS = {
    "plain": ({}, LogitsProcessorList()),
    "temperature-topk": (
        dict(temperature=0.8, top_k=5),
        LogitsProcessorList([TemperatureLogitsWarper(0.8), TopKLogitsWarper(5)]),
    ),
    "topp-repetition": (
        dict(temperature=1.2, top_p=0.8, repetition_penalty=1.5),
        LogitsProcessorList(
            [RepetitionPenaltyLogitsProcessor(1.5), TemperatureLogitsWarper(1.2), TopPLogitsWarper(0.8)]
        ),
    ),
}


@pytest.fixture(scope="module")
def model():
    return sampling_model()


def _generate(model, setting, drafter, rows=ROWS, seed=0, mode="speculative", new=NEW):
    kwargs, _ = SETTINGS[setting]
    kwargs = {"top_k": 0, "top_p": 1.0, **kwargs}  # nothing but the setting (generate's default top_k is 50)
    torch.manual_seed(seed)
    return model.generate(
        torch.tensor([PROMPT] * rows),
        max_new_tokens=new,
        do_sample=True,
        use_bpd=True,
        bpd_sampling=mode,
        draft_rescorer=drafter,
        return_dict_in_generate=True,
        **kwargs,
    )


@pytest.mark.parametrize(
    "setting, drafts, rows",
    [
        ("plain", "heads", ROWS),
        ("plain", "pbest", ROWS),
        ("temperature-topk", "pbest", ROWS),
        # processors that read input_ids run per row and node: fewer rows by default, all of them under `slow`
        ("topp-repetition", "heads", 1500),
        ("topp-repetition", "pbest", 1000),
        pytest.param("topp-repetition", "heads", ROWS, marks=pytest.mark.slow),
        pytest.param("topp-repetition", "pbest", ROWS, marks=pytest.mark.slow),
    ],
)
def test_speculative_sampling_matches_base_distribution(model, setting, drafts, rows):
    """A batch of many rows (rows accept different lengths: holes in the cache), chains and 3 sampled drafts."""
    dist = exact_distribution(model.base, PROMPT, SETTINGS[setting][1])
    drafter = PBestRescorer(top_k=4, num_drafts=3) if drafts == "pbest" else None
    out = _generate(model, setting, drafter, rows=rows)
    samples = out.sequences[:, len(PROMPT) :]
    accepted = out.accepted_lengths[out.accepted_lengths >= 0]
    assert int((accepted > 0).sum()) > rows // 8  # drafts were really accepted, not only bonus tokens
    assert chi_square_pvalue(samples, dist, key=lambda s: s) > 1e-3
    assert chi_square_pvalue(samples, dist, key=lambda s: s[2]) > 1e-3


def test_speculative_sampling_batch_one(model):
    """Batch size 1 (a dense cache, no holes): 300 calls, the first two tokens."""
    dist = exact_distribution(model.base, PROMPT, SETTINGS["temperature-topk"][1])
    samples = torch.cat([_generate(model, "temperature-topk", None, rows=1, seed=s).sequences for s in range(300)])
    assert chi_square_pvalue(samples[:, len(PROMPT) :], dist, key=lambda s: s[:2]) > 1e-3


def test_generate_test_rejects_an_always_accepting_sampler(model, monkeypatch):
    """The end-to-end test can fail: accepting every draft whose p > 0 is caught."""
    dist = exact_distribution(model.base, PROMPT, SETTINGS["plain"][1])
    monkeypatch.setattr(sampling, "_uniform", lambda shape, device: torch.zeros(shape, device=device))
    for drafter in (None, PBestRescorer(top_k=4, num_drafts=3)):
        samples = _generate(model, "plain", drafter).sequences[:, len(PROMPT) :]
        assert chi_square_pvalue(samples, dist, key=lambda s: s) < 1e-3


class SelfDrafter(Drafter):
    """Drafts with the base model itself: `q` is the model's true distribution given the prefix and the drafts."""

    def __init__(self, base):
        self.base = base

    @torch.no_grad()
    def get_drafts(self, state: DraftState):
        tokens, probs = [], []
        for b in range(state.batch_size):  # rows have different lengths (no padding: one prompt repeated)
            ids = state.input_ids[b : b + 1, : int(state.lengths[b])]
            for _ in range(state.num_heads):
                q = state.proposal_probs(self.base(ids).logits[:, -1].float())  # (1, V)
                t = torch.multinomial(q, 1) if state.sampling else q.argmax(-1, keepdim=True)
                tokens.append(t[0, 0])
                probs.append(q[0])
                ids = torch.cat([ids, t], dim=1)
        shape = (state.batch_size, 1, state.num_heads)
        drafts = torch.stack(tokens).view(shape)
        return Drafts(drafts, torch.stack(probs).view(*shape, -1)) if state.sampling else drafts


def test_acceptance_rises_when_proposals_are_good(model):
    """With q = p, speculative sampling accepts every draft; sample-then-match only when the sample hits."""
    means = {}
    for mode in ("speculative", "match"):
        # 13 tokens: the prefill's, then 4 blocks of h + 1 = 3 (every step may accept both drafts)
        out = _generate(model, "temperature-topk", SelfDrafter(model.base), rows=16, mode=mode, new=13)
        accepted = out.accepted_lengths[out.accepted_lengths >= 0].float()
        means[mode] = float(accepted.mean())
    assert means["speculative"] > 1.9  # h = 2: (nearly) every draft accepted
    assert means["speculative"] > means["match"] + 0.5, means


def test_bpd_sampling_is_validated(model):
    with pytest.raises(ValueError, match="bpd_sampling='exact' is not a sampling scheme"):
        model.generate(torch.tensor([PROMPT]), max_new_tokens=2, do_sample=True, use_bpd=True, bpd_sampling="exact")
    with pytest.raises(ValueError, match="only applies with `use_bpd=True`"):
        model.generate(torch.tensor([PROMPT]), max_new_tokens=2, do_sample=True, bpd_sampling="match")


def test_greedy_ignores_the_sampling_scheme(model):
    """Greedy stays token-identical to the base model's generate, whatever `bpd_sampling` says."""
    ids = torch.tensor([PROMPT, [4, 4, 6]])
    ref = model.base.generate(ids, max_new_tokens=8, do_sample=False)
    for mode in ("speculative", "match"):
        for drafter in (None, PBestRescorer(top_k=4, num_drafts=3)):
            out = model.generate(
                ids, max_new_tokens=8, do_sample=False, use_bpd=True, bpd_sampling=mode, draft_rescorer=drafter
            )
            assert torch.equal(out, ref)
