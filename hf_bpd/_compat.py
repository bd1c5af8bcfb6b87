"""
Every use of a private or version-sensitive transformers API, in one place, behind a version check.

hf_bpd is tested against exactly the versions in `TESTED`; on any other version importing hf_bpd raises an
`ImportError` naming the tested and the installed versions (set `HF_BPD_SKIP_VERSION_CHECK=1` to try anyway, at
your own risk: the lossless tests are the way to find out). When a new transformers release is tested, update
`TESTED` here and the pins in `setup.cfg` together.

What is private, and why:
- `GenerationConfig._pad_token_tensor`: the pad id as `generate` prepared it (from the model's config, the
  generation config or the EOS id), which plain decoding pads finished rows with.
- `PreTrainedModel._supports_logits_to_keep()`: whether `forward` takes `logits_to_keep` (skip the vocabulary
  projection of the prompt in the prefill).
- In-place writes to `DynamicLayer.keys` / `.values`: reorder the verified block's cache slots (p-best verification).
- `Trainer._save`, `_load_from_checkpoint`, `_load_best_model`, `_push_from_checkpoint`: overridden by
  [`~hf_bpd.trainer.BPDTrainer`] for heads-only checkpoints ([`check_trainer_private_api`]).
"""

from __future__ import annotations

import inspect
import os
from typing import Any

import torch

TESTED = {"transformers": ("5.24.0",), "peft": ("0.21.2",)}


def _release(version: str) -> tuple[int, ...]:
    from packaging.version import Version

    return Version(version).release


def check_version(package: str, installed: str) -> None:
    """
    Raise an `ImportError` unless `installed` is a tested version of `package` (or the check is switched off).
    """
    if os.environ.get("HF_BPD_SKIP_VERSION_CHECK"):
        return
    tested = TESTED[package]
    if any(_release(installed) == _release(v) for v in tested):
        return
    raise ImportError(
        f"hf_bpd is tested with {package} {' / '.join(tested)}, but {package} {installed} is installed. Its "
        f"generation, cache and Trainer internals change between releases, so hf_bpd could decode wrongly. "
        f"Install the tested version (`pip install {package}=={tested[-1]}`), or set HF_BPD_SKIP_VERSION_CHECK=1 "
        "to try anyway (then run hf_bpd's tests)."
    )


def check_transformers() -> None:
    import transformers

    check_version("transformers", transformers.__version__)


def check_peft() -> None:
    import peft

    check_version("peft", peft.__version__)


check_transformers()


# ------------------------------------------------------------------------------------------------ generation
def pad_token_tensor(generation_config: Any) -> torch.Tensor | None:
    """The pad token `generate` prepared (a 0-d tensor), or None."""
    return getattr(generation_config, "_pad_token_tensor", None)


def supports_logits_to_keep(model: Any) -> bool:
    """Whether `model.forward` takes `logits_to_keep`."""
    probe = getattr(model, "_supports_logits_to_keep", None)
    if probe is not None:
        return bool(probe())
    return "logits_to_keep" in inspect.signature(model.forward).parameters


# ------------------------------------------------------------------------------------------------ cache
def reorder_cache_tail(cache: Any, width: int, order: torch.LongTensor) -> None:
    """
    Reorder the last `width` slots of every layer of a dynamic cache by `order` `(batch, width)`, in place.

    Raises:
        ValueError: for a layer that is not a full-attention `DynamicLayer`.
    """
    from transformers.cache_utils import DynamicLayer

    for layer in cache.layers:
        if not isinstance(layer, DynamicLayer) or getattr(layer, "sliding_window", None):
            raise ValueError(
                f"Verifying several drafts at once needs a dynamic full-attention cache; got {type(layer).__name__}."
            )
        if not layer.is_initialized:
            continue
        for name in ("keys", "values"):
            states = getattr(layer, name)  # (B, H, T, D)
            index = order[:, None, :, None].expand(-1, states.shape[1], -1, states.shape[3])
            states[:, :, -width:] = states[:, :, -width:].gather(2, index)


# ------------------------------------------------------------------------------------------------ Trainer
TRAINER_PRIVATE_METHODS = {
    "_save": ("output_dir", "state_dict"),
    "_load_from_checkpoint": ("resume_from_checkpoint", "model"),
    "_load_best_model": (),
    "_push_from_checkpoint": ("checkpoint_folder",),
    "_set_signature_columns_if_needed": (),  # keeps the cached soft-target columns in the batches
}


def check_trainer_private_api(trainer_class: type) -> None:
    """
    Check that `transformers.Trainer` still has the private methods `BPDTrainer` overrides, with the same parameters.

    Raises:
        ImportError: naming the method that moved.
    """
    import transformers

    for name, params in TRAINER_PRIVATE_METHODS.items():
        method = getattr(trainer_class, name, None)
        found = tuple(inspect.signature(method).parameters)[1:] if method is not None else None
        if found != params:
            raise ImportError(
                f"transformers {transformers.__version__}: Trainer.{name} is "
                f"{'missing' if found is None else f'{name}{found}'}, expected {name}{params}. hf_bpd's BPDTrainer "
                f"overrides it; install transformers {' / '.join(TESTED['transformers'])}."
            )
