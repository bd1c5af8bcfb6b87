"""Draft trees (issue 11): lossless with static and dynamic trees, oracle trees accept everything, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ARCHS, PAD, batch_prompts, randomize_heads, tiny_base
from test_sampling import NEW, ROWS, chi_square_pvalue, exact_distribution, sampling_model

from hf_bpd import BPDConfig, BPDForCausalLM
from hf_bpd.drafters.tree import expected_accepted_length, grow_tree
from hf_bpd.logits import DynamicTreeDrafter, OracleDrafter, StaticTreeDrafter, build_static_tree
from hf_bpd.tree import DraftTree, tree_from_parents
from hf_bpd_bench.tree_tune import calibrate_draft_tree, heads_fingerprint, load_tree_file

H = 3
VOCAB_TINY = 97  # conftest.VOCAB: the n-gram tree test considers every token
STATIC = [[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 1, 0], [1, 0, 0]]


def make(arch: str = "llama", heads: str = "random") -> BPDForCausalLM:
    model = BPDForCausalLM.from_base(tiny_base(arch), num_draft_heads=H)
    return randomize_heads(model) if heads == "random" else model


def drafter(kind: str):
    if kind == "static":
        return StaticTreeDrafter(STATIC)
    if kind == "dynamic":
        return DynamicTreeDrafter(10, top_k=4)
    return DynamicTreeDrafter(10, top_k=4, min_confidence=0.02)  # adaptive: often fewer nodes


class OracleTree(OracleDrafter):
    """
    A random tree (parents drawn per step) with random sibling-distinct tokens, where the reference continuation is
    hidden on one path that is not the first; with `corrupt_at`, that path's token at that depth is wrong.
    """

    def __init__(self, reference, corrupt_at=None, seed=0):
        super().__init__(reference, PAD)
        self.corrupt_at = corrupt_at
        self.gen = torch.Generator().manual_seed(seed)

    def get_drafts(self, state):
        want = self.continuation(state.lengths, state.num_heads)  # (B, h)
        batch, vocab = want.shape[0], state.vocab_size
        parents = [-1, 0, 0]  # two depth-1 nodes; the oracle goes down the second
        chain = [2]
        for _depth in range(1, state.num_heads):
            parents.append(chain[-1])  # the oracle's next node
            chain.append(len(parents) - 1)
            parents.append(int(torch.randint(0, len(parents) - 1, (1,), generator=self.gen)))  # a random extra node
        layout = tree_from_parents(tuple(parents))
        tokens = torch.randint(3, vocab, (batch, layout.width - 1), generator=self.gen)
        oracle = want.clone()
        if self.corrupt_at is not None:
            oracle[:, self.corrupt_at] = (oracle[:, self.corrupt_at] + 1) % vocab
        for depth, node in enumerate(chain):
            tokens[:, node - 1] = oracle[:, depth]
        for w in range(1, layout.width):  # siblings of an oracle node must differ from it (distinct sibling tokens)
            for node in chain:
                if w != node and parents[w] == parents[node]:
                    clash = tokens[:, w - 1] == tokens[:, node - 1]
                    tokens[clash, w - 1] = (tokens[clash, w - 1] + 1 - 3) % (vocab - 3) + 3
        return DraftTree(tokens=tokens, layout=layout)


# ------------------------------------------------------------------------------------------------ lossless
@pytest.mark.parametrize("kind", ["static", "dynamic", "adaptive"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("arch", ARCHS)
def test_tree_random_heads_equals_base(arch, batch, kind):
    model = make(arch)
    ids, mask = batch_prompts(batch)
    ref = model.base.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False)
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=24,
        do_sample=False,
        use_bpd=True,
        draft_rescorer=drafter(kind),
        return_dict_in_generate=True,
    )
    assert torch.equal(out.sequences, ref)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("arch", ARCHS)
def test_tree_oracle_path_accepts_everything(arch, batch):
    model = make(arch)
    model.generation_config.eos_token_id = None
    ids, mask = batch_prompts(batch)
    blocks = 5
    new = 1 + blocks * (H + 1)
    ref = model.base.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False)
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=new,
        do_sample=False,
        use_bpd=True,
        draft_rescorer=OracleTree(ref),
        return_dict_in_generate=True,
    )
    assert torch.equal(out.sequences, ref)
    assert (out.accepted_lengths == H).all()  # the oracle path is found in the tree and its cache kept
    assert out.num_serial_calls == 1 + blocks


@pytest.mark.parametrize("batch", [1, 3])
def test_tree_partial_oracle_stays_lossless(batch):
    model = make("qwen2")
    ids, mask = batch_prompts(batch, seed=7)
    ref = model.base.generate(ids, attention_mask=mask, max_new_tokens=22, do_sample=False)
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=22,
        do_sample=False,
        use_bpd=True,
        draft_rescorer=OracleTree(ref, corrupt_at=1),
        return_dict_in_generate=True,
    )
    assert torch.equal(out.sequences, ref)
    live = out.accepted_lengths[:-1] >= 0
    assert (out.accepted_lengths[:-1][live] >= 1).all()


class LatticeOracle(DynamicTreeDrafter):
    """The real dynamic tree over head logits rigged so that the reference token is every head's rank-1 token."""

    def __init__(self, reference, **kwargs):
        super().__init__(**kwargs)
        self.oracle = OracleDrafter(reference, PAD)

    def get_drafts(self, state):
        want = self.oracle.continuation(state.lengths, state.num_heads)
        logits = torch.randn(state.batch_size, state.num_heads, state.vocab_size)
        logits.scatter_(-1, torch.randint(3, state.vocab_size, want[..., None].shape), 9.0)  # rank 0 (or `want`)
        logits.scatter_(-1, want[..., None], 8.0)  # rank 1 unless it is also the rank-0 token
        state._logits = logits
        return super().get_drafts(state)


