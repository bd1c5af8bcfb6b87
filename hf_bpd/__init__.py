"""hf_bpd: blockwise parallel decoding for Hugging Face causal LMs, with draft refinement."""

from .acceptance import accepted_lengths, select_best_draft, truncate_at_eos
from .configuration_bpd import BPDConfig
from .generation import BPDGenerateOutput
from .logits import DraftRescorer
from .losses import draft_head_loss
from .modeling_bpd import BPDCausalLMOutput, BPDForCausalLM

__version__ = "0.1.0"

# `AutoConfig` (and through it `AutoTokenizer` on a heads folder) then reads model_type "bpd" without a warning.
from transformers import AutoConfig as _AutoConfig  # noqa: E402

_AutoConfig.register(BPDConfig.model_type, BPDConfig, exist_ok=True)

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
]
