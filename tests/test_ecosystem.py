"""
Issue 12: the habits of a transformers user work with `use_bpd=True` exactly as plain `generate`, or are refused
before any work; checkpoints round-trip (base path, generation config); the Auto classes and pipelines know the model;
errors say what is wrong.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch
from conftest import EOS, PAD, batch_prompts, randomize_heads, tiny_base
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

import hf_bpd
from hf_bpd import BPDForCausalLM
from hf_bpd.generation import BPDGenerateOutput

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "reference"
needs_reference = pytest.mark.skipif(not (REFERENCE / "heads").is_dir(), reason="reference checkpoint not available")


@pytest.fixture
def model():
    return randomize_heads(BPDForCausalLM.from_base(tiny_base(), num_draft_heads=3), std=0.3)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(REFERENCE / "tokenizer")


@pytest.fixture
def text_model(tokenizer):
    """A tiny random model over the reference tokenizer's vocabulary (8192)."""
    base = tiny_base("llama", vocab_size=len(tokenizer), pad_token_id=0, eos_token_id=0, bos_token_id=0)
    return randomize_heads(BPDForCausalLM.from_base(base, num_draft_heads=3), std=0.3)


# ------------------------------------------------------------------------------------------ generate habits
def test_guidance_scale_is_refused_before_any_work(model, monkeypatch):
    ids, _ = batch_prompts(1)
    monkeypatch.setattr(model.base, "forward", lambda *a, **k: pytest.fail("the model ran"))
    with pytest.raises(ValueError, match="guidance_scale"):
        model.generate(ids, max_new_tokens=5, use_bpd=True, guidance_scale=1.5)
    with pytest.raises(ValueError, match="guidance_scale"):
        model.generate(ids, generation_config=GenerationConfig(guidance_scale=2.0, max_new_tokens=5), use_bpd=True)


def test_contrastive_search_and_dola_are_refused(model):
    ids, _ = batch_prompts(1)
    with pytest.raises(ValueError, match="contrastive"):
        model.generate(ids, max_new_tokens=5, use_bpd=True, penalty_alpha=0.6, top_k=4)
    with pytest.raises(ValueError, match="DoLa"):
        model.generate(ids, max_new_tokens=5, use_bpd=True, dola_layers="high")


def test_stop_strings_with_tokenizer_match_plain_generate(text_model, tokenizer):
    prompts = ["To be, or not to be", "Once upon a time, there"]
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    free = text_model.base.generate(**enc, max_new_tokens=24, do_sample=False)
    # stop at a piece of text the model really produces, in the middle of row 0's continuation
    stop = tokenizer.decode(free[0, enc.input_ids.shape[1] + 6 : enc.input_ids.shape[1] + 8])
    kwargs = dict(max_new_tokens=24, do_sample=False, stop_strings=[stop], tokenizer=tokenizer)
    ref = text_model.base.generate(**enc, **kwargs)
    assert not torch.equal(ref, free)  # the stop string did stop row 0 early (padded from there on)
    out = text_model.generate(**enc, **kwargs, use_bpd=True)
    assert torch.equal(out, ref)
    text_model.generation_config.stop_strings = [stop]  # from the generation config as well
    out = text_model.generate(**enc, max_new_tokens=24, do_sample=False, tokenizer=tokenizer, use_bpd=True)
    assert torch.equal(out, ref)


def test_stop_strings_without_tokenizer_is_a_clear_error(text_model, tokenizer):
    ids = tokenizer(["To be"], return_tensors="pt").input_ids
    with pytest.raises(ValueError, match="tokenizer="):
        text_model.generate(ids, max_new_tokens=5, stop_strings=["be"], use_bpd=True)


def test_token_healing_matches_plain_generate(text_model, tokenizer):
    enc = tokenizer(["To be, or not to be, that is the qu"], return_tensors="pt")
    kwargs = dict(max_new_tokens=12, do_sample=False, token_healing=True, tokenizer=tokenizer)
    ref = text_model.base.generate(enc.input_ids, **kwargs)
    assert torch.equal(text_model.generate(enc.input_ids, **kwargs, use_bpd=True), ref)
    assert torch.equal(text_model.generate(input_ids=enc.input_ids, **kwargs, use_bpd=True), ref)


def test_right_padding_is_refused(model):
    ids, mask = batch_prompts(2)
    right_ids, right_mask = ids.flip(1), mask.flip(1)  # padding now at the end of row 1
    with pytest.raises(ValueError, match="Right padding"):
        model.generate(right_ids, attention_mask=right_mask, max_new_tokens=5, use_bpd=True)
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = PAD, EOS
    with pytest.raises(ValueError, match="Right padding"):  # mask inferred from the pad token, as generate does
        model.generate(right_ids, max_new_tokens=5, use_bpd=True)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, use_bpd=True)  # left: fine
    assert torch.equal(out, model.base.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False))