@pytest.mark.parametrize("batch", [1, 3])
def test_dynamic_tree_finds_the_rank_one_path(batch):
    """The dynamic tree's own construction: the full binary lattice (2 + 4 + 8 nodes) holds the oracle path."""
    model = make("mistral")
    model.generation_config.eos_token_id = None
    ids, mask = batch_prompts(batch)
    new = 1 + 4 * (H + 1)
    ref = model.base.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False)
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=new,
        do_sample=False,
        use_bpd=True,
        draft_rescorer=LatticeOracle(ref, num_nodes=14, top_k=2),
        return_dict_in_generate=True,
    )
    assert torch.equal(out.sequences, ref)
    assert (out.accepted_lengths == H).all()


@pytest.mark.parametrize("new", [1, 2, 5, 7])
def test_tree_max_new_tokens_exact_and_eos(new):
    """Near max_length the loop cuts the tree to the tokens a row may still commit; EOS stops rows mid-block."""
    model = make("gpt2")
    ids, mask = batch_prompts(2, seed=3)
    ref = model.base.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False)
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=new, do_sample=False, use_bpd=True, draft_rescorer=OracleTree(ref)
    )
    assert torch.equal(out, ref)
    free = model.base.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    eos = int(free[0, ids.shape[1] + 5])
    ref = model.base.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, eos_token_id=eos)
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=20,
        do_sample=False,
        eos_token_id=eos,
        use_bpd=True,
        draft_rescorer=StaticTreeDrafter(STATIC),
    )
    assert torch.equal(out, ref)


def test_tree_with_input_dependent_processors():
    """Processors that read input_ids see each tree node's own path as its prefix."""
    model = make("llama")
    ids, mask = batch_prompts(2, seed=2)
    kwargs = dict(
        attention_mask=mask, max_new_tokens=16, do_sample=False, repetition_penalty=1.4, no_repeat_ngram_size=2
    )
    ref = model.base.generate(ids, **kwargs)
    assert torch.equal(model.generate(ids, use_bpd=True, draft_rescorer=OracleTree(ref), **kwargs), ref)
    assert torch.equal(model.generate(ids, use_bpd=True, draft_rescorer=drafter("dynamic"), **kwargs), ref)


