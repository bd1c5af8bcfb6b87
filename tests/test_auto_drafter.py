"""The composed default drafter (`"auto"`: heads tree + prompt lookup + width from cost) and prompt lookup through
the registry: lossless against the base model's greedy generate on every test architecture, batch 1 and 3, a prompt
token equal to the pad id; cost curves that force a plain greedy step and the full tree; drafts deeper than `h`;
exact sampling through the fixed-shape fallback; calibration and spec errors."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, PAD, batch_prompts, randomize_heads, tiny_base
from test_sampling import chi_square_pvalue, exact_distribution, sampling_model

from hf_bpd import BPDForCausalLM
from hf_bpd.drafters import AutoDrafter, ConfidenceCalibration, ContextNgramDrafter, MatchCalibration, build_drafter
from hf_bpd.drafters.calibration import CALIBRATION_EDGES

H = 3
FLAT = lambda width: 1.0  # noqa: E731  (every width costs the same: verify every node with a chance)
STEEP = lambda width: float(width) ** 3  # noqa: E731  (any draft node costs more than it can return)


def make(arch: str) -> BPDForCausalLM:
    return randomize_heads(BPDForCausalLM.from_base(tiny_base(arch), num_draft_heads=H))


def calibration() -> dict:
    rates = [[0.2 + 0.05 * b for b in range(len(CALIBRATION_EDGES) + 1)] for _ in range(H)]
    return ConfidenceCalibration(rates).to_dict()


def match_calibration(depth: int = 10) -> dict:
    return MatchCalibration([[0.9 ** (d + 1) for d in range(depth)] for _ in range(7)]).to_dict()


def auto_spec(cost, **options) -> dict:
    spec = {
        "type": "auto",
        "tree": {"num_nodes": 6, "top_k": 3, "calibration": calibration()},
        "context": {"max_ngram": 3, "max_depth": 8},
        "match_calibration": match_calibration(),
        "cost": cost,
        "adapt": False,  # the given curve and calibration decide the width (what these cases check)
    }
    return {**spec, **options}


def repetitive_prompts(batch: int):
    """Prompts that repeat a phrase (prompt lookup finds matches), left padded, one real token equal to PAD."""
    ids, mask = batch_prompts(batch, length=16)
    phrase = torch.tensor([11, 12, 13, 14, 15])
    for b in range(batch):
        start = int((mask[b] == 0).sum())
        row = torch.cat([phrase, torch.tensor([PAD]), phrase, phrase])[: 16 - start]
        ids[b, start:] = row
    return ids, mask


def lossless_run(model, drafter, ids, mask, new: int = 24):
    """`generate(use_bpd=True)` with `drafter`, checked identical to the base model's greedy output; the output."""
    ref = model.base.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False)
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=new,
        do_sample=False,
        use_bpd=True,
        drafter=drafter,
        return_dict_in_generate=True,
    )
    assert torch.equal(out.sequences, ref)
    return out


SPECS = {
    "context-alone": lambda: {"type": "context-ngram"},
    "context-merge-tree": lambda: {
        "type": "context-ngram",
        "rule": "merge",
        "inner": {"type": "tree", "num_nodes": 5, "top_k": 2},
    },
    "context-switch-heads": lambda: {"type": "context-ngram", "rule": "switch", "switch_length": 2, "inner": "heads"},
    "auto-flat": lambda: auto_spec(FLAT),
    "auto-steep": lambda: auto_spec(STEEP),
    "auto-switch": lambda: auto_spec([[1, 1.0], [5, 1.2], [17, 2.0]], rule="both"),
    "auto-uncalibrated": lambda: {"type": "auto", "tree": {"num_nodes": 4, "top_k": 2}, "context": {}},
    "auto-no-tree": lambda: {k: v for k, v in auto_spec(FLAT).items() if k != "tree"},  # num_nodes 0: no heads
    "auto-switch-flat": lambda: auto_spec(FLAT, rule="both", switch_length=1),
    "auto-adapt": lambda: auto_spec([[1, 1.0], [5, 1.2], [17, 2.0]], adapt=True),  # learns while generating
}


