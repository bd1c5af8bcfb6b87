"""BPDTrainer on a tiny Llama and synthetic arithmetic sequences: training, modes, checkpoints, DDP, bad input."""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import VOCAB, tiny_base
from datasets import Dataset
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, TrainerCallback

from hf_bpd import BPDForCausalLM
from hf_bpd.data import BlockCollator, load_packed_dataset, pack_dataset
from hf_bpd.trainer import BPDTrainer, BPDTrainingArguments, add_lora_adapters, check_tokenizer_matches, merge_lora

REPO = Path(__file__).resolve().parents[1]
H = 3
SEQ = 32
NUMBERS = VOCAB - 3  # word "wK" is token id K + 3 (ids 0, 1, 2: pad, eos, bos)


# --------------------------------------------------------------------------------------------- fixtures
def word_tokenizer(size: int = VOCAB) -> PreTrainedTokenizerFast:
    """Whitespace word-level tokenizer: `<pad> <eos> <bos> w0 .. w{size - 4}` (ids 0 .. size - 1)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, **{f"w{i}": i + 3 for i in range(size - 3)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")


def arithmetic_text(start: int, step: int, length: int) -> str:
    return " ".join(f"w{(start + k * step) % NUMBERS}" for k in range(length))


def arithmetic_ids(start: int, step: int, length: int) -> list[int]:
    return [3 + (start + k * step) % NUMBERS for k in range(length)]


def write_corpus(path: Path, docs: int, seed: int) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(docs):
            text = arithmetic_text(rng.randrange(NUMBERS), rng.choice([1, 2, 3]), rng.randrange(20, 60))
            f.write(json.dumps({"text": text}) + "\n")
    return path


class LogCapture(TrainerCallback):
    def __init__(self):
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


def training_args(output_dir: Path, **overrides) -> BPDTrainingArguments:
    kwargs = dict(
        output_dir=str(output_dir),
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
        save_strategy="no",
        per_device_train_batch_size=16,
        per_device_eval_batch_size=32,
        learning_rate=1e-2,
        logging_steps=50,
        seed=0,
    )
    kwargs.update(overrides)
    return BPDTrainingArguments(**kwargs)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """32-wide models gain nothing from intra-op threads, and oversubscribed cores slow every step down."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    train, evaluation = write_corpus(root / "train.jsonl", 400, 0), write_corpus(root / "eval.jsonl", 40, 1)
    return SimpleNamespace(train=train, eval=evaluation)


@pytest.fixture(scope="module")
def blocks(corpus, tokenizer):
    return SimpleNamespace(
        train=load_packed_dataset(corpus.train, tokenizer, SEQ, min_tokens=H + 2),
        eval=load_packed_dataset(corpus.eval, tokenizer, SEQ, min_tokens=H + 2),
    )


@pytest.fixture(scope="module")
def base_dir(blocks, tokenizer, tmp_path_factory):
    """A tiny Llama trained (plain loop, ~200 steps) to continue the arithmetic sequences, saved with its tokenizer."""
    base = tiny_base("llama").train()
    opt = torch.optim.AdamW(base.parameters(), lr=3e-3)
    collate, gen = BlockCollator(0), torch.Generator().manual_seed(0)
    for _ in range(200):
        batch = collate([blocks.train[i] for i in torch.randint(len(blocks.train), (16,), generator=gen).tolist()])
        base(input_ids=batch["input_ids"], labels=batch["labels"]).loss.backward()
        opt.step()
        opt.zero_grad()
    path = tmp_path_factory.mktemp("base")
    base.eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def prompts():
    return torch.tensor([arithmetic_ids(a, s, 8) for a, s in ((5, 2), (50, 3), (20, 1))])


@pytest.fixture(scope="module")
def frozen_run(base_dir, blocks, corpus, tokenizer, tmp_path_factory):
    """150 steps, frozen base, 3 heads with their own projections; evaluated before and after."""
    model = BPDForCausalLM.from_base(str(base_dir), num_draft_heads=H, share_lm_head=False)
    base_before = {k: v.clone() for k, v in model.base.state_dict().items()}
    heads_before = {k: v.clone() for k, v in model.heads_state_dict().items()}
    capture = LogCapture()
    out = tmp_path_factory.mktemp("frozen")
    trainer = BPDTrainer(
        model,
        training_args(out, max_steps=150, logging_first_step=True),
        train_dataset=blocks.train,
        eval_dataset=blocks.eval,
        processing_class=tokenizer,
        training_data=[str(corpus.train)],
        callbacks=[capture],
    )
    initial = trainer.evaluate()
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    final = trainer.evaluate()
    model.eval()
    return SimpleNamespace(
        model=model,
        trainer=trainer,
        initial=initial,
        final=final,
        logs=capture.logs,
        base_before=base_before,
        heads_before=heads_before,
        seconds=seconds,
        out=out,
    )


