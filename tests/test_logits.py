"""Draft refinement: top-k lattice, exact p-best / n-gram search, neural rescoring with its own KV cache."""

from __future__ import annotations

import itertools
import math
import os
import random
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PAD, VOCAB, batch_prompts, randomize_heads, tiny_base

from hf_bpd import BPDForCausalLM, accepted_lengths
from hf_bpd.data import iter_documents
from hf_bpd.logits import (
    NeuralRescorer,
    NgramRescorer,
    PBestRescorer,
    TopKLattice,
    is_kenlm_available,
    ngram_pbest,
    pbest_paths,
)
from hf_bpd.logits import ngram as ngram_module
from hf_bpd.logits import ngram_build as build_ngram_module
from hf_bpd_bench.tune import tune_rescorer

H = 3
LN10 = math.log(10.0)
REPO = Path(__file__).resolve().parents[1]
needs_kenlm = pytest.mark.skipif(not is_kenlm_available(), reason="kenlm is not installed (pip install kenlm)")


def _has_lmplz() -> bool:
    try:
        build_ngram_module.find_kenlm_binary("lmplz")
        build_ngram_module.find_kenlm_binary("build_binary")
    except FileNotFoundError:
        return False
    return True


needs_lmplz = pytest.mark.skipif(
    not _has_lmplz(), reason="KenLM's lmplz/build_binary not found: run `bash scripts/build_kenlm.sh` or set KENLM_BIN"
)


# ------------------------------------------------------------------------------------------------ helpers
def write_arpa(path: Path, ngrams: dict[tuple[str, ...], tuple[float, float | None]]) -> Path:
    """Write an ARPA file from `{words: (log10 prob, log10 backoff or None)}`; adds <s>, </s>, <unk> unigrams."""
    ngrams = dict(ngrams)
    ngrams.setdefault(("<unk>",), (-3.0, None))
    ngrams.setdefault(("<s>",), (-99.0, 0.0))
    ngrams.setdefault(("</s>",), (-3.0, None))
    order = max(len(words) for words in ngrams)
    by_order = defaultdict(list)
    for words, (logp, backoff) in ngrams.items():
        by_order[len(words)].append((words, logp, backoff))
    lines = ["\\data\\"] + [f"ngram {n}={len(by_order[n])}" for n in range(1, order + 1)] + [""]
    for n in range(1, order + 1):
        lines.append(f"\\{n}-grams:")
        for words, logp, backoff in sorted(by_order[n]):
            entry = f"{logp:.6f}\t{' '.join(words)}"
            lines.append(entry + (f"\t{backoff:.6f}" if backoff is not None and n < order else ""))
        lines.append("")
    lines.append("\\end\\")
    path.write_text("\n".join(lines) + "\n")
    return path


def random_trigram_arpa(path: Path, vocab: int, seed: int) -> Path:
    """A random, consistent 3-gram ARPA over the words "0" .. "vocab - 1" (every n-gram's prefix and suffix exist)."""
    rng = random.Random(seed)
    words = [str(i) for i in range(vocab)]
    grams: dict[tuple[str, ...], tuple[float, float | None]] = {}
    for w in words:
        grams[(w,)] = (rng.uniform(-2.0, -0.5), rng.uniform(-0.6, 0.0))
    bigrams = [(a, b) for a in words for b in words if rng.random() < 0.4]
    for gram in bigrams:
        grams[gram] = (rng.uniform(-1.5, -0.05), rng.uniform(-0.6, 0.0))
    present = set(bigrams)
    for a, b in bigrams:
        for c in words:
            if (b, c) in present and rng.random() < 0.3:
                grams[(a, b, c)] = (rng.uniform(-1.0, -0.01), None)
    return write_arpa(path, grams)


def bigram_arpa_from(path: Path, sequences: list[list[int]], vocab: int = VOCAB) -> Path:
    """A bigram model that strongly predicts the transitions seen in `sequences` (MLE successor distribution)."""
    counts: dict[int, Counter] = defaultdict(Counter)
    for seq in sequences:
        for a, b in zip(seq, seq[1:]):
            counts[a][b] += 1
    grams: dict[tuple[str, ...], tuple[float, float | None]] = {}
    for w in range(vocab):
        grams[(str(w),)] = (-math.log10(vocab), -2.0 if w in counts else 0.0)
    for a, successors in counts.items():
        total = sum(successors.values())
        for b, c in successors.items():
            grams[(str(a), str(b))] = (math.log10(0.99 * c / total), None)
    return write_arpa(path, grams)


