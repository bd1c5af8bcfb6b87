"""
`hf-bpd export --format medusa`: the export, loaded by a plain-torch re-implementation of vLLM's Medusa module,
gives our draft logits.

`VLLMMedusa` below is written from vLLM's `vllm/model_executor/models/medusa.py` and
`vllm/transformers_utils/configs/medusa.py` (config key renaming, `ResidualBlock`, `lm_heads` / `original_lm_head`,
`token_map` with `truncated_vocab_size`, `load_weights`), with `ParallelLMHead` as a bias-free linear layer and one
stricter rule: every parameter must come from the file (an unloaded vLLM parameter would hold garbage).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from hf_bpd import BPDForCausalLM
from hf_bpd_bench.cli import main as cli_main
from hf_bpd.export import export_medusa

from conftest import randomize_heads, tiny_base


def medusa_config_from_file(path) -> dict:
    """vLLM's `MedusaConfig.from_pretrained`: keys with "num" and "heads" -> num_heads, "num" and "layers" ->
    num_hidden_layers; defaults as in `MedusaConfig.__init__`."""
    config = json.loads((path / "config.json").read_text())
    for key in list(config):
        if "num" in key:
            if "heads" in key:
                config["num_heads"] = config.pop(key)
            elif "layers" in key:
                config["num_hidden_layers"] = config.pop(key)
    config.setdefault("num_heads", 5)
    config.setdefault("num_hidden_layers", 1)
    if config.get("truncated_vocab_size") is None:
        config["truncated_vocab_size"] = config["vocab_size"]
    return config


class ResidualBlock(nn.Module):
    def __init__(self, config: dict, hidden_size: int, num_layers: int):
        super().__init__()
        bias = config.get("medusa_fc_bias", False)
        self.layers = nn.ModuleList([nn.Linear(hidden_size, hidden_size, bias=bias) for _ in range(num_layers)])
        self.act = nn.SiLU()

    def forward(self, x):
        for layer in self.layers:
            x = x + self.act(layer(x))
        return x


class VLLMMedusa(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        self.config = config
        self.blocks = nn.ModuleList(
            [ResidualBlock(config, config["hidden_size"], config["num_hidden_layers"]) for _ in range(config["num_heads"])]
        )
        self.orig_vocab_size = config["vocab_size"]
        self.truncated_vocab_size = config["truncated_vocab_size"]
        if config.get("original_lm_head", False):
            self.lm_head = nn.Linear(config["hidden_size"], self.truncated_vocab_size, bias=False)
            self.lm_heads = [self.lm_head for _ in range(config["num_heads"])]
        else:
            self.lm_heads = nn.ModuleList(
                [nn.Linear(config["hidden_size"], self.truncated_vocab_size, bias=False) for _ in range(config["num_heads"])]
            )
        self.token_map = None

    def forward(self, hidden_states):
        return [block(hidden_states) for block in self.blocks]

    def compute_logits(self, hidden_states):
        logits_lst = []
        for hs, lm_head in zip(hidden_states, self.lm_heads):
            logits = lm_head(hs)
            if self.token_map is None:
                logits_lst.append(logits)
            else:
                full = -torch.inf * torch.ones((*logits.shape[:-1], self.orig_vocab_size), dtype=logits.dtype)
                full[..., self.token_map] = logits
                logits_lst.append(full)
        return logits_lst

    def load_weights(self, weights):
        params = dict(self.named_parameters())
        weights_map = {}
        for name, tensor in weights:
            name = name.replace("medusa_heads.", "")
            if name == "token_map":
                if self.truncated_vocab_size < self.orig_vocab_size:
                    self.token_map = tensor
            elif name in params:
                weights_map[name] = tensor
            elif self.config.get("original_lm_head", False) and name == "lm_heads.0.weight":
                weights_map["lm_head.weight"] = tensor
        for name, tensor in weights_map.items():
            if "lm_head" in name and self.token_map is not None and tensor.shape[0] > self.token_map.shape[0]:
                tensor = tensor[self.token_map]
            assert params[name].shape == tensor.shape, (name, params[name].shape, tensor.shape)
            with torch.no_grad():
                params[name].copy_(tensor)
        assert self.truncated_vocab_size == self.orig_vocab_size or self.token_map is not None
        assert set(weights_map) == set(params), f"not in the file: {sorted(set(params) - set(weights_map))}"


def load_vllm_medusa(path) -> VLLMMedusa:
    medusa = VLLMMedusa(medusa_config_from_file(path))
    medusa.load_weights(load_file(path / "model.safetensors").items())
    return medusa.eval()


def vllm_draft_logits(medusa: VLLMMedusa, hidden: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.stack(medusa.compute_logits(medusa(hidden)), dim=-2)  # (..., h, V)


@pytest.mark.parametrize(
    "share, layers, original_lm_head",
    [(True, 1, False), (True, 2, True), (False, 2, False)],
)
def test_vllm_medusa_reproduces_our_draft_logits(tmp_path, share, layers, original_lm_head):
    model = randomize_heads(
        BPDForCausalLM.from_base(tiny_base("llama"), num_draft_heads=3, head_num_layers=layers, share_lm_head=share),
        std=0.2,
    )
    if not share:  # own projections that differ from the base lm_head
        with torch.no_grad():
            for proj in model.draft_lm_heads:
                proj.weight.add_(torch.randn_like(proj.weight) * 0.1)
    export_medusa(model, tmp_path, original_lm_head=original_lm_head)
    config = medusa_config_from_file(tmp_path)
    assert config["num_heads"] == 3 and config["num_hidden_layers"] == layers and config["medusa_fc_bias"] is True
    medusa = load_vllm_medusa(tmp_path)
    hidden = torch.randn(5, 32)
    with torch.no_grad():
        ours = model.draft_logits(hidden)
    torch.testing.assert_close(vllm_draft_logits(medusa, hidden), ours, rtol=1e-5, atol=1e-5)


def test_vllm_medusa_with_a_draft_vocabulary(tmp_path):
    model = BPDForCausalLM.from_base(tiny_base("llama"), num_draft_heads=2, draft_vocab_size=40)
    model.set_draft_vocab(torch.randperm(97, generator=torch.Generator().manual_seed(0))[:40])
    randomize_heads(model, std=0.2)
    export_medusa(model, tmp_path)
    config = medusa_config_from_file(tmp_path)
    assert (config["vocab_size"], config["truncated_vocab_size"]) == (97, 40)
    medusa = load_vllm_medusa(tmp_path)
    assert torch.equal(medusa.token_map, model.draft_token_map)
    hidden = torch.randn(4, 32)
    with torch.no_grad():
        ours, theirs = model.draft_logits(hidden), vllm_draft_logits(medusa, hidden)
    inside = model.draft_token_map
    torch.testing.assert_close(theirs[..., inside], ours[..., inside], rtol=1e-5, atol=1e-5)
    outside = torch.ones(97, dtype=torch.bool)
    outside[inside] = False
    assert bool((theirs[..., outside] == -torch.inf).all()) and bool((ours[..., outside] < -1e30).all())
    assert torch.equal(theirs.argmax(-1), ours.argmax(-1))


def test_heads_read_the_hidden_state_vllm_passes():
    """vLLM hands Medusa the target's last hidden state after the final norm: the one `lm_head` reads."""
    model = BPDForCausalLM.from_base(tiny_base("llama"), num_draft_heads=2)
    ids = torch.randint(3, 97, (1, 7))
    with torch.no_grad():
        out = model(input_ids=ids)
        torch.testing.assert_close(model.get_output_embeddings()(out.hidden_states), out.logits)