# every drafter on llama; the other architectures with prompt lookup alone and the full auto tree (a shared CPU)
CASES = [(name, "llama") for name in sorted(SPECS)] + [
    (name, arch) for arch in ARCHS if arch != "llama" for name in ("auto-flat", "context-alone")
]


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("name, arch", CASES)
def test_greedy_lossless(name, arch, batch):
    model = make(arch)
    ids, mask = repetitive_prompts(batch)
    drafter = build_drafter(model, SPECS[name]())
    out = lossless_run(model, drafter, ids, mask)
    if name == "auto-steep":  # no node pays for itself: every step is a plain greedy step
        assert out.mean_verify_width == 0.0 and int(out.accepted_lengths.max()) == 0
    elif name == "auto-flat":  # width is free: the whole candidate tree (6 nodes and the match branch) is verified
        assert out.mean_verify_width >= 6.0
    else:
        assert out.mean_verify_width > 0
    if name == "auto-switch-flat":  # a long match replaces the tree: the heads are not run on those steps
        assert drafter.tree.calls < len(drafter.widths)


def test_prompt_lookup_drafts_deeper_than_the_heads():
    """A periodic continuation: the match branch (up to 8 tokens) is accepted beyond h = 3 in one step."""
    model = make("llama")
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11] * 4])
    with torch.no_grad():  # make the base model copy: its greedy output continues the period
        ref = model.base.generate(ids, max_new_tokens=30, do_sample=False)
    drafter = ContextNgramDrafter(max_depth=8)
    out = model.generate(
        ids, max_new_tokens=30, do_sample=False, use_bpd=True, drafter=drafter, return_dict_in_generate=True
    )
    assert torch.equal(out.sequences, ref)
    # whatever the random model continues with, a verified block may be up to 8 deep and the buffer holds it
    assert out.mean_verify_width <= 8
    period = ref[0, 28:].tolist() == (ids[0, :7].tolist() * 5)[: ref.shape[1] - 28]
    if period:
        assert int(out.accepted_lengths.max()) > H


def test_deep_tree_is_refused_unless_declared():
    from hf_bpd.drafters import Drafter
    from hf_bpd.tree import DraftTree

    class Deep(Drafter):
        def propose(self, ctx):
            return DraftTree.from_chains(ctx.tokens.new_zeros(ctx.batch_size, 1, H + 2))

    model = make("llama")
    with pytest.raises(ValueError, match="max_depth"):
        model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=10, use_bpd=True, drafter=Deep())
    declared = Deep()
    declared.max_depth = H + 2
    ref = model.base.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=10, do_sample=False)
    assert torch.equal(
        model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=10, use_bpd=True, drafter=declared), ref
    )


def test_sampling_falls_back_to_an_exact_fixed_shape_tree():
    """With `do_sample=True` the auto drafter verifies the heads' sampled tree (shape fixed before the draws, no
    deterministic branch): the samples follow the base model's distribution."""
    from test_sampling import NEW, ROWS

    model = sampling_model()
    drafter = AutoDrafter(
        model, tree={"num_nodes": 4, "top_k": 2, "calibration": None}, context={}, cost=FLAT, sampling_nodes=4
    )
    prompt = [3, 5, 7]
    from transformers import LogitsProcessorList

    dist = exact_distribution(model.base, prompt, LogitsProcessorList())
    torch.manual_seed(0)
    out = model.generate(
        torch.tensor([prompt] * ROWS),
        max_new_tokens=NEW,
        do_sample=True,
        top_k=0,
        top_p=1.0,
        use_bpd=True,
        drafter=drafter,
        return_dict_in_generate=True,
    )
    samples = out.sequences[:, len(prompt) :]
    assert 0 < out.mean_verify_width <= 4.0  # the fixed sampling budget (cut near max_length), never pruned
    assert chi_square_pvalue(samples, dist, key=lambda s: s) > 1e-3