def context_state(model, context: list[int]):
    import kenlm

    state = kenlm.State()
    model.NullContextWrite(state)
    for token in context[-(model.order - 1) :] if model.order > 1 else []:
        out = kenlm.State()
        model.BaseScore(state, str(token), out)
        state = out
    return state


def brute_force_pbest(scores: torch.Tensor, p: int, ngram=None, context=None, tokens=None, alpha: float = 0.0):
    """All k**h paths of one row's lattice, scored one by one; the p best (indices, scores)."""
    import kenlm

    h, k = scores.shape
    scored = []
    for path in itertools.product(range(k), repeat=h):
        total = 0.0
        state = context_state(ngram, context) if ngram is not None else None
        for i, j in enumerate(path):
            head = float(scores[i, j])
            if ngram is None:
                total += head
                continue
            out = kenlm.State()
            total += (1 - alpha) * head + alpha * LN10 * ngram.BaseScore(state, str(int(tokens[i, j])), out)
            state = out
        scored.append((total, path))
    scored.sort(key=lambda item: -item[0])
    return [path for _, path in scored[:p]], [score for score, _ in scored[:p]]


def make_model(seed: int = 1, arch: str = "llama") -> BPDForCausalLM:
    model = BPDForCausalLM.from_base(tiny_base(arch), num_draft_heads=H)
    return randomize_heads(model, seed=seed)


def greedy(model: BPDForCausalLM, ids: torch.Tensor, mask: torch.Tensor, new: int) -> torch.Tensor:
    return model.base.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False)


