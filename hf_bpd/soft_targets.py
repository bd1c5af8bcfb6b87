"""
Soft (top-k) targets for feature shards from the hidden states they already store ([`add_soft_targets`]): the base's
next-token distribution through its output embeddings, without a second forward of the base.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .features import _REQUIRED, _SOFT, IGNORE, save_feature_shard, shard_metadata

# config fields through which an architecture transforms `lm_head(hidden)` before its logits (Gemma 2/3's soft cap,
# Cohere's scale, Granite's divisor): soft targets from stored hidden states would miss the transform
_LOGIT_TRANSFORMS = (
    "final_logit_softcapping",
    "logit_scale",
    "logits_scaling",
    "lm_head_multiplier",
    "output_multiplier",
)


def _logit_transforms(base: Any) -> list[str]:
    """The config fields (top level or text config) by which `base` transforms `lm_head(hidden)` into its logits,
    and `"forward"` when a one-token forward's logits are not its output embeddings' product of its last hidden
    state for another reason."""
    configs = [getattr(base, "config", None)]
    if hasattr(configs[0], "get_text_config"):
        configs.append(configs[0].get_text_config())
    found = sorted({a for c in configs for a in _LOGIT_TRANSFORMS if getattr(c, a, None) not in (None, 1, 1.0)})
    if found:
        return found
    device = base.get_output_embeddings().weight.device
    ids = torch.tensor([[0, 1]], device=device)
    try:
        out = base(input_ids=ids, output_hidden_states=True)
    except Exception:  # a model that cannot run on token ids alone: the config check is what there is
        return []
    direct = base.get_output_embeddings()(out.hidden_states[-1]).float()
    return [] if torch.allclose(direct, out.logits.float(), atol=1e-3, rtol=1e-3) else ["forward"]


@torch.inference_mode()
def add_soft_targets(
    base: Any,
    paths: Iterable[str | os.PathLike],
    top_k: int,
    chunk_positions: int = 4096,
) -> list[Path]:
    """
    Give feature shards the base's top-k next-token distribution (the soft targets of `distillation="soft"`),
    computed from the hidden states the shards already store, through the base's output embeddings: no second
    forward of the base. This is how shards captured while answering ([`generation_features`], hard targets only)
    get soft targets; the values equal [`extract_features`]`(top_k=...)`'s up to the storage dtype's rounding of the
    hidden states (bf16 by default: log-probabilities within ~1e-2, the same top tokens but near-ties).

    Filled at every position with a valid target (the distribution at `s - 1`, unshifted like `targets`); other
    positions keep `topk_ids` 0 and `topk_logprobs` `-inf`, as `extract_features` leaves padding. Shards already
    holding `top_k` soft targets are skipped; shards with another `k` are rewritten. Each shard is rewritten
    atomically ([`save_feature_shard`]) with its metadata kept.

    Args:
        base: the causal LM the features came from (its `get_output_embeddings()`; fp32 for the closest values).
        paths: feature shard files.
        top_k (`int`): tokens kept per position, in `[1, vocab]`.
        chunk_positions (`int`): positions projected at once (memory: `chunk_positions * vocab` floats).
    Returns:
        The shard paths, in order.
    Raises:
        `ValueError` for a `top_k` outside `[1, vocab]` or a `chunk_positions` below 1, for an architecture whose logits are not its output
        embeddings' product (its config, or its text config, sets one of `final_logit_softcapping`, `logit_scale`,
        `logits_scaling`, `lm_head_multiplier`, `output_multiplier`, or a one-token forward disagrees: use
        `extract_features(top_k=...)`), or for a file that is not a feature shard of the base's hidden size.
    """
    lm_head = base.get_output_embeddings()
    vocab, d = lm_head.weight.shape
    if not isinstance(top_k, int) or not 1 <= top_k <= vocab:
        raise ValueError(f"top_k must be an int in [1, {vocab}], got {top_k!r}.")
    if not isinstance(chunk_positions, int) or chunk_positions < 1:
        raise ValueError(
            f"chunk_positions must be a positive int (positions projected at once), got {chunk_positions!r}."
        )
    transforms = _logit_transforms(base)
    if transforms:
        raise ValueError(
            f"{type(base).__name__} transforms its logits beyond its output embeddings ({', '.join(transforms)}): "
            "soft targets from stored hidden states would miss that; extract the shards with "
            "`extract_features(top_k=...)` instead."
        )
    weight_dtype = lm_head.weight.dtype
    device = lm_head.weight.device
    out = []
    for path in map(Path, paths):
        with safe_open(str(path), framework="pt") as handle:
            keys = set(handle.keys())
            if not _REQUIRED <= keys:
                raise ValueError(f"{path} is not a feature shard (tensors {sorted(keys)}).")
            if _SOFT <= keys and handle.get_slice("topk_ids").get_shape()[-1] == top_k:
                out.append(path)
                continue
            hidden = handle.get_tensor("hidden")
            targets = handle.get_tensor("targets")
        if hidden.shape[-1] != d:
            raise ValueError(f"{path} stores hidden states of size {hidden.shape[-1]}; the base's is {d}.")
        n, length = targets.shape
        topk_ids = torch.zeros(n, length, top_k, dtype=torch.int32)
        topk_logprobs = torch.full((n, length, top_k), float("-inf"), dtype=torch.float16)
        valid = targets != IGNORE
        valid[:, 0] = False  # position 0 has no state before it
        rows, cols = valid.nonzero(as_tuple=True)
        for start in range(0, rows.numel(), chunk_positions):
            r, c = rows[start : start + chunk_positions], cols[start : start + chunk_positions]
            logits = lm_head(hidden[r, c - 1].to(device=device, dtype=weight_dtype)).float()
            best = logits.topk(top_k, dim=-1)  # log-softmax of the top k only: no second (positions, vocab) copy
            topk_ids[r, c] = best.indices.cpu().to(torch.int32)
            topk_logprobs[r, c] = (best.values - logits.logsumexp(-1, keepdim=True)).cpu().to(torch.float16)
        tensors = {"hidden": hidden, "targets": targets, "topk_ids": topk_ids, "topk_logprobs": topk_logprobs}
        out.append(save_feature_shard(path, tensors, shard_metadata(path)))
    return out