@pytest.mark.parametrize(
    "mode, drafter",
    [
        ("match", lambda: StaticTreeDrafter([[0], [1], [2], [0, 0], [0, 1], [1, 0]])),
        ("speculative", lambda: StaticTreeDrafter([[0], [1], [2], [0, 0], [0, 1], [1, 0]])),
        ("speculative", lambda: DynamicTreeDrafter(6, top_k=3)),
    ],
)
def test_tree_sampling_matches_base_distribution(mode, drafter):
    """
    "match": sample, then match at every node (a node's sample follows at most one child). "speculative": the tree
    filled with tokens sampled from the heads (siblings without replacement), multi-draft rejection sampling. Both
    exact (chi-square over the first 3 tokens, a batch of rows with different accepted lengths).
    """
    model = sampling_model()
    prompt = [3, 5, 7]
    dist = exact_distribution(model.base, prompt)
    ids = torch.tensor([prompt] * ROWS)
    torch.manual_seed(0)
    out = model.generate(
        ids,
        max_new_tokens=NEW,
        do_sample=True,
        temperature=0.8,
        top_k=5,
        top_p=1.0,
        use_bpd=True,
        bpd_sampling=mode,
        draft_rescorer=drafter(),
        return_dict_in_generate=True,
    )
    samples = out.sequences[:, len(prompt) :]
    assert int((out.accepted_lengths > 0).sum()) > 500  # drafts really accepted, on several branches
    assert chi_square_pvalue(samples, dist, key=lambda s: s) > 1e-3
    assert chi_square_pvalue(samples, dist, key=lambda s: s[2]) > 1e-3


def test_sampled_tree_drafts_carry_their_proposals():
    """Siblings are drawn without replacement: distinct tokens, each proposal the head's without earlier siblings."""
    from hf_bpd.drafters.tree import sample_tree

    torch.manual_seed(1)
    probs = torch.softmax(torch.randn(3, 2, 8), dim=-1)
    probs[0, 0, 4:] = 0  # row 0, depth 1: 4 tokens in the support, 5 children: the last one is a one-hot
    probs[0, 0] /= probs[0, 0].sum()
    layout = tree_from_parents((-1, 0, 0, 0, 0, 0, 1, 1))
    tree = sample_tree(probs, layout)
    assert tree.tokens.shape == (3, 7) and tree.proposals.shape == (3, 7, 8)
    assert torch.allclose(tree.proposals.sum(-1), torch.ones(3, 7))
    for b in range(3):
        first = tree.tokens[b, :4].tolist()
        assert len(set(first)) == 4  # without replacement
        q = probs[b, 0].clone()
        for w in range(4):
            assert torch.allclose(tree.proposals[b, w], q / q.sum())
            q[tree.tokens[b, w]] = 0
        assert torch.allclose(tree.proposals[b, 5], probs[b, 1]) and tree.tokens[b, 5] != tree.tokens[b, 6]
    assert tree.proposals[0, 4].max() == 1 and tree.tokens[0, 4] == probs[0, 0].argmax()


def test_tree_sampling_test_rejects_an_always_accepting_sampler(monkeypatch):
    """The chi-square test above can fail: accepting every sampled tree draft whose p > 0 is caught."""
    import hf_bpd.sampling as sampling

    monkeypatch.setattr(sampling, "_uniform", lambda shape, device: torch.zeros(shape, device=device))
    model = sampling_model()
    prompt = [3, 5, 7]
    dist = exact_distribution(model.base, prompt)
    torch.manual_seed(0)
    out = model.generate(
        torch.tensor([prompt] * ROWS),
        max_new_tokens=NEW,
        do_sample=True,
        temperature=0.8,
        top_k=5,
        top_p=1.0,
        use_bpd=True,
        draft_rescorer=DynamicTreeDrafter(6, top_k=3),
    )
    assert chi_square_pvalue(out[:, len(prompt) :], dist, key=lambda s: s) < 1e-3


# ------------------------------------------------------------------------------------------------ tree construction
def test_grow_tree_takes_the_most_confident_nodes():
    # one row, 2 heads, k = 2: depth 1 probs (0.6, 0.3), depth 2 probs (0.5, 0.4)
    logprobs = torch.tensor([[[0.6, 0.3], [0.5, 0.4]]]).log()
    tokens = torch.tensor([[[10, 11], [20, 21]]])
    parents, node_tokens = grow_tree(logprobs, tokens, torch.tensor([True]), num_nodes=4)
    # worth: (0)=.6, (0,0)=.3, (1)=.3, (0,1)=.24, (1,0)=.15 -> the 4 best, by depth then worth
    assert parents == (-1, 0, 0, 1, 1)
    assert node_tokens.tolist() == [[10, 11, 20, 21]]
    parents, _ = grow_tree(logprobs, tokens, torch.tensor([True]), num_nodes=4, log_min=torch.tensor(0.28).log())
    assert parents == (-1, 0, 0, 1)  # adaptive: (0, 1) at 0.24 is below the threshold