def rank_two_logits(wanted: list[int], vocab: int = VOCAB, seed: int = 0) -> torch.Tensor:
    """Draft logits `(1, h, V)` where `wanted[i]` is head i's second choice (a different token is first)."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, len(wanted), vocab, generator=gen)
    for i, token in enumerate(wanted):
        wrong = 3 + (token + 7) % (vocab - 3)
        logits[0, i, wrong] = 8.0
        logits[0, i, token] = 7.0
    return logits


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread; two threads on a busy 2-core machine slow them down many times."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------ lattice
def test_lattice_from_logits_shapes_and_logprobs():
    logits = torch.randn(2, H, VOCAB)
    lattice = TopKLattice.from_logits(logits, 5)
    assert lattice.tokens.shape == lattice.logprobs.shape == (2, H, 5)
    expected = torch.log_softmax(logits, -1).topk(5, -1)
    torch.testing.assert_close(lattice.logprobs, expected.values)
    assert torch.equal(lattice.tokens, expected.indices)
    paths = torch.tensor([[[0, 1, 2]], [[4, 4, 4]]])
    assert torch.equal(lattice.path_tokens(paths)[0, 0], lattice.tokens[0, torch.arange(H), paths[0, 0]])
    torch.testing.assert_close(lattice.path_logprobs(paths)[1, 0], lattice.logprobs[1, :, 4].sum())


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("k,h,p", [(3, 3, 5), (2, 4, 16), (4, 2, 3), (3, 3, 27)])
def test_pbest_paths_equal_brute_force(seed, k, h, p):
    scores = torch.randn(2, h, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    paths, totals = pbest_paths(scores, p)
    assert paths.shape == (2, p, h)
    for b in range(2):
        want_paths, want_scores = brute_force_pbest(scores[b], p)
        assert [tuple(x) for x in paths[b].tolist()] == want_paths
        torch.testing.assert_close(totals[b], torch.tensor(want_scores, dtype=torch.float64))


def test_pbest_rescorer_drafts():
    logits = torch.randn(2, H, VOCAB)
    out = PBestRescorer(top_k=3, num_drafts=5)(torch.zeros(2, 4, dtype=torch.long), torch.tensor([4, 4]), logits)
    assert out.shape == (2, 5, H)
    lattice = TopKLattice.from_logits(logits, 3)
    assert torch.equal(out[:, 0], logits.argmax(-1))  # the best path is the argmax draft
    for b in range(2):
        want, _ = brute_force_pbest(lattice.logprobs[b].double(), 5)
        tokens = [tuple(lattice.tokens[b, torch.arange(H), torch.tensor(path)].tolist()) for path in want]
        assert [tuple(x) for x in out[b].tolist()] == tokens


# ------------------------------------------------------------------------------------------------ n-gram search
@needs_kenlm
@pytest.mark.parametrize("seed", range(5))
def test_ngram_search_equals_brute_force(tmp_path, seed):
    import kenlm

    vocab, k, p = 12, 3, 5
    model = kenlm.Model(str(random_trigram_arpa(tmp_path / "lm.arpa", vocab, seed)))
    gen = torch.Generator().manual_seed(seed)
    lattice = TopKLattice.from_logits(torch.randn(1, H, vocab, generator=gen), k)
    context = torch.randint(0, vocab, (4,), generator=gen).tolist()
    head = lattice.logprobs[0].double()
    words = [[str(t) for t in row] for row in lattice.tokens[0].tolist()]
    for alpha in (0.3, 0.8, 1.0):
        paths, scores = ngram_pbest(model, context_state(model, context), words, head.numpy(), alpha, p)
        want_paths, want_scores = brute_force_pbest(head, p, model, context, lattice.tokens[0], alpha)
        assert [tuple(x) for x in paths.tolist()] == want_paths
        np.testing.assert_allclose(scores, want_scores, rtol=1e-9, atol=1e-9)


@needs_kenlm
def test_ngram_rescorer_batch_with_padding_equals_brute_force(tmp_path):
    vocab, k, p, alpha = 12, 3, 5, 0.6
    path = random_trigram_arpa(tmp_path / "lm.arpa", vocab, seed=11)
    rescorer = NgramRescorer(path, top_k=k, alpha=alpha, num_drafts=p, vocab_size=vocab, pad_token_id=PAD)
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(3, H, vocab, generator=gen)
    ids = torch.randint(3, vocab, (3, 10), generator=gen)
    ids[1, :6] = PAD  # row 1: 6 pads, then 4 tokens
    ids[2, :8] = PAD  # row 2: a single real token before its length
    lengths = torch.tensor([10, 10, 9])
    drafts = rescorer(ids, lengths, logits)
    assert drafts.shape == (3, p, H)
    lattice = TopKLattice.from_logits(logits, k)
    for b, context in enumerate([ids[0].tolist(), ids[1, 6:].tolist(), ids[2, 8:9].tolist()]):
        want, _ = brute_force_pbest(lattice.logprobs[b].double(), p, rescorer.model, context, lattice.tokens[b], alpha)
        tokens = [tuple(lattice.tokens[b, torch.arange(H), torch.tensor(x)].tolist()) for x in want]
        assert [tuple(x) for x in drafts[b].tolist()] == tokens


@needs_kenlm
def test_ngram_alpha_zero_is_pbest(tmp_path):
    path = random_trigram_arpa(tmp_path / "lm.arpa", 12, seed=0)
    logits = torch.randn(2, H, 12)
    ids, lengths = torch.randint(3, 12, (2, 5)), torch.tensor([5, 5])
    ngram = NgramRescorer(path, top_k=3, alpha=0.0, num_drafts=4)(ids, lengths, logits)
    assert torch.equal(ngram, PBestRescorer(top_k=3, num_drafts=4)(ids, lengths, logits))


@needs_kenlm
def test_ngram_beam_size(tmp_path):
    import kenlm

    model = kenlm.Model(str(random_trigram_arpa(tmp_path / "lm.arpa", 12, seed=2)))
    lattice = TopKLattice.from_logits(torch.randn(1, 4, 12), 3)
    words = [[str(t) for t in row] for row in lattice.tokens[0].tolist()]
    head = lattice.logprobs[0].double().numpy()
    state = context_state(model, [4, 5])
    exact = ngram_pbest(model, state, words, head, 0.5, 4)
    wide = ngram_pbest(model, state, words, head, 0.5, 4, beam_size=81)  # wider than any position: still exact
    narrow = ngram_pbest(model, state, words, head, 0.5, 4, beam_size=4)
    assert np.array_equal(exact[0], wide[0]) and narrow[0].shape == (4, 4)
    assert (narrow[1] <= exact[1] + 1e-12).all()  # a pruned search never beats the exact one
    with pytest.raises(ValueError, match="beam_size"):
        NgramRescorer(model, top_k=3, alpha=0.5, num_drafts=4, beam_size=2)


def test_kenlm_is_imported_lazily():
    """No module of the package imports kenlm at import time (only inside the functions that need it)."""
    import ast

    for path in (REPO / "hf_bpd").rglob("*.py"):
        for node in ast.parse(path.read_text()).body:  # top-level statements only
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] == "kenlm" for n in names), f"{path} imports kenlm at module level"


# ------------------------------------------------------------------------------------------------ repairs
def _rank_two_setup():
    """A prompt, its base-model greedy continuation, and drafts logits with that continuation at rank 2."""
    model = make_model()
    ids, mask = batch_prompts(1)
    ref = greedy(model, ids, mask, 1 + H)  # prefill token g0, then the h tokens the drafts should propose
    committed = ref[:, : ids.shape[1] + 1]
    wanted = ref[0, ids.shape[1] + 1 :].tolist()
    return model, committed, wanted, rank_two_logits(wanted)


def _accepted(model: BPDForCausalLM, committed: torch.Tensor, drafts: torch.Tensor) -> int:
    """Drafts `(h,)` the base model accepts after `committed` `(1, T)` (one verify forward)."""
    logits = model.base(torch.cat([committed, drafts[None]], dim=1)).logits[0, committed.shape[1] - 1 :]
    return int(accepted_lengths(drafts[None], logits.argmax(-1)[None])[0])


@needs_kenlm
def test_ngram_repairs_rejected_draft(tmp_path):
    model, committed, wanted, logits = _rank_two_setup()
    path = bigram_arpa_from(tmp_path / "lm.arpa", [committed[0, -1:].tolist() + wanted])
    lengths = torch.tensor([committed.shape[1]])
    plain = NgramRescorer(path, top_k=4, alpha=0.0)(committed, lengths, logits)[0, 0]
    assert plain.tolist() != wanted and _accepted(model, committed, plain) == 0
    repaired = NgramRescorer(path, top_k=4, alpha=0.5)(committed, lengths, logits)[0, 0]
    assert repaired.tolist() == wanted and _accepted(model, committed, repaired) == H


def test_neural_repairs_rejected_draft():
    model, committed, wanted, logits = _rank_two_setup()
    lengths = torch.tensor([committed.shape[1]])
    plain = NeuralRescorer(model.base, top_k=4, alpha=0.0)(committed, lengths, logits)[0, 0]
    assert plain.tolist() != wanted and _accepted(model, committed, plain) == 0
    repaired = NeuralRescorer(model.base, top_k=4, alpha=1.0)(committed, lengths, logits)[0, 0]
    assert repaired.tolist() == wanted and _accepted(model, committed, repaired) == H


# ------------------------------------------------------------------------------------------------ generate (p = 1)
@pytest.mark.parametrize("batch", [1, 3])
def test_neural_self_rescoring_generate_lossless_and_accepts_all(batch):
    model = make_model()
    model.generation_config.eos_token_id = None
    ids, mask = batch_prompts(batch)
    ref = greedy(model, ids, mask, 25)
    rescorer = NeuralRescorer(model.base, top_k=VOCAB, alpha=1.0, pad_token_id=PAD)
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=25,
        do_sample=False,
        use_bpd=True,
        draft_rescorer=rescorer,
        return_dict_in_generate=True,
    )
    assert torch.equal(out.sequences, ref)
    # The LM is the verifier and sees the whole vocabulary: every draft is accepted (the last block may be cut).
    assert (out.accepted_lengths[:-1] == H).all()
    assert rescorer.calls == out.accepted_lengths.shape[0] and rescorer.time_s > 0
    # Its cache holds each row's committed prefix as of the last draft step, plus the accepted part of the last walk
    # (the loop's `update` feedback: the walk's tokens are the draft, `h - 1` of them are fed).
    last = out.accepted_lengths[-1]
    before_last_block = out.sequences.shape[1] - (mask == 0).sum(-1) - (last + 1)
    assert torch.equal(rescorer.cached_lengths, before_last_block + last.clamp(max=H - 1))


@needs_kenlm
@pytest.mark.parametrize("batch", [1, 3])
def test_ngram_generate_lossless_and_more_efficient(tmp_path, batch):
    model = make_model()
    ids, mask = batch_prompts(batch)
    ref = greedy(model, ids, mask, 30)
    path = bigram_arpa_from(tmp_path / "lm.arpa", [row[ids.shape[1] - 1 :].tolist() for row in ref])
    efficiency = {}
    for alpha in (0.0, 1.0):
        rescorer = NgramRescorer(path, top_k=VOCAB, alpha=alpha, vocab_size=VOCAB, pad_token_id=PAD)
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=30,
            do_sample=False,
            use_bpd=True,
            draft_rescorer=rescorer,
            return_dict_in_generate=True,
        )
        assert torch.equal(out.sequences, ref)
        efficiency[alpha] = out.block_efficiency
    assert efficiency[1.0] > efficiency[0.0] + 0.5


def test_pbest_p1_generate_equals_plain_bpd():
    model = make_model()
    ids, mask = batch_prompts(3)
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, use_bpd=True)
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=20,
        do_sample=False,
        use_bpd=True,
        draft_rescorer=PBestRescorer(top_k=4, num_drafts=1),
    )
    assert torch.equal(out, plain)


# ------------------------------------------------------------------------------------------------ generate (p > 1)
@pytest.mark.parametrize("batch", [1, 3])
def test_pbest_multi_draft_generate_lossless(batch):
    model = make_model()
    ids, mask = batch_prompts(batch)
    ref = greedy(model, ids, mask, 24)
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=24,
        do_sample=False,
        use_bpd=True,
        draft_rescorer=PBestRescorer(top_k=4, num_drafts=8),
        return_dict_in_generate=True,
    )
    assert torch.equal(out.sequences, ref)
    assert 1.0 <= out.block_efficiency <= H + 1


@needs_kenlm
@pytest.mark.parametrize("batch", [1, 3])
def test_ngram_multi_draft_generate_lossless_and_repairs(tmp_path, batch):
    model = make_model()
    ids, mask = batch_prompts(batch)
    ref = greedy(model, ids, mask, 30)
    path = bigram_arpa_from(tmp_path / "lm.arpa", [row[ids.shape[1] - 1 :].tolist() for row in ref])
    efficiency = {}
    for alpha in (0.0, 1.0):
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=30,
            do_sample=False,
            use_bpd=True,
            return_dict_in_generate=True,
            draft_rescorer=NgramRescorer(path, top_k=VOCAB, alpha=alpha, num_drafts=4, pad_token_id=PAD),
        )
        assert torch.equal(out.sequences, ref)
        efficiency[alpha] = out.block_efficiency
    assert efficiency[1.0] > efficiency[0.0] + 0.5


# ------------------------------------------------------------------------------------------------ neural KV cache
def _scratch_lm_logprobs(lm, committed: list[int], path: list[int], lattice_tokens: torch.Tensor) -> torch.Tensor:
    """LM log-probs `(h, k)` of the lattice tokens along `path`, from one full forward without any cache."""
    seq = torch.tensor([committed + path[:-1]])
    logprobs = torch.log_softmax(lm(seq).logits[0].float(), -1)
    start = len(committed) - 1
    return torch.stack([logprobs[start + i, lattice_tokens[i]] for i in range(len(path))])


def _commit(buffer, lengths, drafts, accepted, gen):
    """Write what a verify step would commit: each row's accepted drafts, then a random bonus token."""
    for b in range(buffer.shape[0]):
        n = int(accepted[b])
        if n < 0:  # a finished row commits nothing
            continue
        start = int(lengths[b])
        buffer[b, start : start + n] = drafts[b, 0, :n]
        buffer[b, start + n] = int(torch.randint(3, VOCAB, (1,), generator=gen))
    return lengths + (accepted + 1).clamp(min=0)


