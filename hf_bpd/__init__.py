"""hf_bpd: blockwise parallel decoding for Hugging Face causal LMs, with draft refinement."""

from .acceptance import accepted_lengths, select_best_draft, truncate_at_eos
from .configuration_bpd import BPDConfig
from .drafters import DraftRescorer
from .generation import BPDGenerateOutput
from .losses import draft_head_loss
from .modeling_bpd import BPDCausalLMOutput, BPDForCausalLM

__version__ = "0.1.0"

# `AutoConfig` (and through it `AutoTokenizer` on a heads folder) then reads model_type "bpd" without a warning;
# `AutoModelForCausalLM.from_pretrained(heads_folder)` loads heads + base through `BPDForCausalLM.from_pretrained`,
# and pipelines accept the model as a text-generation model.
from transformers import AutoConfig as _AutoConfig  # noqa: E402
from transformers import AutoModelForCausalLM as _AutoModelForCausalLM  # noqa: E402

_AutoConfig.register(BPDConfig.model_type, BPDConfig, exist_ok=True)
_AutoModelForCausalLM.register(BPDConfig, BPDForCausalLM, exist_ok=True)

# Public names loaded on first use (the trainer imports `Trainer`; the loader pulls gguf support).
_LAZY = {
    "BPDTrainer": ".trainer",
    "BPDTrainingArguments": ".trainer",
    "LatticeRescorer": ".drafters",
    "NeuralRescorer": ".drafters",
    "NgramRescorer": ".drafters",
    "OracleDrafter": ".drafters",
    "PBestRescorer": ".drafters",
    "load_smollm2": ".smollm2",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "BPDConfig",
    "BPDForCausalLM",
    "BPDCausalLMOutput",
    "BPDGenerateOutput",
    "DraftRescorer",
    "accepted_lengths",
    "select_best_draft",
    "truncate_at_eos",
    "draft_head_loss",
    *_LAZY,
]
