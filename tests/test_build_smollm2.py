"""Bad input of the SmolLM2 data pipeline (`examples/build_smollm2.py`, issue 18): a torn answers file is cut back
to its last complete record and appended to cleanly; over-long prompts and empty answers are counted in the log; a
torn or grown feature shard is extracted again. A tiny random model stands in for SmolLM2 (nothing downloads)."""

from __future__ import annotations

import importlib.util
import json
import logging
import tempfile
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


# ------------------------------------------------------------------------- features captured while answering
@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_generation_features_equal_a_second_forward(arch):
    """The hidden states recorded while `generate` answers left-padded prompts, and the targets built from them, are
    what `extract_features` computes in a second forward over prompt + answer (fp32: to rounding); one row stops at
    EOS while the others go on, so post-EOS padding and per-row lengths are exercised."""
    from conftest import batch_prompts

    from hf_bpd.features import LastHiddenStateRecorder, extract_features, generation_features

    base = tiny_base(arch)
    ids, mask = batch_prompts(3, length=7)
    new = 6
    probe = base.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, eos_token_id=None)
    eos = int(probe[0, ids.shape[1] + 2])  # row 0 ends at its third answer token
    with LastHiddenStateRecorder(base) as recorder:
        gen = base.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, eos_token_id=eos)
    seq_len = 16
    got = generation_features(
        base, ids, mask, gen, recorder.states, eos, seq_len, train_start=[2, 0, 0], storage_dtype=torch.float32
    )
    rows, masks = [], []
    for b in range(3):
        answer = gen[b, ids.shape[1] :].tolist()
        n = answer.index(eos) + 1 if eos in answer else len(answer)
        rows.append(ids[b][mask[b].bool()].tolist() + answer[:n])
        masks.append([0, 0] * (b == 0) + [1] * (len(rows[-1]) - 2 * (b == 0)))
    answer_lengths = [len(r) - int(m.sum()) for r, m in zip(rows, mask)]
    assert answer_lengths[0] <= 3 < max(answer_lengths)  # row 0 stopped early, another went on
    with tempfile.TemporaryDirectory() as tmp:
        (path,) = extract_features(base, rows, tmp, seq_len=seq_len, train_mask=masks, storage_dtype=torch.float32)
        want = load_file(path)
    for b, row in enumerate(rows):
        n = len(row)
        torch.testing.assert_close(got["hidden"][b, : n - 1], want["hidden"][b, : n - 1], atol=1e-5, rtol=1e-4)
        assert torch.equal(got["targets"][b], want["targets"][b]), b
    assert (got["targets"][0, :2] == -100).all() and (got["targets"][0, len(rows[0]) :] == -100).all()
    assert not recorder.decoder._forward_hooks  # the hook is gone after the block


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_add_soft_targets_equal_extracted_top_k(arch, tmp_path):
    """Soft targets computed from a shard's stored hidden states (`add_soft_targets`, how captured shards get them)
    are `extract_features(top_k=...)`'s at every position with a target (fp32 storage: to rounding); the hard
    targets, hidden states and metadata are kept; a shard that has them is left alone; bad input is refused."""
    from hf_bpd.features import (
        CachedFeatures,
        add_soft_targets,
        extract_features,
        save_feature_shard,
        shard_metadata,
    )

    base = tiny_base(arch)
    seqs = [list(range(3 + i, 3 + i + n)) for i, n in enumerate((10, 12, 9, 11))]
    masks = [[0, 0, 0] + [1] * (len(s) - 3) for s in seqs]  # no target in a "system block"
    kw = dict(seq_len=16, train_mask=masks, storage_dtype=torch.float32)
    (soft,) = extract_features(base, seqs, tmp_path / "soft", top_k=3, **kw)
    (hard,) = extract_features(base, seqs, tmp_path / "hard", **kw)
    tensors = load_file(hard)
    save_feature_shard(hard, tensors, {"ids": ["a", "b", "c", "d"]})
    assert add_soft_targets(base, [hard], top_k=3) == [hard]
    got, want = load_file(hard), load_file(soft)
    assert torch.equal(got["hidden"], tensors["hidden"]) and torch.equal(got["targets"], tensors["targets"])
    assert shard_metadata(hard) == {"ids": ["a", "b", "c", "d"]}
    valid = got["targets"] != -100
    assert int(valid.sum()) > 20
    assert torch.equal(got["topk_ids"][valid], want["topk_ids"][valid])
    torch.testing.assert_close(got["topk_logprobs"][valid], want["topk_logprobs"][valid], atol=2e-3, rtol=1e-3)
    assert (got["topk_logprobs"][~valid] == float("-inf")).all()
    assert CachedFeatures([hard]).has_soft_targets
    stamp = hard.stat().st_mtime_ns
    add_soft_targets(base, [hard], top_k=3)  # already there: not rewritten
    assert hard.stat().st_mtime_ns == stamp
    add_soft_targets(base, [hard], top_k=2)  # another k: rewritten
    assert load_file(hard)["topk_ids"].shape[-1] == 2
    with pytest.raises(ValueError, match="top_k must be"):
        add_soft_targets(base, [hard], top_k=0)
    with pytest.raises(ValueError, match="chunk_positions must be"):
        add_soft_targets(base, [hard], top_k=2, chunk_positions=0)
    base.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        add_soft_targets(base, [hard], top_k=3)
    del base.config.final_logit_softcapping
    forward = base.forward

    def scaled(*args, **kwargs):  # logits that are not the output embeddings' product (a scale no config names)
        out = forward(*args, **kwargs)
        out.logits = out.logits * 2
        return out

    base.forward = scaled
    with pytest.raises(ValueError, match=r"beyond its output embeddings \(forward\)"):
        add_soft_targets(base, [hard], top_k=3)
    base.forward = forward
    with pytest.raises(ValueError, match="hidden states of size"):
        add_soft_targets(tiny_base(arch, hidden_size=64, intermediate_size=64), [hard], top_k=3)
    save_feature_shard(tmp_path / "x.safetensors", {"hidden": torch.zeros(1, 2, 3)})
    with pytest.raises(ValueError, match="not a feature shard"):
        add_soft_targets(base, [tmp_path / "x.safetensors"], top_k=3)