@pytest.fixture(scope="module")
def lora_run(base_dir, blocks, tokenizer, tmp_path_factory):
    """6 steps of joint training: LoRA on q/v/down projections, base LM loss, 4x head learning rate."""
    model = BPDForCausalLM.from_base(str(base_dir), num_draft_heads=H)
    out = tmp_path_factory.mktemp("lora")
    args = training_args(
        out,
        max_steps=6,
        learning_rate=5e-3,
        use_lora=True,
        lora_r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        lora_target_modules=["q_proj", "v_proj", "down_proj"],
        base_loss_weight=0.5,
        heads_learning_rate_multiplier=4.0,
        save_strategy="steps",
        save_steps=3,
        logging_steps=3,
    )
    trainer = BPDTrainer(model, args, train_dataset=blocks.train, processing_class=tokenizer)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    model.eval()
    return SimpleNamespace(model=model, trainer=trainer, before=before, out=out)


def draft_and_logits(model: BPDForCausalLM, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        out = model(ids)
    return out.logits, out.draft_logits


# --------------------------------------------------------------------------------------------- training
def test_training_lowers_every_head_loss_and_bpd_accepts_blocks(frozen_run, prompts):
    h_range = range(1, H + 1)
    for i in h_range:  # held-out loss of every head, before vs after
        before, after = frozen_run.initial[f"eval_head{i}_loss"], frozen_run.final[f"eval_head{i}_loss"]
        assert after < 0.6 * before, (i, before, after)
    train_logs = [log for log in frozen_run.logs if "loss" in log and "head1_loss" in log]
    for i in h_range:  # and on the training stream, first logged step vs last
        assert train_logs[-1][f"head{i}_loss"] < train_logs[0][f"head{i}_loss"]
    model = frozen_run.model
    ref = model.base.generate(prompts, max_new_tokens=40, do_sample=False)
    out = model.generate(prompts, max_new_tokens=40, do_sample=False, use_bpd=True, return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref)  # lossless
    print(f"block efficiency {out.block_efficiency:.2f} after {frozen_run.seconds:.1f}s of training")
    assert out.block_efficiency > 2.0
    for row in prompts:  # batch 1 as well
        kw = dict(max_new_tokens=40, do_sample=False)
        single = model.generate(row[None], use_bpd=True, return_dict_in_generate=True, **kw)
        assert torch.equal(single.sequences, model.base.generate(row[None], **kw))
        assert single.block_efficiency > 2.0


def test_frozen_mode_leaves_base_bit_identical(frozen_run):
    after = frozen_run.model.base.state_dict()
    assert after.keys() == frozen_run.base_before.keys()
    assert all(torch.equal(after[k], v) for k, v in frozen_run.base_before.items())
    assert not any(p.requires_grad for p in frozen_run.model.base.parameters())
    heads = frozen_run.model.heads_state_dict()
    assert all(not torch.equal(heads[k], v) for k, v in frozen_run.heads_before.items() if "weight" in k)


def test_per_head_metrics_reach_the_logs(frozen_run):
    train = [log for log in frozen_run.logs if "loss" in log and "eval_loss" not in log]
    evals = [log for log in frozen_run.logs if "eval_loss" in log]
    assert len(train) >= 4 and len(evals) == 2  # logging_first_step + every 50 steps; two evaluate() calls
    for log, prefix in ((train[-1], ""), (evals[-1], "eval_")):
        for i in range(1, H + 1):
            top1, top5 = log[f"{prefix}head{i}_top1"], log[f"{prefix}head{i}_top5"]
            assert 0.0 <= top1 <= top5 <= 1.0 and log[f"{prefix}head{i}_loss"] > 0
    assert evals[-1]["eval_head1_top1"] > 0.5  # the trained first head is mostly right on held-out data
    # What `report_to` integrations see is what the callbacks see; the trainer keeps the latest for the card.
    assert frozen_run.trainer.state.log_history[-1]["eval_head1_top1"] == evals[-1]["eval_head1_top1"]


def test_heads_only_checkpoint_round_trip_and_model_card(frozen_run, base_dir, corpus, prompts, tmp_path):
    frozen_run.trainer.save_model(str(tmp_path))
    files = {p.name for p in tmp_path.iterdir()}
    assert {"bpd_heads.safetensors", "config.json", "README.md", "bpd_training.json"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin", "base", "adapter"}
    assert all(not k.startswith("base.") for k in load_file(tmp_path / "bpd_heads.safetensors"))
    loaded = BPDForCausalLM.from_pretrained(tmp_path).eval()  # the base comes from config.base_model_name_or_path
    assert loaded.config.base_model_name_or_path == str(base_dir)
    for a, b in zip(draft_and_logits(frozen_run.model, prompts), draft_and_logits(loaded, prompts)):
        assert torch.equal(a, b)
    kw = dict(max_new_tokens=30, do_sample=False, use_bpd=True, return_dict_in_generate=True)
    x, y = frozen_run.model.generate(prompts, **kw), loaded.generate(prompts, **kw)
    assert torch.equal(x.sequences, y.sequences) and torch.equal(x.accepted_lengths, y.accepted_lengths)
    card = (tmp_path / "README.md").read_text()
    info = json.loads((tmp_path / "bpd_training.json").read_text())
    top1 = frozen_run.final["eval_head1_top1"]
    assert "base_model:" not in card  # a local path is no Hub id: kept out of the YAML metadata
    for needle in (f"`{base_dir}`", "| draft heads `h` | 3 |", "`resblock`", str(corpus.train), f"{top1:.4f}"):
        assert needle in card, needle
    assert info["head_metrics"]["split"] == "evaluation" and len(info["head_metrics"]["top1"]) == H
    # A plain save_pretrained writes a card too (without training data, unless given).
    plain = tmp_path / "plain"
    loaded.save_pretrained(plain)
    assert "# Draft heads for" in (plain / "README.md").read_text()
    # `usage_setup` lines (e.g. making a GGUF base available offline) come before the load in the usage example
    loaded.save_pretrained(plain, training_info={"usage_setup": ["import os", "", "os.getcwd()  # setup"]})
    usage = (plain / "README.md").read_text().split("## Usage")[1]
    assert usage.index("os.getcwd()  # setup") < usage.index("BPDForCausalLM.from_pretrained")
    loaded.save_pretrained(plain, training_info={"usage_setup": "import os\nos.getcwd()"})  # one string: its lines
    assert "\nimport os\nos.getcwd()\n" in (plain / "README.md").read_text()
    frozen_run.trainer.create_model_card()  # Trainer.push_to_hub's hook writes the BPD card, not a generic one
    assert "## Measured per-head accuracy" in (frozen_run.out / "README.md").read_text()


# --------------------------------------------------------------------------------------------- LoRA
def test_lora_mode_changes_only_adapters_and_heads(lora_run):
    model, before = lora_run.model, lora_run.before
    changed_lora = 0
    for name, param in model.named_parameters():
        if "lora_" in name:
            assert param.requires_grad
            changed_lora += not torch.equal(param, before[name])
        elif name.startswith("base."):
            assert not param.requires_grad and torch.equal(param, before[name]), name
        else:
            assert param.requires_grad
            if name.endswith("weight"):
                assert not torch.equal(param, before[name]), name
    assert changed_lora > 0
    assert all(torch.count_nonzero(p) > 0 for n, p in model.named_parameters() if "lora_B" in n)
    # heads_learning_rate_multiplier: head parameters sit in groups at 4x the base learning rate.
    head_ids = {id(p) for n, p in model.named_parameters() if not n.startswith("base.")}
    for group in lora_run.trainer.optimizer.param_groups:
        is_head = {id(p) in head_ids for p in group["params"]}
        assert len(is_head) == 1
        assert group["initial_lr"] == pytest.approx(2e-2 if is_head.pop() else 5e-3)


def test_lora_checkpoint_round_trip_and_merge(lora_run, prompts, tmp_path):
    model = lora_run.model
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "model.safetensors").exists() and not (tmp_path / "base").exists()
    assert "LoRA adapters on the base" in (tmp_path / "README.md").read_text()
    loaded = BPDForCausalLM.from_pretrained(tmp_path).eval()
    for a, b in zip(draft_and_logits(model, prompts), draft_and_logits(loaded, prompts)):
        assert torch.equal(a, b)
    kw = dict(max_new_tokens=20, do_sample=False)
    assert torch.equal(loaded.generate(prompts, use_bpd=True, **kw), model.generate(prompts, use_bpd=True, **kw))
    merged = merge_lora(loaded)
    assert not hasattr(merged.base, "peft_config")
    for a, b in zip(draft_and_logits(model, prompts), draft_and_logits(merged, prompts)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert torch.equal(merged.generate(prompts, use_bpd=True, **kw), merged.base.generate(prompts, **kw))
    with pytest.raises(ValueError, match="no LoRA adapters"):
        merge_lora(merged)


def test_resume_restores_heads_and_adapters_and_checks_num_heads(lora_run, base_dir, blocks, tokenizer):
    checkpoint = lora_run.out / "checkpoint-3"
    assert (checkpoint / "bpd_heads.safetensors").is_file() and (checkpoint / "adapter").is_dir()
    args = lambda **kw: training_args(  # noqa: E731
        lora_run.out,
        max_steps=4,
        learning_rate=5e-3,
        use_lora=True,
        lora_r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        lora_target_modules=["q_proj", "v_proj", "down_proj"],
        base_loss_weight=0.5,
        heads_learning_rate_multiplier=4.0,
        **kw,
    )
    other = BPDForCausalLM.from_base(str(base_dir), num_draft_heads=2)
    trainer = BPDTrainer(other, args(), train_dataset=blocks.train)
    with pytest.raises(ValueError, match=r"num_draft_heads=3.*num_draft_heads=2"):
        trainer.train(resume_from_checkpoint=str(checkpoint))

    model = BPDForCausalLM.from_base(str(base_dir), num_draft_heads=H)
    trainer = BPDTrainer(model, args(), train_dataset=blocks.train, processing_class=tokenizer)
    trainer._load_from_checkpoint(str(checkpoint))
    saved = load_file(checkpoint / "bpd_heads.safetensors")
    assert all(torch.equal(model.heads_state_dict()[k], v) for k, v in saved.items())
    adapter = load_file(checkpoint / "adapter" / "adapter_model.safetensors")
    params = dict(model.base.named_parameters())
    assert all(torch.equal(params[k.replace(".weight", ".default.weight")], v) for k, v in adapter.items())
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert trainer.state.global_step == 4


# --------------------------------------------------------------------------------------------- distillation
def test_teacher_is_the_base_without_adapters(lora_run, base_dir, prompts):
    model, trainer = lora_run.model, lora_run.trainer
    inputs = {"input_ids": prompts, "attention_mask": torch.ones_like(prompts)}
    with torch.no_grad():
        outputs = model(**inputs)
        teacher = trainer.teacher_logits(model, inputs, outputs)
        plain = AutoModelForCausalLM.from_pretrained(base_dir).eval()(**inputs).logits
    torch.testing.assert_close(teacher, plain, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(outputs.logits, plain, atol=1e-4)  # the adapters do change the student's base


@pytest.mark.parametrize("mode, weighting", [("hard", "geometric"), ("soft", "random")])
def test_self_distillation_lowers_head_loss(mode, weighting, base_dir, blocks, tmp_path):
    model = BPDForCausalLM.from_base(str(base_dir), num_draft_heads=2, share_lm_head=False)
    args = training_args(
        tmp_path,
        max_steps=40,
        distillation=mode,
        head_loss_weighting=weighting,
        distillation_temperature=2.0,
    )
    trainer = BPDTrainer(model, args, train_dataset=blocks.train, eval_dataset=blocks.eval.select(range(16)))
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    for i in (1, 2):
        assert after[f"eval_head{i}_loss"] < 0.8 * before[f"eval_head{i}_loss"], (i, before, after)
    info = trainer.training_info()
    assert info["distillation"] == mode and info["head_metrics"]["targets"] == "base model greedy tokens"


# --------------------------------------------------------------------------------------------- Hub
def test_push_to_hub_uploads_heads_adapters_and_card(lora_run, monkeypatch):
    import huggingface_hub

    uploaded = {}

    def fake_create_repo(self, repo_id, **kwargs):
        return SimpleNamespace(repo_id=f"me/{repo_id}")

    def fake_upload_folder(self, *, repo_id, folder_path, **kwargs):
        root = Path(folder_path)
        uploaded.update(repo_id=repo_id, files={str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()})
        uploaded["card"] = (root / "README.md").read_text()
        return "commit"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", fake_create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", fake_upload_folder)
    info = lora_run.trainer.training_info()
    assert lora_run.model.push_to_hub("heads", training_info=info) == "commit"
    assert uploaded["repo_id"] == "me/heads"
    expected = {"bpd_heads.safetensors", "config.json", "README.md", "adapter/adapter_model.safetensors"}
    assert expected <= uploaded["files"]
    assert not any(f.endswith("model.safetensors") and not f.startswith("adapter/") for f in uploaded["files"])
    assert "library_name: hf_bpd" in uploaded["card"] and "LoRA + heads" in uploaded["card"]


def test_checkpoint_pushes_during_training_carry_heads_and_adapters(lora_run, monkeypatch, tmp_path):
    from concurrent.futures import Future

    import transformers.trainer

    uploads = []

    def fake_upload_folder(*, folder_path, **kwargs):
        root = Path(folder_path)
        uploads.append({str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()})
        done = Future()
        done.set_result("commit")
        return done

    trainer = lora_run.trainer
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: SimpleNamespace(upload_folder=fake_upload_folder))
    monkeypatch.setattr(trainer.args, "output_dir", str(tmp_path))
    monkeypatch.setattr(trainer, "hub_model_id", "me/heads", raising=False)
    monkeypatch.setattr(trainer, "push_in_progress", None, raising=False)
    trainer._push_from_checkpoint(str(lora_run.out / "checkpoint-3"))
    assert {"bpd_heads.safetensors", "README.md", "adapter/adapter_model.safetensors", "config.json"} <= uploads[0]


# --------------------------------------------------------------------------------------------- bad input
def test_data_errors_missing_column_empty_texts_and_short_documents(tokenizer, tmp_path, caplog):
    with pytest.raises(ValueError, match="Text column 'text' not found; columns found: \\['body'\\]"):
        pack_dataset(Dataset.from_dict({"body": ["w1 w2 w3"]}), tokenizer, 8)
    with pytest.raises(ValueError, match="No 8-token block"):
        pack_dataset(Dataset.from_dict({"text": ["", "   ", ""]}), tokenizer, 8)
    (tmp_path / "bad.jsonl").write_text(json.dumps({"content": "w1 w2"}) + "\n")
    with pytest.raises(ValueError, match="columns found"):
        load_packed_dataset(tmp_path / "bad.jsonl", tokenizer, 8)
    docs = [arithmetic_text(0, 1, n) for n in (2, 4, 30, 3, 40)]  # three shorter than h + 2 = 5
    (tmp_path / "mixed.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    with caplog.at_level(logging.WARNING):
        packed = load_packed_dataset(tmp_path / "mixed.jsonl", tokenizer, 8, min_tokens=H + 2)
    assert "Skipped 3 empty or short (< 5 tokens)" in caplog.text
    assert len(packed) == (30 + 1 + 40 + 1) // 8


def test_trainer_skips_and_counts_short_sequences(base_dir, tmp_path, caplog):
    model = BPDForCausalLM.from_base(str(base_dir), num_draft_heads=H)
    rows = [arithmetic_ids(0, 1, n) for n in (3, 10, 4, 12, 5, 1)]  # 3 shorter than h + 2 = 5
    with caplog.at_level(logging.WARNING):
        data = Dataset.from_dict({"input_ids": rows})
        trainer = BPDTrainer(model, training_args(tmp_path, max_steps=1), train_dataset=data)
    assert "Skipped 3 of 6 sequences shorter than 5 tokens" in caplog.text
    assert sorted(len(r) for r in trainer.train_dataset["input_ids"]) == [5, 10, 12]
    trainer.train()  # variable lengths: BlockCollator pads and masks
    with pytest.raises(ValueError, match="All 2 sequences are shorter than 5"):
        BPDTrainer(
            model, training_args(tmp_path), train_dataset=Dataset.from_dict({"input_ids": rows[:1] + rows[-1:]})
        )


def test_streaming_dataset_trains(base_dir, corpus, tokenizer, tmp_path):
    stream = load_packed_dataset(corpus.train, tokenizer, SEQ, min_tokens=H + 2, streaming=True)
    model = BPDForCausalLM.from_base(str(base_dir), num_draft_heads=H)
    args = training_args(tmp_path, max_steps=3, per_device_train_batch_size=4)
    trainer = BPDTrainer(model, args, train_dataset=stream)
    trainer.train()
    assert trainer.state.global_step == 3


def test_tokenizer_vocabulary_must_match_the_model(base_dir, tmp_path):
    model = BPDForCausalLM.from_base(str(base_dir), num_draft_heads=H)
    check_tokenizer_matches(word_tokenizer(VOCAB), model)
    with pytest.raises(ValueError, match=r"120 tokens.*vocabulary 97"):
        BPDTrainer(model, training_args(tmp_path), processing_class=word_tokenizer(120))


def test_lora_target_modules_must_exist(tmp_path):
    model = BPDForCausalLM.from_base(tiny_base("llama"), num_draft_heads=2)
    with pytest.raises(ValueError, match=r"\['qkv_proj'\] do not exist.*'q_proj'"):
        BPDTrainer(model, training_args(tmp_path, use_lora=True, lora_target_modules=["q_proj", "qkv_proj"]))
    assert not hasattr(model.base, "peft_config")
    gpt2 = BPDForCausalLM.from_base(tiny_base("gpt2"), num_draft_heads=2)
    with pytest.raises(ValueError, match=r"'c_attn'"):
        add_lora_adapters(gpt2, target_modules=["q_proj"])
    add_lora_adapters(gpt2, r=2, target_modules=["c_attn"])  # Conv1D layers are valid targets
    with pytest.raises(ValueError, match="already carries"):
        add_lora_adapters(gpt2)


def test_argument_validation(tmp_path):
    with pytest.raises(ValueError, match="head_loss_weighting"):
        training_args(tmp_path, head_loss_weighting="stern")
    with pytest.raises(ValueError, match="distillation"):
        training_args(tmp_path, distillation="yes")
    with pytest.raises(ValueError, match="heads_learning_rate_multiplier"):
        training_args(tmp_path, heads_learning_rate_multiplier=0.0)
    with pytest.raises(ValueError, match="BPDForCausalLM"):
        BPDTrainer(tiny_base("llama"), training_args(tmp_path))


# --------------------------------------------------------------------------------------------- distributed
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_two_process_accelerate_launch_trains_and_saves_loadable_heads(base_dir, corpus, tmp_path):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        str(REPO / "examples" / "train_heads.py"),
        "--use_cpu",
        "--base_model",
        str(base_dir),
        "--train_files",
        str(corpus.train),
        "--output_dir",
        str(out),
        "--num_draft_heads",
        "2",
        "--seq_len",
        str(SEQ),
        "--per_device_train_batch_size",
        "4",
        "--max_steps",
        "3",
        "--logging_steps",
        "1",
        "--save_strategy",
        "no",
        "--report_to",
        "none",
        "--disable_tqdm",
        "true",
        "--include_num_input_tokens_seen",
        "true",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # CPU processes, gloo backend, even on a GPU machine
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=REPO)
    print(f"2-process accelerate launch took {time.perf_counter() - start:.1f}s")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    info = json.loads((out / "bpd_training.json").read_text())
    assert info["global_step"] == 3
    assert info["num_input_tokens_seen"] == 2 * 3 * 4 * SEQ  # both processes' batches were counted: 2 ranks
    loaded = BPDForCausalLM.from_pretrained(out).eval()
    assert loaded.num_draft_heads == 2 and loaded.config.base_model_name_or_path == str(base_dir)
    ids = torch.tensor([arithmetic_ids(3, 2, 8)])
    ref = loaded.base.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(loaded.generate(ids, max_new_tokens=12, do_sample=False, use_bpd=True), ref)


def test_train_heads_script_trains_token_conditioned_heads(base_dir, corpus, tmp_path, monkeypatch):
    """`examples/train_heads.py --head_type recurrent` (the head kind SmolLM2 ships) trains, saves and decodes
    losslessly; the script's choices are the head registry's, so a new head type needs no change here."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_heads", REPO / "examples" / "train_heads.py")
    script = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "train_heads", script)  # its dataclasses look their module up there
    spec.loader.exec_module(script)
    out = tmp_path / "recurrent"
    argv = ["train_heads.py", "--base_model", str(base_dir), "--train_files", str(corpus.train)]
    argv += ["--output_dir", str(out), "--num_draft_heads", "2", "--head_type", "recurrent", "--seq_len", str(SEQ)]
    argv += ["--head_intermediate_size", "24", "--per_device_train_batch_size", "4", "--max_steps", "2"]
    argv += ["--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true", "--use_cpu", "true"]
    monkeypatch.setattr(sys, "argv", argv)
    script.main()
    loaded = BPDForCausalLM.from_pretrained(out).eval()
    assert loaded.config.head_type == "recurrent" and not loaded.independent_heads
    assert loaded.config.head_intermediate_size == 24 and loaded.num_draft_heads == 2
    assert json.loads((out / "bpd_training.json").read_text())["global_step"] == 2
    ids = torch.tensor([arithmetic_ids(3, 2, 8)])
    ref = loaded.base.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(loaded.generate(ids, max_new_tokens=12, do_sample=False, use_bpd=True), ref)


# --------------------------------------------------------------------------------------------- cached features
@pytest.fixture(scope="module")
def cached(base_dir, blocks, tmp_path_factory):
    """Features of the frozen base over the training / eval blocks (extracted once, as for SmolLM2)."""
    from hf_bpd.features import CachedFeatures, extract_features

    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    root = tmp_path_factory.mktemp("features")
    train = extract_features(base, blocks.train["input_ids"], root / "train", seq_len=SEQ, shard_size=64)
    evaluation = extract_features(base, blocks.eval["input_ids"], root / "eval", seq_len=SEQ, shard_size=64)
    return SimpleNamespace(base=base, train=CachedFeatures(train), eval=CachedFeatures(evaluation), root=root)


def test_feature_targets_are_the_base_greedy_tokens(cached, blocks):
    row = blocks.train[3]["input_ids"]
    with torch.no_grad():
        logits = cached.base(torch.tensor([row])).logits[0]
    item = cached.train[3]
    n = len(row)
    assert torch.equal(item["labels"][1:n], logits[:-1].argmax(-1))
    assert int(item["labels"][0]) == -100 and bool((item["labels"][n:] == -100).all())
    # resumable: a second call finds every shard and writes nothing
    from hf_bpd.features import extract_features

    stamp = {p: p.stat().st_mtime_ns for p in cached.train.files}
    again = extract_features(cached.base, blocks.train["input_ids"], cached.root / "train", seq_len=SEQ, shard_size=64)
    assert again == cached.train.files and all(p.stat().st_mtime_ns == stamp[p] for p in again)


def test_cached_features_with_a_draft_vocab_train_heads_that_bpd_accepts(cached, base_dir, prompts, tmp_path):
    from hf_bpd.features import coverage, draft_vocab_from_counts

    counts = cached.train.target_counts(VOCAB)
    token_map = draft_vocab_from_counts(counts, 80, always=[1])
    assert 1 in token_map.tolist() and coverage(counts, token_map) > 0.8
    model = BPDForCausalLM.from_base(str(base_dir), num_draft_heads=H, draft_vocab_size=80, share_lm_head=False)
    model.set_draft_vocab(token_map)  # own (K x d) projections, as frozen_run has (V x d) ones
    args = training_args(tmp_path, max_steps=150, distillation="hard")
    trainer = BPDTrainer(model, args, train_dataset=cached.train, eval_dataset=cached.eval)
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    for i in range(1, H + 1):
        assert after[f"eval_head{i}_loss"] < 0.6 * before[f"eval_head{i}_loss"], (i, before, after)
    model.eval()
    ref = model.base.generate(prompts, max_new_tokens=40, do_sample=False)
    out = model.generate(prompts, max_new_tokens=40, do_sample=False, use_bpd=True, return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref)
    assert out.block_efficiency > 2.0
    model.save_pretrained(tmp_path / "heads")
    loaded = BPDForCausalLM.from_pretrained(tmp_path / "heads")
    assert torch.equal(loaded.draft_token_map, token_map)


def test_draft_vocab_with_on_the_fly_hard_distillation(base_dir, blocks, tmp_path):
    model = BPDForCausalLM.from_base(str(base_dir), num_draft_heads=2, draft_vocab_size=90)
    model.set_draft_vocab(torch.arange(3, 93))
    trainer = BPDTrainer(
        model,
        training_args(tmp_path, max_steps=30, distillation="hard"),
        train_dataset=blocks.train,
        eval_dataset=blocks.eval.select(range(16)),
    )
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert after["eval_head1_loss"] < 0.8 * before["eval_head1_loss"]


def test_cached_features_bad_input(cached, base_dir, tmp_path):
    from hf_bpd.features import CachedFeatures, draft_vocab_from_counts

    model = BPDForCausalLM.from_base(str(base_dir), num_draft_heads=2)
    with pytest.raises(ValueError, match="distribution"):
        BPDTrainer(model, training_args(tmp_path, distillation="soft"), train_dataset=cached.train)
    wide = BPDForCausalLM.from_base(tiny_base("llama", hidden_size=64, intermediate_size=64), num_draft_heads=2)
    with pytest.raises(ValueError, match="hidden size"):
        BPDTrainer(wide, training_args(tmp_path), train_dataset=cached.train)
    with pytest.raises(ValueError, match="No feature shards"):
        CachedFeatures(tmp_path)
    with pytest.raises(ValueError, match="size must be"):
        draft_vocab_from_counts(torch.ones(10), 11)


def test_soft_targets_from_cached_top_k(cached, base_dir, blocks, tmp_path):
    """Top-k soft targets: the base's own top-k log-probabilities, and soft distillation trains from them alone."""
    from hf_bpd.features import CachedFeatures, extract_features

    paths = extract_features(
        cached.base, blocks.train["input_ids"][:64], tmp_path / "soft", seq_len=SEQ, shard_size=64, top_k=4
    )
    soft = CachedFeatures(paths)
    assert soft.has_soft_targets and not CachedFeatures(paths, soft_targets=False).has_soft_targets
    row = blocks.train[3]["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(cached.base(torch.tensor([row])).logits[0].float(), -1)
    item = soft[3]
    top = logp[:-1].topk(4, -1)
    n = len(row)
    assert torch.equal(item["teacher_topk_ids"][1:n], top.indices)
    torch.testing.assert_close(item["teacher_topk_logprobs"][1:n].float(), top.values, atol=2e-3, rtol=1e-3)
    assert torch.equal(item["teacher_topk_ids"][1:n, 0], item["labels"][1:n])  # argmax = the greedy target
    model = BPDForCausalLM.from_base(str(base_dir), num_draft_heads=2)
    trainer = BPDTrainer(
        model, training_args(tmp_path, max_steps=40, distillation="soft"), train_dataset=soft, eval_dataset=soft
    )
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert after["eval_head1_loss"] < 0.8 * before["eval_head1_loss"], (before, after)


def test_keep_least_certain_masks_the_most_certain_targets(cached, blocks, tmp_path):
    from hf_bpd.features import CachedFeatures, extract_features

    paths = extract_features(cached.base, blocks.train["input_ids"][:16], tmp_path / "f", seq_len=SEQ, top_k=2)
    full, half = CachedFeatures(paths), CachedFeatures(paths).keep_least_certain(0.5)
    valid, kept = full.targets != -100, half.targets != -100
    assert bool((kept <= valid).all()) and abs(int(kept.sum()) - int(valid.sum()) / 2) <= 2
    top1 = full.topk_logprobs[..., 0].float()
    assert float(top1[kept].max()) <= float(top1[valid & ~kept].min())  # every kept target is less certain
    with pytest.raises(ValueError, match="top-k"):
        CachedFeatures(paths, soft_targets=False).keep_least_certain(0.5)
    # only the loss is masked: heads still read every token (the rows' real tokens, which the shards store), and the
    # batches' order is the full data's
    assert half.lengths() == full.lengths()
    assert torch.equal(half[3]["draft_input_ids"], full.input_ids[3])
    assert torch.equal(full[3]["draft_input_ids"], full.input_ids[3])
    seen = []
    model = BPDForCausalLM.from_base(cached.base, num_draft_heads=2, head_type="recurrent")
    model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("draft_input_ids")), with_kwargs=True)
    BPDTrainer(model, training_args(tmp_path, max_steps=1, per_device_train_batch_size=16), train_dataset=half).train()
    width = seen[0].shape[1]
    unmasked = {tuple(full.input_ids[i, :width].tolist()) for i in range(len(full))}
    assert all(tuple(row.tolist()) in unmasked for row in seen[0])  # the tokens, not the masked labels


