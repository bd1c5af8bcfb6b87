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

import json
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

    Resumable and appendable: a shard already on disk with the rows and length this call would write is skipped
    (with `top_k = 0`, whatever soft targets it has); one that lacks this `top_k` gets it from its stored hidden
    states ([`add_soft_targets`], no forward; by a forward when the architecture transforms its logits); any other
    (a last shard that has grown since, an unreadable file) is extracted again. A shard is
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
    from .soft_targets import _logit_transforms, add_soft_targets

    transforms = None  # checked once, when a shard on disk only lacks this top-k
    pending = []  # shards that get this top-k from their stored hidden states
    for shard_index, start in enumerate(tqdm(range(0, len(sequences), shard_size), desc=f"features {name}")):
        path = out / f"{name}-{shard_index:05d}.safetensors"
        paths.append(path)
        rows = [list(s)[:seq_len] for s in sequences[start : start + shard_size]]
        state = _shard_state(path, len(rows), seq_len, top_k)
        if state == "top-k" and transforms is None:
            transforms = _logit_transforms(base)
        if state == "ok":
            continue
        if state == "top-k" and not transforms:
            pending.append(path)  # after the loop, in one call
            continue
        masks = None if train_mask is None else [list(m)[:seq_len] for m in train_mask[start : start + shard_size]]
        d = base.get_output_embeddings().weight.shape[1]
        hidden = torch.zeros(len(rows), seq_len, d, dtype=storage_dtype)
        targets = torch.full((len(rows), seq_len), IGNORE, dtype=torch.int32)
        inputs = torch.full((len(rows), seq_len), IGNORE, dtype=torch.int32)
        for i, row in enumerate(rows):
            inputs[i, : len(row)] = torch.as_tensor(row, dtype=torch.int32)
        if top_k:
            topk_ids = torch.zeros(len(rows), seq_len, top_k, dtype=torch.int32)
            topk_logprobs = torch.full((len(rows), seq_len, top_k), float("-inf"), dtype=torch.float16)
        # batches of similar length, each cut to its longest row: the forward costs what the tokens cost, not the
        # padding to `seq_len` (right padding under a causal mask leaves the valid positions unchanged)
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        for b in range(0, len(order), batch_size):
            picked = order[b : b + batch_size]
            width = max(1, max(len(rows[i]) for i in picked))
            ids = torch.full((len(picked), width), pad, dtype=torch.long)
            attn = torch.zeros_like(ids)
            for j, i in enumerate(picked):
                ids[j, : len(rows[i])] = torch.as_tensor(rows[i], dtype=torch.long)
                attn[j, : len(rows[i])] = 1
            outputs = base(input_ids=ids.to(device), attention_mask=attn.to(device), output_hidden_states=True)
            step_targets = torch.full_like(ids, IGNORE)
            step_targets[:, 1:] = outputs.logits[:, :-1].argmax(-1).cpu()  # unshifted: entry s is argmax at s - 1
            valid = attn.bool()
            if masks is not None:
                for j, i in enumerate(picked):
                    mask = masks[i][:width]  # a mask longer than its row masks nothing more
                    valid[j, : len(mask)] &= torch.as_tensor(mask, dtype=torch.bool)
            index = torch.as_tensor(picked)
            hidden[index, :width] = (outputs.hidden_states[-1] * attn[..., None].to(device)).to(storage_dtype).cpu()
            targets[index, :width] = step_targets.masked_fill(~valid, IGNORE).to(torch.int32)
            if top_k:
                logp = torch.log_softmax(outputs.logits[:, :-1].float(), dim=-1).topk(top_k, dim=-1)
                topk_ids[index, 1:width] = logp.indices.cpu().to(torch.int32)
                topk_logprobs[index, 1:width] = logp.values.cpu().to(torch.float16)
        tensors = {"hidden": hidden, "targets": targets, "input_ids": inputs}
        if top_k:
            tensors.update(topk_ids=topk_ids, topk_logprobs=topk_logprobs)
        save_feature_shard(path, tensors)
    if pending:
        add_soft_targets(base, pending, top_k)
    return paths


