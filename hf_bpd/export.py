"""
Export draft heads for serving engines: the Medusa checkpoint format that vLLM's Medusa proposer loads.

    hf-bpd export --format medusa OUT [--model HEADS_DIR] [--base BASE] [--dtype bfloat16] [--original-lm-head]
    python -m hf_bpd.export --format medusa OUT --model HEADS_DIR

The format (vLLM `vllm/model_executor/models/medusa.py` and `vllm/transformers_utils/configs/medusa.py`):

- `config.json`: `model_type: "medusa"`, `architectures: ["MedusaModel"]`, `hidden_size`, `vocab_size`, `num_heads`
  (h), `num_hidden_layers` (ResBlocks per head), `truncated_vocab_size` (K, = `vocab_size` without a draft
  vocabulary), `medusa_fc_bias: true` (our ResBlocks have a bias), `original_lm_head`. vLLM renames every config key
  that contains "num" and "heads" to `num_heads`, so no other such key is written.
- `model.safetensors`: `blocks.{i}.layers.{l}.weight` / `.bias` (head `i`, block `l`: `x + SiLU(W x + b)`, exactly
  our `ResBlock`), `lm_heads.{i}.weight` (the head's vocabulary projection: with `share_lm_head` a copy of the base
  model's output embedding -- vLLM has no "shared with the target" mode, every head's projection must be in the
  file; with `original_lm_head=True` one copy, `lm_heads.0.weight`, serves all heads), and `token_map` (K base token
  ids) with a draft vocabulary, the projections then holding only those K rows.

vLLM feeds the heads the target model's last hidden state after its final norm, which is what the heads read here
(`hidden_states[-1]` of transformers' models). Only `resblock` heads have this form: FFN heads
(`x + W2 SiLU(W1 x)`) and LoRA heads (`x + B A x`) compute functions that no `x + SiLU(W x + b)` reproduces, so
exporting them is an error. SGLang has no Medusa proposer (its speculative algorithms are EAGLE/EAGLE3, MTP,
standalone draft models and n-gram), so there is no SGLang target for these heads.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

if TYPE_CHECKING:
    from .modeling_bpd import BPDForCausalLM

logger = logging.getLogger(__name__)

FORMATS = ("medusa",)
MEDUSA_WEIGHTS_NAME = "model.safetensors"


def medusa_state_dict(model: "BPDForCausalLM", original_lm_head: bool = False,
                      dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
    """
    The heads of `model` as vLLM Medusa tensors (see the module docstring for the names).

    Args:
        model ([`BPDForCausalLM`]): with `head_type="resblock"` heads.
        original_lm_head (`bool`, defaults to `False`): write one projection (`lm_heads.0.weight`) for all heads
            (vLLM's `original_lm_head`; only possible when the heads share the base `lm_head`). The default writes
            one copy per head, which every vLLM version with Medusa reads.
        dtype (`torch.dtype`, *optional*): dtype of the written tensors (default: the model's).
    Returns:
        `dict[str, torch.Tensor]` of contiguous CPU tensors.
    Raises:
        `ValueError` for FFN / LoRA heads, peft adapters on the base, a biased base `lm_head`, or
        `original_lm_head=True` with heads that own their projections.
    """
    config = model.config
    if not model.independent_heads:
        raise ValueError(f"{config.head_type!r} heads read the drafted tokens; vLLM's Medusa format holds independent "
                         "heads only. See docs/serving.md (MLP speculator / EAGLE-3 via `speculators`).")
    if config.head_type != "resblock":
        raise ValueError(
            f"vLLM's Medusa heads compute `x + SiLU(W x + b)` per block; {config.head_type!r} heads compute "
            f"{'x + W2 SiLU(W1 x)' if config.head_type == 'ffn' else 'x + B A x'}, which no such block reproduces, "
            "so they cannot be exported exactly. Train `head_type='resblock'` heads to serve them with vLLM."
        )
    if hasattr(model.base, "peft_config"):
        raise ValueError(
            "The base model carries peft adapters: the heads read the *adapted* model's hidden states. Merge them "
            "(hf_bpd.trainer.merge_lora), serve the merged base model, then export."
        )
    output = model.get_output_embeddings()
    bias = getattr(output, "bias", None)
    if bias is not None and bool(bias.detach().ne(0).any()):
        raise ValueError("The base model's lm_head has a bias; vLLM's Medusa projections have none.")
    if original_lm_head and not config.share_lm_head:
        raise ValueError("`original_lm_head=True` needs heads that share the base lm_head (share_lm_head=True).")
    token_map = getattr(model, "draft_token_map", None)
    dtype = dtype or output.weight.dtype

    def cpu(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(device="cpu", dtype=dtype).contiguous()

    tensors: dict[str, torch.Tensor] = {}
    for i, head in enumerate(model.heads):
        for layer, block in enumerate(head):
            tensors[f"blocks.{i}.layers.{layer}.weight"] = cpu(block.linear.weight)
            tensors[f"blocks.{i}.layers.{layer}.bias"] = cpu(block.linear.bias)
    if config.share_lm_head:
        weight = output.weight
        if token_map is not None:  # only the draft vocabulary's rows
            weight = weight.index_select(0, token_map.to(weight.device))
        shared = cpu(weight)
        for i in range(1 if original_lm_head else config.num_draft_heads):
            tensors[f"lm_heads.{i}.weight"] = shared.clone()  # safetensors refuses tensors that share memory
    else:
        for i, proj in enumerate(model.draft_lm_heads):
            tensors[f"lm_heads.{i}.weight"] = cpu(proj.weight)
    if token_map is not None:
        tensors["token_map"] = token_map.detach().to(device="cpu", dtype=torch.long).contiguous()
    return tensors


def medusa_config(model: "BPDForCausalLM", original_lm_head: bool = False, dtype: torch.dtype | None = None,
                  out_dir: str | os.PathLike | None = None) -> dict[str, object]:  # fmt: skip
    """
    The `config.json` of the Medusa export (vLLM's `MedusaConfig` fields, plus the informational
    `base_model_name_or_path`, a local folder written relative to `out_dir` as `save_pretrained` does).
    """
    config = model.config
    vocab = config.base_vocab_size
    token_map = getattr(model, "draft_token_map", None)
    dtype = dtype or model.get_output_embeddings().weight.dtype
    return {
        "model_type": "medusa",
        "architectures": ["MedusaModel"],
        "hidden_size": config.base_hidden_size,
        "vocab_size": vocab,
        "num_heads": config.num_draft_heads,
        "num_hidden_layers": config.head_num_layers,
        "truncated_vocab_size": vocab if token_map is None else int(token_map.numel()),
        "medusa_fc_bias": True,
        "original_lm_head": bool(original_lm_head),
        "torch_dtype": str(dtype).removeprefix("torch."),
        "base_model_name_or_path": model._base_reference(Path(out_dir)) if out_dir else config.base_model_name_or_path,
    }


def export_medusa(model: "BPDForCausalLM", out_dir: str | os.PathLike, original_lm_head: bool = False,
                  dtype: torch.dtype | None = None) -> Path:  # fmt: skip
    """
    Write `config.json` and `model.safetensors` of a vLLM Medusa checkpoint to `out_dir`.

    Serve with `vllm serve BASE --speculative-config '{"method": "medusa", "model": "OUT", "num_speculative_tokens":
    h}'` where BASE is the model the heads were trained on (with the same weights).
    """
    out = Path(out_dir)
    tensors = medusa_state_dict(model, original_lm_head=original_lm_head, dtype=dtype)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / MEDUSA_WEIGHTS_NAME), metadata={"format": "pt"})
    config = medusa_config(model, original_lm_head=original_lm_head, dtype=dtype, out_dir=out)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    logger.info("Wrote a vLLM Medusa checkpoint (%d heads) to %s", model.config.num_draft_heads, out)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `export` arguments (shared with the `hf-bpd` CLI)."""
    parser.add_argument("out", help="Folder to write the exported heads to.")
    parser.add_argument("--format", choices=FORMATS, default="medusa", help="Checkpoint format (vLLM Medusa).")
    parser.add_argument("--model", default=None,
                        help="BPDForCausalLM checkpoint folder (default: reference/heads in $HF_BPD_REFERENCE or "
                             "./reference).")  # fmt: skip
    parser.add_argument("--base", default=None, help="Base model folder/name (default: the checkpoint's own).")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                        help="dtype of the written tensors (default: the base model's).")  # fmt: skip
    parser.add_argument("--original-lm-head", action="store_true",
                        help="Write one shared projection (vLLM `original_lm_head`) instead of one copy per head.")
    return parser


def run_from_args(args: argparse.Namespace) -> Path:
    from .modeling_bpd import BPDForCausalLM
    from .tools.reference import require_reference

    model_dir = args.model or require_reference("heads", "--model")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    model = BPDForCausalLM.from_pretrained(model_dir, base_model=args.base)
    return export_medusa(model, args.out, original_lm_head=args.original_lm_head, dtype=dtype)


def main(argv: Sequence[str] | None = None) -> int:
    """`hf-bpd export` / `python -m hf_bpd.export`."""
    parser = argparse.ArgumentParser(description="Export draft heads for a serving engine.", prog="hf-bpd export")
    add_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        out = run_from_args(parser.parse_args(argv))
    except (ValueError, OSError) as err:  # FileNotFoundError is an OSError
        parser.exit(1, f"hf-bpd export: error: {err}\n")
    print(f"wrote {out} (serve: vllm serve BASE --speculative-config "
          f"'{{\"method\": \"medusa\", \"model\": \"{out}\", \"num_speculative_tokens\": N}}')")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