def test_extract_features_adds_a_missing_top_k_without_a_forward(tmp_path):
    """A shard on disk that lacks the asked top-k gets it from its stored hidden states (no base forward); asked for
    none, a shard with soft targets is kept as it is."""
    from hf_bpd.features import extract_features

    base = tiny_base("llama")
    seqs = [list(range(3 + i, 11 + i)) for i in range(4)]
    kw = dict(seq_len=16, shard_size=2, storage_dtype=torch.float32)
    paths = extract_features(base, seqs, tmp_path / "a", **kw)
    want = extract_features(base, seqs, tmp_path / "b", top_k=2, **kw)
    calls = []
    base.register_forward_pre_hook(lambda m, a, k: calls.append(k["input_ids"].shape[-1]), with_kwargs=True)
    assert extract_features(base, seqs, tmp_path / "a", top_k=2, **kw) == paths
    assert calls and max(calls) <= 2  # only the logit-transform check's two-token forwards, no extraction
    for got, ref in zip(paths, want):
        got, ref = load_file(got), load_file(ref)
        valid = got["targets"] != -100
        assert torch.equal(got["topk_ids"][valid], ref["topk_ids"][valid])
    stamps = [p.stat().st_mtime_ns for p in paths]
    extract_features(base, seqs, tmp_path / "a", **kw)  # top_k=0: the soft targets stay
    assert [p.stat().st_mtime_ns for p in paths] == stamps and max(calls) <= 2


def test_stale_temporaries_are_removed_but_not_a_running_writer_s(tmp_path):
    import os

    from hf_bpd.features import remove_stale_temporaries, save_feature_shard

    save_feature_shard(tmp_path / "s.safetensors", {"x": torch.zeros(2)})
    assert [p.name for p in tmp_path.iterdir()] == ["s.safetensors"]  # the temporary was renamed
    alive = tmp_path / f"gen-00001.{os.getppid()}.tmp"  # the parent process: running
    dead = tmp_path / "gen-00002.999999999.tmp"
    old_style, own = tmp_path / "gen-00003.tmp", tmp_path / f"gen-00004.{os.getpid()}.tmp"
    for p in (alive, dead, old_style, own):
        p.write_bytes(b"half a shard")
    assert set(remove_stale_temporaries(tmp_path)) == {dead, old_style, own}
    assert alive.exists()