def save_feature_shard(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict | None = None
) -> Path:
    """
    Write one feature shard atomically: to `path` with a `.tmp` suffix, then renamed, so a crash never leaves half a
    shard under its real name. `metadata` (JSON-serialisable) goes into the safetensors header (`shard_metadata`).
    """
    path = Path(path)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp")  # one writer's own: `remove_stale_temporaries` spares it
    save_file(tensors, str(tmp), metadata=None if metadata is None else {"hf_bpd": json.dumps(metadata)})
    os.replace(tmp, path)
    return path


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """
    Delete the `*.tmp` files [`save_feature_shard`] left in `folder` when its process died before the rename; a
    temporary of a process still running (another stage rewriting a shard right now) is left alone.

    Returns:
        The paths deleted.
    """
    removed = []
    for tmp in sorted(Path(folder).glob("*.tmp")):
        pid = tmp.stem.rsplit(".", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and _process_alive(int(pid)):
            continue
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: an existence check, nothing is sent
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def shard_metadata(path: str | os.PathLike) -> dict | None:
    """
    The metadata [`save_feature_shard`] stored in a shard, or `None` when it stored none.

    Raises:
        `OSError` / `safetensors.SafetensorError` when the file cannot be read (left to the caller: a shard is never
        torn under its real name, so an unreadable one is a problem to look at, not data to throw away).
    """
    with safe_open(str(path), framework="pt") as handle:
        raw = (handle.metadata() or {}).get("hf_bpd")
    return None if raw is None else json.loads(raw)


class LastHiddenStateRecorder:
    """
    Records the last hidden state of every forward of a causal LM's decoder body (`base.get_decoder()`), e.g. over a
    `generate` call: the prefill's `(B, P, d)` and one `(B, 1, d)` per decoding step. What the model computes while
    it generates its own answers is then the feature cache of those answers ([`generation_features`]) for free,
    instead of a second forward over them ([`extract_features`]). Use as a context manager; `states` holds the
    tensors (detached, on the model's device) in call order.
    """

    def __init__(self, base: Any):
        self.decoder = base.get_decoder()
        self.states: list[torch.Tensor] = []
        self._handle = None

    def _hook(self, module, args, output) -> None:
        hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
        self.states.append(hidden.detach())

    def __enter__(self) -> LastHiddenStateRecorder:
        self.states = []
        self._handle = self.decoder.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()
        self._handle = None


@torch.inference_mode()
def generation_features(
    base: Any,
    input_ids: torch.LongTensor,
    attention_mask: torch.LongTensor,
    sequences: torch.LongTensor,
    states: Sequence[torch.Tensor],
    eos_token_id: int | Sequence[int],
    seq_len: int,
    train_start: Sequence[int] | None = None,
    storage_dtype: torch.dtype = torch.bfloat16,
) -> dict[str, torch.Tensor]:
    """
    Feature rows (the layout of [`extract_features`]: hidden states and the base's greedy next tokens) of prompts and
    the greedy answers `generate` gave them, from the hidden states recorded while it ran ([`LastHiddenStateRecorder`]).

    Row `b` is the prompt's tokens (left padding removed) followed by the answer up to and including its first
    `eos_token_id`, cut to `seq_len`. Targets of answer positions are the answer's tokens (greedy decoding's own
    argmax); targets of prompt positions are the argmax of the base's output embeddings over the recorded states (one
    projection per prompt token, the only extra compute). The last token of a row has no recorded state (`generate`
    never runs a forward on it): its hidden row is zero, and no target reads it. Hard targets only: soft (top-k)
    targets would need the full distribution at every step, which `generate` does not keep.

    Args:
        input_ids, attention_mask (`torch.LongTensor` of shape `(B, P)`): the left-padded prompts given to `generate`.
        sequences (`torch.LongTensor` of shape `(B, P + G)`): what greedy `generate` returned.
        states: the recorder's tensors: `(B, P, d)` then one `(B, 1, d)` per generated token but the last (`G` is
            what `generate` returned: fewer than `max_new_tokens` when every row stopped early).
        eos_token_id (`int` or a sequence of them): ends an answer (what follows it is `generate`'s padding).
        seq_len (`int`): stored length `T`.
        train_start: per row, the first position that gets a target (e.g. after a chat template's system block).
    Returns:
        `{"hidden": (B, T, d) storage_dtype, "targets": (B, T) int32, "input_ids": (B, T) int32}` (`-100` where
        there is no target, resp. no token): `input_ids` are the row's real tokens (the prompt's own, where `targets`
        hold the base's argmax), which heads that read the committed tokens (`head_type="context"`) train on.
    Raises:
        `ValueError` when the recorded states do not match the prompts and sequences (another decoding strategy, or
        a recorder that saw other forwards).
    """
    batch, width = input_ids.shape
    recorded = torch.cat(list(states), dim=1) if states else None
    generated = sequences[:, width:]
    # greedy `generate`: the prefill, then one forward per generated token but the last
    if recorded is None or tuple(recorded.shape[:2]) != (batch, width + max(generated.shape[1] - 1, 0)):
        raise ValueError(
            f"The recorded states ({None if recorded is None else tuple(recorded.shape)}) do not match {batch} prompts "
            f"of {width} tokens and {generated.shape[1]} generated: record exactly one greedy `generate` call."
        )
    lm_head = base.get_output_embeddings()
    eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
    hidden = torch.zeros(batch, seq_len, recorded.shape[-1], dtype=storage_dtype)
    targets = torch.full((batch, seq_len), IGNORE, dtype=torch.int32)
    inputs = torch.full((batch, seq_len), IGNORE, dtype=torch.int32)
    for b in range(batch):
        p = int(attention_mask[b].sum())
        left = width - p
        answer = generated[b].tolist()
        n = next((i + 1 for i, token in enumerate(answer) if token in eos), len(answer))
        tokens = input_ids[b, left:].tolist() + answer[:n]
        length = min(len(tokens), seq_len)
        have = min(length, recorded.shape[1] - left)  # positions with a recorded state
        hidden[b, :have] = recorded[b, left : left + have].to(storage_dtype).cpu()
        row = torch.full((length,), IGNORE, dtype=torch.long)
        prompt_end = min(p, length)
        if prompt_end > 1:  # the base's own argmax inside the prompt: one projection per prompt token
            row[1:prompt_end] = lm_head(recorded[b, left : left + prompt_end - 1]).argmax(-1).cpu()
        row[prompt_end:] = torch.as_tensor(tokens[prompt_end:length], dtype=torch.long)
        if train_start is not None:
            row[: train_start[b]] = IGNORE
        targets[b, :length] = row.to(torch.int32)
        inputs[b, :length] = torch.as_tensor(tokens[:length], dtype=torch.int32)
    return {"hidden": hidden, "targets": targets, "input_ids": inputs}


_REQUIRED = {"hidden", "targets"}
_SOFT = {"topk_ids", "topk_logprobs"}
_OPTIONAL = {"input_ids"}  # the rows' real tokens (shards written before they were stored lack them)


def _shard_state(path: Path, rows: int, seq_len: int, top_k: int) -> str:
    """What a shard on disk needs for this call: `"ok"` (it holds these rows, and top-k soft targets when asked:
    any `k` when none are asked), `"top-k"` (the rows, but not this `k`: `add_soft_targets` supplies it without a
    forward) or `"extract"` (missing, unreadable, or other rows: a last shard grows when more sequences come)."""
    if not path.exists():
        return "extract"
    try:
        with safe_open(str(path), framework="pt") as handle:
            shape = handle.get_slice("targets").get_shape()
            soft = "topk_ids" in handle.keys()
            k = handle.get_slice("topk_ids").get_shape()[-1] if soft else 0
    except Exception as err:  # unreadable (torn by a crash before the rename, or foreign): rebuilt
        logger.warning("feature shard %s is unreadable (%s): extracting it again", path, err)
        return "extract"
    if list(shape) != [rows, seq_len]:
        logger.info("feature shard %s holds %s rows, expected %d: extracting it again", path, shape, rows)
        return "extract"
    return "ok" if k == top_k or not top_k else "top-k"


class CachedFeatures(Dataset):
    """
    Rows of cached features: `{"base_hidden_states": (T, d), "labels": (T,)}` where `labels` are the base's greedy
    tokens (unshifted, `-100` where masked), and `"draft_input_ids"` `(T,)`, the rows' real tokens, from shards that
    stored them (`input_ids`, written since hf_bpd 0.30; token-conditioned heads are teacher-forced on them). Feed to [`BPDTrainer`] with `distillation="hard"` (or `"none"`: the
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
        # two passes: shapes first, then each shard copied into tensors allocated once (torch.cat of the shards
        # would hold every shard twice at its peak: 2x the features' size, ~18 GiB for SmolLM2's 2M tokens)
        # hard_only: shards without soft targets (e.g. captured while generating); no_inputs: without input_ids
        shapes, hard_only, no_inputs, dtypes = [], [], [], set()
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"Feature shard {f} does not exist.")
            with safe_open(str(f), framework="pt") as handle:
                keys = set(handle.keys())
                if not _REQUIRED <= keys <= _REQUIRED | _SOFT | _OPTIONAL or len(keys & _SOFT) == 1:
                    raise ValueError(
                        f"{f} is not a feature shard (tensors {sorted(keys)}, expected hidden, targets and optionally "
                        "topk_ids, topk_logprobs)."
                    )
                if not _SOFT <= keys:
                    hard_only.append(f)
                if "input_ids" not in keys:
                    no_inputs.append(f)
                shape = handle.get_slice("hidden").get_shape()
                dtypes.add(handle.get_slice("hidden").get_dtype())
                k = handle.get_slice("topk_ids").get_shape()[-1] if _SOFT <= keys else 0
            if shapes and shape[1:] != shapes[0][1][1:]:
                raise ValueError(
                    f"{f} holds rows of (seq_len, hidden) {tuple(shape[1:])}; {files[0]} holds "
                    f"{tuple(shapes[0][1][1:])}: shards of one dataset share seq_len and hidden size."
                )
            shapes.append((f, shape, k))
        soft = soft_targets and not hard_only
        if soft and len({k for _, _, k in shapes}) > 1:
            raise ValueError(
                f"The shards hold top-k soft targets of different k ({sorted({k for _, _, k in shapes})}): add them "
                "again with one k (`add_soft_targets`), or load with `soft_targets=False`."
            )
        if soft_targets and hard_only and len(hard_only) < len(files):
            logger.warning(
                "%d of %d feature shards have no soft (top-k) targets (e.g. %s): soft targets are not loaded for any "
                "shard; distillation='soft' needs them all (extract with top_k > 0).",
                len(hard_only),
                len(files),
                hard_only[0],
            )
        rows = sum(shape[0] for _, shape, _ in shapes)
        self.hidden = self.targets = self.topk_ids = self.topk_logprobs = None
        # the rows' real tokens, when every shard stored them (`-100` after a row's end)
        self.input_ids: torch.LongTensor | None = None
        at = 0
        for f, shape, k in shapes:
            with safe_open(str(f), framework="pt") as handle:
                hidden = handle.get_tensor("hidden")
                if self.hidden is None:  # shards stored in different dtypes: fp32, as torch.cat would promote
                    dtype = hidden.dtype if len(dtypes) == 1 else torch.float32
                    self.hidden = torch.empty(rows, *shape[1:], dtype=dtype)
                    self.targets = torch.empty(rows, shape[1], dtype=torch.long)
                    if not no_inputs:
                        self.input_ids = torch.empty(rows, shape[1], dtype=torch.long)
                    if soft:
                        self.topk_ids = torch.empty(rows, shape[1], k, dtype=torch.int32)  # long per row
                        self.topk_logprobs = torch.empty(rows, shape[1], k, dtype=torch.float16)
                self.hidden[at : at + shape[0]] = hidden
                self.targets[at : at + shape[0]] = handle.get_tensor("targets")
                if self.input_ids is not None:
                    self.input_ids[at : at + shape[0]] = handle.get_tensor("input_ids")
                if soft:
                    self.topk_ids[at : at + shape[0]] = handle.get_tensor("topk_ids")
                    self.topk_logprobs[at : at + shape[0]] = handle.get_tensor("topk_logprobs")
            at += shape[0]
        self.files = files
        self.inputs: torch.LongTensor | None = None  # the unmasked tokens once `keep_least_certain` masked some

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = {"base_hidden_states": self.hidden[index], "labels": self.targets[index]}
        # what token-conditioned heads read under teacher forcing: the rows' real tokens when the shards stored them
        # (inside a prompt the labels are the base's argmax, not the text that follows), else every target even
        # where a selection masked its loss
        tokens = self.input_ids if self.input_ids is not None else self.inputs
        if tokens is not None:
            row["draft_input_ids"] = tokens[index]
        if self.topk_ids is not None:
            row["teacher_topk_ids"] = self.topk_ids[index].long()
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
        the speedup at half the data). Needs soft targets (`extract_features(top_k=...)`). Only the loss is masked:
        rows then also give `"draft_input_ids"`, every token, which token-conditioned heads read under teacher
        forcing, and `lengths()` (so the batches' order) is unchanged.

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
            if self.inputs is None:
                self.inputs = self.targets
            self.targets = self.targets.masked_fill(certainty > threshold, IGNORE)
        return self

    @property
    def hidden_size(self) -> int:
        return self.hidden.shape[-1]

    def lengths(self) -> list[int]:
        """Each row's length up to its last target (what `collate_features` keeps): the `lengths` that
        `train_sampling_strategy="group_by_length"` groups by ([`BPDTrainer`] passes them)."""
        valid = (self.targets if self.inputs is None else self.inputs) != IGNORE  # a selection keeps the order
        last = torch.where(valid, torch.arange(valid.shape[1]), -1).max(dim=1).values
        return (last + 1).clamp(min=1).tolist()

    def num_target_tokens(self) -> int:
        return int((self.targets != IGNORE).sum())

    def target_counts(self, vocab_size: int) -> torch.LongTensor:
        """How often each base token is a (valid) target."""
        valid = self.targets[self.targets != IGNORE]
        return torch.bincount(valid, minlength=vocab_size)


def collate_features(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """
    Stack [`CachedFeatures`] rows (all the same length) into a batch, cut after the batch's last target: the columns
    after it hold no target of any head, so the loss is unchanged and the heads' cost is that of the real tokens
    (with `train_sampling_strategy="group_by_length"`, batches of similar lengths: see `CachedFeatures.lengths`).
    """
    batch = {key: torch.stack([r[key] for r in rows]) for key in rows[0]}
    labels = batch.get("labels")
    if labels is not None and labels.dim() == 2:
        columns = (labels != IGNORE).any(dim=0).nonzero()
        width = int(columns.max()) + 1 if columns.numel() else 1
        if width < labels.shape[1]:
            batch = {key: value[:, :width] for key, value in batch.items()}
    return batch


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


def __getattr__(name: str) -> Any:
    """`add_soft_targets` lives in `hf_bpd.soft_targets` (which imports this module); importable from here too."""
    if name == "add_soft_targets":
        from .soft_targets import add_soft_targets

        return add_soft_targets
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