def test_neural_cache_batch1_follows_feedback_and_matches_full_forward():
    lm = tiny_base("llama", seed=5)
    gen = torch.Generator().manual_seed(0)
    buffer = torch.randint(3, VOCAB, (1, 60), generator=gen)
    rescorer = NeuralRescorer(lm, top_k=5, alpha=0.5)
    length = torch.tensor([8])
    # accepted drafts per step; None: no feedback (a direct call), so the walk counts as rejected
    for _step, accepted in enumerate([0, 1, H, 2, None, H, 0, 1]):
        logits = torch.randn(1, H, VOCAB, generator=gen)
        drafts = rescorer(buffer, length, logits)
        assert rescorer.cached_lengths.tolist() == length.tolist()
        assert rescorer.cache_length == int(length) + H - 1  # the walk's tokens wait for the feedback
        lattice = TopKLattice.from_logits(logits, 5)
        want = _scratch_lm_logprobs(lm, buffer[0, : int(length)].tolist(), drafts[0, 0].tolist(), lattice.tokens[0])
        torch.testing.assert_close(rescorer.last_lm_logprobs[0], want)
        if accepted is None:
            continue
        n = torch.tensor([accepted])
        rescorer.update(n, torch.zeros(1, dtype=torch.long))
        kept = min(accepted, H - 1)
        assert rescorer.cached_lengths.tolist() == [int(length) + kept]
        assert rescorer.cache_length == int(length) + kept  # batch 1: the rejected walk tokens are cropped
        length = _commit(buffer, length, drafts, n, gen)
    rescorer.reset()
    assert rescorer.cached_lengths is None and rescorer.calls == 0 and rescorer.time_s == 0.0