def test_cached_features_load_shards_in_order_without_copies(cached, blocks, tmp_path):
    """`CachedFeatures` fills tensors allocated once, shard after shard: the rows equal the shards' in order (soft
    targets too), shards of two storage dtypes are promoted as torch.cat would, and shards of another seq_len are
    refused with both names."""
    from safetensors.torch import load_file

    from hf_bpd.features import CachedFeatures, extract_features, save_feature_shard

    seqs = blocks.train["input_ids"][:10]
    paths = extract_features(cached.base, seqs, tmp_path / "a", seq_len=SEQ, shard_size=4, top_k=2)
    data = CachedFeatures(paths)
    shards = [load_file(p) for p in paths]
    assert [s["hidden"].shape[0] for s in shards] == [4, 4, 2] and len(data) == 10
    assert torch.equal(data.hidden, torch.cat([s["hidden"] for s in shards]))
    assert torch.equal(data.targets, torch.cat([s["targets"] for s in shards]).long())
    assert torch.equal(data.topk_ids, torch.cat([s["topk_ids"] for s in shards]).long())
    assert torch.equal(data.topk_logprobs, torch.cat([s["topk_logprobs"] for s in shards]))
    wide = save_feature_shard(tmp_path / "fp32.safetensors", {**shards[2], "hidden": shards[2]["hidden"].float()})
    mixed = CachedFeatures([paths[0], wide])
    assert mixed.hidden.dtype == torch.float32 and torch.equal(mixed.hidden[4:], shards[2]["hidden"].float())
    short = save_feature_shard(
        tmp_path / "short.safetensors", {k: v[:, :8].contiguous() for k, v in shards[0].items()}
    )
    with pytest.raises(ValueError, match=r"short.safetensors holds rows of \(seq_len, hidden\) \(8, 32\)"):
        CachedFeatures([paths[0], short])
    (k3,) = extract_features(cached.base, seqs[:4], tmp_path / "k3", seq_len=SEQ, top_k=3)
    with pytest.raises(ValueError, match=r"different k \(\[2, 3\]\)"):
        CachedFeatures([paths[0], k3])
    assert CachedFeatures([paths[0], k3], soft_targets=False).topk_ids is None  # not loaded: no conflict