def test_generation_features_refuse_states_of_another_call():
    from conftest import batch_prompts

    from hf_bpd.features import LastHiddenStateRecorder, generation_features

    base = tiny_base("llama")
    ids, mask = batch_prompts(2, length=5)
    with LastHiddenStateRecorder(base) as recorder:
        base(input_ids=ids[:1], attention_mask=mask[:1])  # one row's forward, not this batch's generate
    gen = base.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    with pytest.raises(ValueError, match="record exactly one greedy `generate` call"):
        generation_features(base, ids, mask, gen, recorder.states, 2, 16)
    with pytest.raises(ValueError, match="do not match"):
        generation_features(base, ids, mask, gen, [], 2, 16)
    with LastHiddenStateRecorder(base) as recorder:
        gen = base.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
        base(input_ids=gen[:, -1:], attention_mask=torch.ones_like(gen[:, -1:]))  # one forward too many
    with pytest.raises(ValueError, match="do not match"):
        generation_features(base, ids, mask, gen, recorder.states, 2, 16)


def test_answers_stage_captures_features_and_a_crash_between_shard_and_answers_is_repaired(
    build, tokenizer, tmp_path, monkeypatch, caplog
):
    """With --capture-features the answers stage writes each batch's feature rows (training and held-out apart,
    tagged with their prompt ids) beside the answers; the features stage then extracts only answers without them;
    a shard whose answers never reached answers.jsonl (a crash in between) is deleted on the next run."""
    from hf_bpd.features import CachedFeatures, save_feature_shard, shard_metadata

    model = tiny_base("llama", vocab_size=len(tokenizer), pad_token_id=0, eos_token_id=0)
    monkeypatch.setattr("hf_bpd.smollm2.load_smollm2", lambda dtype=None: (model, tokenizer))
    ids = ["q0", "q1", "q2", "q3", "q20"]  # crc32("q20") % 20 == 0: held out
    prompts = [{"id": i, "messages": [{"role": "user", "content": f"Say {i} twice."}]} for i in ids]
    (tmp_path / "train_prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    args = build.parse_args(
        ["--work-dir", str(tmp_path), "--answer-tokens", "6", "--answer-batch", "2", "--dtype", "float32"]
    )
    build.stage_answers(args)
    answered = {r["id"] for r in build._read_jsonl(tmp_path / "answers.jsonl") if r["answer"].strip()}
    chat = sorted((tmp_path / "features" / "chat-gen").glob("*.safetensors"))
    held = sorted((tmp_path / "features" / "eval-gen").glob("*.safetensors"))
    assert build._held_out({"id": "q20"}) and not build._held_out({"id": "q0"})
    got = {i for f in chat + held for i in shard_metadata(f)["ids"]}
    assert got == answered and {i for f in held for i in shard_metadata(f)["ids"]} <= {"q20"}
    assert len(CachedFeatures(chat + held)) == len(answered)

    assert all(shard_metadata(f)["seq_len"] == args.seq_len for f in chat + held)
    first = shard_metadata(chat[0])["ids"]
    stored = load_file(chat[0])
    assert stored["hidden"].shape[0] == len(first) and (stored["targets"] != -100).any(dim=1).all()

    # a crash after a shard was written, before (all) its answers were: the last answer of chat[0] never landed,
    # and a whole shard's answers never did; a half-written .tmp is left behind
    landed = answered - {first[-1]}
    orphan = tmp_path / "features" / "chat-gen" / "gen-00099.safetensors"
    save_feature_shard(orphan, {k: v[:1] for k, v in stored.items()}, metadata={"ids": ["ghost"]})
    torn = tmp_path / "features" / "eval-gen" / "gen-00100.tmp"
    torn.write_bytes(b"torn")
    stamp = chat[0].stat().st_mtime_ns
    covered, _, usable = build._captured_features(tmp_path, landed, args.seq_len)  # a reader changes nothing
    assert orphan.exists() and torn.exists() and chat[0].stat().st_mtime_ns == stamp
    assert chat[0] not in usable["chat"] and orphan not in usable["chat"] and "ghost" in covered
    with caplog.at_level(logging.WARNING):
        covered, next_shard, usable = build._captured_features(tmp_path, landed, args.seq_len, repair=True)
    assert not orphan.exists() and not torn.exists() and "missing from answers.jsonl" in caplog.text
    assert shard_metadata(chat[0])["ids"] == first[:-1] and load_file(chat[0])["hidden"].shape[0] == len(first) - 1
    torch.testing.assert_close(load_file(chat[0])["hidden"], stored["hidden"][:-1])
    assert covered == landed and chat[0] in usable["chat"] and next_shard == 100  # never reuses a number

    with pytest.raises(SystemExit, match="seq-len 64"):  # shards captured at another length are not mixed in
        build._captured_features(tmp_path, landed, 64)
    chat[0].write_bytes(b"not a shard")
    with pytest.raises(SystemExit, match="cannot be read"):  # never thrown away silently
        build._captured_features(tmp_path, landed, args.seq_len, repair=True)
    chat[0].unlink()

    seen = {}
    monkeypatch.setattr(
        "hf_bpd.features.extract_features", lambda m, seqs, out, **kw: seen.setdefault(kw["name"], seqs)
    )
    monkeypatch.setattr(build, "_raw_windows", lambda *a, **k: [])
    build.stage_features(args)
    # the answers of the shard removed above lost their captured features: they, and only they, are extracted
    assert len(seen["chat"]) == len(first) and seen["eval"] == []
    # --soft-top-k (16 by default): the captured shards got the base's top-k from their stored hidden states
    shards = build._captured_features(tmp_path, landed, args.seq_len)[2]
    assert shards["chat"] and all(load_file(p)["topk_ids"].shape[-1] == 16 for p in shards["chat"] + shards["eval"])