def test_grow_tree_batch_shares_a_shape_by_mean_confidence():
    logprobs = torch.tensor([[[0.9, 0.1]], [[0.2, 0.8]], [[0.99, 0.01]]]).log()
    tokens = torch.tensor([[[5, 6]], [[7, 8]], [[9, 4]]])
    live = torch.tensor([True, True, False])  # the finished row does not count
    parents, node_tokens = grow_tree(logprobs, tokens, live, num_nodes=1)
    assert parents == (-1, 0) and node_tokens.tolist() == [[5], [7], [9]]  # mean .55 vs .45: rank 0


def test_grow_tree_full_path_reserves_the_deepest_best_path():
    # depth 1 probs (0.5, 0.45, 0.05), depths 2-3 (0.3, 0.3, 0.3): best-first 3 nodes = two roots + one child
    logprobs = torch.tensor([[[0.5, 0.45, 0.05], [0.3, 0.3, 0.3], [0.3, 0.3, 0.3]]]).log()
    tokens = torch.arange(9).view(1, 3, 3)
    parents, _ = grow_tree(logprobs, tokens, torch.tensor([True]), num_nodes=3)
    assert parents == (-1, 0, 0, 1)
    parents, node_tokens = grow_tree(logprobs, tokens, torch.tensor([True]), num_nodes=4, full_path=True)
    assert parents == (-1, 0, 0, 1, 3) and node_tokens.tolist() == [[0, 1, 3, 6]]  # (0, 0, 0) + the next best (1)
    parents, _ = grow_tree(logprobs, tokens, torch.tensor([True]), num_nodes=2, full_path=True)
    assert parents == (-1, 0, 1)  # a budget below the depth keeps the path's top


def test_confidence_calibration_fit_and_use():
    from hf_bpd.drafters.tree import CALIBRATION_EDGES, ConfidenceCalibration

    torch.manual_seed(0)
    score = -torch.rand(4000) * 7
    hits = torch.rand(4000) < score.exp() * 0.8  # a calibrated rate 0.8 * p
    calib = ConfidenceCalibration.fit([score, score], [hits, torch.zeros(4000, dtype=torch.bool)])
    assert calib.rates.shape == (2, len(CALIBRATION_EDGES) + 1)
    assert bool((calib.rates.diff(dim=1) >= 0).all()) and bool((calib.rates > 0).all())  # monotone, never 0
    assert float(calib.rates[0, -1]) > 0.5 and float(calib.rates[1].max()) < 0.01
    out = calib.log_confidence(0, torch.tensor([-0.1, -3.5, -9.0]))
    assert bool((out <= 0).all()) and out[0] > out[1] > out[2]
    assert ConfidenceCalibration.from_dict(calib.to_dict()).rates.equal(calib.rates)
    with pytest.raises(ValueError, match="one rate per depth and score bin"):
        ConfidenceCalibration([[0.5, 0.6]])
    with pytest.raises(ValueError, match="rates must lie in"):
        ConfidenceCalibration([[0.0] * (len(CALIBRATION_EDGES) + 1)])
    with pytest.raises(ValueError, match="calibration must be a ConfidenceCalibration"):
        DynamicTreeDrafter(4, calibration=[[0.5]])


@pytest.mark.parametrize("batch", [1, 3])
def test_calibrated_dynamic_tree_stays_lossless(batch):
    from hf_bpd_bench.tree_tune import calibrate_confidence

    model = make("llama")
    ids, mask = batch_prompts(batch, seed=2)
    calib = calibrate_confidence(
        model, [row[None] for row in batch_prompts(2, seed=1)[0][:, 5:]], top_k=3, max_new_tokens=12
    )
    assert calib.num_heads == H
    drafter = DynamicTreeDrafter(8, top_k=3, calibration=calib.to_dict(), full_path=True)
    ref = model.base.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=16, do_sample=False, use_bpd=True, draft_rescorer=drafter
    )
    assert torch.equal(out, ref)
    short = BPDForCausalLM.from_base(tiny_base("llama"), num_draft_heads=H + 1)
    with pytest.raises(ValueError, match="calibration covers 3 depths but the model has 4"):
        short.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=4,
            do_sample=False,
            use_bpd=True,
            draft_rescorer=DynamicTreeDrafter(8, top_k=3, calibration=calib),
        )


def test_build_static_tree_is_medusas_greedy_construction():
    accuracy = [[0.5, 0.2], [0.4, 0.1]]
    tree = build_static_tree(accuracy, 4)
    assert tree == [[0], [0, 0], [1], [1, 0]]  # worth .5, .2, .2, .08 (ties: the smaller path); (0, 1) = .05
    assert expected_accepted_length(tree, accuracy) == pytest.approx(0.5 + 0.2 + 0.2 + 0.08)
    assert build_static_tree(accuracy, 100) == build_static_tree(accuracy, 6)  # the whole lattice: 2 + 4 nodes


