"""The verify forward's cost curve: interpolation, measurement without side effects, and the per-machine cache."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import tiny_base
from transformers import DynamicCache

from hf_bpd import BPDForCausalLM
from hf_bpd.cost import CACHE_FILE, ISA_LIMIT_ENV, ForwardCost, _non_decreasing

WIDTHS = (1, 2, 5, 9)
FAST = {"widths": WIDTHS, "context_length": 16, "repeats": 3, "budget_s": 0.0}


def test_interpolation_and_relative():
    curve = ForwardCost(widths=(1, 3, 5), seconds=(1.0, 2.0, 4.0))
    assert [curve.cost(w) for w in (0.5, 1, 2, 3, 4, 5, 7)] == pytest.approx([1, 1, 1.5, 2, 3, 4, 6])
    assert curve.relative(4) == pytest.approx(3.0)
    assert curve.curve(3).tolist() == pytest.approx([1.0, 1.5, 2.0])
    assert ForwardCost.from_dict(json.loads(json.dumps(curve.to_dict()))) == curve


@pytest.mark.parametrize(
    "widths, seconds",
    [((2, 3), (1.0, 2.0)), ((1, 1), (1.0, 1.0)), ((1, 2), (1.0,)), ((1, 2), (1.0, float("nan"))), ((1,), (0.0,))],
)
def test_invalid_curves_are_refused(widths, seconds):
    with pytest.raises(ValueError, match="cost curve"):
        ForwardCost(widths=widths, seconds=seconds)


def test_non_decreasing_pools_dips():
    assert _non_decreasing([1.0, 3.0, 2.0, 4.0]) == pytest.approx([1.0, 2.5, 2.5, 4.0])
    assert _non_decreasing([3.0, 1.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])
    assert _non_decreasing([1.0, 2.0]) == [1.0, 2.0]


def test_measure_leaves_the_caller_alone():
    model = tiny_base("llama")
    ids = torch.randint(3, 90, (1, 7))
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids, cache=cache, use_cache=True)
    rng = torch.get_rng_state()
    curve = ForwardCost.measure(model, **FAST)
    assert torch.equal(torch.get_rng_state(), rng)  # a private generator: sampling stays reproducible
    assert cache.get_seq_length() == 7  # the caller's cache is untouched
    assert curve.widths == WIDTHS and all(s > 0 for s in curve.seconds)
    assert list(curve.seconds) == sorted(curve.seconds)
    assert curve.key["model"]["dtype"] == "float32" and curve.key["torch_threads"] == torch.get_num_threads()
    assert curve.key["context_length"] == 16


def test_cache_hit_miss_foreign_and_corrupt(tmp_path, monkeypatch, caplog):
    model = BPDForCausalLM.from_base(tiny_base("llama"), num_draft_heads=2)
    calls = []
    measure = ForwardCost.measure.__func__

    def counted(cls, *args, **kwargs):
        calls.append(1)
        return measure(cls, *args, **kwargs)

    monkeypatch.setattr(ForwardCost, "measure", classmethod(counted))
    for name in ISA_LIMIT_ENV:
        monkeypatch.delenv(name, raising=False)
    first = ForwardCost.for_model(model, tmp_path, **FAST)
    assert len(calls) == 1 and first.key["model"]["parameters"] == sum(p.numel() for p in model.base.parameters())
    assert ForwardCost.for_model(model, tmp_path, **FAST) == first and len(calls) == 1  # read back
    assert [p.name for p in tmp_path.iterdir()] == [CACHE_FILE]  # no temporary file left behind

    data = json.loads((tmp_path / CACHE_FILE).read_text())  # a foreign entry: another CPU, same file
    data["entries"][0]["key"]["cpu"] = "another machine"
    (tmp_path / CACHE_FILE).write_text(json.dumps(data))
    ForwardCost.for_model(model, tmp_path, **FAST)
    assert len(calls) == 2
    assert len(json.loads((tmp_path / CACHE_FILE).read_text())["entries"]) == 2  # the other machine's entry stays

    threads = torch.get_num_threads()  # another thread count is another entry
    torch.set_num_threads(threads + 1)
    try:
        assert ForwardCost.for_model(model, tmp_path, **FAST).key["torch_threads"] == threads + 1
    finally:
        torch.set_num_threads(threads)
    assert len(calls) == 3
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # an instruction-set limit times another machine
    assert ForwardCost.for_model(model, tmp_path, **FAST).key["isa_limits"] == {"ONEDNN_MAX_CPU_ISA": "AVX2"}
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    assert len(calls) == 4
    half = model.base.to(torch.bfloat16)  # another dtype too
    assert ForwardCost.for_model(half, tmp_path, **FAST).key["model"]["dtype"] == "bfloat16" and len(calls) == 5

    (tmp_path / CACHE_FILE).write_text('{"schema": 1, "entries": [')  # torn write from an older version
    with caplog.at_level(logging.WARNING, logger="hf_bpd.cost"):
        ForwardCost.for_model(half, tmp_path, **FAST)
    assert len(calls) == 6 and "unreadable" in caplog.text
    assert len(json.loads((tmp_path / CACHE_FILE).read_text())["entries"]) == 1  # rewritten whole


def test_invalid_entry_is_measured_again(tmp_path, caplog):
    model = tiny_base("gpt2")
    first = ForwardCost.for_model(model, tmp_path, **FAST)
    data = json.loads((tmp_path / CACHE_FILE).read_text())
    data["entries"][0]["seconds"][0] = -1.0
    (tmp_path / CACHE_FILE).write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING, logger="hf_bpd.cost"):
        again = ForwardCost.for_model(model, tmp_path, **FAST)
    assert "invalid forward-cost entry" in caplog.text and again.key == first.key and min(again.seconds) > 0


def test_default_folder_is_the_user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_BPD_CACHE", str(tmp_path / "cache"))
    ForwardCost.for_model(tiny_base("qwen2"), **FAST)
    assert (tmp_path / "cache" / CACHE_FILE).is_file()


def test_context_too_long_is_refused():
    with pytest.raises(ValueError, match="positions"):
        ForwardCost.measure(tiny_base("llama"), widths=(1, 65), context_length=250)


def test_an_older_cache_is_measured_again_without_a_warning(tmp_path, caplog):
    """A cache written by an older version (schema 1 kept medians) is replaced quietly, never trusted."""
    model = tiny_base("llama")
    old = {"schema": 1, "entries": [{"key": {}, "widths": [1], "seconds": [1e-9]}]}
    (tmp_path / CACHE_FILE).write_text(json.dumps(old))
    with caplog.at_level(logging.WARNING, logger="hf_bpd.cost"):
        curve = ForwardCost.for_model(model, tmp_path, **FAST)
    assert not caplog.text and curve.seconds[0] > 1e-9
    assert json.loads((tmp_path / CACHE_FILE).read_text())["schema"] == 2