def test_extract_features_refuses_a_nonsense_top_k(cached, blocks, tmp_path):
    from hf_bpd.features import extract_features

    for bad in (-1, VOCAB + 1, 2.5):
        with pytest.raises(ValueError, match="top_k must be"):
            extract_features(cached.base, blocks.train["input_ids"][:2], tmp_path / "bad", seq_len=SEQ, top_k=bad)


@pytest.fixture
def varied(cached, blocks, tmp_path):
    """Cached features of 48 rows of 6 to 31 tokens (right-padded to SEQ), with top-2 soft targets."""
    from hf_bpd.features import CachedFeatures, extract_features

    rows = [blocks.train["input_ids"][i][: 6 + (7 * i) % 26] for i in range(48)]
    return rows, CachedFeatures(extract_features(cached.base, rows, tmp_path / "varied", seq_len=SEQ, top_k=2))


@pytest.mark.parametrize("head_type", ["resblock", "recurrent"])
@pytest.mark.parametrize("distillation", ["hard", "soft"])
def test_batches_are_cut_after_their_last_target_with_the_same_loss(varied, base_dir, head_type, distillation):
    """`collate_features` drops the columns after a batch's last target: every head's loss (hard and soft, both head
    kinds: the conditioned heads read the tokens after each position) is what the full-width batch gives."""
    from conftest import randomize_heads

    from hf_bpd.features import collate_features

    rows, features = varied
    assert features.lengths() == [len(r) for r in rows]
    picked = [features[i] for i in (0, 3, 5)]
    cut = collate_features(picked)
    full = {key: torch.stack([r[key] for r in picked]) for key in picked[0]}
    longest = max(len(rows[i]) for i in (0, 3, 5))
    assert cut["labels"].shape[1] == longest < SEQ and cut["base_hidden_states"].shape[1] == longest
    model = BPDForCausalLM.from_base(str(base_dir), num_draft_heads=2, head_type=head_type)
    randomize_heads(model, std=0.1)
    losses = []
    for b in (cut, full):
        out = model(base_hidden_states=b["base_hidden_states"], labels=b["labels"], draft_full_vocab=True)
        if distillation == "hard":
            losses.append(out.head_losses)
        else:
            from hf_bpd.losses import topk_distillation_loss

            soft = topk_distillation_loss(
                out.draft_logits, b["teacher_topk_ids"], b["teacher_topk_logprobs"], b["labels"]
            )
            losses.append(soft[1])
    torch.testing.assert_close(losses[0], losses[1])