# ------------------------------------------------------------------------------------------------ saved trees
def test_draft_tree_saved_with_the_heads(tmp_path):
    model = make("llama")
    model.config.draft_tree = STATIC
    model.save_pretrained(tmp_path / "heads", save_base=True)
    loaded = BPDForCausalLM.from_pretrained(tmp_path / "heads")
    assert loaded.config.draft_tree == STATIC
    ids, mask = batch_prompts(2)
    ref = loaded.base.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    out = loaded.generate(
        ids, attention_mask=mask, max_new_tokens=12, do_sample=False, use_bpd=True, draft_rescorer=StaticTreeDrafter()
    )  # the checkpoint's own tree
    assert torch.equal(out, ref)


def test_calibrate_and_load_tree_file(tmp_path):
    model = make("llama")
    ids, _ = batch_prompts(3, seed=1)
    prompts = [row[None] for row in ids[:, 5:]]
    result = calibrate_draft_tree(model, prompts, num_nodes=[4, 6], top_k=3, max_new_tokens=12)
    assert len(result.draft_tree) in (4, 6) and {r["num_nodes"] for r in result.budgets} == {4, 6}
    assert torch.tensor(result.accuracy).shape == (H, 3)
    result.save(tmp_path / "tree.json")
    assert load_tree_file(tmp_path / "tree.json", model) == result.draft_tree
    BPDConfig(num_draft_heads=H, draft_tree=result.draft_tree)  # a valid config field
    other = randomize_heads(make("llama"), seed=7)
    assert heads_fingerprint(other) != heads_fingerprint(model)
    with pytest.raises(ValueError, match="calibrated for other heads"):
        load_tree_file(tmp_path / "tree.json", other)
    fewer = BPDForCausalLM.from_base(tiny_base("llama"), num_draft_heads=2)
    with pytest.raises(ValueError, match="calibrated for 3 draft heads, the model has 2"):
        load_tree_file(tmp_path / "tree.json", fewer)
    (tmp_path / "bad.json").write_text(json.dumps({"draft_tree": [[0]]}))
    with pytest.raises(ValueError, match="not a draft tree file"):
        load_tree_file(tmp_path / "bad.json")


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "tree, match",
    [
        ([[0], [0, 1], [0, 1, 0], [0, 1, 0, 0]], "4 tokens deep but the model has 3 draft heads"),
        ([[0, 1]], "no parent: its prefix \\[0\\] is missing"),
        ([[0], [0]], "appears twice"),
        ([[0], [-1]], "integers >= 0"),
        ([], "non-empty list"),
    ],
)
def test_bad_static_trees(tree, match):
    with pytest.raises(ValueError, match=match):
        BPDConfig(num_draft_heads=H, draft_tree=tree)
    if tree and "deep" not in match:
        with pytest.raises(ValueError, match=match):
            StaticTreeDrafter(tree)


def test_static_tree_deeper_than_the_heads_fails_at_generate():
    model = make("llama")
    ids, _ = batch_prompts(1)
    with pytest.raises(ValueError, match="4 tokens deep but the model has 3 draft heads"):
        model.generate(
            ids,
            max_new_tokens=8,
            use_bpd=True,
            draft_rescorer=StaticTreeDrafter([[0], [0, 0], [0, 0, 0], [0, 0, 0, 0]]),
        )
    with pytest.raises(ValueError, match="config.draft_tree.*not set.*hf-bpd tune --tree"):
        model.generate(ids, max_new_tokens=8, use_bpd=True, draft_rescorer=StaticTreeDrafter())


@pytest.mark.parametrize("num_nodes", [0, -3, 2.5, True])
def test_node_budget_below_one(num_nodes):
    with pytest.raises(ValueError, match="num_nodes must be an integer >= 1"):
        DynamicTreeDrafter(num_nodes)


def test_node_budget_beyond_the_position_limit():
    model = make("gpt2")  # n_positions = 256
    ids, _ = batch_prompts(1)
    with pytest.raises(ValueError, match="num_nodes=300 needs a verify block of 301 tokens.*position limit \\(256\\)"):
        model.generate(ids, max_new_tokens=8, use_bpd=True, draft_rescorer=DynamicTreeDrafter(300))
    with pytest.raises(ValueError, match="min_confidence"):
        DynamicTreeDrafter(8, min_confidence=1.0)


