"""Tests for hf_bpd.data (no network, tiny on-the-fly tokenizer)."""

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from hf_bpd.data import load_text_files, pack_dataset  # noqa: E402
from hf_bpd_bench.reference import split_reference_corpora  # noqa: E402

CORPORA = Path(__file__).resolve().parents[1].parent / "shared" / "corpora"


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(["hello world", "second line here", "word " * 20], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


@pytest.fixture()
def files(tmp_path):
    (tmp_path / "a.txt").write_text("hello world\n\nsecond line here\n")
    with open(tmp_path / "b.jsonl", "w") as f:
        for i in range(40):
            f.write(json.dumps({"text": "word " * (i * 3), "id": i}) + "\n")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"body": "hi"}) + "\n")
    (tmp_path / "empty.jsonl").write_text(json.dumps({"text": "  "}) + "\n")
    return tmp_path


def test_load_txt_per_file_and_per_line(files):
    assert load_text_files(files / "a.txt").num_rows == 1
    per_line = load_text_files(files / "a.txt", one_example_per_file=False)
    assert per_line["text"][:] == ["hello world", "", "second line here"]


def test_load_mixed_and_errors(files):
    ds = load_text_files([files / "a.txt", files / "b.jsonl"])
    assert ds.column_names == ["text"] and ds.num_rows == 41
    with pytest.raises(ValueError, match="columns found: \\['body'\\]"):
        load_text_files(files / "bad.jsonl")
    with pytest.raises(ValueError, match="empty"):
        load_text_files(files / "empty.jsonl")


def test_pack_dataset_and_streaming_agree(files, tokenizer, caplog):
    paths = [files / "a.txt", files / "b.jsonl"]
    packed = pack_dataset(load_text_files(paths), tokenizer, 16, min_tokens=3)
    assert packed.column_names == ["input_ids"]
    assert all(len(x) == 16 for x in packed["input_ids"])
    assert "Skipped" in caplog.text
    streamed = list(pack_dataset(load_text_files(paths, streaming=True), tokenizer, 16, min_tokens=3))
    assert [r["input_ids"] for r in streamed] == packed["input_ids"][:]
    assert tokenizer.eos_token_id in packed["input_ids"][0]


@pytest.mark.skipif(not CORPORA.is_dir(), reason="reference corpora not available")
def test_split_reference_corpora_is_disjoint_and_deterministic():
    a = split_reference_corpora(CORPORA)
    assert set(a) == {"austen", "shakespeare", "kjv", "python"}
    for domain, splits in a.items():
        assert splits["train"] and splits["validation"], domain
    assert not set(a["python"]["validation"]) & set(a["python"]["train"])
    assert len(a["python"]["validation"]) == 10
    # Austen/Shakespeare validation slices start at a line boundary of the work.
    emma = (CORPORA / "austen_emma.txt").read_text(encoding="utf-8")
    train0, val0 = a["austen"]["train"][0], a["austen"]["validation"][0]
    assert train0 + val0 == emma and train0.endswith("\n")
    assert split_reference_corpora(CORPORA)["kjv"] == a["kjv"]