def test_neural_cache_batch_with_padding_matches_full_forward(arch):
    lm = tiny_base(arch, seed=6)
    gen = torch.Generator().manual_seed(1)
    ids, mask = batch_prompts(3, length=9, seed=2)
    pads = (mask == 0).sum(-1)
    buffer = torch.cat([ids, torch.randint(3, VOCAB, (3, 40), generator=gen)], dim=1)
    rescorer = NeuralRescorer(lm, top_k=4, alpha=0.7, pad_token_id=PAD)
    lengths = torch.full((3,), 9)
    # rows accept different numbers of drafts: the rejected walk tokens of one row stay as holes while another
    # row keeps more; -1 is a row that had finished
    for accepted in ([0, H, 1], [2, 0, H], [H, 1, 0], [1, 2, -1], [0, 0, -1], [H, H, -1]):
        logits = torch.randn(3, H, VOCAB, generator=gen)
        drafts = rescorer(buffer, lengths, logits)
        assert torch.equal(rescorer.cached_lengths, lengths - pads)
        lattice = TopKLattice.from_logits(logits, 4)
        for b in range(3):
            committed = buffer[b, int(pads[b]) : int(lengths[b])].tolist()
            want = _scratch_lm_logprobs(lm, committed, drafts[b, 0].tolist(), lattice.tokens[b])
            torch.testing.assert_close(rescorer.last_lm_logprobs[b], want, rtol=1e-4, atol=1e-5)
        accepted = torch.tensor(accepted)
        rescorer.update(accepted, torch.zeros(3, dtype=torch.long))
        assert torch.equal(rescorer.cached_lengths, lengths - pads + accepted.clamp(min=0, max=H - 1))
        lengths = _commit(buffer, lengths, drafts, accepted, gen)


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("alpha", [-0.1, 1.5, "0.5"])
def test_alpha_outside_unit_interval(alpha):
    with pytest.raises(ValueError, match="alpha must be a number in \\[0, 1\\]"):
        NeuralRescorer(tiny_base(), top_k=2, alpha=alpha)


