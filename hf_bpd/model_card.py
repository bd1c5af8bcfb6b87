"""The model card (`README.md`) written next to saved draft heads, and the training record it is rendered from."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from .configuration_bpd import BPDConfig

TRAINING_INFO_NAME = "bpd_training.json"
MODEL_CARD_NAME = "README.md"


def read_training_info(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The training record (`bpd_training.json`) saved in `folder`, or `None` when there is none."""
    path = Path(folder) / TRAINING_INFO_NAME
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def adapter_config_of(base: Any) -> dict[str, Any] | None:
    """The active peft adapter's config as a dict when `base` carries peft adapters, else `None`."""
    if not hasattr(base, "peft_config"):
        return None
    return base.peft_config[base.active_adapter].to_dict()


def _is_hub_id(name: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", name)) and not Path(name).exists()


def _yaml_list(key: str, values: list[str]) -> list[str]:
    return [f"{key}:"] + [f"- {json.dumps(v)}" for v in values]


def render_model_card(
    config: BPDConfig, training_info: dict[str, Any] | None = None, adapter_config: dict[str, Any] | None = None
) -> str:
    """
    A Hub model card for draft heads: YAML metadata, then what the heads are, how and on what they were trained, and
    their measured per-head accuracy.

    Args:
        config ([`BPDConfig`]): the heads' configuration (base model, `h`, head type).
        training_info (`dict`, *optional*): the record written by [`~hf_bpd.trainer.BPDTrainer`] (`training_data`,
            `mode`, `distillation`, `head_loss_weighting`, `global_step`, `head_metrics`, ...; `usage_setup`: lines
            of Python the usage example runs before loading, e.g. making the base model available offline).
        adapter_config (`dict`, *optional*): the peft LoRA config when adapters are saved with the heads.
    Returns:
        The card's markdown text.
    """
    info = training_info or {}
    base = config.base_model_name_or_path
    h = config.num_draft_heads
    yaml = ["---", "library_name: hf_bpd"]
    if base and _is_hub_id(base):  # the Hub validates `base_model`: never a local path
        yaml.append(f"base_model: {json.dumps(base)}")
    yaml += _yaml_list("tags", ["hf_bpd", "blockwise-parallel-decoding", "draft-heads", "speculative-decoding"])
    data = info.get("training_data")
    data = [data] if isinstance(data, str) else list(data or [])
    yaml += ["pipeline_tag: text-generation", "---", ""]

    lines = [
        f"# Draft heads for `{base or 'an unnamed base model'}`",
        "",
        f"{h} blockwise-parallel-decoding draft heads (hf_bpd). Head `i` reads the base model's last hidden state at "
        f"position `t`"
        + (
            " and the tokens `t + 1 .. t + i` (the base model's next token, then the drafted ones)"
            if config.head_type == "recurrent"
            else " and, through attention, every earlier position (`hf_bpd.context_heads`, EAGLE style), with the "
            "tokens `t + 1 .. t + i`"
            if config.head_type == "context"
            else ""
        )
        + " and predicts token `t + 1 + i`; the base model's own head keeps predicting token `t + 1`. "
        "`generate(..., use_bpd=True)` returns exactly what the base model's greedy / sampled `generate` returns, "
        "in fewer serial calls of the base model.",
        "",
        "| | |",
        "|---|---|",
        f"| base model | `{base}` ({config.base_model_type or 'unknown type'}, hidden size {config.base_hidden_size}, "
        f"vocabulary {config.base_vocab_size}) |",
        f"| draft heads `h` | {h} |",
        f"| head type | `{config.head_type}` x {config.head_num_layers}"
        + (
            " (token-conditioned: head `i` also reads the base's next token and the draft tokens before its own)"
            if config.head_type == "recurrent"
            else f" decoder layer(s) shared by all {h} depths, attending over the committed context"
            if config.head_type == "context"
            else ""
        )
        + (f", rank {config.head_rank}" if config.head_type == "lora" else "")
        + (f", inner size {config.head_hidden_size}" if config.head_type == "ffn" and config.head_hidden_size else "")
        + " |",
        f"| vocabulary projection | {'shared with the base `lm_head`' if config.share_lm_head else 'one per head'}"
        + (
            f", restricted to a draft vocabulary of {config.draft_vocab_size} tokens (`draft_token_map`)"
            if getattr(config, "draft_vocab_size", None)
            else ""
        )
        + " |",
    ]
    if adapter_config is not None:
        targets = adapter_config.get("target_modules")
        targets = sorted(targets) if isinstance(targets, (list, set, tuple)) else targets
        lines.append(
            f"| LoRA adapters on the base | r={adapter_config.get('r')}, alpha={adapter_config.get('lora_alpha')}, "
            f"targets `{targets}` (saved in `adapter/`) |"
        )
    for key, label in (
        ("mode", "training mode"),
        ("distillation", "self-distillation"),
        ("head_loss_weighting", "head loss weighting"),
        ("base_loss_weight", "base LM loss weight"),
        ("global_step", "optimizer steps"),
        ("num_input_tokens_seen", "training tokens"),
        ("train_target_tokens", "cached target tokens (one epoch)"),
        ("epochs", "epochs over the cached targets"),
        ("epochs_planned", "epochs planned (a time budget may stop a run before them)"),
        ("seconds_this_session", "training wall time (s)"),
        ("machine", "machine"),
        ("command", "command"),
    ):
        if info.get(key) not in (None, ""):
            if key == "seconds_this_session" and info.get("resumed_from_step"):
                label = f"training wall time (s) of the run resumed at step {info['resumed_from_step']}"
            lines.append(f"| {label} | {info[key] if key != 'command' else f'`{info[key]}`'} |")
    lines += ["", "## Training data", ""]
    lines += [f"- `{d}`" for d in data] if data else ["Not recorded."]
    lines += ["", "## Measured per-head accuracy", ""]
    metrics = info.get("head_metrics")
    if metrics:
        given = metrics.get("top1_given_prefix")
        lines += [
            f"On {metrics.get('split', 'training')} data ({metrics.get('targets', 'labels')} as targets"
            + (
                "; token-conditioned heads teacher-forced on them"
                if config.head_type in ("recurrent", "context")
                else ""
            )
            + ")."
            + (
                " *Top-1 given a correct prefix*: among the positions where the heads before it were all "
                "right, the share this head gets right too (the chance a greedy chain accepted so far is "
                "accepted one token further)."
                if given
                else ""
            ),
            "",
            "| head | predicts | top-1 | top-5 |" + (" top-1 given a correct prefix |" if given else "") + " loss |",
            "|---|---|---|---|" + ("---|" if given else "") + "---|",
        ]
        for i in range(len(metrics.get("top1", []))):
            loss = metrics.get("loss", [None] * h)[i]
            lines.append(
                f"| {i + 1} | `t + {i + 2}` | {metrics['top1'][i]:.4f} | {metrics['top5'][i]:.4f} | "
                + (f"{given[i]:.4f} | " if given else "")
                + (f"{loss:.4f}" if loss is not None else "-")
                + " |"
            )
        if len(metrics.get("top1", [])) > h:
            lines += ["", f"Heads {h + 1}-{len(metrics['top1'])} were trained too; only the first {h} are kept."]
    else:
        lines.append("Not measured.")
    lines += [
        "",
        "## Usage",
        "",
        "```python",
        "from hf_bpd import BPDForCausalLM",
        *_lines(info.get("usage_setup")),
        "",
        'model = BPDForCausalLM.from_pretrained("<this repo or folder>")  # loads the base model it references'
        + (" and the LoRA adapters" if adapter_config is not None else ""),
        "out = model.generate(input_ids, max_new_tokens=128, use_bpd=True)",
        "```",
        "",
    ]
    return "\n".join(yaml + lines)


def _lines(value: Any) -> list[str]:
    """Code lines given as one string or a list of strings."""
    if not value:
        return []
    return str(value).splitlines() if isinstance(value, str) else [str(line) for line in value]


def write_model_card(
    folder: str | os.PathLike,
    config: BPDConfig,
    training_info: dict[str, Any] | None = None,
    adapter_config: dict[str, Any] | None = None,
) -> Path:
    """
    Write `README.md` (and, when `training_info` is given, `bpd_training.json`) into `folder`.

    Without `training_info`, a `bpd_training.json` already in `folder` (written by the trainer) is used.

    Returns:
        The path of the card.
    """
    folder = Path(folder)
    if training_info is not None:
        (folder / TRAINING_INFO_NAME).write_text(json.dumps(training_info, indent=2, default=str), encoding="utf-8")
    else:
        training_info = read_training_info(folder)
    path = folder / MODEL_CARD_NAME
    path.write_text(render_model_card(config, training_info, adapter_config), encoding="utf-8")
    return path