def test_match_calibration_fit_and_errors():
    lengths = [1] * 50 + [8] * 50
    accepted = [0] * 40 + [1] * 10 + [5] * 45 + [0] * 5
    cal = MatchCalibration.fit(lengths, accepted, depth=6)
    short, long = cal.probs(torch.tensor([1, 8]), torch.tensor([1, 1]))
    assert long > 0.8 > 0.3 > short
    deep = cal.probs(torch.tensor([8] * 6), torch.arange(1, 7))
    assert bool((deep.diff() <= 0).all())  # a path is never likelier than its prefix
    assert float(cal.probs(torch.tensor([0]), torch.tensor([1]))) == 0.0  # no match, no probability
    assert MatchCalibration.from_dict(cal.to_dict()).rates.shape == (7, 6)
    with pytest.raises(ValueError, match="suffix-match-length bin"):
        MatchCalibration([[0.5]])
    with pytest.raises(ValueError, match="'merge' or 'both'"):
        AutoDrafter(None, tree={"num_nodes": 2}, rule="switch")
    with pytest.raises(ValueError, match="needs `tree`"):
        AutoDrafter(None)
    with pytest.raises(ValueError, match="max_depth must be"):
        ContextNgramDrafter(max_depth=0)


def test_tuned_spec_round_trips_through_the_config_and_stays_lossless(tmp_path):
    """`hf-bpd tune --auto`'s spec on a tiny model: a valid `BPDConfig.drafter`, built by plain `use_bpd=True`."""
    from hf_bpd_bench.auto_tune import auto_spec, match_observations, write_config

    seq = torch.tensor([4, 5, 6, 7, 4, 5, 6, 8, 4, 5, 6, 7])
    lengths, accepted = match_observations(seq, prompt_len=4, max_depth=3)
    # t=4: 7 never occurred before (no match); t=5: "4" matches at 0, drafts 5 6 7, the model wrote 5 6 8
    assert lengths[0] == 1 and accepted[0] == 2
    model = make("llama")
    prompts = [torch.tensor([5, 6, 7, 8, 5, 6, 7, 8, 9]), torch.tensor([3, 4, 3, 4, 3, 4, 10])]
    spec = auto_spec(model, prompts, num_nodes=4, top_k=97, max_depth=6, max_new_tokens=40)  # every rank: hits
    spec["cost"] = [[1, 1.0], [9, 1.1], [17, 3.0]]  # no measurement in a unit test
    model.save_pretrained(tmp_path, save_base=True)
    write_config(tmp_path, spec)  # what `--write-config` does to a checkpoint
    loaded = BPDForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.drafter["type"] == "auto"
    ids = prompts[0][None]
    ref = model.base.generate(ids, max_new_tokens=20, do_sample=False)
    out = loaded.generate(ids, max_new_tokens=20, use_bpd=True, return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref) and out.mean_verify_width is not None


def test_bench_verdict_line():
    from hf_bpd_bench.machine import format_verdict

    record = {"cpu": "AMD EPYC", "native_bf16": True, "dtype": "float32", "torch_threads": 2, "gpu": None}
    assert (
        format_verdict("bpd", 1.4, record) == "bpd: 1.40x greedy here (float32, AMD EPYC, bf16 units: yes, 2 threads)"
    )
    assert "not measured" in format_verdict("bpd", None, record | {"torch_threads": 1})
    limited = record | {"native_bf16": False, "isa_limits": {"ONEDNN_MAX_CPU_ISA": "AVX2"}}
    assert "bf16 units: no (ISA limited: ONEDNN_MAX_CPU_ISA=AVX2)" in format_verdict("bpd", 1.2, limited)


