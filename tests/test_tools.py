"""The tools' shared pieces: the prompt loader, method parsing, the reference lookup, metrics, the version check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from hf_bpd import metrics
from hf_bpd.data import load_prompts, tokenize_prompts
from hf_bpd_bench.cli import main
from hf_bpd_bench.methods import METHODS, parse_methods
from hf_bpd_bench.reference import find_reference, require_reference

TOKENIZER = Path(__file__).resolve().parents[1] / "reference" / "tokenizer"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture
def tokenizer():
    return AutoTokenizer.from_pretrained(TOKENIZER)


def _write(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


# ------------------------------------------------------------------------------------------------ prompt loader
def test_prompts_raw_text_and_chat_messages(tmp_path, tokenizer):
    tokenizer.chat_template = CHAT_TEMPLATE
    messages = [{"role": "user", "content": "Say hi"}]
    path = _write(
        tmp_path / "p.jsonl", [{"prompt": "Once upon a time", "domain": "story"}, "", {"messages": messages}]
    )
    rows = load_prompts(path, tokenizer)
    assert rows[0] == {"prompt": "Once upon a time", "domain": "story", "chat": False}
    want = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rows[1] == {"prompt": want, "domain": "all", "chat": True} and want.endswith("<|assistant|>")
    batches = tokenize_prompts(rows, tokenizer, batch_size=2)
    assert len(batches) == 1 and batches[0]["input_ids"].shape[0] == 2
    chat_ids = tokenizer(want, add_special_tokens=False)["input_ids"]
    assert batches[0]["input_ids"][1, -len(chat_ids) :].tolist() == chat_ids  # no special tokens added twice
    assert (batches[0]["attention_mask"].sum(-1) > 0).all()


def test_prompts_line_without_prompt_or_messages_names_file_and_line(tmp_path, tokenizer):
    path = _write(tmp_path / "p.jsonl", [{"prompt": "ok"}, {"text": "no prompt field"}])
    with pytest.raises(ValueError, match=r"p\.jsonl:2: .*\"prompt\".*\"messages\""):
        load_prompts(path, tokenizer)
    path = _write(tmp_path / "q.jsonl", ["{not json"])
    with pytest.raises(ValueError, match=r"q\.jsonl:1"):
        load_prompts(path, tokenizer)


def test_prompts_messages_need_a_chat_template(tmp_path, tokenizer):
    tokenizer.chat_template = None
    path = _write(tmp_path / "p.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(ValueError, match=r"p\.jsonl:1: .*chat template"):
        load_prompts(path, tokenizer)
    with pytest.raises(ValueError, match="pass a tokenizer"):
        load_prompts(path)


def test_prompts_per_domain_cap_and_text_files(tmp_path):
    path = _write(tmp_path / "p.jsonl", [{"prompt": f"p{i}", "domain": "a" if i % 2 else "b"} for i in range(6)])
    assert [r["prompt"] for r in load_prompts(path, max_prompts_per_domain=1)] == ["p0", "p1"]
    (tmp_path / "p.txt").write_text("one\n\ntwo\n")
    assert [r["prompt"] for r in load_prompts(tmp_path / "p.txt")] == ["one", "two"]
    with pytest.raises(FileNotFoundError, match="nothere"):
        load_prompts(tmp_path / "nothere.jsonl")


# ------------------------------------------------------------------------------------------------ bench methods
def test_parse_methods_comma_and_space_lists():
    assert parse_methods("greedy,bpd") == ["greedy", "bpd"]
    assert parse_methods(["greedy, bpd", "oracle", "bpd"]) == ["greedy", "bpd", "oracle"]
    assert parse_methods(None) == list(METHODS)
    with pytest.raises(ValueError, match="Unknown methods \\['fast'\\]; choose from greedy, bpd"):
        parse_methods("greedy,fast")


def test_cli_unknown_method_fails_before_loading_anything(capsys, monkeypatch):
    import hf_bpd_bench.cli as cli

    monkeypatch.setattr(cli, "_load_resources", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--model", "/nonexistent", "--methods", "greedy,fast"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Unknown methods ['fast']" in err and "bpd-neural" in err


def test_cli_bench_help_lists_the_methods(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    out = capsys.readouterr().out
    assert all(name in out for name in METHODS)


# ------------------------------------------------------------------------------------------------ reference stack
def test_reference_lookup_env_then_cwd(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_BPD_REFERENCE", raising=False)
    monkeypatch.chdir(tmp_path)
    assert find_reference("heads") is None
    with pytest.raises(FileNotFoundError, match="pass --model DIR.*HF_BPD_REFERENCE"):
        require_reference("heads", "--model DIR")
    (tmp_path / "reference" / "heads").mkdir(parents=True)
    assert find_reference("heads") == tmp_path / "reference" / "heads"
    other = tmp_path / "elsewhere"
    (other / "heads").mkdir(parents=True)
    monkeypatch.setenv("HF_BPD_REFERENCE", str(other))
    assert find_reference("heads") == other / "heads"


def test_cli_without_reference_says_what_to_pass(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("HF_BPD_REFERENCE", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="pass --model DIR"):
        main(["bench", "--methods", "greedy"])


# ------------------------------------------------------------------------------------------------ metrics
def test_metrics_one_definition():
    assert metrics.block_efficiency(10, 4) == 2.5
    assert metrics.block_efficiency(torch.tensor([9, 3]), torch.tensor([3, 3])) == 2.0  # tokens per row-call
    accepted = torch.tensor([[3, 0], [2, -1]])  # row 1 finished after the first step
    tokens, calls = metrics.rows_from_accepted(accepted)
    assert tokens.tolist() == [1 + 4 + 3, 1 + 1] and calls.tolist() == [3, 2]
    stats = metrics.accepted_length_stats(accepted)
    assert stats["mean"] == pytest.approx(5 / 3) and stats["histogram"] == [1, 0, 1, 1]
    assert metrics.mean_accepted_length(torch.tensor([-1])) is None
    assert metrics.share_of_ideal(2.0, 4.0) == 0.5 and metrics.draft_ms_per_step(0.01, 5) == pytest.approx(2.0)
