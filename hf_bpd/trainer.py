"""
Training draft heads with the Hugging Face `Trainer`: frozen base (default), joint training with LoRA adapters on the
base, or self-distillation from the base model's own predictions.

`BPDTrainer` only changes what a draft-head run needs: the loss (the pure [`~hf_bpd.losses.bpd_training_loss`]), a
learning-rate multiplier for the heads, per-head accuracy in the logs, heads-only checkpoints with a model card, and
checks on resumed checkpoints. Everything else (DDP / DeepSpeed / FSDP through `accelerate launch`, mixed precision,
gradient accumulation, logging to any `report_to`) is the Trainer's own.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainingArguments
from transformers.pytorch_utils import Conv1D
from transformers.trainer_utils import get_last_checkpoint

from ._compat import check_peft, check_trainer_private_api
from .configuration_bpd import BPDConfig
from .data import BlockCollator, drop_short_sequences
from .features import CachedFeatures, collate_features
from .losses import (
    DISTILLATION_MODES,
    WEIGHTING_SCHEMES,
    bpd_training_loss,
    causal_lm_loss,
    greedy_targets,
    head_accuracy_counts,
    head_weights,
    prefix_accuracy_counts,
    topk_distillation_loss,
)
from .model_card import MODEL_CARD_NAME, TRAINING_INFO_NAME, adapter_config_of, write_model_card
from .modeling_bpd import ADAPTER_SUBFOLDER, HEADS_WEIGHTS_NAME, BPDForCausalLM

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------- arguments
@dataclass
class BPDTrainingArguments(TrainingArguments):
    r"""
    [`~transformers.TrainingArguments`] plus the choices of a draft-head run. Every field has its `--help` text.
    """

    head_loss_weighting: str = field(
        default="uniform",
        metadata={
            "help": "How the per-head losses are combined: 'uniform' (mean), 'geometric' (0-based head i weighs "
            "head_loss_decay**i, Medusa) or 'random' (one head drawn per step, Stern et al.).",
            "choices": list(WEIGHTING_SCHEMES),
        },
    )
    head_loss_decay: float = field(
        default=0.8, metadata={"help": "Ratio of the 'geometric' head loss weighting (Medusa uses 0.8)."}
    )
    base_loss_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of the base model's own LM loss added to the head loss (joint training; Medusa-2 uses "
            "the base loss plus 0.2 x the heads). Only has an effect when base parameters train (use_lora)."
        },
    )
    heads_learning_rate_multiplier: float = field(
        default=1.0,
        metadata={"help": "The heads train with learning_rate x this (Medusa-2 gives heads 4x the LoRA rate)."},
    )
    distillation: str = field(
        default="none",
        metadata={
            "help": "Self-distillation targets: 'none' (the training text), 'hard' (the base model's greedy token "
            "at each position) or 'soft' (KL to the base model's distribution). The teacher is the base model "
            "with any LoRA adapters disabled: heads learn what the verifier accepts.",
            "choices": list(DISTILLATION_MODES),
        },
    )
    distillation_temperature: float = field(
        default=1.0, metadata={"help": "Temperature of 'soft' distillation (teacher and heads)."}
    )
    use_lora: bool = field(
        default=False,
        metadata={"help": "Joint training: add LoRA adapters to the (frozen) base model, trained with the heads."},
    )
    lora_r: int = field(default=32, metadata={"help": "LoRA rank (Medusa-2: 32)."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (Medusa-2: 16)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA path."})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Names of the base model's linear modules that get adapters (e.g. q_proj v_proj); default "
            "'all-linear' (every linear layer but the output head)."
        },
    )
    ddp_find_unused_parameters: bool | None = field(
        default=False,
        metadata={
            "help": "DDP's find_unused_parameters; every trainable parameter (heads, adapters) is used at "
            "every step, so the default skips that extra graph traversal."
        },
    )
    prediction_loss_only: bool = field(
        default=True,
        metadata={"help": "Evaluation returns the loss and per-head metrics only (draft logits are (B, T, h, V))."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.head_loss_weighting not in WEIGHTING_SCHEMES:
            raise ValueError(
                f"head_loss_weighting must be one of {WEIGHTING_SCHEMES}, got {self.head_loss_weighting!r}."
            )
        if self.distillation not in DISTILLATION_MODES:
            raise ValueError(f"distillation must be one of {DISTILLATION_MODES}, got {self.distillation!r}.")
        for name in ("heads_learning_rate_multiplier", "distillation_temperature"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}.")
        if self.base_loss_weight < 0:
            raise ValueError(f"base_loss_weight must be >= 0, got {self.base_loss_weight}.")


# --------------------------------------------------------------------------------------------- helpers
def check_tokenizer_matches(tokenizer: Any, model: BPDForCausalLM) -> None:
    """
    Raise a `ValueError` when the tokenizer can produce ids outside the base model's vocabulary.

    Args:
        tokenizer: a `transformers` tokenizer.
        model ([`BPDForCausalLM`]): the model it feeds.
    """
    vocab = model.get_output_embeddings().weight.shape[0]
    size = len(tokenizer)
    if size > vocab:
        raise ValueError(
            f"The tokenizer ({type(tokenizer).__name__}, {size} tokens) does not match the base model "
            f"({model.config.base_model_name_or_path!r}, vocabulary {vocab}): ids >= {vocab} would index out of the "
            "embedding table. Use the base model's own tokenizer."
        )


def linear_module_names(module: nn.Module) -> list[str]:
    """The distinct short names (`q_proj`, `c_attn`, ...) of the linear layers in `module` that LoRA can target."""
    return sorted(
        {name.rsplit(".", 1)[-1] for name, m in module.named_modules() if isinstance(m, (nn.Linear, Conv1D))}
    )


def add_lora_adapters(
    model: BPDForCausalLM,
    r: int = 32,
    lora_alpha: int = 16,
    lora_dropout: float = 0.05,
    target_modules: Sequence[str] | str | None = None,
    **lora_kwargs: Any,
) -> BPDForCausalLM:
    """
    Put LoRA adapters on the base model (through `peft`); the base weights stay frozen, adapters and heads train.

    Args:
        model ([`BPDForCausalLM`]): the model; `model.base` becomes a `peft` model in place.
        r (`int`), lora_alpha (`int`), lora_dropout (`float`): the LoRA hyper-parameters.
        target_modules (`list[str]` or `str`, *optional*): module names (suffix match) or one regex (full match);
            defaults to `"all-linear"`.
        lora_kwargs: any other `peft.LoraConfig` field.
    Returns:
        The same model.
    Raises:
        `ValueError` when the base already carries adapters or a target module does not exist in it (the message
        lists the linear modules available).
    """
    from peft import LoraConfig, get_peft_model

    if hasattr(model.base, "peft_config"):
        raise ValueError("The base model already carries peft adapters; add LoRA once.")
    targets = "all-linear" if target_modules is None or list(target_modules) == ["all-linear"] else target_modules
    if targets != "all-linear":
        names = [name for name, _ in model.base.named_modules()]
        if isinstance(targets, str):
            missing = [] if any(re.fullmatch(targets, n) for n in names) else [targets]
        else:
            targets = list(targets)
            missing = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]
        if missing:
            raise ValueError(
                f"LoRA target module(s) {missing} do not exist in the base model ({type(model.base).__name__}). "
                f"Its linear modules are: {linear_module_names(model.base)}."
            )
    if "fan_in_fan_out" not in lora_kwargs and any(isinstance(m, Conv1D) for m in model.base.modules()):
        lora_kwargs["fan_in_fan_out"] = True  # GPT-2 style Conv1D layers store the weight transposed
    config = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
        **lora_kwargs,
    )
    model.base = get_peft_model(model.base, config)
    return model


def merge_lora(model: BPDForCausalLM) -> BPDForCausalLM:
    """
    Merge the LoRA adapters into the base weights for inference (`peft`'s `merge_and_unload`).

    The merged base is no longer the model `config.base_model_name_or_path` names: save it with
    `save_pretrained(..., save_base=True)`, or save the unmerged model (heads + adapters) instead.

    Returns:
        The same model, whose `base` is a plain `transformers` model again.
    """
    if not hasattr(model.base, "peft_config"):
        raise ValueError("The base model carries no LoRA adapters to merge.")
    model.base = model.base.merge_and_unload()
    model.generation_config = model.base.generation_config
    logger.warning(
        "LoRA merged into the base weights: save with `save_base=True` (a heads-only checkpoint would reference the "
        "unmerged base %r).",
        model.config.base_model_name_or_path,
    )
    return model


def _datasets_filtered(dataset: Any, min_length: int) -> Any:
    """Drop sequences shorter than `min_length` from a `datasets` dataset (or each of a dict of them)."""
    import datasets

    if isinstance(dataset, dict):
        return {name: _datasets_filtered(d, min_length) for name, d in dataset.items()}
    if isinstance(dataset, (datasets.Dataset, datasets.IterableDataset)):
        return drop_short_sequences(dataset, min_length)
    return dataset


# --------------------------------------------------------------------------------------------- trainer
# BPDTrainer overrides four private Trainer methods (heads-only checkpoints): fail at import if they moved.
check_trainer_private_api(Trainer)
check_peft()


class BPDTrainer(Trainer):
    """
    [`~transformers.Trainer`] for the draft heads of a [`BPDForCausalLM`].

    Args:
        model ([`BPDForCausalLM`]): the model; with `args.use_lora` adapters are added to its base here.
        args ([`BPDTrainingArguments`]): the run's arguments.
        data_collator (*optional*): defaults to [`~hf_bpd.data.BlockCollator`] (padding masked in the labels).
        train_dataset, eval_dataset (*optional*): datasets with `input_ids` (e.g. from
            [`~hf_bpd.data.load_packed_dataset`]); sequences shorter than `num_draft_heads + 2` are skipped, with a
            warning that counts them.
        processing_class (*optional*): the tokenizer, checked against the base vocabulary and saved with the heads.
        training_data (`str` or `list[str]`, *optional*): what the heads were trained on, for the model card.
        kwargs: any other `Trainer` argument (`callbacks`, `optimizers`, ...).
    """

    loss_is_scaled_for_ga = False  # `compute_loss` returns a per-batch mean

    def __init__(
        self,
        model: BPDForCausalLM,
        args: BPDTrainingArguments,
        data_collator: Any = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        training_data: str | Sequence[str] | None = None,
        **kwargs: Any,
    ):
        if not isinstance(model, BPDForCausalLM):
            raise ValueError(f"BPDTrainer trains a BPDForCausalLM, got {type(model).__name__}.")
        if not isinstance(args, BPDTrainingArguments):
            raise ValueError(f"BPDTrainer needs BPDTrainingArguments, got {type(args).__name__}.")
        if processing_class is not None and hasattr(processing_class, "__len__"):
            check_tokenizer_matches(processing_class, model)
        if args.use_lora and not hasattr(model.base, "peft_config"):
            add_lora_adapters(model, args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_target_modules)
        self.base_trainable = any(p.requires_grad for p in model.base.parameters())
        if args.base_loss_weight > 0 and not self.base_trainable:
            logger.warning(
                "base_loss_weight=%s has no effect: the base model is frozen (use_lora adds adapters).",
                args.base_loss_weight,
            )
        min_length = model.config.num_draft_heads + 2
        train_dataset = _datasets_filtered(train_dataset, min_length)
        eval_dataset = _datasets_filtered(eval_dataset, min_length)
        self.cached_features = isinstance(train_dataset, CachedFeatures)
        if self.cached_features:
            if args.distillation == "soft" and not train_dataset.has_soft_targets:
                raise ValueError(
                    "These cached features hold the base model's greedy tokens, not its distribution: extract them "
                    "with `extract_features(..., top_k=16)` for distillation='soft', or use distillation='hard'."
                )
            if self.base_trainable:
                raise ValueError(
                    "Cached features need a frozen base (no LoRA, freeze_base=True): the base is not run."
                )
            if train_dataset.hidden_size != model.config.base_hidden_size:
                raise ValueError(
                    f"The cached features are {train_dataset.hidden_size}-wide but the base model's hidden size is "
                    f"{model.config.base_hidden_size}: they were extracted from another model."
                )
            data_collator = data_collator or collate_features
        if data_collator is None:
            pad = getattr(processing_class, "pad_token_id", None)
            pad = model.generation_config.pad_token_id if pad is None else pad
            data_collator = BlockCollator(0 if pad is None else int(pad))
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )
        self.model_accepts_loss_kwargs = False
        self.training_data = [training_data] if isinstance(training_data, str) else training_data
        self.head_generator = torch.Generator().manual_seed(args.seed)
        self.head_stats: dict[str, torch.Tensor] = {}  # split -> (5, h) sums since the last log
        self.head_metrics: dict[str, dict[str, list[float]]] = {}  # split -> last logged per-head metrics

    # ------------------------------------------------------------------ loss
    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """The draft-head objective of [`~hf_bpd.losses.bpd_training_loss`] (a per-batch mean)."""
        args = self.args
        labels = inputs.get("labels")
        if labels is None:
            mask = inputs.get("attention_mask")
            labels = inputs["input_ids"] if mask is None else inputs["input_ids"].masked_fill(mask == 0, -100)
        teacher_topk = (inputs.get("teacher_topk_ids"), inputs.get("teacher_topk_logprobs"))
        model_inputs = {k: v for k, v in inputs.items() if k != "labels" and not k.startswith("teacher_topk_")}
        unwrapped = self.accelerator.unwrap_model(model)
        compact = unwrapped.draft_token_map is not None  # heads score a draft vocabulary: loss in that space
        # Cached features carry the teacher's greedy tokens as labels already: nothing to distil on the fly.
        distillation = "none" if "base_hidden_states" in inputs else args.distillation
        teacher = None
        given = model_inputs.pop("draft_input_ids", None)  # cached features whose loss a selection masked
        if not unwrapped.independent_heads:  # teacher forcing: the conditioning tokens are the targets
            model_inputs["draft_input_ids"], teacher = (
                (given, None)
                if given is not None
                else self._conditioning_tokens(model, model_inputs, labels, distillation)
            )
        outputs = model(**model_inputs, return_draft_logits=True, draft_full_vocab=not compact)
        model_inputs.pop("draft_input_ids", None)
        if "base_hidden_states" in inputs and args.distillation == "soft":  # cached top-k soft targets
            return self._cached_soft_loss(model, unwrapped, outputs, labels, teacher_topk, return_outputs)
        if distillation != "none" and teacher is None:
            teacher = self.teacher_logits(model, model_inputs, outputs)
        base_loss_weight = args.base_loss_weight if self.base_trainable else 0.0
        head_labels = labels
        if compact:
            if distillation == "hard":  # the teacher's argmax over the *full* vocabulary, then mapped
                head_labels, teacher, distillation = greedy_targets(teacher, labels), None, "none"
            if distillation == "soft":  # KL over the draft vocabulary (the teacher renormalised on it)
                teacher = teacher.index_select(-1, unwrapped.draft_token_map)
            else:
                head_labels = unwrapped.to_draft_ids(head_labels)
        num_heads = outputs.draft_logits.shape[2]
        scheme = args.head_loss_weighting if model.training or args.head_loss_weighting != "random" else "uniform"
        weights = head_weights(num_heads, scheme, args.head_loss_decay, self.head_generator)
        result = bpd_training_loss(
            outputs.draft_logits,
            head_labels,
            teacher_logits=teacher,
            head_weights=weights,
            distillation=distillation,
            temperature=args.distillation_temperature,
        )
        if base_loss_weight > 0:  # the base LM loss always reads the full-vocabulary labels
            base_loss = causal_lm_loss(outputs.logits, labels)
            result = result._replace(loss=result.loss + base_loss_weight * base_loss, base_loss=base_loss)
        split = "train" if model.training else "eval"
        self._accumulate(split, outputs.draft_logits, result.head_losses, result.targets)
        return (result.loss, outputs) if return_outputs else result.loss

    def _conditioning_tokens(
        self, model: nn.Module, inputs: dict[str, Any], labels: torch.Tensor, distillation: str
    ) -> tuple[Any, torch.Tensor | None]:
        """
        What token-conditioned heads read under teacher forcing: the sequence their targets come from. The labels
        (cached features: the base's greedy tokens), or under self-distillation the teacher's greedy tokens: the
        base's own (`"greedy"`, computed in the forward pass), or with LoRA adapters the adapter-free teacher's,
        whose logits are returned to be reused as the teacher.
        """
        if distillation == "none":
            return labels, None
        if hasattr(self.accelerator.unwrap_model(model).base, "disable_adapter"):
            teacher = self.teacher_logits(model, inputs, None)
            return greedy_targets(teacher, labels), teacher
        return "greedy", None

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        """`train_sampling_strategy="group_by_length"` on cached features: transformers' `LengthGroupedSampler`
        with each row's length up to its last target (it would otherwise read an `input_ids` column the rows do not
        have); `collate_features` then cuts each batch after its last target. Anything else: `Trainer`'s own."""
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if isinstance(dataset, CachedFeatures) and self.args.train_sampling_strategy == "group_by_length":
            from transformers.trainer_pt_utils import LengthGroupedSampler

            return LengthGroupedSampler(
                self.args.train_batch_size * self.args.gradient_accumulation_steps,
                dataset=dataset,
                lengths=dataset.lengths(),
            )
        return super()._get_train_sampler(train_dataset)

    def _get_eval_sampler(self, eval_dataset: Any) -> Any:
        """Evaluation under `group_by_length` on cached features: transformers groups evaluation batches by length
        too, reading an `input_ids` column cached rows do not have (it raised at the first `evaluate`); the rows'
        own lengths instead. Anything else: `Trainer`'s own."""
        if isinstance(eval_dataset, CachedFeatures) and self.args.train_sampling_strategy == "group_by_length":
            from transformers.trainer_pt_utils import LengthGroupedSampler

            return LengthGroupedSampler(
                self.args.eval_batch_size, dataset=eval_dataset, lengths=eval_dataset.lengths()
            )
        return super()._get_eval_sampler(eval_dataset)

    def _set_signature_columns_if_needed(self) -> None:
        # the cached top-k soft targets are read by `compute_loss`, not by the model's forward: keep them in batches
        super()._set_signature_columns_if_needed()
        self._signature_columns = [*self._signature_columns, "teacher_topk_ids", "teacher_topk_logprobs"]

    def _cached_soft_loss(
        self,
        model: nn.Module,
        unwrapped: Any,
        outputs: Any,
        labels: torch.Tensor,
        teacher_topk: tuple,
        return_outputs: bool,
    ) -> Any:
        """`distillation="soft"` on cached features: cross-entropy to the base's cached top-k distribution."""
        ids, logprobs = teacher_topk
        if ids is None:
            raise ValueError("distillation='soft' on cached features needs shards extracted with `top_k > 0`.")
        args = self.args
        num_heads = outputs.draft_logits.shape[2]
        scheme = args.head_loss_weighting if model.training or args.head_loss_weighting != "random" else "uniform"
        weights = head_weights(num_heads, scheme, args.head_loss_decay, self.head_generator)
        loss, per_head = topk_distillation_loss(
            outputs.draft_logits, unwrapped.to_draft_ids(ids), logprobs, labels, head_weights=weights
        )
        split = "train" if model.training else "eval"
        self._accumulate(split, outputs.draft_logits, per_head, unwrapped.to_draft_ids(labels))
        return (loss, outputs) if return_outputs else loss

    @torch.no_grad()
    def teacher_logits(self, model: nn.Module, inputs: dict[str, Any], outputs: Any) -> torch.Tensor:
        """
        The self-distillation teacher: the base model's logits with any LoRA adapters disabled (no gradient).

        Without adapters the base model of the forward pass already is the teacher and its logits are reused.
        """
        base = self.accelerator.unwrap_model(model).base
        if not hasattr(base, "disable_adapter"):
            return outputs.logits.detach()
        with base.disable_adapter():
            return base(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask")).logits

    @torch.no_grad()
    def _accumulate(
        self, split: str, draft_logits: torch.Tensor, head_losses: torch.Tensor, targets: torch.Tensor
    ) -> None:
        top1, top5, total = head_accuracy_counts(draft_logits.detach(), targets, top_k=5)
        prefix_hits, prefix_total = prefix_accuracy_counts(draft_logits.detach(), targets)
        losses = head_losses.detach().float()
        # (7, h): loss sum, top-1 hits, top-5 hits, targets, batches, hits and targets given a correct prefix
        stats = torch.stack(
            [
                losses,
                top1.float(),
                top5.float(),
                total.float(),
                torch.ones_like(losses),
                prefix_hits.float(),
                prefix_total.float(),
            ]
        )
        self.head_stats[split] = stats if split not in self.head_stats else self.head_stats[split] + stats

    # ------------------------------------------------------------------ optimizer
    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer; the heads' parameters get groups of `lr x heads_learning_rate_multiplier`."""
        fresh = self.optimizer is None
        optimizer = super().create_optimizer(model)
        multiplier = self.args.heads_learning_rate_multiplier
        if not fresh or multiplier == 1.0:
            return optimizer
        unwrapped = self.accelerator.unwrap_model(self.model)
        prefix = f"{unwrapped.base_model_prefix}."
        head_ids = {id(p) for n, p in unwrapped.named_parameters() if not n.startswith(prefix)}
        for group in list(optimizer.param_groups):
            heads = [p for p in group["params"] if id(p) in head_ids]
            if not heads:
                continue
            if len(heads) == len(group["params"]):
                group["lr"] *= multiplier
                continue
            group["params"] = [p for p in group["params"] if id(p) not in head_ids]
            optimizer.add_param_group(
                {**{k: v for k, v in group.items() if k != "params"}, "params": heads, "lr": group["lr"] * multiplier}
            )
        return optimizer

    # ------------------------------------------------------------------ logging
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the per-head loss, top-1 and top-5 accuracy, and top-1 given a correct prefix
        ([`~hf_bpd.losses.prefix_accuracy_counts`]) since the last log (summed over all processes)."""
        eval_losses = [k for k in logs if k.startswith("eval") and k.endswith("_loss")]
        split, prefix = ("eval", eval_losses[0][: -len("loss")]) if eval_losses else ("train", "")
        stats = self.head_stats.pop(split, None)
        if stats is not None:
            if self.accelerator.num_processes > 1:
                stats = self.accelerator.reduce(stats, reduction="sum")
            loss, top1, top5 = stats[0] / stats[4], stats[1] / stats[3].clamp(min=1), stats[2] / stats[3].clamp(min=1)
            given_prefix = stats[5] / stats[6].clamp(min=1)
            metrics = {
                "loss": loss.tolist(),
                "top1": top1.tolist(),
                "top5": top5.tolist(),
                "top1_given_prefix": given_prefix.tolist(),
            }
            self.head_metrics[split] = metrics
            for name, values in metrics.items():
                logs.update({f"{prefix}head{i + 1}_{name}": round(v, 4) for i, v in enumerate(values)})
        super().log(logs, start_time)

    def training_info(self) -> dict[str, Any]:
        """The training record written to `bpd_training.json` and rendered in the model card."""
        import peft
        import transformers

        from . import __version__

        model = self.accelerator.unwrap_model(self.model)
        args = self.args
        split = "eval" if "eval" in self.head_metrics else "train"
        metrics = self.head_metrics.get(split)
        weighting = args.head_loss_weighting
        if weighting == "geometric":
            weighting += f" ({args.head_loss_decay}**i)"
        if hasattr(model.base, "peft_config"):
            mode = "LoRA + heads"
        else:
            mode = "full base + heads" if self.base_trainable else "frozen base, heads only"
        return {
            "base_model": model.config.base_model_name_or_path,
            "num_draft_heads": model.config.num_draft_heads,
            "head_type": model.config.head_type,
            "training_data": self.training_data,
            "mode": mode,
            "distillation": args.distillation,
            "head_loss_weighting": weighting,
            "base_loss_weight": args.base_loss_weight if self.base_trainable else None,
            "heads_learning_rate_multiplier": args.heads_learning_rate_multiplier,
            "learning_rate": args.learning_rate,
            "global_step": self.state.global_step,
            "num_input_tokens_seen": self.state.num_input_tokens_seen or None,
            "head_metrics": None
            if metrics is None
            else {
                "split": "evaluation" if split == "eval" else "training (last logging interval)",
                "targets": "labels" if args.distillation == "none" else "base model greedy tokens",
                **metrics,
            },
            "versions": {
                "hf_bpd": __version__,
                "transformers": transformers.__version__,
                "peft": peft.__version__,
                "torch": torch.__version__,
            },
        }

    # ------------------------------------------------------------------ checkpoints
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict)
        if self.args.should_save:
            self._write_card(output_dir or self.args.output_dir)

    def _write_card(self, folder: str | os.PathLike) -> None:
        model = self.accelerator.unwrap_model(self.model)
        write_model_card(folder, model.config, self.training_info(), adapter_config_of(model.base))

    def create_model_card(self, **kwargs: Any) -> None:
        """The BPD model card (base model, `h`, head type, training data, per-head accuracy); used by `push_to_hub`."""
        if self.is_world_process_zero():
            self._write_card(self.args.output_dir)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """The Trainer pushes `output_dir` with standard weight files copied in: copy the heads' files too."""
        if self.is_world_process_zero() and self.args.hub_strategy != "end":
            source, target = Path(checkpoint_folder), Path(self.args.output_dir)
            for name in (HEADS_WEIGHTS_NAME, TRAINING_INFO_NAME, MODEL_CARD_NAME):
                if (source / name).is_file():
                    shutil.copy(source / name, target / name)
            if (source / ADAPTER_SUBFOLDER).is_dir():
                shutil.copytree(source / ADAPTER_SUBFOLDER, target / ADAPTER_SUBFOLDER, dirs_exist_ok=True)
        super()._push_from_checkpoint(checkpoint_folder)

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any) -> Any:
        """`Trainer.train`; a resumed checkpoint must hold as many draft heads as the model (checked first)."""
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            checkpoint = get_last_checkpoint(self.args.output_dir)
        if isinstance(checkpoint, (str, os.PathLike)):
            self._check_checkpoint(checkpoint)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _check_checkpoint(self, folder: str | os.PathLike) -> None:
        folder = Path(folder)
        if not (folder / "config.json").is_file() or not (folder / HEADS_WEIGHTS_NAME).is_file():
            raise ValueError(f"{folder} is not a BPDTrainer checkpoint (no config.json / {HEADS_WEIGHTS_NAME}).")
        saved = BPDConfig.from_pretrained(folder)
        config = self.accelerator.unwrap_model(self.model).config
        if saved.num_draft_heads != config.num_draft_heads:
            raise ValueError(
                f"Cannot resume from {folder}: it holds num_draft_heads={saved.num_draft_heads}, but the model being "
                f"trained has num_draft_heads={config.num_draft_heads}. Resume with the same number of heads or "
                "start a fresh run (another output_dir)."
            )

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        model = self.accelerator.unwrap_model(self.model if model is None else model)
        folder = Path(resume_from_checkpoint)
        self._check_checkpoint(folder)
        model.load_heads(folder / HEADS_WEIGHTS_NAME)
        has_adapters = hasattr(model.base, "peft_config")
        if (folder / ADAPTER_SUBFOLDER).is_dir() != has_adapters:
            raise ValueError(
                f"{folder} {'holds' if not has_adapters else 'lacks'} LoRA adapters but the model being trained "
                f"{'has none' if not has_adapters else 'has them'}: resume with the same `use_lora` setting."
            )
        if has_adapters:
            model.base.load_adapter(str(folder / ADAPTER_SUBFOLDER), model.base.active_adapter, is_trainable=True)
        logger.info("Loaded draft heads%s from %s.", " and LoRA adapters" if has_adapters else "", folder)

    def _load_best_model(self) -> None:
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return super()._load_best_model()
        self._load_from_checkpoint(self.state.best_model_checkpoint)
