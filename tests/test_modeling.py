"""BPDForCausalLM: config validation, heads, forward shapes, save/load, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import VOCAB, batch_prompts, randomize_heads, tiny_base
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

from hf_bpd import BPDConfig, BPDForCausalLM, DraftRescorer


@pytest.mark.parametrize(
    "field,value",
    [
        ("num_draft_heads", 0),
        ("num_draft_heads", 1.5),
        ("head_type", "mlp"),
        ("head_num_layers", 0),
        ("head_rank", -1),
        ("share_lm_head", "yes"),
        ("head_hidden_size", 0),
    ],
)
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        BPDConfig(**{field: value})


@pytest.mark.parametrize("head_type", ["resblock", "ffn", "lora"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_untrained_heads_reproduce_the_base_path(arch, head_type):
    """Zero-initialised residual heads are the identity: every head's logits equal the base next-token logits."""
    base = tiny_base(arch)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = BPDForCausalLM.from_base(base, num_draft_heads=3, head_type=head_type, head_num_layers=2)
    for k, v in model.base.state_dict().items():  # wrapping never re-initialises the base
        assert torch.equal(v, before[k]), k
    assert all(not p.requires_grad for p in model.base.parameters())
    assert all(p.requires_grad for p in model.heads.parameters())
    ids, mask = batch_prompts(2)
    out = model(input_ids=ids, attention_mask=mask)
    assert out.draft_logits.shape == (2, ids.shape[1], 3, VOCAB)
    for i in range(3):
        torch.testing.assert_close(out.draft_logits[:, :, i], out.logits)
    # the heads see the hidden state the base lm_head sees
    torch.testing.assert_close(model.base.get_output_embeddings()(out.hidden_states), out.logits)


def test_heads_are_independent_modules():
    model = BPDForCausalLM.from_base(tiny_base(), num_draft_heads=3, head_num_layers=2)
    ptrs = {p.data_ptr() for p in model.heads.parameters()}
    assert len(ptrs) == len(list(model.heads.parameters()))


def test_lora_head_is_small():
    model = BPDForCausalLM.from_base(tiny_base(), num_draft_heads=2, head_type="lora", head_rank=4)
    assert sum(p.numel() for p in model.heads[0].parameters()) == 2 * 32 * 4


def test_forward_loss_with_labels():
    model = randomize_heads(BPDForCausalLM.from_base(tiny_base(), num_draft_heads=2))
    ids, mask = batch_prompts(2)
    labels = ids.masked_fill(mask == 0, -100)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.loss.ndim == 0 and out.head_losses.shape == (2,) and torch.isfinite(out.base_loss)
    out.loss.backward()
    assert all(p.grad is not None for p in model.heads.parameters())


@pytest.mark.parametrize("share", [True, False])
def test_save_load_round_trip_bit_exact(tmp_path, share):
    base = tiny_base("qwen2")
    model = randomize_heads(BPDForCausalLM.from_base(base, num_draft_heads=2, head_type="ffn", share_lm_head=share))
    model.save_pretrained(tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert "bpd_heads.safetensors" in files and "config.json" in files
    assert not any(f.endswith((".bin", ".pt", ".pth")) for f in files)
    assert "base" not in files  # referenced, not copied
    from safetensors.torch import load_file

    assert not any(k.startswith("base.") for k in load_file(tmp_path / "bpd_heads.safetensors"))
    loaded = BPDForCausalLM.from_pretrained(tmp_path, base_model=tiny_base("qwen2"))
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    ids, _ = batch_prompts(1)
    assert torch.equal(model(input_ids=ids).draft_logits, loaded(input_ids=ids).draft_logits)


def test_save_with_base_and_load_without_base_argument(tmp_path):
    model = randomize_heads(BPDForCausalLM.from_base(tiny_base("gpt2"), num_draft_heads=2))
    model.save_pretrained(tmp_path, save_base=True)
    loaded = BPDForCausalLM.from_pretrained(tmp_path)
    ids, _ = batch_prompts(1)
    a = model.generate(ids, max_new_tokens=10, do_sample=False, use_bpd=True)
    b = loaded.generate(ids, max_new_tokens=10, do_sample=False, use_bpd=True)
    assert torch.equal(a, b)


def test_load_by_base_path_in_config(tmp_path):
    tiny_base("llama").save_pretrained(tmp_path / "mybase")
    model = BPDForCausalLM.from_base(str(tmp_path / "mybase"), num_draft_heads=2)
    assert model.config.base_model_name_or_path == str(tmp_path / "mybase")
    model.save_pretrained(tmp_path / "heads")
    loaded = BPDForCausalLM.from_pretrained(tmp_path / "heads")
    assert loaded.config.num_draft_heads == 2


def test_heads_for_another_base_is_a_clear_error(tmp_path):
    BPDForCausalLM.from_base(tiny_base(), num_draft_heads=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="base_vocab_size"):
        BPDForCausalLM.from_pretrained(tmp_path, base_model=tiny_base(vocab_size=50))
    with pytest.raises(ValueError, match="base_hidden_size"):
        BPDForCausalLM.from_pretrained(tmp_path, base_model=tiny_base(hidden_size=64, intermediate_size=64))


def test_heads_file_with_wrong_tensors_is_a_clear_error(tmp_path):
    BPDForCausalLM.from_base(tiny_base(), num_draft_heads=2).save_pretrained(tmp_path)
    cfg = BPDConfig.from_pretrained(tmp_path)
    cfg.num_draft_heads = 3
    cfg.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="missing"):
        BPDForCausalLM.from_pretrained(tmp_path, base_model=tiny_base())


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="bpd_heads.safetensors"):
        BPDForCausalLM.from_pretrained(tmp_path, base_model=tiny_base())