@needs_kenlm
def test_ngram_alpha_outside_unit_interval(tmp_path):
    with pytest.raises(ValueError, match="alpha"):
        NgramRescorer(random_trigram_arpa(tmp_path / "lm.arpa", 5, 0), top_k=2, alpha=2.0)


def test_top_k_below_one():
    with pytest.raises(ValueError, match="top_k must be an integer >= 1"):
        PBestRescorer(top_k=0)


def test_top_k_larger_than_vocab():
    with pytest.raises(ValueError, match="larger than the vocabulary"):
        PBestRescorer(top_k=VOCAB + 1)(torch.ones(1, 3, dtype=torch.long), torch.tensor([3]), torch.randn(1, H, VOCAB))


def test_num_drafts_below_one():
    with pytest.raises(ValueError, match="num_drafts must be an integer >= 1"):
        PBestRescorer(top_k=2, num_drafts=0)


def test_num_drafts_more_than_lattice_paths():
    rescorer = PBestRescorer(top_k=2, num_drafts=9)  # 2 ** 3 = 8 paths
    with pytest.raises(ValueError, match="larger than the 8 paths"):
        rescorer(torch.ones(1, 3, dtype=torch.long), torch.tensor([3]), torch.randn(1, H, VOCAB))


def test_neural_vocab_mismatch():
    rescorer = NeuralRescorer(tiny_base(vocab_size=50), top_k=2, alpha=0.5)
    with pytest.raises(ValueError, match="must share the base model's tokenizer"):
        rescorer(torch.ones(1, 3, dtype=torch.long), torch.tensor([3]), torch.randn(1, H, VOCAB))


