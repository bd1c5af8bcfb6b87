"""hf_bpd: blockwise parallel decoding for Hugging Face causal LMs, with draft refinement."""

from .acceptance import accepted_lengths, select_best_draft, truncate_at_eos
from .configuration_bpd import BPDConfig
from .generation import BPDGenerateOutput
from .logits import DraftRescorer
from .losses import draft_head_loss
from .modeling_bpd import BPDCausalLMOutput, BPDForCausalLM

__version__ = "0.1.0"

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