# ------------------------------------------------------------------------------------------ generate errors
@pytest.fixture
def model():
    return BPDForCausalLM.from_base(tiny_base(), num_draft_heads=2)


def test_beam_search_is_rejected(model):
    ids, _ = batch_prompts(1)
    with pytest.raises(ValueError, match="num_beams"):
        model.generate(ids, max_new_tokens=5, num_beams=2, use_bpd=True)


def test_assisted_and_prompt_lookup_are_rejected(model):
    ids, _ = batch_prompts(1)
    with pytest.raises(ValueError, match="assistant_model"):
        model.generate(ids, max_new_tokens=5, use_bpd=True, assistant_model=tiny_base())
    with pytest.raises(ValueError, match="prompt_lookup_num_tokens"):
        model.generate(ids, max_new_tokens=5, use_bpd=True, prompt_lookup_num_tokens=3)


class NoCropLayer(DynamicLayer):
    is_croppable = False


def test_uncroppable_cache_is_rejected(model):
    ids, _ = batch_prompts(1)
    cache = Cache(layers=[NoCropLayer() for _ in range(2)])
    with pytest.raises(ValueError, match="cannot be cropped"):
        model.generate(ids, max_new_tokens=5, use_bpd=True, cache=cache)


def test_use_cache_false_is_rejected(model):
    ids, _ = batch_prompts(1)
    with pytest.raises(ValueError, match="use_cache"):
        model.generate(ids, max_new_tokens=5, use_bpd=True, use_cache=False)


def test_streamer_with_batch_is_rejected(model):
    from transformers.generation.streamers import BaseStreamer

    ids, mask = batch_prompts(2)
    with pytest.raises(ValueError, match="streamer"):
        model.generate(ids, attention_mask=mask, max_new_tokens=5, use_bpd=True, streamer=BaseStreamer())


def test_rescorer_without_bpd_is_rejected(model):
    ids, _ = batch_prompts(1)
    with pytest.raises(ValueError, match="draft_rescorer"):
        model.generate(ids, max_new_tokens=5, draft_rescorer=object())


class WrongShape(DraftRescorer):
    def __call__(self, input_ids, lengths, draft_logits):
        return draft_logits.argmax(-1)  # (B, h): the p axis is missing


def test_bad_rescorer_type_and_output_shape(model):
    ids, _ = batch_prompts(1)
    with pytest.raises(ValueError, match="DraftRescorer"):
        model.generate(ids, max_new_tokens=5, use_bpd=True, draft_rescorer=lambda ids, lengths, logits: logits)
    with pytest.raises(ValueError, match="draft_rescorer must return"):
        model.generate(ids, max_new_tokens=5, use_bpd=True, draft_rescorer=WrongShape())


def test_output_hidden_states_is_rejected(model):
    ids, _ = batch_prompts(1)
    with pytest.raises(ValueError, match="output_hidden_states"):
        model.generate(ids, max_new_tokens=5, use_bpd=True, return_dict_in_generate=True, output_hidden_states=True)


def test_user_dynamic_cache_works(model):
    ids, _ = batch_prompts(1)
    ref = model.base.generate(ids, max_new_tokens=8, do_sample=False)
    out = model.generate(ids, max_new_tokens=8, do_sample=False, use_bpd=True, cache=DynamicCache())
    assert torch.equal(out, ref)


def test_relative_base_path_is_resolved_next_to_the_checkpoint(tmp_path, monkeypatch):
    tiny_base("llama").save_pretrained(tmp_path / "base")
    model = randomize_heads(BPDForCausalLM.from_base(tiny_base("llama"), num_draft_heads=2))
    model.config.base_model_name_or_path = "../base"
    model.save_pretrained(tmp_path / "heads")
    monkeypatch.chdir("/")
    loaded = BPDForCausalLM.from_pretrained(tmp_path / "heads")
    ids, _ = batch_prompts(1)
    assert torch.equal(loaded(input_ids=ids).draft_logits, model(input_ids=ids).draft_logits)


def test_tokenizer_source_follows_a_relative_base_path(tmp_path, monkeypatch):
    """`hf-bpd tune` once passed the raw "../base" to AutoTokenizer (read as a Hub id)."""
    from hf_bpd.modeling_bpd import tokenizer_source

    tiny_base("llama").save_pretrained(tmp_path / "base")
    model = BPDForCausalLM.from_base(tiny_base("llama"), num_draft_heads=2)
    model.config.base_model_name_or_path = "../base"
    model.save_pretrained(tmp_path / "heads")
    monkeypatch.chdir("/")
    loaded = BPDForCausalLM.from_pretrained(tmp_path / "heads")
    assert Path(tokenizer_source(tmp_path / "heads", loaded)).resolve() == (tmp_path / "base").resolve()
    assert tokenizer_source(tmp_path / "heads", loaded, tokenizer="tok") == "tok"
    assert tokenizer_source(tmp_path / "heads", loaded, base="b") == "b"
    (tmp_path / "heads" / "tokenizer_config.json").write_text("{}")  # a checkpoint with its own tokenizer wins
    assert tokenizer_source(tmp_path / "heads", loaded) == str(tmp_path / "heads")