def test_soft_targets_are_not_silently_dropped(tmp_path, caplog, build):
    """Captured shards carry no top-k: `CachedFeatures` says so when they are mixed with soft shards, and the heads
    stage refuses `--distillation soft` while captured shards without top-k are in its data."""
    from hf_bpd.features import CachedFeatures, add_soft_targets, extract_features, save_feature_shard

    base = tiny_base("llama")
    seqs = [list(range(3, 3 + n)) for n in (10, 12)]
    (soft,) = extract_features(base, seqs, tmp_path / "soft", seq_len=16, top_k=2)
    hard = save_feature_shard(
        tmp_path / "hard.safetensors", {k: v for k, v in load_file(soft).items() if not k.startswith("topk")}
    )
    assert CachedFeatures(soft).has_soft_targets
    with caplog.at_level(logging.WARNING):
        assert not CachedFeatures([soft, hard]).has_soft_targets
    assert "1 of 2 feature shards have no soft (top-k) targets" in caplog.text

    work = tmp_path / "work"
    (work / "features" / "chat-gen").mkdir(parents=True)
    save_feature_shard(work / "features" / "chat-gen" / "gen-00000.safetensors", load_file(hard), {"ids": ["a", "b"]})
    (work / "answers.jsonl").write_text('{"id": "a", "answer": "x"}\n{"id": "b", "answer": "y"}\n')
    args = build.parse_args(["--work-dir", str(work), "--distillation", "soft", "--seq-len", "16"])
    with pytest.raises(SystemExit, match="--distillation soft needs"):
        build.stage_heads(args)
    assert not build._has_soft_targets(work / "features" / "chat-gen" / "gen-00000.safetensors")
    add_soft_targets(base, [work / "features" / "chat-gen" / "gen-00000.safetensors"], top_k=2)
    assert build._has_soft_targets(work / "features" / "chat-gen" / "gen-00000.safetensors")