@pytest.mark.parametrize(
    "flags, isa, native",
    [
        ({"avx512f", "amx_bf16"}, None, True),
        ({"avx512f", "amx_bf16"}, "AVX2", False),  # an AVX2 CPU emulated on one with bf16 units
        ({"avx512f", "avx512_bf16"}, "avx512_core_bf16", True),
        ({"avx512f", "amx_bf16"}, "AVX512_CORE_AMX", True),
        ({"avx512f", "amx_bf16"}, "AVX512_CORE_VNNI", False),
        ({"avx512f", "avx2"}, None, False),
        ({"avx512f", "avx2"}, "ALL", False),
    ],
)
def test_native_bf16_follows_the_cpu_and_the_onednn_isa_limit(monkeypatch, flags, isa, native):
    """`--dtype auto` picks bf16 only where oneDNN (torch's bf16 matmuls on CPU) may use the CPU's bf16 units: an
    `ONEDNN_MAX_CPU_ISA` below AVX512_CORE_BF16 runs the CPU as one without them, and the machine record says so."""
    from hf_bpd.cost import ISA_LIMIT_ENV
    from hf_bpd_bench import machine

    monkeypatch.setattr(machine, "_cpu_flags", lambda: flags)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ISA_LIMIT_ENV:
        monkeypatch.delenv(name, raising=False)
    if isa is not None:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", isa)
    assert machine.has_native_bf16() is native
    assert machine.resolve_dtype("auto") == (torch.bfloat16 if native else torch.float32)
    record = machine.machine_record(torch.float32)
    assert record["native_bf16"] is native and record["isa_limits"] == ({"ONEDNN_MAX_CPU_ISA": isa} if isa else {})
    assert ("ISA limited" in machine.format_machine(record)) is (isa is not None)


def test_match_rates_learnt_per_row():
    """A row whose matches are always right drafts deeper than one whose matches are always wrong: after each step
    the committed tokens score the last match, and the row's conditional rates move from the fitted ones."""
    drafter = AutoDrafter(None, context={"max_depth": 4}, match_calibration=match_calibration(4), cost=FLAT)
    drafter.reset()
    cycle = [11, 12, 13, 14]
    rows = torch.tensor([cycle * 3, cycle * 2 + [11, 12, 99, 98]])  # row 1 breaks the pattern at its end
    length = torch.tensor([8, 8])

    class Ctx:  # the fields AutoDrafter reads from a DraftContext
        batch_size, sampling, independent, num_tokens, max_tokens = 2, False, True, 0, 4
        prompt_start = torch.zeros(2, dtype=torch.long)
        live = torch.ones(2, dtype=torch.bool)

    ctx = Ctx()
    ctx.tokens, ctx.lengths = rows, length
    drafter.propose(ctx)  # both rows match "11 12 13 14" after "... 13 14": drafts 11 12 13 14
    ctx.lengths = torch.tensor([12, 12])  # row 0 committed 11 12 13 14 (all right), row 1 11 12 99 98 (2 right)
    drafter.propose(ctx)
    assert drafter.hits["match"].tolist() == [4.0, 2.0]
    cond = MatchCalibration.from_dict(match_calibration(4)).conditional(torch.tensor([4, 4]))
    assert drafter.expected["match"].tolist() == pytest.approx([float(cond[0].sum()), float(cond[1, :3].sum())])
    probs = drafter._match_path_probs(find_match(rows, torch.tensor([12, 12])))
    assert bool((probs[0] > probs[1]).all())  # the row whose matches held up is trusted more


def find_match(tokens, lengths):
    from hf_bpd.drafters.context_ngram import find_context_match

    return find_context_match(tokens, lengths, torch.zeros(2, dtype=torch.long), 4)


def test_step_cost_learnt_per_width():
    """Observed step seconds replace the measured curve for widths seen; unseen widths are the curve scaled by the
    observed / measured ratio."""
    drafter = AutoDrafter(None, context={}, match_calibration=match_calibration(), cost=[[1, 1.0], [9, 2.0]])
    drafter.reset()
    assert drafter.step_cost(5) == pytest.approx(1.5) and drafter.overhead_s == 0.0
    drafter.widths = [0]
    drafter._last = (0.0, 1, 0.5)  # a width-1 step that started at t=0 and drafted for 0.5 s
    drafter._track_step_cost(3.5)  # next step at t=3.5: 3 s beyond drafting, 3x the measured forward
    assert drafter.step_cost(1) == pytest.approx(3.0) and drafter.step_cost(9) == pytest.approx(6.0)
    assert drafter.overhead_s == pytest.approx(2.0)
    for _ in range(3):  # steps as measured, then one 10x pause at width 5: it does not lock width 5 out
        drafter._last = (0.0, 1, 0.0)
        drafter._track_step_cost(1.0)
    drafter._last = (0.0, 5, 0.0)
    drafter._track_step_cost(15.0)
    assert drafter.step_cost(5) == pytest.approx(1.5) and drafter.step_cost(1) == pytest.approx(1.0)
    frozen = AutoDrafter(None, context={}, match_calibration=match_calibration(), cost=[[1, 1.0]], adapt=False)
    frozen.reset()
    frozen._last = (0.0, 1, 0.5)
    frozen._track_step_cost(3.5)
    assert frozen.step_cost(1) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="adapt_prior"):
        AutoDrafter(None, context={}, adapt_prior=0)