@pytest.mark.parametrize("use_bpd", [True, False])
def test_empty_input_ids_is_a_clear_error(model, use_bpd):
    with pytest.raises(ValueError, match="input_ids` is empty"):
        model.generate(torch.zeros(1, 0, dtype=torch.long), max_new_tokens=5, use_bpd=use_bpd)


def test_untrained_heads_warn_trained_heads_do_not():
    fresh = BPDForCausalLM.from_base(tiny_base(), num_draft_heads=2)
    ids, _ = batch_prompts(1)
    with pytest.warns(UserWarning, match="untrained"):
        fresh.generate(ids, max_new_tokens=4, use_bpd=True)
    randomize_heads(fresh)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fresh.generate(ids, max_new_tokens=4, use_bpd=True)


def test_heads_moved_apart_from_the_base_are_cast_back(model, caplog):
    ids, _ = batch_prompts(1)
    ref = model.base.generate(ids, max_new_tokens=8, do_sample=False)
    model.heads.to(torch.float16)
    with caplog.at_level(logging.WARNING, logger="hf_bpd"):
        out = model.generate(ids, max_new_tokens=8, do_sample=False, use_bpd=True)
    assert torch.equal(out, ref)
    assert "casting the heads" in caplog.text
    assert next(model.heads.parameters()).dtype == torch.float32


def test_heads_file_in_another_dtype_loads_onto_the_base(tmp_path, model):
    model.save_pretrained(tmp_path)
    state = {k: v.half() for k, v in load_file(tmp_path / "bpd_heads.safetensors").items()}
    save_file(state, str(tmp_path / "bpd_heads.safetensors"))
    loaded = BPDForCausalLM.from_pretrained(tmp_path, base_model=tiny_base())
    assert next(loaded.heads.parameters()).dtype == torch.float32
    ids, _ = batch_prompts(1)
    ref = loaded.base.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(loaded.generate(ids, max_new_tokens=8, do_sample=False, use_bpd=True), ref)


def test_compute_transition_scores(model):
    ids, _ = batch_prompts(1)
    out = model.generate(
        ids, max_new_tokens=6, do_sample=False, use_bpd=True, return_dict_in_generate=True, output_scores=True
    )
    ref = model.base.generate(ids, max_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_scores=True)
    scores = model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
    expected = model.base.compute_transition_scores(ref.sequences, ref.scores, normalize_logits=True)
    assert scores.shape == (1, 6)
    torch.testing.assert_close(scores, expected)


# ------------------------------------------------------------------------------------------ checkpoints
@needs_reference
def test_saved_copy_of_the_reference_reloads(tmp_path, monkeypatch):
    model = BPDForCausalLM.from_pretrained(REFERENCE / "heads", dtype=torch.float32)
    model.save_pretrained(tmp_path / "copy")
    monkeypatch.chdir(tmp_path)  # neither the checkpoint nor the working directory is next to the base any more
    loaded = BPDForCausalLM.from_pretrained(tmp_path / "copy", dtype=torch.float32)
    assert Path(loaded.base.name_or_path).resolve() == (REFERENCE / "base").resolve()
    ids = torch.tensor([[5, 17, 300, 41]])
    assert torch.equal(loaded(input_ids=ids).draft_logits, model(input_ids=ids).draft_logits)


def test_from_base_with_a_relative_path_saves_a_loadable_reference(tmp_path, monkeypatch):
    tiny_base("llama").save_pretrained(tmp_path / "models" / "base")
    monkeypatch.chdir(tmp_path)
    model = randomize_heads(BPDForCausalLM.from_base("models/base", num_draft_heads=2))
    model.save_pretrained(tmp_path / "runs" / "heads")
    written = hf_bpd.BPDConfig.from_pretrained(tmp_path / "runs" / "heads").base_model_name_or_path
    assert written == os.path.join("..", "..", "models", "base")  # relative to the checkpoint folder
    assert model.config.base_model_name_or_path == "models/base"  # the in-memory config is left alone
    monkeypatch.chdir("/")
    loaded = BPDForCausalLM.from_pretrained(tmp_path / "runs" / "heads")
    ids, _ = batch_prompts(1)
    assert torch.equal(loaded(input_ids=ids).draft_logits, model(input_ids=ids).draft_logits)


def test_absolute_base_path_stays_absolute(tmp_path):
    tiny_base("llama").save_pretrained(tmp_path / "base")
    BPDForCausalLM.from_base(str(tmp_path / "base"), num_draft_heads=2).save_pretrained(tmp_path / "heads")
    written = hf_bpd.BPDConfig.from_pretrained(tmp_path / "heads").base_model_name_or_path
    assert written == str((tmp_path / "base").resolve())