def test_group_by_length_groups_cached_features_by_their_lengths(varied, base_dir, tmp_path):
    """`train_sampling_strategy="group_by_length"` (transformers' flag) works on cached features: batches of similar
    lengths (transformers' `LengthGroupedSampler` over `CachedFeatures.lengths`), and training runs on them."""
    from transformers.trainer_pt_utils import LengthGroupedSampler

    rows, features = varied
    model = BPDForCausalLM.from_base(str(base_dir), num_draft_heads=2)
    args = training_args(
        tmp_path, max_steps=3, per_device_train_batch_size=4, train_sampling_strategy="group_by_length"
    )
    trainer = BPDTrainer(model, args, train_dataset=features)
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, LengthGroupedSampler)
    order = list(sampler)
    assert sorted(order) == list(range(len(rows)))
    lengths = features.lengths()
    batches = [order[s : s + 4] for s in range(0, len(order), 4)]
    spreads = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches]
    # random batches of 4 would span 3/5 of the range on average
    assert sum(spreads) / len(spreads) < (max(lengths) - min(lengths)) / 2
    trainer.train()
    assert trainer.state.global_step == 3
    # evaluation under the same flag groups by the rows' lengths too (transformers' default read `input_ids`)
    trainer = BPDTrainer(model, args, train_dataset=features, eval_dataset=features)
    assert isinstance(trainer._get_eval_sampler(features), LengthGroupedSampler)
    assert trainer.evaluate()["eval_head1_loss"] > 0
    plain = BPDTrainer(model, training_args(tmp_path, max_steps=1), train_dataset=features)
    assert not isinstance(plain._get_train_sampler(), LengthGroupedSampler)