def test_drafts_scored_against_the_committed_text():
    """A tree's nodes checked against what the row then committed: a node counts when its depth was committed and
    its parent's path was right; a sibling of the right node counts as a miss; `-1` (no token) never counts."""
    from hf_bpd.drafters.auto import _score_against_text

    class Ctx:
        tokens = torch.tensor([[1, 2, 5, 9, 0], [1, 2, 6, 8, 4]])
        lengths = torch.tensor([4, 3])  # row 0 committed 5 9 after length 2; row 1 only 6

    # nodes: 5 | 6 | 5->7 | 6->8 | -1 (a match token missing)
    paths = torch.tensor([[5, -2], [6, -2], [5, 7], [6, 8], [-1, -2]])[None].expand(2, -1, -1)
    depth = torch.tensor([1, 1, 2, 2, 1])
    cond = torch.tensor([0.5, 0.25, 0.4, 0.3, 0.9]).expand(2, -1)
    hits, expected = _score_against_text(Ctx(), paths, depth, cond, torch.tensor([2, 2]))
    assert hits.tolist() == [1.0, 1.0]  # row 0: node 5 right, 6 and 5->7 wrong; row 1: 6 right, depth 2 unknown
    assert expected.tolist() == pytest.approx([0.5 + 0.25 + 0.4, 0.5 + 0.25])


def test_rows_learn_during_a_real_generate():
    """Through the loop (which advances its buffers in place), every step's drafts are scored: after a generate on
    repetitive prompts the rows have checked match tokens and learnt step costs."""
    model = make("llama")
    ids, mask = repetitive_prompts(3)
    drafter = build_drafter(model, auto_spec([[1, 1.0], [5, 1.2], [17, 2.0]], adapt=True))
    ref = model.base.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, use_bpd=True, drafter=drafter)
    assert torch.equal(out, ref)
    assert bool((drafter.expected["match"] > 0).all()) and bool((drafter.expected["tree"] > 0).all())
    assert drafter.step_s and all(len(v) >= 1 for v in drafter.step_s.values())


def test_heads_rest_while_their_tree_does_not_pay():
    """With a cost curve under which no node pays, the heads stop being run after `idle_after` steps and are tried
    again with a growing pause; when width is free they run every step. Output stays the base model's."""
    model = make("llama")
    ids, mask = repetitive_prompts(1)
    ref = model.base.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False)
    for cost, rests in ((STEEP, True), (FLAT, False)):
        drafter = build_drafter(model, auto_spec(cost, idle_after=2, max_skip=4))
        out = model.generate(ids, attention_mask=mask, max_new_tokens=24, use_bpd=True, drafter=drafter)
        assert torch.equal(out, ref)
        assert (drafter.tree.calls < len(drafter.widths) - 1) == rests  # (the last step may draft nothing)
    never = build_drafter(model, auto_spec(STEEP, max_skip=0))
    model.generate(ids, attention_mask=mask, max_new_tokens=24, use_bpd=True, drafter=never)
    assert never.tree.calls >= len(never.widths) - 1
    with pytest.raises(ValueError, match="idle_after"):
        AutoDrafter(None, context={}, idle_after=0)


