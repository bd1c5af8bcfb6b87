"""Bad input of the SmolLM2 data pipeline (`examples/build_smollm2.py`, issue 18): a torn answers file is cut back
to its last complete record and appended to cleanly; over-long prompts and empty answers are counted in the log; a
torn or grown feature shard is extracted again. A tiny random model stands in for SmolLM2 (nothing downloads)."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import pytest
import torch
from conftest import tiny_base
from safetensors.torch import load_file
from transformers import AutoTokenizer

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def build():
    spec = importlib.util.spec_from_file_location("build_smollm2", REPO / "examples" / "build_smollm2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def tokenizer():
    tok = AutoTokenizer.from_pretrained(REPO / "reference" / "tokenizer")
    tok.chat_template = TEMPLATE
    return tok


def test_torn_answers_file_is_cut_back_and_appended_cleanly(build, tmp_path, caplog):
    path = tmp_path / "answers.jsonl"
    path.write_text(
        json.dumps({"id": 1, "answer": "a"}) + "\n" + json.dumps({"id": 2, "answer": "b"}) + '\n{"id": 3, "ans'
    )
    with caplog.at_level(logging.WARNING):
        rows = build._read_jsonl(path, repair=True)
    assert [r["id"] for r in rows] == [1, 2] and "partly written record" in caplog.text
    with path.open("a") as handle:  # what the answers stage does next
        handle.write(json.dumps({"id": 3, "answer": "c"}) + "\n")
    assert [r["id"] for r in build._read_jsonl(path)] == [1, 2, 3]


def test_answers_count_over_long_prompts_and_empty_answers(build, tokenizer, tmp_path, monkeypatch, caplog):
    """A prompt that leaves no room for the answer is skipped and counted; an answer that is only EOS is written
    (the prompt is done) and counted as empty; the log line names both counts."""
    model = tiny_base("llama", vocab_size=len(tokenizer), max_position_embeddings=48, pad_token_id=0, eos_token_id=0)
    with torch.no_grad():  # every step's most likely token is EOS: every answer is empty
        model.lm_head.weight.zero_()
        model.model.norm.weight.fill_(1.0)
        model.lm_head.bias = torch.nn.Parameter(torch.zeros(len(tokenizer)))
        model.lm_head.bias[0] = 10.0
    monkeypatch.setattr("hf_bpd.smollm2.load_smollm2", lambda dtype=None: (model, tokenizer))
    prompts = [
        {"id": "short", "messages": [{"role": "user", "content": "Say hi."}]},
        {"id": "long", "messages": [{"role": "user", "content": "word " * 200}]},
    ]
    (tmp_path / "train_prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    args = build.parse_args(
        ["--work-dir", str(tmp_path), "--answer-tokens", "8", "--answer-batch", "2", "--dtype", "float32"]
    )
    with caplog.at_level(logging.INFO):
        build.stage_answers(args)
    rows = build._read_jsonl(tmp_path / "answers.jsonl")
    assert [r["id"] for r in rows] == ["short"] and rows[0]["answer"] == ""
    assert "'empty': 1" in caplog.text and "'too_long': 1" in caplog.text


def test_torn_and_grown_feature_shards_are_extracted_again(tmp_path, caplog):
    from hf_bpd.features import extract_features

    base = tiny_base("llama")
    seqs = [list(range(3, 3 + n)) for n in (10, 12, 9, 11)]
    paths = extract_features(base, seqs[:3], tmp_path, seq_len=16, shard_size=2)
    paths[0].write_bytes(b"torn by a crash")  # unreadable under its real name
    with caplog.at_level(logging.INFO):
        again = extract_features(base, seqs, tmp_path, seq_len=16, shard_size=2)  # the last shard grew by one row
    assert "unreadable" in caplog.text and "extracting it again" in caplog.text
    assert [load_file(p)["targets"].shape[0] for p in again] == [2, 2]
    assert not list(tmp_path.glob("*.tmp"))