def test_missing_local_base_is_a_clear_error(tmp_path):
    model = BPDForCausalLM.from_base(tiny_base(), num_draft_heads=2)
    model.config.base_model_name_or_path = "../nowhere"
    model.save_pretrained(tmp_path / "heads")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        BPDForCausalLM.from_pretrained(tmp_path / "heads")


def test_generation_config_of_the_checkpoint_is_restored(tmp_path, model):
    model.generation_config.use_bpd = True
    model.generation_config.max_new_tokens = 7
    model.save_pretrained(tmp_path)
    base = tiny_base()
    assert getattr(base.generation_config, "use_bpd", None) is None
    loaded = BPDForCausalLM.from_pretrained(tmp_path, base_model=base)
    assert loaded.generation_config.use_bpd is True and loaded.generation_config.max_new_tokens == 7
    ids, _ = batch_prompts(1)
    out = loaded.generate(ids, do_sample=False, return_dict_in_generate=True)
    assert isinstance(out, BPDGenerateOutput) and out.sequences.shape[1] == ids.shape[1] + 7
    assert torch.equal(loaded.generate(ids, do_sample=False, use_bpd=False), out.sequences)  # base shares the config


def test_auto_model_loads_heads_and_base(tmp_path, model):
    model.save_pretrained(tmp_path / "heads", save_base=True)
    auto = AutoModelForCausalLM.from_pretrained(tmp_path / "heads")
    assert isinstance(auto, BPDForCausalLM)
    ids, _ = batch_prompts(1)
    assert torch.equal(auto(input_ids=ids).draft_logits, model(input_ids=ids).draft_logits)
    ref = model.base.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(auto.generate(ids, max_new_tokens=8, do_sample=False, use_bpd=True), ref)


def test_pipeline_does_not_list_unsupported_models(text_model, tokenizer):
    from transformers import pipeline

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    hf_logger = logging.getLogger("transformers")
    hf_logger.addHandler(handler)
    try:
        pipe = pipeline("text-generation", model=text_model, tokenizer=tokenizer)
        out = pipe("To be", max_new_tokens=6, do_sample=False, use_bpd=True)
    finally:
        hf_logger.removeHandler(handler)
    assert not [r for r in records if "not supported for" in r.getMessage()]
    assert out[0]["generated_text"].startswith("To be")


# ------------------------------------------------------------------------------------------ loading errors
@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_heads_file_is_named(tmp_path, model, damage):
    model.save_pretrained(tmp_path)
    path = tmp_path / "bpd_heads.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"not a safetensors file at all" * 10)
    with pytest.raises(ValueError, match=r"bpd_heads\.safetensors is corrupt or truncated"):
        BPDForCausalLM.from_pretrained(tmp_path, base_model=tiny_base())


def test_folder_that_does_not_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        BPDForCausalLM.from_pretrained(tmp_path / "no" / "such" / "heads")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        BPDForCausalLM.from_pretrained("./heads-that-are-not-here")


def test_repo_id_without_hub_access_still_tries_the_hub(monkeypatch):
    import huggingface_hub

    asked = []

    def offline(repo_id, **kwargs):
        asked.append(repo_id)
        raise OSError("no connection")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(OSError, match="not a local folder, and getting it from the Hub failed"):
        BPDForCausalLM.from_pretrained("some-user/bpd-heads")
    assert asked == ["some-user/bpd-heads"]


def test_public_api_is_importable_from_the_package():
    from hf_bpd import (  # noqa: F401
        BPDTrainer,
        BPDTrainingArguments,
        LatticeRescorer,
        NeuralRescorer,
        NgramRescorer,
        OracleDrafter,
        PBestRescorer,
    )
    from hf_bpd.logits import PBestRescorer as direct
    from hf_bpd.trainer import BPDTrainer as trainer_direct

    assert PBestRescorer is direct and BPDTrainer is trainer_direct
    assert {"BPDTrainer", "NgramRescorer"} <= set(hf_bpd.__all__)
    with pytest.raises(AttributeError):
        hf_bpd.NoSuchThing  # noqa: B018


# ------------------------------------------------------------------------------------------ docs and configs
@needs_reference
def test_readme_example_runs_as_written(monkeypatch, capsys):
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Example") :]
    code = section[
        section.index("```python") + len("```python") : section.index("```", section.index("```python") + 9)
    ]
    monkeypatch.chdir(ROOT)
    exec(compile(code, "README.md", "exec"), {})
    assert "To be, or not to be" in capsys.readouterr().out


@pytest.mark.parametrize("name, kind", [("ddp", "MULTI_GPU"), ("deepspeed_zero2", "DEEPSPEED"), ("fsdp", "FSDP")])
def test_shipped_accelerate_configs_parse(name, kind):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ROOT / "examples" / "accelerate" / f"{name}.yaml"))
    assert config.distributed_type.name == kind and config.mixed_precision == "bf16"