def test_match_alone_equals_the_merge_into_an_empty_tree():
    """The no-tree fast path gives the tree and probabilities of merging the match into a root-only tree."""
    from hf_bpd.drafters.context_ngram import find_context_match, merge_match
    from hf_bpd.tree import DraftTree, tree_from_parents

    ids, _ = repetitive_prompts(3)
    lengths = torch.tensor([16, 14, 12])
    match = find_context_match(ids, lengths, torch.zeros(3, dtype=torch.long), 6)
    drafter = AutoDrafter(None, context={"max_depth": 6}, match_calibration=match_calibration(6), cost=FLAT)
    drafter.reset()
    drafter._lengths = lengths
    fast, fast_probs = drafter._match_alone(match, 6, calibrated=True)
    empty = DraftTree(tokens=ids.new_zeros(3, 0), layout=tree_from_parents((-1,)))
    merged = merge_match(empty, match, 6)
    probs = drafter._with_match(merged, torch.zeros(3, merged.layout.width - 1, dtype=torch.float64), match)
    assert torch.equal(fast.tokens, merged.tokens) and torch.equal(fast.layout.parent, merged.layout.parent)
    assert torch.allclose(fast_probs, probs) and bool((fast_probs > 0).any())


# ------------------------------------------------------------------ token-conditioned heads, calibrated
def make_recurrent(arch: str = "llama") -> BPDForCausalLM:
    model = BPDForCausalLM.from_base(tiny_base(arch), num_draft_heads=H, head_type="recurrent")
    return randomize_heads(model, std=0.3)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("cost, width", [(FLAT, "full"), (STEEP, "none")])
def test_recurrent_heads_get_width_from_cost_and_stay_lossless(cost, width, batch):
    """Token-conditioned heads have no per-head logits; the tree's recorded node scores (`DraftTree.log_scores`)
    give their calibrated probabilities, so the width follows the cost like independent heads': a free width
    verifies the whole tree, a steep one nothing. Output identical to greedy either way."""
    model = make_recurrent()
    ids, mask = repetitive_prompts(batch)
    drafter = build_drafter(model, auto_spec(cost))
    out = lossless_run(model, drafter, ids, mask)
    if width == "full":
        assert out.mean_verify_width >= 6.0
    else:  # uncalibrated, the fixed budget would be verified whatever the cost
        assert out.mean_verify_width == 0.0


def test_recorded_node_scores_equal_the_heads_log_probabilities(monkeypatch):
    """For independent heads the recorded scores are the per-head log-probabilities the calibration read before;
    for conditioned heads they are the head's log-probability of the node's token given the node's parent path."""
    import dataclasses

    from hf_bpd.drafters import auto

    original = auto._tree_log_conditional
    seen = []

    def both(ctx, tree, calibration):
        recorded = original(ctx, tree, calibration)
        if ctx.independent:
            torch.testing.assert_close(
                recorded, original(ctx, dataclasses.replace(tree, log_scores=None), calibration)
            )
        else:  # recompute each node's score from its parent's path
            parents = tree.layout.parent.tolist()
            for w in range(1, tree.layout.width):
                path, node = [], parents[w]
                while node > 0:
                    path.insert(0, tree.tokens[:, node - 1])
                    node = parents[node]
                paths = torch.stack(path, 1) if path else tree.tokens.new_zeros(ctx.batch_size, 0)
                logp = torch.log_softmax(ctx.path_logits(paths).float(), dim=-1)
                own = logp.gather(1, tree.tokens[:, w - 1 : w])[:, 0]
                torch.testing.assert_close(tree.log_scores[:, w - 1], own.cpu(), atol=1e-5, rtol=1e-5)
        seen.append(ctx.independent)
        return recorded

    monkeypatch.setattr(auto, "_tree_log_conditional", both)
    ids, mask = repetitive_prompts(2)
    for model in (make("llama"), make_recurrent()):
        model.generate(
            ids, attention_mask=mask, max_new_tokens=12, use_bpd=True, drafter=build_drafter(model, auto_spec(FLAT))
        )
    assert True in seen and False in seen


