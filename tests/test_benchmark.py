"""hf-bpd bench / analyze on a tiny model with the shipped tokenizer (no wall-clock assertions)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import randomize_heads, tiny_base
from transformers import AutoTokenizer

from hf_bpd import BPDForCausalLM
from hf_bpd.data import load_prompts
from hf_bpd_bench.analyze import h_max, repetition_stats
from hf_bpd_bench.bench import BenchConfig, Resources, benchmark, make_drafter
from hf_bpd_bench.cli import main
from hf_bpd_bench.methods import DEFAULT_BPD_METHOD, METHODS, REFERENCE_METHOD, methods_in

TOKENIZER = Path(__file__).resolve().parents[1] / "reference" / "tokenizer"
PROMPTS = [
    {"prompt": "It is a truth universally acknowledged, that", "domain": "austen"},
    {"prompt": "def main(argv):\n    return", "domain": "python"},
    {"prompt": "In the beginning God created", "domain": "kjv"},
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    vocab = len(tok)
    base = tiny_base(
        "llama",
        vocab_size=vocab,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    model = randomize_heads(BPDForCausalLM.from_base(base, num_draft_heads=3), std=0.05)
    small = tiny_base("llama", seed=5, vocab_size=vocab, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    folder = tmp_path_factory.mktemp("bench")
    base.save_pretrained(folder / "base")
    tok.save_pretrained(folder / "base")
    small.save_pretrained(folder / "small")
    model.config.base_model_name_or_path = str(folder / "base")
    model.save_pretrained(folder / "heads")
    (folder / "prompts.jsonl").write_text("\n".join(json.dumps(p) for p in PROMPTS))
    return Resources(model=model, tokenizer=tok, small_lm=small), folder


@pytest.mark.parametrize(("batch_size", "head_type"), [(1, "resblock"), (2, "resblock"), (2, "recurrent")])
def test_benchmark_methods_identical_and_keyed(setup, batch_size, head_type):
    """Every registered method runs and matches greedy, or is reported unsupported with why: batch size 1 only, no
    static tree, or (token-conditioned heads) a search of the heads' top-k lattice; `hf-bpd bench --stack smollm2`
    with every method aborted on the recurrent heads shipped in stop 25."""
    res, _ = setup
    if head_type != "resblock":
        model = BPDForCausalLM.from_base(res.model.base, num_draft_heads=3, head_type=head_type)
        res = Resources(model=randomize_heads(model, std=0.05), tokenizer=res.tokenizer, small_lm=res.small_lm)
    methods = list(METHODS)  # every registered method; the heads carry no static tree: that one is unsupported
    cfg = BenchConfig(max_new_tokens=12, batch_size=batch_size, repeats=2, top_k=3, num_drafts=3, oracle_top_k=4)
    arpa = setup[1] / "tiny.arpa"
    arpa.write_text(
        "\\data\\\nngram 1=5\nngram 2=1\n\n\\1-grams:\n-1.0\t<unk>\t0\n-99\t<s>\t0\n-1.0\t</s>\t0\n"
        "-0.5\t17\t-0.1\n-0.7\t42\t0\n\n\\2-grams:\n-0.1\t17 42\n\n\\end\\\n"
    )
    res = Resources(model=res.model, tokenizer=res.tokenizer, small_lm=res.small_lm, ngram_path=str(arpa))
    # two prompts in a domain, so that batch size 2 really batches them
    prompts = PROMPTS + [{"prompt": "She was the youngest of the two daughters", "domain": "austen"}]
    report = benchmark(res, prompts, methods, cfg, progress=False)
    assert set(report["methods"]) == set(methods)
    assert set(report["domains"]) == {"austen", "python", "kjv"}
    batch1_only = {m for m in methods if METHODS[m].batch1_only} if batch_size > 1 else set()
    assert batch1_only or batch_size == 1
    for name in batch1_only:  # transformers raises for batch > 1: reported as unsupported, not dropped or crashed
        assert "batch size 1 only" in report["methods"][name]["unsupported"]
        assert report["domains"]["austen"]["methods"][name]["speedup_vs_greedy"] is None
    no_tree = {m for m in methods if "draft_tree" in METHODS[m].parts()}
    for name in no_tree:
        assert "static tree" in report["methods"][name]["unsupported"]
    lattice = {m for m in methods if METHODS[m].lattice} - batch1_only
    assert lattice
    for name in lattice:
        if head_type == "resblock":  # the flag names exactly the drafters that refuse token-conditioned heads
            drafter = res.rescorers.get(name) or make_drafter({"type": "oracle", "reference": None, "top_k": 4}, res)
            assert drafter.requires_independent_heads, name
        else:
            assert "top-k lattice" in report["methods"][name]["unsupported"]
    checked = {m for m in methods if METHODS[m].uses_bpd and not METHODS[m].lattice and m not in no_tree}
    assert all(not getattr(res.rescorers.get(m), "requires_independent_heads", False) for m in checked)
    for name, fig in report["methods"].items():
        if name in batch1_only | no_tree | (lattice if head_type != "resblock" else set()):
            continue
        assert fig["identical_to_greedy"] is True, name
        assert {
            "block_efficiency",
            "tokens_per_s",
            "speedup_vs_greedy",
            "mean_accepted_length",
            "rescoring_ms_per_step",
        } <= set(fig)
    assert report["methods"][REFERENCE_METHOD]["block_efficiency"] == pytest.approx(1.0)
    for oracle in methods_in("headroom"):
        if "unsupported" in report["methods"][oracle]:  # the top-k lattice's, with token-conditioned heads
            continue
        assert (
            report["methods"][oracle]["block_efficiency"] >= report["methods"][DEFAULT_BPD_METHOD]["block_efficiency"]
        )
        assert report["methods"][oracle]["tokens_per_s"] is None  # not timed


def test_unknown_method_and_bad_prompts(setup, tmp_path):
    res, _ = setup
    with pytest.raises(ValueError, match="Unknown methods"):
        benchmark(res, PROMPTS, ["fast"], BenchConfig(), progress=False)
    with pytest.raises(ValueError, match="needs"):
        benchmark(
            Resources(model=res.model, tokenizer=res.tokenizer),
            PROMPTS,
            ["bpd-ngram"],
            BenchConfig(repeats=1),
            progress=False,
        )
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"text": "no prompt field"}\n')
    with pytest.raises(ValueError, match="prompt"):
        load_prompts(bad)


def test_cli_bench_writes_json(setup, tmp_path, capsys):
    _, folder = setup
    out = tmp_path / "bench.json"
    code = main(
        [
            "bench",
            "--model",
            str(folder / "heads"),
            "--prompts",
            str(folder / "prompts.jsonl"),
            "--methods",
            "greedy",
            "bpd",
            "--max-new-tokens",
            "8",
            "--repeats",
            "1",
            "--batch-size",
            "1",
            "2",
            "--json",
            str(out),
            "--no-progress",
            "--small-lm",
            str(folder / "small"),
        ]
    )
    assert code == 0
    data = json.loads(out.read_text())
    assert set(data["methods"]) == {"greedy", "bpd"} and set(data["by_batch_size"]) == {"1", "2"}
    out = capsys.readouterr().out
    assert "speedup_vs_greedy" in out
    machine = out[: out.index("== batch size")]  # above the tables: what the figures were measured on
    for what in ("bf16 matrix units: ", "torch threads: ", "dtype: float32", data["machine"]["cpu"]):
        assert what in machine


def test_cli_analyze_writes_plots(setup, tmp_path):
    _, folder = setup
    code = main(
        [
            "analyze",
            "--model",
            str(folder / "heads"),
            "--prompts",
            str(folder / "prompts.jsonl"),
            "--max-new-tokens",
            "10",
            "--out",
            str(tmp_path / "an"),
            "--ngram",
            "",
        ]
    )
    assert code == 0
    files = {p.name for p in (tmp_path / "an").iterdir()}
    assert {"entropy_per_head.png", "oracle_topk.png", "accepted_lengths.png", "analysis.json"} <= files
    report = json.loads((tmp_path / "an" / "analysis.json").read_text())
    eff = report["domains"]["austen"]["oracle_block_efficiency"]
    assert eff["16"] >= eff["1"] >= 1.0


@pytest.mark.parametrize("head_type", ["resblock", "recurrent", "context"])
def test_cli_analyze_compares_an_ngram_rescorer_for_both_head_kinds(setup, tmp_path, head_type):
    """With an n-gram (the stacks' default) the repetition comparison rescored Kim et al.'s lattice, which
    token-conditioned heads do not have: `hf-bpd analyze --stack smollm2` crashed on the recurrent heads shipped in
    stop 25. They get the same rescoring along the searched path. Context heads this small draft near-uniform
    distributions (entropies within 1e-6 of log V), which the entropy histogram could not bin (stop 32)."""
    res, folder = setup
    model = randomize_heads(BPDForCausalLM.from_base(res.model.base, num_draft_heads=3, head_type=head_type), std=0.05)
    model.config.base_model_name_or_path = str(folder / "base")
    model.save_pretrained(tmp_path / "heads")
    arpa = tmp_path / "tiny.arpa"
    arpa.write_text(
        "\\data\\\nngram 1=5\nngram 2=1\n\n\\1-grams:\n-1.0\t<unk>\t0\n-99\t<s>\t0\n-1.0\t</s>\t0\n"
        "-0.5\t17\t-0.1\n-0.7\t42\t0\n\n\\2-grams:\n-0.1\t17 42\n\n\\end\\\n"
    )
    argv = ["analyze", "--model", str(tmp_path / "heads"), "--prompts", str(folder / "prompts.jsonl")]
    argv += ["--max-new-tokens", "8", "--out", str(tmp_path / "an"), "--ngram", str(arpa)]
    assert main(argv) == 0
    report = json.loads((tmp_path / "an" / "analysis.json").read_text())
    assert all("repetition_rescored" in figures for figures in report["domains"].values())


def test_analyze_reports_depth_accuracy_for_both_head_kinds(setup):
    """Per-depth top-1 given a correct prefix, for independent and token-conditioned heads (issue 17; the recurrent
    and the context kind); the oracle top-k lattice (exact only for independent heads) is skipped for the
    conditioned kinds."""
    from hf_bpd import metrics
    from hf_bpd_bench.analyze import analyze

    res, _ = setup
    conditioned = [
        randomize_heads(BPDForCausalLM.from_base(res.model.base, num_draft_heads=3, head_type=kind), std=0.05)
        for kind in ("recurrent", "context")
    ]
    for model in (res.model, *conditioned):
        report = analyze(
            Resources(model=model, tokenizer=res.tokenizer), PROMPTS[:1], max_new_tokens=12, top_ks=(1, 4)
        )
        figures = report["domains"]["austen"]
        assert len(figures["depth_top1"]) == 3 and len(figures["depth_top1_given_prefix"]) == 3
        assert len(figures["mean_entropy_per_head"]) == 3
        assert bool(figures["oracle_block_efficiency"]) == model.independent_heads
        # fp32: the chain replayed from the heads' teacher-forced predictions is the decode's own
        assert figures["replayed_chain_block_efficiency"] == figures["block_efficiency"] >= 1.0
        # the same figures from the library function on the same greedy continuation
        ids = res.tokenizer([PROMPTS[0]["prompt"]], return_tensors="pt")
        seq = model.generate(**ids, max_new_tokens=12, do_sample=False)
        with torch.no_grad():
            hidden = model.base(seq, output_hidden_states=True).hidden_states[-1]
        targets = seq.clone()
        targets[:, : ids["input_ids"].shape[1]] = -100
        targets = targets.masked_fill(seq == res.tokenizer.pad_token_id, -100)
        expected = metrics.depth_accuracy(model, hidden, targets, input_ids=seq)
        assert figures["depth_top1"] == [round(x, 3) for x in expected["top1"]]


def test_analyze_feeds_context_heads_the_prompt_tokens(setup, monkeypatch):
    """Context heads attend over the prompt: the replayed chain must read the rows' real tokens, not the targets
    (-100 on the prompt). Stop 32's analyze fed the targets and replayed 1.74 tokens per call on SmolLM2's code
    prompts where the decode took 1.97."""
    from hf_bpd import metrics
    from hf_bpd_bench.analyze import analyze

    res, _ = setup
    model = randomize_heads(BPDForCausalLM.from_base(res.model.base, num_draft_heads=2, head_type="context"))
    read, depth_accuracy = [], metrics.depth_accuracy

    def recorded(model, hidden, targets, batch_size=8, input_ids=None):
        read.append((targets, input_ids))
        return depth_accuracy(model, hidden, targets, batch_size, input_ids)

    monkeypatch.setattr(metrics, "depth_accuracy", recorded)
    analyze(Resources(model=model, tokenizer=res.tokenizer), PROMPTS[:1], max_new_tokens=8, top_ks=(1,))
    [(targets, input_ids)], prompt = read, res.tokenizer(PROMPTS[0]["prompt"], return_tensors="pt")["input_ids"]
    assert input_ids is not None and (input_ids >= 0).all() and (targets[:, : prompt.shape[1]] == -100).all()
    assert torch.equal(input_ids[:, : prompt.shape[1]], prompt)


def test_repetition_and_h_max():
    stats = repetition_stats(torch.tensor([[1, 1, 1, 2], [3, 4, 5, 6]]))
    assert stats["consecutive_repetition"] == pytest.approx(2 / 6)
    assert stats["mean_longest_run"] == pytest.approx((3 + 1) / 2)
    assert h_max([0.5, 0.9, 1.2, 1.1, 1.5]) == 3
    assert h_max([1.0, 0.5]) == 1