def test_tree_refuses_compare_unrefined():
    model = make("llama")
    ids, _ = batch_prompts(1)
    with pytest.raises(ValueError, match="compare_unrefined"):
        model.generate(
            ids, max_new_tokens=8, use_bpd=True, draft_rescorer=StaticTreeDrafter(STATIC), compare_unrefined=True
        )


@pytest.mark.parametrize("batch", [1, 3])
def test_ngram_tree_is_lossless_and_follows_the_ngram(tmp_path, batch):
    """An n-gram that knows the reference continuation pulls the dynamic tree onto it (and the output is unchanged)."""
    from test_logits import bigram_arpa_from, needs_kenlm

    if needs_kenlm.args[0]:
        pytest.skip("kenlm is not installed")
    model = make("llama")
    model.generation_config.eos_token_id = None
    ids, mask = batch_prompts(batch)
    ref = model.base.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    arpa = bigram_arpa_from(tmp_path / "bigram.arpa", ref.tolist())
    kwargs = dict(attention_mask=mask, max_new_tokens=20, do_sample=False, use_bpd=True, return_dict_in_generate=True)
    heads = model.generate(ids, draft_rescorer=DynamicTreeDrafter(40, top_k=VOCAB_TINY), **kwargs)
    tree = DynamicTreeDrafter(40, top_k=VOCAB_TINY, ngram=str(arpa), alpha=0.9, pad_token_id=PAD)
    out = model.generate(ids, draft_rescorer=tree, **kwargs)
    assert torch.equal(heads.sequences, ref) and torch.equal(out.sequences, ref)
    assert out.block_efficiency > heads.block_efficiency


# ------------------------------------------------------------------------------------------------ CLI
@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--tree-nodes", "0", "integer >= 1"),
        ("--tree-nodes", "-3", "integer >= 1"),
        ("--tree-nodes", "2.5", "integer"),
        ("--tree-min-confidence", "1", "[0, 1)"),
        ("--tree-min-confidence", "-0.1", "[0, 1)"),
        ("--tree-min-confidence", "nan", "[0, 1)"),
        ("--tree-min-confidence", "high", "[0, 1)"),
    ],
)
def test_cli_bench_tree_flags_reject_nonsense_before_loading(flag, value, message, capsys, monkeypatch):
    import hf_bpd_bench.cli as cli

    monkeypatch.setattr(cli, "_load_resources", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "--model", "/nonexistent", "--methods", "bpd-tree", flag, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and message in err


def test_cli_bench_tree_flags_reach_the_bench_config(monkeypatch):
    import types

    import hf_bpd.data
    import hf_bpd_bench.bench as bench
    import hf_bpd_bench.cli as cli

    seen = {}

    class Stop(Exception):
        pass

    def fake_benchmark(res, prompts, methods, cfg, progress=True):
        seen["cfg"], seen["methods"] = cfg, methods
        raise Stop

    monkeypatch.setattr(cli, "_resolve_defaults", lambda args, fill, required: seen.update(ngram="ngram_path" in fill))
    monkeypatch.setattr(
        cli,
        "_load_resources",
        lambda *a, **k: types.SimpleNamespace(tokenizer=None, model=types.SimpleNamespace(dtype=torch.float32)),
    )
    monkeypatch.setattr(hf_bpd.data, "load_prompts", lambda *a, **k: [])
    monkeypatch.setattr(bench, "benchmark", fake_benchmark)
    argv = [
        "bench",
        "--model",
        "m",
        "--prompts",
        "p",
        "--methods",
        "bpd-tree-ngram",
        "--top-k",
        "8",
        "--num-drafts",
        "4",
        "--alpha-ngram",
        "0.5",
        "--alpha-neural",
        "0.5",
    ]
    with pytest.raises(Stop):
        cli.main(argv + ["--tree-nodes", "32", "--tree-min-confidence", "0.05"])
    assert (seen["cfg"].tree_nodes, seen["cfg"].tree_min_confidence) == (32, 0.05)
    assert seen["ngram"]  # bpd-tree-ngram resolves the stack's n-gram
    with pytest.raises(Stop):
        cli.main(argv)
    assert (seen["cfg"].tree_nodes, seen["cfg"].tree_min_confidence) == (16, 0.0)