def test_by_dtype_overrides_pick_the_spec_for_the_base_dtype_and_tune_writes_them(tmp_path):
    """`BPDConfig.drafter["by_dtype"]`: the overrides for the base model's dtype are merged in when the drafter is
    built (here: a wider tree in fp32, no tree in bf16), decoding stays lossless, malformed overrides are refused; the
    tuner's `--dtype-override` records a width per dtype and `--write-config` keeps the other dtypes' entries."""
    from hf_bpd import BPDConfig
    from hf_bpd_bench.auto_tune import write_config, write_dtype_override

    spec = auto_spec(FLAT, by_dtype={"float32": {"tree": {"num_nodes": 2}}, "bfloat16": {"tree": None}})
    model = make("llama")
    drafter = build_drafter(model, spec)
    assert drafter.tree.num_nodes == 2 and drafter.tree.top_k == 3  # merged key by key: top_k kept
    ids, mask = repetitive_prompts(3)
    lossless_run(model, spec, ids, mask)
    assert build_drafter(model.to(torch.bfloat16), spec).tree is None
    assert build_drafter(model.to(torch.float16), spec).tree.num_nodes == 6  # no entry: the spec as written
    # dtype aliases and the "torch." prefix name the same dtype
    for key in ("float", "torch.float32"):
        aliased = auto_spec(FLAT, by_dtype={key: {"tree": {"num_nodes": 3}}})
        assert build_drafter(model.to(torch.float32), aliased).tree.num_nodes == 3
    for bad in ({"fp32": {}}, {"float32": 16}, [("float32", {})]):
        with pytest.raises(ValueError, match="'by_dtype' must map torch dtype names"):
            BPDConfig(drafter={"type": "auto", "tree": {}, "by_dtype": bad})
        with pytest.raises(ValueError, match="'by_dtype' must map torch dtype names"):  # a nested spec's too
            BPDConfig(drafter={"type": "context-ngram", "inner": {"type": "tree", "by_dtype": bad}})

    model.to(torch.float32).save_pretrained(tmp_path, save_base=True)
    tuned = {k: v for k, v in auto_spec(FLAT).items() if k != "cost"}
    write_config(tmp_path, tuned, {"dtype": "bfloat16", "best": "n6-merge"})
    candidate = {**tuned, "tree": {**tuned["tree"], "num_nodes": 16}, "rule": "both"}
    write_dtype_override(tmp_path, "float32", candidate, {"dtype": "float32", "best": "n16-both"})
    write_dtype_override(tmp_path, "float16", {k: v for k, v in tuned.items() if k != "tree"}, {"dtype": "float16"})
    config = BPDConfig.from_pretrained(tmp_path)
    # an override holds its whole tree (calibration included): it stands whatever the spec's own tree becomes
    assert config.drafter["by_dtype"]["float32"] == {"tree": candidate["tree"], "rule": "both"}
    assert config.drafter["by_dtype"]["float16"] == {"tree": None}
    assert (
        config.drafter["tree"]["num_nodes"] == 6 and config.drafter_tuning["by_dtype"]["float32"]["best"] == "n16-both"
    )
    loaded = BPDForCausalLM.from_pretrained(tmp_path).eval()
    assert build_drafter(loaded, loaded.config.drafter).tree.num_nodes == 16
    from hf_bpd_bench.auto_tune import main

    plain = tmp_path / "plain"
    make("llama").save_pretrained(plain, save_base=True)
    with pytest.raises(SystemExit, match="run `tune --auto --write-config` first"):
        main(["--model", str(plain), "--prompts", "unused.jsonl", "--dtype-override"])
    with pytest.raises(SystemExit, match="drop --top-k and --max-depth"):
        main(["--model", str(tmp_path), "--prompts", "unused.jsonl", "--dtype-override", "--top-k", "8"])
    with pytest.raises(SystemExit):  # argparse: one way to write the config at a time
        main(["--model", str(tmp_path), "--prompts", "unused.jsonl", "--dtype-override", "--write-config"])
    write_config(tmp_path, tuned, {"dtype": "float32", "best": "n6-merge"})  # re-tuned for fp32: its override goes
    config = BPDConfig.from_pretrained(tmp_path)
    assert config.drafter["by_dtype"] == {"float16": {"tree": None}}
    assert set(config.drafter_tuning["by_dtype"]) == {"float16"} and config.drafter_tuning["dtype"] == "float32"