@needs_kenlm
def test_ngram_words_not_token_ids(tmp_path):
    grams = {("the",): (-0.5, 0.0), ("cat",): (-0.7, 0.0), ("the", "cat"): (-0.1, None)}
    path = write_arpa(tmp_path / "words.arpa", grams)
    with pytest.raises(ValueError, match="not token ids"):
        NgramRescorer(path, top_k=2, alpha=0.5)


@needs_kenlm
def test_ngram_ids_outside_vocab(tmp_path):
    path = random_trigram_arpa(tmp_path / "lm.arpa", 30, seed=0)
    with pytest.raises(ValueError, match="has token id 29 but the model's vocabulary has 20 tokens"):
        NgramRescorer(path, top_k=2, alpha=0.5, vocab_size=20)
    rescorer = NgramRescorer(path, top_k=2, alpha=0.5)  # no vocab_size: checked at the first call
    with pytest.raises(ValueError, match="another tokenizer"):
        rescorer(torch.ones(1, 3, dtype=torch.long), torch.tensor([3]), torch.randn(1, H, 20))


@needs_kenlm
def test_ngram_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.arpa"):
        NgramRescorer(tmp_path / "missing.arpa", top_k=2, alpha=0.5)


@needs_kenlm
def test_ngram_corrupt_file(tmp_path):
    path = tmp_path / "corrupt.bin"
    path.write_bytes(os.urandom(2048))
    with pytest.raises(ValueError, match="corrupt.bin"):
        NgramRescorer(path, top_k=2, alpha=0.5)


def test_kenlm_missing_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(ngram_module, "is_kenlm_available", lambda: False)
    with pytest.raises(ImportError, match="pip install kenlm"):
        NgramRescorer(tmp_path / "any.arpa", top_k=2, alpha=0.5)


