"""Tiny random models built from configs (no downloads) shared by the tests."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from transformers import (  # noqa: E402
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from hf_bpd import BPDForCausalLM  # noqa: E402

# Tiny models: one thread is faster than two (and much faster when the other core is busy).
torch.set_num_threads(1)

VOCAB = 97
PAD, EOS, BOS = 0, 1, 2
ARCHS = ("llama", "gpt2", "qwen2", "mistral")


def tiny_base(arch: str = "llama", seed: int = 0, vocab_size: int = VOCAB, **overrides):
    """A 2-layer, 32-wide random causal LM of the given architecture, in eval mode."""
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=BOS)
    if arch == "gpt2":
        config = GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=256, **common, **overrides)
        return GPT2LMHeadModel(config).eval()
    kwargs = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        **common,
    )
    kwargs.update(overrides)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**kwargs)).eval()
    if arch == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**kwargs)).eval()
    if arch == "mistral":
        return MistralForCausalLM(MistralConfig(sliding_window=None, **kwargs)).eval()
    raise ValueError(arch)


def randomize_heads(model: BPDForCausalLM, seed: int = 1, std: float = 0.5) -> BPDForCausalLM:
    """Replace the zero-initialised heads by random ones: drafts that are mostly rejected."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.heads.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def batch_prompts(batch: int, length: int = 9, seed: int = 0, vocab_size: int = VOCAB):
    """Left-padded prompts of different lengths (row b has b pads) and their attention mask."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (batch, length), generator=gen)
    mask = torch.ones_like(ids)
    for b in range(batch):
        mask[b, : min(b * 2, length - 2)] = 0
    ids[mask == 0] = PAD
    return ids, mask


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param
