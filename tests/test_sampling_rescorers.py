"""
Speculative sampling with the lattice rescorers (issue 13): `NgramRescorer` and `NeuralRescorer` sample their drafts
from their reweighted lattice distribution and return it as `q`. The proposals are checked against the formula and
against the drafts' empirical law; `generate` is checked against the base model's exact distribution (chi-square
over the first tokens); greedy drafting is unchanged.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_base
from scipy.stats import chisquare
from test_logits import context_state, random_trigram_arpa
from test_sampling import ROWS, VOCAB, chi_square_pvalue, exact_distribution, sampling_model
from test_sampling_speculative import PROMPT, SETTINGS

from hf_bpd import BPDForCausalLM
from hf_bpd.logits import Drafter, Drafts, DraftState, NeuralRescorer, NgramRescorer, TopKLattice, is_kenlm_available

needs_kenlm = pytest.mark.skipif(not is_kenlm_available(), reason="kenlm is not installed (pip install kenlm)")
LN10 = math.log(10.0)
TEMPERATURE = 0.8


@pytest.fixture(scope="module")
def model():
    return sampling_model()


@pytest.fixture(scope="module")
def arpa(tmp_path_factory):
    return random_trigram_arpa(tmp_path_factory.mktemp("ngram") / "lm.arpa", VOCAB, seed=5)


def _lm():
    """A small causal LM over the same 8 tokens, unrelated to the base model (so q differs from p)."""
    return tiny_base("llama", seed=9, vocab_size=VOCAB, eos_token_id=None, pad_token_id=0, bos_token_id=None)


def _generate(model, setting, drafter, rows=ROWS, seed=0, mode="speculative", new=3):
    kwargs = {"top_k": 0, "top_p": 1.0, **SETTINGS[setting][0]}
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


def _state(rows: int, logits: torch.Tensor, context: list[int], sampling: bool = True) -> DraftState:
    """A draft state with given head logits `(h, V)`, `rows` copies of `context`, temperature as the only warper."""
    ids = torch.tensor([context] * rows)
    warper = (lambda scores: scores / TEMPERATURE) if sampling else None
    state = DraftState(
        None,
        ids,
        torch.full((rows,), len(context)),
        torch.ones(rows, dtype=torch.bool),
        None,
        logits.shape[0],
        proposal_warper=warper,
    )
    state._logits = logits[None].expand(rows, *logits.shape)
    return state


def _expected_q(lattice_tokens, head_logprobs, lm_logprobs, alpha):
    """The documented proposal: softmax over the top-k of ((1 - alpha) head + alpha lm) / T, zeros elsewhere."""
    scores = ((1 - alpha) * head_logprobs + alpha * lm_logprobs) / TEMPERATURE
    q = torch.zeros(VOCAB)
    q[lattice_tokens] = torch.softmax(scores, -1)
    return q


def _ngram_lm(kenlm_model, context, tokens):
    import kenlm

    state, out = context_state(kenlm_model, context), kenlm.State()
    return torch.tensor([kenlm_model.BaseScore(state, str(int(t)), out) * LN10 for t in tokens])


def _neural_lm(lm, context, tokens):
    with torch.no_grad():
        return torch.log_softmax(lm(torch.tensor([context])).logits[0, -1].float(), -1)[tokens]


def _pvalue(observed: torch.Tensor, probs: torch.Tensor) -> float:
    counts = torch.bincount(observed, minlength=len(probs)).double()
    assert float(counts[probs == 0].sum()) == 0, "drew a token of probability 0"
    keep = probs > 0
    expected = probs[keep].double()
    return float(chisquare(counts[keep], expected / expected.sum() * counts.sum()).pvalue)


# ------------------------------------------------------------------------------------------ the proposals
@pytest.mark.parametrize("kind", [pytest.param("ngram", marks=needs_kenlm), "neural"])
def test_proposals_are_the_lattice_distribution_and_the_drafts_follow_them(arpa, kind):
    """q is a distribution on the lattice equal to the formula, and the drafts are drawn from it (depths 1 and 2)."""
    torch.manual_seed(0)
    rows, k, alpha, context = 6000, 4, 0.6, [3, 5, 7]
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(1)) * 1.5
    lattice = TopKLattice.from_logits(logits[None], k)
    if kind == "ngram":
        import kenlm

        rescorer = NgramRescorer(arpa, top_k=k, alpha=alpha, num_drafts=3)
        score = lambda ctx, tokens: _ngram_lm(kenlm.Model(str(arpa)), ctx, tokens)  # noqa: E731
    else:
        lm = _lm()
        rescorer = NeuralRescorer(lm, top_k=k, alpha=alpha)
        score = lambda ctx, tokens: _neural_lm(lm, ctx, tokens)  # noqa: E731
    drafts = rescorer.get_drafts(_state(rows, logits, context))
    assert isinstance(drafts, Drafts)
    tokens, q = drafts.tokens, drafts.proposals  # (rows, p, 2), (rows, p, 2, V)
    assert tokens.shape == (rows, rescorer.num_drafts, 2) and q.shape == (rows, rescorer.num_drafts, 2, VOCAB)
    assert torch.allclose(q.sum(-1), torch.ones(()), atol=1e-5) and bool((q >= 0).all())
    outside = torch.ones(2, VOCAB, dtype=torch.bool)
    outside[0, lattice.tokens[0, 0]] = outside[1, lattice.tokens[0, 1]] = False
    assert float(q[..., outside].abs().max()) == 0.0  # q = 0 outside the head's top-k
    # depth 1: the formula given the committed context, the same for every chain; the draws follow it
    q1 = _expected_q(lattice.tokens[0, 0], lattice.logprobs[0, 0], score(context, lattice.tokens[0, 0]), alpha)
    assert torch.allclose(q[:, :, 0], q1.expand_as(q[:, :, 0]), atol=1e-5)
    assert _pvalue(tokens[:, 0, 0], q1) > 1e-3
    # depth 2: the formula given the context and the chain's own first token; the joint law of (d1, d2) follows
    q2 = {}
    for t in lattice.tokens[0, 0].tolist():
        q2[t] = _expected_q(
            lattice.tokens[0, 1], lattice.logprobs[0, 1], score(context + [t], lattice.tokens[0, 1]), alpha
        )
        sel = tokens[..., 0] == t
        assert torch.allclose(q[..., 1, :][sel], q2[t].expand(int(sel.sum()), VOCAB), atol=1e-5)
    joint = torch.stack([q1[t] * q2[t] if t in q2 else torch.zeros(VOCAB) for t in range(VOCAB)]).flatten()
    assert _pvalue(tokens[:, 0, 0] * VOCAB + tokens[:, 0, 1], joint) > 1e-3
    if rescorer.num_drafts > 1:  # the chains of a row are independent: (chain 0, chain 1) first tokens ~ q1 x q1
        assert _pvalue(tokens[:, 0, 0] * VOCAB + tokens[:, 1, 0], (q1[:, None] * q1[None]).flatten()) > 1e-3


@pytest.mark.parametrize("kind", [pytest.param("ngram", marks=needs_kenlm), "neural"])
def test_greedy_drafting_is_unchanged(arpa, kind):
    """Without sampling (greedy, or bpd_sampling='match'), get_drafts is the deterministic best path(s) as before."""
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(2))
    make = {
        "ngram": lambda: NgramRescorer(arpa, top_k=4, alpha=0.6, num_drafts=3),
        "neural": lambda: NeuralRescorer(_lm(), top_k=4, alpha=0.6),
    }[kind]
    state = _state(3, logits, [3, 5, 7], sampling=False)
    drafts = make().get_drafts(state)
    assert isinstance(drafts, torch.Tensor) and not isinstance(drafts, Drafts)
    assert torch.equal(drafts, make()(state.input_ids, state.lengths, state.draft_logits().float()))


# ------------------------------------------------------------------------------------------ generate, end to end
@pytest.mark.parametrize(
    "kind, setting, num_drafts",
    [
        pytest.param("ngram", "plain", 1, marks=needs_kenlm),
        pytest.param("ngram", "temperature-topk", 3, marks=needs_kenlm),
        ("neural", "temperature-topk", 1),
        ("neural", "plain", 1),
        pytest.param("ngram", "topp-repetition", 3, marks=[needs_kenlm, pytest.mark.slow]),
        pytest.param("neural", "topp-repetition", 1, marks=pytest.mark.slow),
    ],
)
def test_rescorer_speculative_sampling_matches_base_distribution(model, arpa, kind, setting, num_drafts):
    """Many rows (different accepted lengths: holes in the generate cache and in the neural LM's cache)."""
    dist = exact_distribution(model.base, PROMPT, SETTINGS[setting][1])
    if kind == "ngram":
        drafter = NgramRescorer(arpa, top_k=4, alpha=0.5, num_drafts=num_drafts)
    else:
        drafter = NeuralRescorer(_lm(), top_k=4, alpha=0.5)
    rows = ROWS if setting != "topp-repetition" else 2000
    out = _generate(model, setting, drafter, rows=rows)
    samples = out.sequences[:, len(PROMPT) :]
    accepted = out.accepted_lengths[out.accepted_lengths >= 0]
    assert int((accepted > 0).sum()) > rows // 8  # drafts were really accepted
    assert chi_square_pvalue(samples, dist, key=lambda s: s) > 1e-3
    assert chi_square_pvalue(samples, dist, key=lambda s: s[:2]) > 1e-3


def test_neural_rescorer_batch_one_sampling(model):
    """Batch 1 across many calls (the neural cache follows the `update` feedback of sampled walks)."""
    dist = exact_distribution(model.base, PROMPT, SETTINGS["temperature-topk"][1])
    drafter = NeuralRescorer(_lm(), top_k=4, alpha=0.5)
    samples = torch.cat([_generate(model, "temperature-topk", drafter, rows=1, seed=s).sequences for s in range(300)])
    assert chi_square_pvalue(samples[:, len(PROMPT) :], dist, key=lambda s: s[:2]) > 1e-3


def test_rescorer_proposals_raise_acceptance(model):
    """Self-rescoring (the base model as LM, alpha = 1, the whole vocabulary): q = p, so speculative sampling
    accepts (nearly) every draft, while "sample, then match" accepts only when the sample hits the draft."""
    means = {}
    for mode in ("speculative", "match"):
        drafter = NeuralRescorer(model.base, top_k=VOCAB, alpha=1.0)
        out = _generate(model, "temperature-topk", drafter, rows=16, mode=mode, new=13)
        means[mode] = float(out.accepted_lengths[out.accepted_lengths >= 0].float().mean())
    assert means["speculative"] > 1.9, means
    assert means["speculative"] > means["match"] + 0.5, means


class _Recorder(Drafter):
    """Wraps a drafter: records what each step showed it and what it returned (the loop calls `update` through)."""

    def __init__(self, inner):
        self.inner, self.num_drafts, self.steps = inner, inner.num_drafts, []

    def reset(self):
        self.inner.reset()

    def update(self, accepted, chosen):
        self.inner.update(accepted, chosen)

    def get_drafts(self, state):
        drafts = self.inner.get_drafts(state)
        self.steps.append(
            (
                state.input_ids.clone(),
                state.lengths.clone(),
                state.live.clone(),
                state.draft_logits().float().clone(),
                drafts,
            )
        )
        return drafts


@pytest.mark.parametrize("kind", [pytest.param("ngram", marks=needs_kenlm), "neural"])
def test_proposals_in_generate_score_the_right_prefixes(tmp_path, kind):
    """In a padded batch whose rows accept different lengths, every returned q equals the formula with the LM run
    from scratch on the row's committed tokens plus the chain's own sampled tokens (the neural cache follows the
    loop's `update` feedback; the n-gram's state follows each chain)."""
    from conftest import PAD, batch_prompts, randomize_heads
    from conftest import VOCAB as V

    model = randomize_heads(BPDForCausalLM.from_base(tiny_base("llama"), num_draft_heads=3), seed=1)
    model.generation_config.eos_token_id = None
    k, alpha, temperature = 5, 0.6, 0.7
    if kind == "ngram":
        import kenlm

        path = random_trigram_arpa(tmp_path / "lm.arpa", V, seed=3)
        inner = NgramRescorer(path, top_k=k, alpha=alpha, num_drafts=2, pad_token_id=PAD)
        ngram = kenlm.Model(str(path))
        score = lambda ctx, tokens: _ngram_lm(ngram, ctx, tokens)  # noqa: E731
    else:
        lm = tiny_base("llama", seed=7)
        inner = NeuralRescorer(lm, top_k=k, alpha=alpha, pad_token_id=PAD)
        score = lambda ctx, tokens: _neural_lm(lm, ctx, tokens)  # noqa: E731
    recorder = _Recorder(inner)
    ids, mask = batch_prompts(3)
    torch.manual_seed(0)
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=16,
        do_sample=True,
        temperature=temperature,
        top_k=0,
        top_p=1.0,
        use_bpd=True,
        draft_rescorer=recorder,
        return_dict_in_generate=True,
    )
    assert int((out.accepted_lengths > 0).sum()) > 0
    pads = (mask == 0).sum(-1)
    checked = 0
    for input_ids, lengths, live, logits, drafts in recorder.steps:
        lattice = TopKLattice.from_logits(logits, k)
        for b in range(3):
            if not live[b]:
                continue
            committed = input_ids[b, int(pads[b]) : int(lengths[b])].tolist()
            for c in range(drafts.tokens.shape[1]):
                chain = drafts.tokens[b, c].tolist()
                for i in range(len(chain)):
                    lm_i = score(committed + chain[:i], lattice.tokens[b, i])
                    scores = ((1 - alpha) * lattice.logprobs[b, i] + alpha * lm_i) / temperature
                    want = torch.zeros(V).index_put_((lattice.tokens[b, i],), torch.softmax(scores, -1))
                    torch.testing.assert_close(drafts.proposals[b, c, i], want, rtol=1e-4, atol=1e-5)
                    checked += 1
    assert checked > 30


@needs_kenlm
def test_generate_test_rejects_a_rescorer_that_misreports_q(model, arpa, monkeypatch):
    """The end-to-end test can fail: drafts drawn with the n-gram term but reported with the heads' q alone."""
    import hf_bpd.drafters.ngram as ngram_module
    from hf_bpd.logits.lattice import lattice_proposal

    def lying(state, tokens, head, lm, alpha, vocab_size):
        token, _ = lattice_proposal(state, tokens, head, lm, alpha, vocab_size)
        return token, lattice_proposal(state, tokens, head, None, 0.0, vocab_size)[1]

    monkeypatch.setattr(ngram_module, "lattice_proposal", lying)
    dist = exact_distribution(model.base, PROMPT, SETTINGS["plain"][1])
    drafter = NgramRescorer(arpa, top_k=4, alpha=0.9, num_drafts=1)
    samples = _generate(model, "plain", drafter).sequences[:, len(PROMPT) :]
    assert chi_square_pvalue(samples, dist, key=lambda s: s) < 1e-3
