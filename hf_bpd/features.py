"""
Cached features for fast draft-head training with a frozen base.

With the base frozen, every epoch of head training recomputes the same base forward. `extract_features` runs it
once per sequence and stores what the heads need: the base's last hidden states and its greedy next tokens (hard
self-distillation targets, Medusa's recipe). [`BPDTrainer`] then trains on [`CachedFeatures`] without running the
base at all (`BPDForCausalLM.forward(base_hidden_states=...)`), and with a draft vocabulary
(`draft_vocab_from_counts`) the heads' projections shrink from `V` to `K` columns.

Storage: safetensors shards of `hidden` `(n, T, d)` (bf16 by default: 1.1 KiB per token for d = 576) and `targets`
`(n, T)` int32, `-100` on padding; with `top_k > 0` also the base's `k` most likely tokens and their log-probabilities
at every position (`topk_ids` `(n, T, k)` int32, `topk_logprobs` `(n, T, k)` float16, unshifted like `targets`), the
soft targets of `distillation="soft"` without the base (KL to the teacher's top-k, as sparse distillation does). A torch `Dataset` over the shards' tensors, loaded into memory once, not a
`datasets` table: Arrow stores 2D float arrays as nested lists, which decode through Python per row, far slower than
slicing a tensor.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

IGNORE = -100


@torch.inference_mode()
def extract_features(
    base: Any,
    sequences: Sequence[Sequence[int]],
    out_dir: str | os.PathLike,
    seq_len: int = 256,
    batch_size: int = 8,
    shard_size: int = 128,
    storage_dtype: torch.dtype = torch.bfloat16,
    name: str = "features",
    train_mask: Sequence[Sequence[int]] | None = None,
    top_k: int = 0,
) -> list[Path]:
    """
    Run the frozen base once over `sequences` and store its last hidden states and greedy next tokens.

    Resumable and appendable: a shard already on disk with the rows, length and top-k this call would write is
    skipped; any other (a last shard that has grown since, an unreadable file) is extracted again. A shard is
    written to a temporary name, then renamed, so a crash never leaves half a shard under its real name.

    Args:
        base: a causal LM (`AutoModelForCausalLM`), in the dtype the features should come from.
        sequences: token-id lists; each is cut to `seq_len` and right-padded.
        out_dir: folder for `{name}-{i:05d}.safetensors` shards.
        train_mask: optional 0/1 lists aligned with `sequences`: positions with 0 get no target (e.g. a chat
            template's system prompt). Targets are the base's own greedy tokens either way.
    Returns:
        The shard paths, in order.
    """
    vocab = base.get_output_embeddings().weight.shape[0]
    if not isinstance(top_k, int) or not 0 <= top_k <= vocab:
        raise ValueError(f"top_k must be an int in [0, {vocab}] (0: greedy targets only), got {top_k!r}.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pad = 0
    device = next(base.parameters()).device
    paths = []
    for shard_index, start in enumerate(tqdm(range(0, len(sequences), shard_size), desc=f"features {name}")):
        path = out / f"{name}-{shard_index:05d}.safetensors"
        paths.append(path)
        rows = [list(s)[:seq_len] for s in sequences[start : start + shard_size]]
        if path.exists() and _shard_matches(path, len(rows), seq_len, top_k):
            continue
        masks = None if train_mask is None else [list(m)[:seq_len] for m in train_mask[start : start + shard_size]]
        hidden_parts, target_parts, topk_parts = [], [], []
        for b in range(0, len(rows), batch_size):
            batch = rows[b : b + batch_size]
            ids = torch.full((len(batch), seq_len), pad, dtype=torch.long)
            attn = torch.zeros_like(ids)
            for i, row in enumerate(batch):
                ids[i, : len(row)] = torch.as_tensor(row)
                attn[i, : len(row)] = 1
            outputs = base(input_ids=ids.to(device), attention_mask=attn.to(device), output_hidden_states=True)
            hidden_parts.append(outputs.hidden_states[-1].to(storage_dtype).cpu())
            targets = torch.full_like(ids, IGNORE)
            targets[:, 1:] = outputs.logits[:, :-1].argmax(-1).cpu()  # unshifted: entry s is argmax at s - 1
            valid = attn.bool()
            if masks is not None:
                for i, m in enumerate(masks[b : b + batch_size]):
                    valid[i, : len(m)] &= torch.as_tensor(m, dtype=torch.bool)
            target_parts.append(targets.masked_fill(~valid, IGNORE).to(torch.int32))
            if top_k:
                logp = torch.log_softmax(outputs.logits[:, :-1].float(), dim=-1).topk(top_k, dim=-1)
                ids_k = torch.zeros(*ids.shape, top_k, dtype=torch.int32)
                logp_k = torch.full((*ids.shape, top_k), float("-inf"), dtype=torch.float16)
                ids_k[:, 1:], logp_k[:, 1:] = logp.indices.cpu().to(torch.int32), logp.values.cpu().to(torch.float16)
                topk_parts.append((ids_k, logp_k))
        tensors = {"hidden": torch.cat(hidden_parts), "targets": torch.cat(target_parts)}
        if top_k:
            tensors["topk_ids"] = torch.cat([t[0] for t in topk_parts])
            tensors["topk_logprobs"] = torch.cat([t[1] for t in topk_parts])
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp))
        tmp.rename(path)
    return paths


_REQUIRED = {"hidden", "targets"}
_SOFT = {"topk_ids", "topk_logprobs"}


def _shard_matches(path: Path, rows: int, seq_len: int, top_k: int) -> bool:
    """Whether a shard on disk holds what this call would write (a last shard grows when more sequences come)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            shape = handle.get_slice("targets").get_shape()
            soft = "topk_ids" in handle.keys()
            k = handle.get_slice("topk_ids").get_shape()[-1] if soft else 0
    except Exception as err:  # unreadable (torn by a crash before the rename, or foreign): rebuilt
        logger.warning("feature shard %s is unreadable (%s): extracting it again", path, err)
        return False
    if list(shape) != [rows, seq_len] or k != top_k:
        logger.info(
            "feature shard %s holds %s rows/top-%d, expected %d/top-%d: extracting it again",
            path,
            shape,
            k,
            rows,
            top_k,
        )
        return False
    return True


class CachedFeatures(Dataset):
    """
    Rows of cached features: `{"base_hidden_states": (T, d), "labels": (T,)}` where `labels` are the base's greedy
    tokens (unshifted, `-100` where masked). Feed to [`BPDTrainer`] with `distillation="hard"` (or `"none"`: the
    labels already are the teacher's tokens). Shards written with `top_k > 0` also give `"teacher_topk_ids"` and
    `"teacher_topk_logprobs"` `(T, k)` (the base's top-k at each position), used by `distillation="soft"`.

    Args:
        paths: shard files (or folders, whose `*.safetensors` are taken in name order).
        soft_targets (`bool`, defaults to `True`): load the top-k soft targets when every shard has them.
    Raises:
        `ValueError` when no shard is found, or a file is not a feature shard; `FileNotFoundError` for a missing file.
    """

    def __init__(self, paths: str | os.PathLike | Iterable[str | os.PathLike], soft_targets: bool = True):
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        files: list[Path] = []
        for p in map(Path, paths):
            files += sorted(p.glob("*.safetensors")) if p.is_dir() else [p]
        if not files:
            raise ValueError(f"No feature shards (*.safetensors) found in {list(map(str, paths))}.")
        hidden, targets, topk_ids, topk_logprobs = [], [], [], []
        soft = soft_targets
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"Feature shard {f} does not exist.")
            with safe_open(str(f), framework="pt") as handle:
                keys = set(handle.keys())
                if not _REQUIRED <= keys <= _REQUIRED | _SOFT or len(keys & _SOFT) == 1:
                    raise ValueError(
                        f"{f} is not a feature shard (tensors {sorted(keys)}, expected hidden, targets and optionally "
                        "topk_ids, topk_logprobs)."
                    )
                soft = soft and _SOFT <= keys
                hidden.append(handle.get_tensor("hidden"))
                targets.append(handle.get_tensor("targets").long())
                if soft:
                    topk_ids.append(handle.get_tensor("topk_ids").long())
                    topk_logprobs.append(handle.get_tensor("topk_logprobs"))
        self.hidden = torch.cat(hidden)
        self.targets = torch.cat(targets)
        self.topk_ids = torch.cat(topk_ids) if soft else None
        self.topk_logprobs = torch.cat(topk_logprobs) if soft else None
        self.files = files

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = {"base_hidden_states": self.hidden[index], "labels": self.targets[index]}
        if self.topk_ids is not None:
            row["teacher_topk_ids"] = self.topk_ids[index]
            row["teacher_topk_logprobs"] = self.topk_logprobs[index]
        return row

    @property
    def has_soft_targets(self) -> bool:
        """Whether the shards carry the base's top-k distribution (`extract_features(top_k=...)`)."""
        return self.topk_ids is not None

    def keep_least_certain(self, fraction: float) -> CachedFeatures:
        """
        Keep the targets of the `fraction` of positions where the base model was least certain (lowest top-1
        probability, i.e. the flattest next-token distribution) and mask the rest (`-100`), in place. Data selection
        by target flatness ("train where the target is least certain", arXiv 2601.18902, reported to keep ~96% of
        the speedup at half the data). Needs soft targets (`extract_features(top_k=...)`).

        Args:
            fraction (`float`): share of the valid target positions kept, in `(0, 1]`.
        Returns:
            `self`, for chaining.
        Raises:
            `ValueError` without soft targets or for a fraction outside `(0, 1]`.
        """
        if self.topk_logprobs is None:
            raise ValueError("keep_least_certain needs the base's top-k distribution: extract with `top_k > 0`.")
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}.")
        valid = self.targets != IGNORE
        certainty = self.topk_logprobs[..., 0].float().exp().masked_fill(~valid, float("inf"))  # top-1 probability
        keep = int(round(fraction * int(valid.sum())))
        if keep < int(valid.sum()):
            threshold = certainty[valid].kthvalue(max(keep, 1)).values
            self.targets = self.targets.masked_fill(certainty > threshold, IGNORE)
        return self

    @property
    def hidden_size(self) -> int:
        return self.hidden.shape[-1]

    def num_target_tokens(self) -> int:
        return int((self.targets != IGNORE).sum())

    def target_counts(self, vocab_size: int) -> torch.LongTensor:
        """How often each base token is a (valid) target."""
        valid = self.targets[self.targets != IGNORE]
        return torch.bincount(valid, minlength=vocab_size)


def collate_features(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack [`CachedFeatures`] rows (all the same length) into a batch."""
    return {key: torch.stack([r[key] for r in rows]) for key in rows[0]}


def draft_vocab_from_counts(counts: torch.Tensor, size: int, always: Sequence[int] = ()) -> torch.LongTensor:
    """
    The `size` most frequent tokens (ties broken by smaller id), plus `always` (e.g. EOS) kept in.

    Returns:
        `torch.LongTensor` of shape `(size,)`, sorted by token id.
    """
    if size < 1 or size > counts.numel():
        raise ValueError(f"draft vocabulary size must be in [1, {counts.numel()}], got {size}.")
    score = counts.double().clone()
    for t in always:
        score[int(t)] = float("inf")
    order = torch.argsort(-score, stable=True)
    return order[:size].sort().values


def coverage(counts: torch.Tensor, token_map: torch.Tensor) -> float:
    """Share of targets that a draft vocabulary can draft at all (upper bound of every head's accuracy)."""
    total = counts.sum()
    return float(counts[token_map].sum() / total) if total > 0 else 0.0