@pytest.mark.parametrize("first", [False, True])
def test_followups_first_answers_multi_turn_prompts_in_the_first_chunks(
    build, tokenizer, tmp_path, monkeypatch, first
):
    model = tiny_base("llama", vocab_size=len(tokenizer), pad_token_id=0, eos_token_id=0)
    monkeypatch.setattr("hf_bpd.smollm2.load_smollm2", lambda dtype=None: (model, tokenizer))
    ids = [f"q{i}" for i in range(20)] + ["q0/f", "q1/f"]  # one chunk is 16 prompts at --answer-batch 1
    prompts = [{"id": i, "messages": [{"role": "user", "content": f"Say {i}."}]} for i in ids]
    (tmp_path / "train_prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    flags = ["--work-dir", str(tmp_path), "--answer-tokens", "2", "--answer-batch", "1", "--dtype", "float32"]
    build.stage_answers(build.parse_args(flags + ["--no-capture-features"] + ["--followups-first"] * first))
    order = [r["id"] for r in build._read_jsonl(tmp_path / "answers.jsonl")]
    assert sorted(order) == sorted(ids)
    where = [order.index(i) for i in ("q0/f", "q1/f")]
    assert (max(where) < 16) if first else (min(where) >= 16)


def test_followups_make_multi_turn_prompts_from_training_answers_only(build, tmp_path):
    """The followups stage appends `{id}/f` prompts (first turn, its answer, a follow-up of its task kind) made from
    answers that are not held out, is idempotent, skips empty answers, and a follow-up is held out with its parent."""
    held_id = next(f"q{i}" for i in range(200) if build._held_out({"id": f"q{i}"}))
    ids = ["q0", "q1", held_id, "q3"]
    prompts = [
        {"id": i, "domain": "summarize", "messages": [{"role": "user", "content": f"Sum up {i}."}]} for i in ids
    ]
    (tmp_path / "train_prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    answers = [{**p, "answer": "" if p["id"] == "q3" else f"It says {p['id']}.", "answer_tokens": 3} for p in prompts]
    (tmp_path / "answers.jsonl").write_text("".join(json.dumps(a) + "\n" for a in answers))
    args = build.parse_args(["--work-dir", str(tmp_path), "--followups", "10"])
    build.stage_followups(args)
    build.stage_followups(args)  # again: nothing new
    rows = build._read_jsonl(tmp_path / "train_prompts.jsonl")
    made = [r for r in rows if "/" in r["id"]]
    assert [r["id"] for r in made] == ["q0/f", "q1/f"]  # not the held-out one, not the empty answer
    first = made[0]["messages"]
    assert [m["role"] for m in first] == ["user", "assistant", "user"] and first[1]["content"] == "It says q0."
    assert first[2]["content"] in build.FOLLOWUPS["summarize"]
    assert build._held_out({"id": f"{held_id}/f"}) and not build._held_out({"id": "q0/f"})
    with pytest.raises(SystemExit, match="--followups must be >= 0"):
        build.main(["--work-dir", str(tmp_path), "--stages", "followups", "--followups", "-1"])


def test_eval_head_kinds_answer_scope_masks_each_row_s_prompt(build, tokenizer, tmp_path, monkeypatch):
    """`bench/eval_head_kinds.py --answers`: the rows of shards captured while answering keep the answer's targets
    only, from the first answer position (the prompt's length under the chat template) on."""
    from hf_bpd.features import CachedFeatures, save_feature_shard, shard_metadata

    spec = importlib.util.spec_from_file_location("eval_head_kinds", REPO / "bench" / "eval_head_kinds.py")
    evaluation = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluation)
    model = tiny_base("llama", vocab_size=len(tokenizer), pad_token_id=0, eos_token_id=0)
    monkeypatch.setattr("hf_bpd.smollm2.load_smollm2", lambda dtype=None: (model, tokenizer))
    prompts = [{"id": f"q{i}", "messages": [{"role": "user", "content": "Say it " * (i + 1)}]} for i in range(4)]
    (tmp_path / "train_prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    args = build.parse_args(
        ["--work-dir", str(tmp_path), "--answer-tokens", "6", "--answer-batch", "4", "--dtype", "float32"]
    )
    build.stage_answers(args)
    folder = tmp_path / "features" / "chat-gen"
    targets = CachedFeatures([folder]).targets
    masked = evaluation.answer_targets([folder], targets, tmp_path / "answers.jsonl", tokenizer)
    answers = {r["id"]: r for r in build._read_jsonl(tmp_path / "answers.jsonl")}
    rows = [i for f in sorted(folder.glob("*.safetensors")) for i in shard_metadata(f)["ids"]]
    assert len(rows) == targets.shape[0] == 4
    for row, key in enumerate(rows):
        text = tokenizer.apply_chat_template(answers[key]["messages"], add_generation_prompt=True, tokenize=False)
        start = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        kept = (masked[row] != -100).nonzero().flatten()
        assert kept[0] == start and (targets[row, :start] != -100).any()  # the prompt had targets; now masked
        assert len(kept) - answers[key]["answer_tokens"] in (0, 1)  # the answer, and its EOS where it stopped
        assert torch.equal(masked[row, kept], targets[row, kept])
    extracted = tmp_path / "x.safetensors"  # a shard without prompt ids (extracted from text) is refused
    save_feature_shard(extracted, {k: v[:1] for k, v in load_file(next(folder.glob("*.safetensors"))).items()})
    with pytest.raises(SystemExit, match="stores no prompt ids"):
        evaluation.answer_targets([extracted], targets[:1], tmp_path / "answers.jsonl", tokenizer)


def test_init_heads_widens_trained_heads_and_keeps_their_draft_vocabulary(build, tmp_path):
    """`--init-heads`: the heads stage starts from a trained heads folder, wider FFN blocks computing what the
    narrow heads computed; the folder's draft vocabulary replaces the one this run counted (its output rows were
    trained on it), own projections come along, and another head kind, `h` or vocabulary size is refused."""
    from conftest import VOCAB, randomize_heads

    from hf_bpd import BPDForCausalLM

    base = tiny_base("llama")
    hidden, prev = torch.randn(2, 4, 32), torch.randint(0, VOCAB, (2, 4, 3))
    for share in (True, False):
        trained = BPDForCausalLM.from_base(
            base, num_draft_heads=3, head_type="recurrent", draft_vocab_size=40, share_lm_head=share
        )
        trained.set_draft_vocab(torch.arange(3, 3 + 40).flip(0))
        randomize_heads(trained, std=0.3)
        if not share:
            with torch.no_grad():
                for proj in trained.draft_lm_heads:
                    proj.weight.normal_(std=0.3)
        trained.save_pretrained(tmp_path / f"trained-{share}")
        wide = BPDForCausalLM.from_base(
            base,
            num_draft_heads=3,
            head_type="recurrent",
            draft_vocab_size=40,
            head_intermediate_size=64,
            share_lm_head=share,
        )
        wide.set_draft_vocab(torch.arange(5, 5 + 40))  # as if more data had counted another vocabulary
        build._init_heads(wide, tmp_path / f"trained-{share}")
        assert torch.equal(wide.draft_token_map, trained.draft_token_map)
        torch.testing.assert_close(wide.draft_logits(hidden, prev), trained.draft_logits(hidden, prev))
    other_size = BPDForCausalLM.from_base(base, num_draft_heads=3, head_type="recurrent", draft_vocab_size=48)
    with pytest.raises(SystemExit, match="draft vocabulary of 40, this run's to a draft vocabulary of 48"):
        build._init_heads(other_size, tmp_path / "trained-True")
    four = BPDForCausalLM.from_base(base, num_draft_heads=4, head_type="recurrent", draft_vocab_size=40)
    with pytest.raises(SystemExit, match="holds 3 'recurrent' heads .* this run builds 4"):
        build._init_heads(four, tmp_path / "trained-True")
    unshared = BPDForCausalLM.from_base(
        base, num_draft_heads=3, head_type="recurrent", draft_vocab_size=40, share_lm_head=False
    )
    with pytest.raises(SystemExit, match="share_lm_head=True.*share_lm_head=False"):
        build._init_heads(unshared, tmp_path / "trained-True")


def test_archived_answers_are_restored_on_a_fresh_work_folder(build, tokenizer, tmp_path, monkeypatch, caplog):
    """The work folder lives in the user cache, which a fresh machine lacks: `archive` writes the answers not yet
    archived as one more gzip chunk (reproducible bytes), and `answers` on an empty work folder restores them
    (prompt fields from the prompts file) instead of generating them again."""
    model = tiny_base("llama", vocab_size=len(tokenizer), pad_token_id=0, eos_token_id=0)
    monkeypatch.setattr("hf_bpd.smollm2.load_smollm2", lambda dtype=None: (model, tokenizer))
    prompts = [{"id": f"q{i}", "kind": "qa", "messages": [{"role": "user", "content": f"Say {i}."}]} for i in range(3)]
    old, fresh, out = tmp_path / "old", tmp_path / "fresh", tmp_path / "out"
    for work in (old, fresh):
        work.mkdir()
        (work / "train_prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    answers = [{**p, "answer": f"answer {i}", "answer_tokens": 2} for i, p in enumerate(prompts)]
    (old / "answers.jsonl").write_text("".join(json.dumps(a) + "\n" for a in answers[:2]))
    flags = ["--out", str(out), "--dtype", "float32", "--answer-tokens", "2", "--no-capture-features"]
    build.stage_archive(build.parse_args(["--work-dir", str(old), *flags]))
    first = (out / "smollm2-answers" / "answers-000.jsonl.gz").read_bytes()
    with caplog.at_level(logging.INFO):
        build.stage_archive(build.parse_args(["--work-dir", str(old), *flags]))  # nothing new: no chunk
    assert "nothing new" in caplog.text and len(list((out / "smollm2-answers").iterdir())) == 1
    with (old / "answers.jsonl").open("a") as handle:
        handle.write(json.dumps(answers[2]) + "\n")
    build.stage_archive(build.parse_args(["--work-dir", str(old), *flags]))
    assert [r["id"] for r in build._archived(build.parse_args(["--work-dir", str(old), *flags]))] == ["q0", "q1", "q2"]
    build.stage_answers(build.parse_args(["--work-dir", str(fresh), *flags]))
    restored = build._read_jsonl(fresh / "answers.jsonl")
    assert restored == answers  # every field back, nothing generated again
    lacking = tmp_path / "lacking"  # a work folder whose prompts file lacks q2 (a stage not rerun): said, not dropped
    lacking.mkdir()
    (lacking / "train_prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts[:2]))
    with caplog.at_level(logging.WARNING):
        build.stage_answers(build.parse_args(["--work-dir", str(lacking), *flags]))
    assert "1 archived answers have no prompt" in caplog.text and "q2" in caplog.text
    assert [r["id"] for r in build._read_jsonl(lacking / "answers.jsonl")] == ["q0", "q1"]
    (out / "smollm2-answers" / "answers-000.jsonl.gz").unlink()  # the same answers give the same bytes
    build.stage_archive(build.parse_args(["--work-dir", str(fresh), *flags]))
    assert (out / "smollm2-answers" / "answers-002.jsonl.gz").read_bytes() == first  # numbered after the last


def test_more_prompts_are_stable_per_kind_and_answers_take_only_the_chosen_kinds(
    build, tokenizer, tmp_path, monkeypatch
):
    """The more stage appends `m-{kind}-{i}` prompts of the chosen kinds, made with the validation prompts' templates
    from training texts only; a rerun with a larger number appends only the new ones and the first stay as they were.
    `--kinds` then restricts the answers stage: the other prompts wait for a later run."""
    train = "\n".join(f"training line {i} of a long text" for i in range(400))
    fake = {d: {"train": [train], "validation": ["VALIDATION " * 400]} for d in ("austen", "shakespeare", "kjv")}
    fake["python"] = {"train": [train], "validation": ["VALIDATION " * 400]}
    monkeypatch.setattr("hf_bpd_bench.reference.split_reference_corpora", lambda *a, **k: fake)
    first = {"id": "p0", "domain": "qa", "messages": [{"role": "user", "content": "Who speaks?"}]}
    (tmp_path / "train_prompts.jsonl").write_text(json.dumps(first) + "\n")
    flags = ["--work-dir", str(tmp_path), "--out", str(tmp_path / "reference"), "--kinds", "summarize"]
    build.stage_more(build.parse_args(flags + ["--more-prompts-per-kind", "3"]))
    before = build._read_jsonl(tmp_path / "train_prompts.jsonl")
    build.stage_more(build.parse_args(flags + ["--more-prompts-per-kind", "5"]))
    rows = build._read_jsonl(tmp_path / "train_prompts.jsonl")
    assert rows[:4] == before and [r["id"] for r in rows[1:]] == [f"m-summarize-{i}" for i in range(5)]
    templates = build.TEMPLATES["summarize"][1]
    for row in rows[1:]:
        text = row["messages"][0]["content"]
        assert row["domain"] == "summarize" and row["split"] == "train" and "VALIDATION" not in text
        assert any(text.startswith(t.split("{passage}")[0]) for t in templates)
    model = tiny_base("llama", vocab_size=len(tokenizer), pad_token_id=0, eos_token_id=0)
    monkeypatch.setattr("hf_bpd.smollm2.load_smollm2", lambda dtype=None: (model, tokenizer))
    answer = ["--answer-tokens", "2", "--answer-batch", "4", "--dtype", "float32", "--no-capture-features"]
    build.stage_answers(build.parse_args(flags + answer))
    assert sorted(r["id"] for r in build._read_jsonl(tmp_path / "answers.jsonl")) == [r["id"] for r in rows[1:]]
    build.stage_answers(build.parse_args(flags[:4] + answer))  # every kind: the qa prompt too
    assert len(build._read_jsonl(tmp_path / "answers.jsonl")) == 6
    with pytest.raises(SystemExit):
        build.parse_args(["--kinds", "summarise"])
    with pytest.raises(SystemExit, match="--more-prompts-per-kind must be >= 0"):
        build.main(["--work-dir", str(tmp_path), "--stages", "more", "--more-prompts-per-kind", "-1"])
