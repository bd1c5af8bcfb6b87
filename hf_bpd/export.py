"""
Export draft heads for serving engines: the Medusa checkpoint format that vLLM's Medusa proposer loads.

    hf-bpd export --format medusa OUT [--model HEADS_DIR] [--base BASE] [--dtype bfloat16] [--per-head-lm-heads]
    python -m hf_bpd.export --format medusa OUT --model HEADS_DIR

The format (vLLM `vllm/model_executor/models/medusa.py` and `vllm/transformers_utils/configs/medusa.py`):

- `config.json`: `model_type: "medusa"`, `architectures: ["MedusaModel"]`, `hidden_size`, `vocab_size`, `num_heads`
  (h), `num_hidden_layers` (ResBlocks per head), `truncated_vocab_size` (= `vocab_size`), `medusa_fc_bias: true` (our
  ResBlocks have a bias), `original_lm_head`. vLLM renames every config key that contains "num" and "heads" to
  `num_heads`, so no other such key is written.
- `model.safetensors`: `blocks.{i}.layers.{l}.weight` / `.bias` (head `i`, block `l`: `x + SiLU(W x + b)`, exactly
  our `ResBlock`) and the vocabulary projections. vLLM builds its projections as full-vocabulary `ParallelLMHead`s
  (`vocab_size` rows, padded to a multiple of 64 in memory) and its weight loader asserts that the file holds exactly
  `vocab_size` rows:
  - heads that share the base `lm_head` (the default): `original_lm_head: true` and ONE projection,
    `lm_heads.0.weight`, the base model's full (tied) output embedding, which vLLM uses for every head;
  - heads with their own projections: `original_lm_head: false` and `lm_heads.{i}.weight` per head;
  - no `token_map` and no truncated projection, ever: vLLM's truncated-vocabulary Medusa path (`token_map`) fails to
    load in current releases (0.32: "Following weights were not initialized from checkpoint: {'token_map'}"), and
    without `original_lm_head` it sizes every head's projection to the full vocabulary. Heads trained with a draft
    vocabulary and the shared `lm_head` are exported with the full projection: vLLM's drafts are then the argmax
    over the whole vocabulary (still exact output: vLLM verifies every draft). Heads with their own draft-vocabulary
    projections cannot be widened exactly and are refused. `docs/serving.md` says what each layout costs.

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


def resolve_original_lm_head(model: BPDForCausalLM, original_lm_head: bool | None) -> bool:
    """The `original_lm_head` the export writes: one shared projection whenever the heads share the base `lm_head`."""
    share = model.config.share_lm_head
    if original_lm_head and not share:
        raise ValueError("`original_lm_head=True` needs heads that share the base lm_head (share_lm_head=True).")
    return share if original_lm_head is None else bool(original_lm_head)


def medusa_state_dict(
    model: BPDForCausalLM, original_lm_head: bool | None = None, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """
    The heads of `model` as vLLM Medusa tensors (see the module docstring for the names and shapes).

    Args:
        model ([`BPDForCausalLM`]): with `head_type="resblock"` heads.
        original_lm_head (`bool`, *optional*): write one projection (`lm_heads.0.weight`) for all heads. Defaults to
            `True` for heads that share the base `lm_head`; `False` writes one full copy per head.
        dtype (`torch.dtype`, *optional*): dtype of the written tensors (default: the model's).
    Returns:
        `dict[str, torch.Tensor]` of contiguous CPU tensors; every projection has `vocab_size` rows.
    Raises:
        `ValueError` for FFN / LoRA heads, peft adapters on the base, a biased base `lm_head`, own projections over a
        draft vocabulary, or `original_lm_head=True` with heads that own their projections.
    """
    config = model.config
    if not model.independent_heads:
        raise ValueError(
            f"{config.head_type!r} heads read the drafted tokens; vLLM's Medusa format holds independent "
            "heads only. See docs/serving.md (MLP speculator / EAGLE-3 via `speculators`)."
        )
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
    original_lm_head = resolve_original_lm_head(model, original_lm_head)
    if not config.share_lm_head and getattr(model, "draft_token_map", None) is not None:
        raise ValueError(
            "These heads own projections over a draft vocabulary of "
            f"{int(model.draft_token_map.numel())} tokens. vLLM loads only full-vocabulary projections (its "
            "truncated-vocabulary `token_map` path fails to load), and a projection without a bias cannot be widened "
            "exactly. Train heads with share_lm_head=True (exported with the base lm_head), or without a draft "
            "vocabulary."
        )
    dtype = dtype or output.weight.dtype

    def cpu(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(device="cpu", dtype=dtype).contiguous()

    tensors: dict[str, torch.Tensor] = {}
    for i, head in enumerate(model.heads):
        for layer, block in enumerate(head):
            tensors[f"blocks.{i}.layers.{layer}.weight"] = cpu(block.linear.weight)
            tensors[f"blocks.{i}.layers.{layer}.bias"] = cpu(block.linear.bias)
    if config.share_lm_head:
        shared = cpu(output.weight)  # the full (tied) projection, never truncated
        for i in range(1 if original_lm_head else config.num_draft_heads):
            tensors[f"lm_heads.{i}.weight"] = shared.clone()  # safetensors refuses tensors that share memory
    else:
        for i, proj in enumerate(model.draft_lm_heads):
            tensors[f"lm_heads.{i}.weight"] = cpu(proj.weight)
    return tensors


def medusa_config(
    model: BPDForCausalLM,
    original_lm_head: bool | None = None,
    dtype: torch.dtype | None = None,
    out_dir: str | os.PathLike | None = None,
) -> dict[str, object]:
    """
    The `config.json` of the Medusa export (vLLM's `MedusaConfig` fields, plus the informational
    `base_model_name_or_path`, a local folder written relative to `out_dir` as `save_pretrained` does).
    """
    config = model.config
    vocab = config.base_vocab_size
    dtype = dtype or model.get_output_embeddings().weight.dtype
    return {
        "model_type": "medusa",
        "architectures": ["MedusaModel"],
        "hidden_size": config.base_hidden_size,
        "vocab_size": vocab,
        "num_heads": config.num_draft_heads,
        "num_hidden_layers": config.head_num_layers,
        "truncated_vocab_size": vocab,
        "medusa_fc_bias": True,
        "original_lm_head": resolve_original_lm_head(model, original_lm_head),
        "torch_dtype": str(dtype).removeprefix("torch."),
        "base_model_name_or_path": model._base_reference(Path(out_dir)) if out_dir else config.base_model_name_or_path,
    }


def export_medusa(
    model: BPDForCausalLM,
    out_dir: str | os.PathLike,
    original_lm_head: bool | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
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
    if getattr(model, "draft_token_map", None) is not None:
        logger.info("Draft vocabulary not exported: vLLM drafts over the full vocabulary with the base lm_head.")
    logger.info("Wrote a vLLM Medusa checkpoint (%d heads) to %s", model.config.num_draft_heads, out)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `export` arguments (shared with the `hf-bpd` CLI)."""
    parser.add_argument("out", help="Folder to write the exported heads to.")
    parser.add_argument("--format", choices=FORMATS, default="medusa", help="Checkpoint format (vLLM Medusa).")
    parser.add_argument(
        "--model",
        default=None,
        help="BPDForCausalLM checkpoint folder (`hf-bpd export`: default reference/heads in "
        "$HF_BPD_REFERENCE or ./reference).",
    )
    parser.add_argument("--base", default=None, help="Base model folder/name (default: the checkpoint's own).")
    parser.add_argument(
        "--dtype",
        choices=("float32", "float16", "bfloat16"),
        default=None,
        help="dtype of the written tensors (default: the base model's).",
    )
    parser.add_argument(
        "--per-head-lm-heads",
        action="store_true",
        help="Write one full copy of the shared projection per head (original_lm_head: false) "
        "instead of one (the default for heads that share the base lm_head).",
    )
    parser.add_argument(
        "--original-lm-head",
        action="store_true",
        help="One shared projection (vLLM `original_lm_head`); the default, kept for old scripts.",
    )
    return parser


def run_from_args(args: argparse.Namespace) -> Path:
    from .modeling_bpd import BPDForCausalLM

    if not args.model:  # `hf-bpd export` fills in the reference stack's heads (hf_bpd_bench); the library does not
        raise ValueError("no --model given: pass --model DIR (a BPDForCausalLM checkpoint folder).")
    model_dir = args.model
    dtype = getattr(torch, args.dtype) if args.dtype else None
    model = BPDForCausalLM.from_pretrained(model_dir, base_model=args.base)
    original = False if args.per_head_lm_heads else (True if args.original_lm_head else None)
    return export_medusa(model, args.out, original_lm_head=original, dtype=dtype)


def main(argv: Sequence[str] | None = None) -> int:
    """`hf-bpd export` / `python -m hf_bpd.export`."""
    parser = argparse.ArgumentParser(description="Export draft heads for a serving engine.", prog="hf-bpd export")
    add_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        out = run_from_args(parser.parse_args(argv))
    except (ValueError, OSError) as err:  # FileNotFoundError is an OSError
        parser.exit(1, f"hf-bpd export: error: {err}\n")
    print(
        f"wrote {out} (serve: vllm serve BASE --speculative-config "
        f'\'{{"method": "medusa", "model": "{out}", "num_speculative_tokens": N}}\')'
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
