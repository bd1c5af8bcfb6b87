"""
`hf-bpd export --format medusa`: the export, loaded by a plain-torch re-implementation of vLLM's Medusa module,
gives our draft logits.

`VLLMMedusa` below follows vLLM's current `vllm/model_executor/models/medusa.py` and
`vllm/transformers_utils/configs/medusa.py` *shapes*, not ours: `MedusaConfig.from_pretrained`'s key renaming and
defaults; `ResidualBlock` with `medusa_fc_bias`; with `original_lm_head` ONE `ParallelLMHead(truncated_vocab_size)`
shared by all heads, else one `ParallelLMHead(vocab_size)` per head (the full vocabulary, whatever
`truncated_vocab_size` says); `ParallelLMHead` pads its rows to a multiple of 64 and its weight loader asserts that
the file holds exactly the layer's vocabulary rows; `load_weights` as vLLM's (`token_map` becomes a parameter only
while loading, `lm_heads.0.weight` feeds `lm_head` under `original_lm_head`); and the model loader's final check:
every parameter must be in what `load_weights` reports as loaded ("Following weights were not initialized from
checkpoint"). The old export (draft-vocabulary projections and `token_map`) fails this loader.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import randomize_heads, tiny_base
from safetensors.torch import load_file
from torch import nn

from hf_bpd import BPDForCausalLM
from hf_bpd.export import export_medusa
from hf_bpd_bench.cli import main as cli_main

PADDING = 64  # vLLM's DEFAULT_VOCAB_PADDING_SIZE
ROOT = Path(__file__).resolve().parents[1]


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


class ParallelLMHead(nn.Module):
    """vLLM's `ParallelLMHead` on one device: rows padded to a multiple of 64, a loader that checks the row count."""

    def __init__(self, num_embeddings: int, hidden_size: int):
        super().__init__()
        self.org_vocab_size = num_embeddings
        padded = -(-num_embeddings // PADDING) * PADDING
        self.weight = nn.Parameter(torch.empty(padded, hidden_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param, loaded_weight):
        assert loaded_weight.shape[0] == self.org_vocab_size, (loaded_weight.shape, self.org_vocab_size)
        param.data[: loaded_weight.shape[0]].copy_(loaded_weight)
        param.data[loaded_weight.shape[0] :].fill_(0)


def default_weight_loader(param, loaded_weight):
    assert param.shape == loaded_weight.shape, (param.shape, loaded_weight.shape)
    param.data.copy_(loaded_weight)


class VLLMMedusa(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        self.config = config
        self.blocks = nn.ModuleList(
            [
                ResidualBlock(config, config["hidden_size"], config["num_hidden_layers"])
                for _ in range(config["num_heads"])
            ]
        )
        self.orig_vocab_size = config["vocab_size"]
        self.truncated_vocab_size = config["truncated_vocab_size"]
        if config.get("original_lm_head", False):
            self.lm_head = ParallelLMHead(self.truncated_vocab_size, config["hidden_size"])
            self.lm_heads = [self.lm_head for _ in range(config["num_heads"])]
        else:
            self.lm_heads = nn.ModuleList(
                [ParallelLMHead(config["vocab_size"], config["hidden_size"]) for _ in range(config["num_heads"])]
            )
        self.token_map = None

    def forward(self, hidden_states):
        return [block(hidden_states) for block in self.blocks]

    def compute_logits(self, hidden_states):
        logits_lst = []
        for hs, lm_head in zip(hidden_states, self.lm_heads):
            logits = (hs @ lm_head.weight.T)[..., : self.truncated_vocab_size]  # LogitsProcessor drops the padding
            if self.token_map is None:
                logits_lst.append(logits)
            else:
                full = -torch.inf * torch.ones((*logits.shape[:-1], self.orig_vocab_size), dtype=logits.dtype)
                full[..., self.token_map] = logits
                logits_lst.append(full)
        return logits_lst

    def load_weights(self, weights) -> set[str]:
        params = dict(self.named_parameters())
        loaded, weights_map = set(), {}
        for name, tensor in weights:
            name = name.replace("medusa_heads.", "")
            if name == "token_map":
                if self.truncated_vocab_size < self.orig_vocab_size:
                    self.token_map = nn.Parameter(tensor, requires_grad=False)
            elif name in params:
                weights_map[name] = tensor
            elif self.config.get("original_lm_head", False) and name == "lm_heads.0.weight":
                weights_map["lm_head.weight"] = tensor
        for name, tensor in weights_map.items():
            if "lm_head" in name and self.token_map is not None and tensor.shape[0] > self.token_map.shape[0]:
                tensor = tensor[self.token_map]
            param = params[name]
            getattr(param, "weight_loader", default_weight_loader)(param, tensor)
            loaded.add(name)
        assert self.truncated_vocab_size == self.orig_vocab_size or self.token_map is not None
        return loaded


def load_vllm_medusa(path) -> VLLMMedusa:
    """vLLM's model loader: build, `load_weights`, then refuse any parameter the checkpoint did not initialise."""
    medusa = VLLMMedusa(medusa_config_from_file(path))
    loaded = medusa.load_weights(load_file(path / "model.safetensors").items())
    missing = {name for name, _ in medusa.named_parameters()} - loaded
    if missing:
        raise ValueError(f"Following weights were not initialized from checkpoint: {missing}")
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


def test_default_layout_is_one_full_shared_projection(tmp_path):
    model = randomize_heads(BPDForCausalLM.from_base(tiny_base("llama"), num_draft_heads=3), std=0.2)
    export_medusa(model, tmp_path)
    config = medusa_config_from_file(tmp_path)
    assert config["original_lm_head"] is True and config["truncated_vocab_size"] == config["vocab_size"] == 97
    tensors = load_file(tmp_path / "model.safetensors")
    assert [k for k in tensors if k.startswith("lm_heads.")] == ["lm_heads.0.weight"] and "token_map" not in tensors
    assert torch.equal(tensors["lm_heads.0.weight"], model.get_output_embeddings().weight.detach())


def test_vllm_medusa_with_a_draft_vocabulary(tmp_path):
    """Shared-projection heads with a draft vocabulary: exported with the full projection (vLLM drafts over the whole
    vocabulary); inside the draft vocabulary the logits are ours."""
    model = BPDForCausalLM.from_base(tiny_base("llama"), num_draft_heads=2, draft_vocab_size=40)
    model.set_draft_vocab(torch.randperm(97, generator=torch.Generator().manual_seed(0))[:40])
    randomize_heads(model, std=0.2)
    export_medusa(model, tmp_path)
    config = medusa_config_from_file(tmp_path)
    assert (config["vocab_size"], config["truncated_vocab_size"]) == (97, 97)
    medusa = load_vllm_medusa(tmp_path)
    assert medusa.token_map is None
    hidden = torch.randn(4, 32)
    with torch.no_grad():
        ours, theirs = model.draft_logits(hidden), vllm_draft_logits(medusa, hidden)
        full = model.get_output_embeddings()(torch.stack([head(hidden) for head in model.heads], dim=-2))
    inside = model.draft_token_map
    torch.testing.assert_close(theirs[..., inside], ours[..., inside], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(theirs, full, rtol=1e-5, atol=1e-5)


def test_own_projections_over_a_draft_vocabulary_are_refused(tmp_path):
    model = BPDForCausalLM.from_base(tiny_base("llama"), num_draft_heads=2, draft_vocab_size=40, share_lm_head=False)
    with pytest.raises(ValueError, match="draft vocabulary"):
        export_medusa(model, tmp_path / "out")


@pytest.mark.parametrize("original_lm_head", [False, True])
def test_the_old_truncated_layouts_fail_vllms_loader(tmp_path, original_lm_head):
    """What the export used to write for a draft vocabulary: per-head (or one) 40-row projections and `token_map`.
    vLLM 0.32 refuses both (a shape assertion; `token_map` never reported as loaded); so must the re-implementation."""
    from safetensors.torch import save_file

    model = BPDForCausalLM.from_base(tiny_base("llama"), num_draft_heads=2, draft_vocab_size=40)
    export_medusa(model, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    rows = tensors.pop("lm_heads.0.weight")[model.draft_token_map]
    for i in range(1 if original_lm_head else 2):
        tensors[f"lm_heads.{i}.weight"] = rows.clone()
    tensors["token_map"] = model.draft_token_map.clone()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(truncated_vocab_size=40, original_lm_head=original_lm_head)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises((AssertionError, ValueError), match="40|token_map"):
        load_vllm_medusa(tmp_path)


# The real engine: vLLM in this interpreter, or in its own environment named by HF_BPD_VLLM_PYTHON (vLLM pins its own
# torch and transformers, so it usually lives in a separate virtual environment; see docs/serving.md).
VLLM_PYTHON = os.environ.get("HF_BPD_VLLM_PYTHON") or (sys.executable if importlib.util.find_spec("vllm") else None)


def load_bench_script():
    spec = importlib.util.spec_from_file_location(
        "vllm_medusa_acceptance", ROOT / "bench" / "vllm_medusa_acceptance.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_script_reads_vllms_counters_per_run():
    """vLLM's counters are process-wide: the script takes one run's share and derives vLLM's acceptance figures."""
    bench = load_bench_script()
    before = {
        "num_drafts": 10,
        "num_draft_tokens": 30,
        "num_accepted_tokens": 5,
        "num_accepted_tokens_per_pos": [4, 1],
    }
    after = {
        "num_drafts": 30,
        "num_draft_tokens": 90,
        "num_accepted_tokens": 35,
        "num_accepted_tokens_per_pos": [20, 10, 0],
    }
    delta = bench.counter_delta(before, after)
    assert delta == {
        "num_drafts": 20,
        "num_draft_tokens": 60,
        "num_accepted_tokens": 30,
        "num_accepted_tokens_per_pos": [16, 9, 0],
    }
    figures = bench.acceptance(delta)
    assert figures["mean_accepted_length"] == 2.5 and figures["acceptance_rate"] == 0.5
    assert figures["acceptance_rate_per_position"] == [0.8, 0.45, 0.0]
    assert bench.acceptance({"num_drafts": 0}) == {}


@pytest.mark.skipif(VLLM_PYTHON is None, reason="vLLM is not importable (set HF_BPD_VLLM_PYTHON to its python)")
@pytest.mark.skipif(not (ROOT / "reference" / "heads").is_dir(), reason="reference checkpoint not available")
def test_real_vllm_loads_the_export_and_keeps_its_greedy_output(tmp_path):
    """Opt-in: the real engine (bench/vllm_medusa_acceptance.py under VLLM_PYTHON) loads our export, drafts with it,
    and its greedy output with speculation equals its output without."""
    model = BPDForCausalLM.from_pretrained(ROOT / "reference" / "heads")
    export_medusa(model, tmp_path / "medusa")
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", **os.environ}
    result = subprocess.run(
        [
            VLLM_PYTHON,
            str(ROOT / "bench" / "vllm_medusa_acceptance.py"),
            "--medusa",
            str(tmp_path / "medusa"),
            "--num-prompts",
            "4",
            "--max-tokens",
            "32",
            "--json",
            str(tmp_path / "report.json"),
            "--check-identical",
        ],
        capture_output=True,
        text=True,
        timeout=1800,
        env=env,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    report = json.loads((tmp_path / "report.json").read_text())
    run = report[f"medusa_k{model.config.num_draft_heads}"]
    assert report["identical"] and run["identical"]
    assert run["num_drafts"] > 0 and run["num_draft_tokens"] == run["num_drafts"] * model.config.num_draft_heads


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
    assert (
        cli_main(
            [
                "export",
                "--format",
                "medusa",
                str(tmp_path / "out"),
                "--model",
                str(tmp_path / "heads"),
                "--dtype",
                "float32",
            ]
        )
        == 0
    )
    medusa = load_vllm_medusa(tmp_path / "out")
    hidden = torch.randn(3, 32)
    with torch.no_grad():
        torch.testing.assert_close(vllm_draft_logits(medusa, hidden), model.draft_logits(hidden), rtol=1e-5, atol=1e-5)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (tmp_path / "out" / config["base_model_name_or_path"]).resolve() == base_dir.resolve()