@pytest.mark.parametrize("head_type", ["ffn", "lora"])
def test_ffn_and_lora_heads_are_refused(tmp_path, head_type):
    model = BPDForCausalLM.from_base(tiny_base("llama"), num_draft_heads=2, head_type=head_type)
    with pytest.raises(ValueError, match="resblock"):
        export_medusa(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_original_lm_head_needs_shared_projections(tmp_path):
    model = BPDForCausalLM.from_base(tiny_base("llama"), num_draft_heads=2, share_lm_head=False)
    with pytest.raises(ValueError, match="share_lm_head"):
        export_medusa(model, tmp_path, original_lm_head=True)


def test_cli_export(tmp_path):
    base_dir = tmp_path / "base"
    tiny_base("llama").save_pretrained(base_dir)
    model = randomize_heads(BPDForCausalLM.from_base(str(base_dir), num_draft_heads=2), std=0.2)
    model.save_pretrained(tmp_path / "heads")
    assert cli_main(["export", "--format", "medusa", str(tmp_path / "out"), "--model", str(tmp_path / "heads"),
                     "--dtype", "float32"]) == 0  # fmt: skip
    medusa = load_vllm_medusa(tmp_path / "out")
    hidden = torch.randn(3, 32)
    with torch.no_grad():
        torch.testing.assert_close(vllm_draft_logits(medusa, hidden), model.draft_logits(hidden), rtol=1e-5, atol=1e-5)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (tmp_path / "out" / config["base_model_name_or_path"]).resolve() == base_dir.resolve()