def test_lmplz_missing_says_how_to_build(monkeypatch, tmp_path):
    monkeypatch.setattr(build_ngram_module, "_DEFAULT_BIN", tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("KENLM_BIN", raising=False)
    with pytest.raises(FileNotFoundError, match="scripts/build_kenlm.sh"):
        build_ngram_module.find_kenlm_binary("lmplz")


# ------------------------------------------------------------------------------------------------ statistics
def test_statistics_reset_by_generate():
    model = make_model()
    ids, mask = batch_prompts(1)
    rescorer = PBestRescorer(top_k=3)
    for _ in range(2):  # generate resets the statistics: the second run does not add to the first
        out = model.generate(
            ids, max_new_tokens=12, use_bpd=True, draft_rescorer=rescorer, return_dict_in_generate=True
        )
        assert rescorer.calls == out.accepted_lengths.shape[0]
        assert 0 < rescorer.time_s <= out.draft_time_s
    assert rescorer.ms_per_call > 0


# ------------------------------------------------------------------------------------------------ tuning
@needs_kenlm
def test_tune_rescorer_picks_the_helpful_alpha(tmp_path):
    model = make_model()
    model.generation_config.eos_token_id = None
    prompts = [batch_prompts(1, seed=s)[0][0] for s in (4, 5)]
    continuations = [greedy(model, p[None], torch.ones_like(p[None]), 20)[0, len(p) - 1 :].tolist() for p in prompts]
    path = bigram_arpa_from(tmp_path / "lm.arpa", continuations)
    result = tune_rescorer(
        model,
        lambda **c: NgramRescorer(path, **c),
        prompts,
        alphas=[0.0, 1.0],
        top_ks=[VOCAB],
        num_drafts_list=[1],
        max_new_tokens=20,
    )
    assert [row["alpha"] for row in result.table] == [None, 0.0, 1.0]
    assert result.table[0]["baseline"] and result.best["alpha"] == 1.0
    assert result.best["block_efficiency"] > result.table[1]["block_efficiency"]
    assert result.table[1]["block_efficiency"] == pytest.approx(result.table[0]["block_efficiency"])
    assert "| alpha |" in result.to_markdown()


def test_tune_rescorer_skips_impossible_configs():
    model = make_model()
    prompts = [batch_prompts(1)[0][0]]
    result = tune_rescorer(
        model,
        lambda alpha, top_k, num_drafts: PBestRescorer(top_k=top_k, num_drafts=num_drafts),
        prompts,
        alphas=[0.0],
        top_ks=[1, 2],
        num_drafts_list=[1, 2],
        max_new_tokens=6,
        include_baseline=False,
    )
    errors = {(row["top_k"], row["num_drafts"]): row["error"] for row in result.table}
    assert errors[(1, 2)].startswith("skipped") and errors[(1, 1)] is None


def test_tune_cli_smoke(tmp_path, capsys):
    from hf_bpd_bench import tune as tuning

    model = BPDForCausalLM.from_base(tiny_base(vocab_size=8192), num_draft_heads=H)
    model.save_pretrained(tmp_path / "bpd", save_base=True)
    tuning.main(
        [
            "--model",
            str(tmp_path / "bpd"),
            "--tokenizer",
            str(REPO / "reference/tokenizer"),
            "--rescorer",
            "pbest",
            "--prompts",
            str(REPO / "reference/prompts/validation.jsonl"),
            "--max-prompts",
            "2",
            "--alphas",
            "0",
            "--top-ks",
            "2",
            "--max-new-tokens",
            "6",
            "--max-prompt-tokens",
            "48",
            "--output",
            str(tmp_path / "tune.json"),
        ]
    )
    assert "best:" in capsys.readouterr().out
    assert (tmp_path / "tune.json").is_file()


# ------------------------------------------------------------------------------------------------ building n-grams
def test_iter_documents(tmp_path):
    (tmp_path / "a.txt").write_text("line one\n\nline two\n")
    (tmp_path / "b.jsonl").write_text('{"text": "doc"}\n{"text": ""}\n')
    (tmp_path / "c.jsonl").write_text('{"body": "doc"}\n')
    docs = list(iter_documents([tmp_path / "a.txt", tmp_path / "b.jsonl"]))
    assert docs == ["line one\n\nline two\n", "doc"]
    by_line = iter_documents([tmp_path / "a.txt"], line_per_document=True)
    assert list(by_line) == ["line one", "line two"]
    with pytest.raises(ValueError, match="Text column 'text' not found .*c.jsonl"):
        list(iter_documents([tmp_path / "c.jsonl"]))
    with pytest.raises(FileNotFoundError, match="nothere.txt"):
        list(iter_documents([tmp_path / "nothere.txt"]))


@needs_lmplz
@needs_kenlm
def test_build_ngram_binary_and_arpa(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(REPO / "reference/tokenizer")
    corpus = tmp_path / "corpus.jsonl"
    texts = ["the cat sat on the mat", "the dog sat on the log", "a cat and a dog"] * 20
    corpus.write_text("".join(f'{{"text": "{t}"}}\n' for t in texts))
    binary = build_ngram_module.build_ngram([corpus], tokenizer, tmp_path / "lm.bin", order=3)
    arpa = build_ngram_module.build_ngram([corpus], tokenizer, tmp_path / "lm.arpa", order=3, prune=[0, 1])
    ids = tokenizer(texts[0], add_special_tokens=False)["input_ids"]
    largest = max(max(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    for path in (binary, arpa):
        rescorer = NgramRescorer(path, top_k=2, alpha=0.5, vocab_size=len(tokenizer))
        assert rescorer.order == 3 and all(str(i) in rescorer.model for i in ids)
        seen = rescorer.model.score(" ".join(map(str, ids)), bos=True, eos=True)
        unseen = rescorer.model.score(" ".join(map(str, reversed(ids))), bos=True, eos=True)
        assert seen > unseen
    with pytest.raises(ValueError, match="another tokenizer"):
        NgramRescorer(binary, top_k=2, alpha=0.5, vocab_size=largest)  # probing a binary's vocabulary


@needs_lmplz
def test_build_ngram_cli(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("to be or not to be\nthat is the question\n")
    build_ngram_module.main(
        [
            str(corpus),
            "--tokenizer",
            str(REPO / "reference/tokenizer"),
            "--output",
            str(tmp_path / "lm.arpa"),
            "--order",
            "2",
            "--line-per-document",
        ]
    )
    assert (tmp_path / "lm.arpa").read_text().startswith("\\data\\")
