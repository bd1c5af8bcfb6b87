"""
Every use of a private or version-sensitive transformers API, in one place, behind a version check.

hf_bpd is tested against the versions in `TESTED` (a version range per package); on any other version importing
hf_bpd warns once, naming the tested and the installed versions (set `HF_BPD_SKIP_VERSION_CHECK=1` to silence it):
hf_bpd may then decode wrongly, and the lossless tests are the way to find out. `tests/test_compat.py` checks the
private signatures listed below against the installed transformers. When a new transformers release is tested,
update `TESTED` here and the pins in `setup.cfg` together.

What is private, and why:
- `GenerationConfig._pad_token_tensor`: the pad id as `generate` prepared it (from the model's config, the
  generation config or the EOS id), which plain decoding pads finished rows with.
- `GenerationMixin._supports_logits_to_keep()`: whether `forward` takes `logits_to_keep` (skip the vocabulary
  projection of the prompt in the prefill).
- In-place writes to `DynamicLayer.keys` / `.values` (and a `DynamicSlidingWindowLayer` inside its window): reorder
  the verified block's cache slots (tree and p-best verification, closing batch holes before returning a cache).
- `GenerationMixin._prefill`'s slicing of a prefilled cache (`hf_bpd._validation.uncached_start` does the same).
- `Trainer._save`, `_load_from_checkpoint`, `_load_best_model`, `_push_from_checkpoint`: overridden by
  [`~hf_bpd.trainer.BPDTrainer`] for heads-only checkpoints ([`check_trainer_private_api`]).
"""

from __future__ import annotations

import inspect
import os
import warnings
from typing import Any

import torch

TESTED = {"transformers": ">=5.24.0,<5.25", "peft": ">=0.21.2,<0.22"}
_warned: set[str] = set()


def is_tested(package: str, installed: str) -> bool:
    """Whether `installed` lies in the tested range of `package`."""
    from packaging.specifiers import SpecifierSet

    return SpecifierSet(TESTED[package]).contains(installed, prereleases=True)


def check_version(package: str, installed: str) -> bool:
    """
    Warn once per package (a `UserWarning`) unless `installed` is in the tested range or the check is switched off.

    Returns:
        `bool`: whether the version is a tested one.
    """
    if is_tested(package, installed):
        return True
    if os.environ.get("HF_BPD_SKIP_VERSION_CHECK") or package in _warned:
        return False
    _warned.add(package)
    warnings.warn(
        f"hf_bpd is tested with {package} {TESTED[package]}, but {package} {installed} is installed. Its generation, "
        f"cache and Trainer internals change between releases, so hf_bpd could decode wrongly: run hf_bpd's tests "
        f"(tests/test_compat.py checks the private APIs it uses), or install a tested version (`pip install "
        f"'{package}{TESTED[package]}'`). Set HF_BPD_SKIP_VERSION_CHECK=1 to silence this warning.",
        UserWarning,
        stacklevel=2,
    )
    return False


def check_transformers() -> bool:
    import transformers

    return check_version("transformers", transformers.__version__)


def check_peft() -> bool:
    import peft

    return check_version("peft", peft.__version__)


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
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    for layer in cache.layers:
        # a sliding-window layer that never filled its window holds every token, laid out as a full layer's
        inside_window = type(layer) is DynamicSlidingWindowLayer and layer.get_seq_length() < layer.sliding_window
        if type(layer) is not DynamicLayer and not inside_window:
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
    "_get_train_sampler": ("train_dataset",),  # group_by_length over cached features (their lengths)
    "_get_eval_sampler": ("eval_dataset",),  # the same for evaluation
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
                f"overrides it; install transformers {TESTED['transformers']}."
            )
