"""
The blockwise decode loop: draft -> verify -> accept, lossless, batch-aware.

`bpd_generate` runs transformers' own `generate` preparation on the base model (generation config merge, logits
processors, stopping criteria, cache, max_length) through its `custom_generate=callable` hook; `_bpd_decode` is
that callable. The acceptance math lives in `acceptance.py`; this file only plumbs.

Rows of a batch accept different numbers of drafts per step. The KV cache has one length for the whole batch, so
the rejected positions of a row that accepted fewer tokens than the best row stay in the cache as *holes*: they are
masked out in the 2D attention mask, and position ids are counted per row, so every row attends exactly to its own
committed tokens at their true positions. Trailing positions that no row kept are cropped.
"""

from __future__ import annotations

import functools
import inspect
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from transformers.generation import (
    EosTokenCriteria,
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    GenerateDecoderOnlyOutput,
    LogitsProcessorList,
    MaxLengthCriteria,
    MinPLogitsWarper,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from .acceptance import accepted_lengths, block_efficiency, cap_accepted, select_best_draft, truncate_at_eos
from .tree import canonical_nodes, compact_block, tree_attention_mask, tree_layout

if TYPE_CHECKING:
    from .logits.base import DraftRescorer
    from .modeling_bpd import BPDForCausalLM

# Processors that read only the scores (never `input_ids`): applied to all verified positions in one call.
_POSITION_FREE_PROCESSORS = (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    MinPLogitsWarper,
    TypicalLogitsWarper,
    EpsilonLogitsWarper,
    EtaLogitsWarper,
)


@dataclass
class BPDGenerateOutput(GenerateDecoderOnlyOutput):
    """
    [`~transformers.generation.GenerateDecoderOnlyOutput`] plus blockwise-decoding statistics.

    Args:
        num_serial_calls (`int`): forward calls of the base model (the prefill counts as one).
        num_generated_tokens (`int`): tokens generated, summed over rows (padding after a row's end not counted).
        block_efficiency (`float`): generated tokens per serial call, averaged over rows (each row over the calls it
            took part in); `h + 1` at most.
        accepted_lengths (`torch.LongTensor` of shape `(num_steps, batch)`): drafts accepted by each row at each
            verify step, `-1` where the row had already finished.
        unrefined_accepted_lengths (`torch.LongTensor` of shape `(num_steps, batch)`, *optional*): with
            `compare_unrefined=True`, what the heads' own argmax draft would have accepted at each step (verified in
            the same call, never chosen), `-1` where the row had finished.
        draft_time_s (`float`): seconds spent computing drafts (heads and any rescorer).
    """

    num_serial_calls: int | None = None
    num_generated_tokens: int | None = None
    block_efficiency: float | None = None
    accepted_lengths: torch.LongTensor | None = None
    unrefined_accepted_lengths: torch.LongTensor | None = None
    draft_time_s: float | None = None


def bpd_generate(
    bpd: "BPDForCausalLM",
    inputs: torch.Tensor | None = None,
    generation_config: Any = None,
    draft_rescorer: "DraftRescorer | None" = None,
    compare_unrefined: bool = False,
    **kwargs: Any,
) -> Any:
    """`BPDForCausalLM.generate(..., use_bpd=True)`; see there."""
    for key, what in (
        ("assistant_model", "assisted decoding"),
        ("prompt_lookup_num_tokens", "prompt lookup decoding"),
        ("custom_generate", "a custom generation loop"),
    ):
        if kwargs.get(key) is not None:
            raise ValueError(f"`use_bpd=True` cannot be combined with {what} (`{key}`): pick one decoding method.")
    from .logits.base import DraftRescorer

    if draft_rescorer is not None and not isinstance(draft_rescorer, DraftRescorer):
        raise ValueError(
            f"`draft_rescorer` must be a hf_bpd.logits.DraftRescorer, got {type(draft_rescorer).__name__}."
        )
    streamer = kwargs.pop("streamer", None)
    prompt = inputs if inputs is not None else kwargs.get("input_ids")
    if streamer is not None and prompt is not None and prompt.dim() == 2 and prompt.shape[0] > 1:
        raise ValueError("A `streamer` with `use_bpd=True` supports batch size 1 (rows advance at different speeds).")
    if compare_unrefined and draft_rescorer is None:
        raise ValueError("`compare_unrefined=True` compares a `draft_rescorer`'s drafts with the heads' own: pass one.")
    decode = functools.partial(_bpd_decode, bpd=bpd, draft_rescorer=draft_rescorer, bpd_streamer=streamer,
                               compare_unrefined=compare_unrefined)  # fmt: skip
    return bpd.base.generate(
        inputs, generation_config=generation_config, custom_generate=decode, streamer=streamer, **kwargs
    )


def _validate(model: Any, generation_config: Any, model_kwargs: dict[str, Any]) -> Any:
    """Check everything BPD cannot honour and return the cache."""
    if generation_config.num_beams > 1:
        raise ValueError("`use_bpd=True` decodes greedily or by sampling; `num_beams > 1` is not supported.")
    if getattr(generation_config, "prompt_lookup_num_tokens", None):
        raise ValueError("`use_bpd=True` cannot be combined with prompt lookup decoding (`prompt_lookup_num_tokens`).")
    if model.config.is_encoder_decoder:
        raise ValueError("`use_bpd=True` supports decoder-only models.")
    if generation_config.output_attentions or generation_config.output_hidden_states:
        raise ValueError(
            "`output_attentions` / `output_hidden_states` are not available with `use_bpd=True` (verification runs "
            "over blocks of tokens); call the base model's forward on the output to get them."
        )
    if not generation_config.use_cache:
        raise ValueError("`use_bpd=True` needs the KV cache: do not pass `use_cache=False`.")
    cache = model_kwargs.get("cache")
    if cache is None:
        raise ValueError("`use_bpd=True` needs a KV cache; none was prepared by `generate`.")
    if not getattr(cache, "is_croppable", False):
        raise ValueError(
            f"`use_bpd=True` rolls back rejected drafts with `cache.crop`, but a {type(cache).__name__} cannot be "
            "cropped. Use the default dynamic cache (do not set `cache_implementation`)."
        )
    windows = [getattr(layer, "sliding_window", None) for layer in getattr(cache, "layers", [])]
    windows = [w for w in windows if w]
    if windows and generation_config.max_length >= min(windows):
        raise ValueError(
            f"`use_bpd=True` supports sliding-window caches only while the sequence fits in the window "
            f"({min(windows)} tokens); max_length is {generation_config.max_length}."
        )
    unknown = {k: v for k, v in model_kwargs.items() if v is not None and k not in _HANDLED_MODEL_KWARGS}
    if unknown:
        raise ValueError(f"`use_bpd=True` does not support these model inputs: {sorted(unknown)}.")
    return cache


_HANDLED_MODEL_KWARGS = {"cache", "attention_mask", "position_ids", "use_cache", "logits_to_keep"}


class _Scorer:
    """Applies the logits processors to the verified positions, each with its own row's true prefix."""

    def __init__(self, logits_processor: LogitsProcessorList, do_sample: bool):
        self.processors = logits_processor
        self.position_free = all(isinstance(p, _POSITION_FREE_PROCESSORS) for p in logits_processor)
        self.do_sample = do_sample

    def scores(
        self,
        logits: torch.Tensor,
        out: torch.LongTensor,
        lengths: torch.LongTensor,
        node_tokens: torch.LongTensor,
        depth: torch.LongTensor,
        live: torch.BoolTensor,
    ) -> torch.Tensor:
        """
        Processed scores of the block's nodes.

        Args:
            logits (`(B, W, V)`): base logits at the block's nodes.
            out, lengths: committed tokens of each row.
            node_tokens (`(B, W, h)`): the draft that each node lies on; node `w` continues the row's committed
                tokens with `node_tokens[b, w, : depth[w]]`.
            depth (`(W,)`): how many draft tokens precede each node's prediction.
        """
        if len(self.processors) == 0:
            return logits
        batch, width, vocab = logits.shape
        if self.position_free:
            flat = logits.reshape(batch * width, vocab)
            return self.processors(out[:, :1].repeat_interleave(width, 0), flat).view(batch, width, vocab)
        # Processors that read `input_ids` see, for every node, exactly what plain decoding would show there:
        # the row's committed tokens followed by the draft tokens on the path to that node. Rows differ in
        # length, so each row is scored on its own, in row `b` of a full-batch call: processors that keep
        # per-row state (e.g. the prompt padding lengths of the repetition penalty) index it by batch position.
        scores = logits.clone()
        depths = depth.tolist()
        for b in torch.nonzero(live).flatten().tolist():
            committed = out[b, : int(lengths[b])]
            for w in range(width):
                prefix = torch.cat([committed, node_tokens[b, w, : depths[w]]])[None].expand(batch, -1)
                scores[b, w] = self.processors(prefix, logits[b, w][None].expand(batch, -1).clone())[b]
        return scores

    def select(self, scores: torch.Tensor) -> torch.LongTensor:
        if not self.do_sample:
            return scores.argmax(dim=-1)
        probs = torch.softmax(scores, dim=-1)
        return torch.multinomial(probs.flatten(0, -2), num_samples=1).view(probs.shape[:-1])


class _Stopper:
    """Applies the stopping criteria to each committed token of each row (vectorised for EOS / max length)."""

    def __init__(self, stopping_criteria: StoppingCriteriaList):
        self.criteria = stopping_criteria
        self.fast = all(isinstance(c, (MaxLengthCriteria, EosTokenCriteria)) for c in stopping_criteria)
        eos = [c.eos_token_id for c in stopping_criteria if isinstance(c, EosTokenCriteria)]
        self.eos = torch.cat([e.flatten() for e in eos]) if eos else None
        self.has_eos = any(hasattr(c, "eos_token_id") for c in stopping_criteria)

    def __call__(
        self, out: torch.LongTensor, lengths: torch.LongTensor, committed: torch.LongTensor, n: torch.LongTensor, live: torch.BoolTensor
    ) -> tuple[torch.LongTensor, torch.BoolTensor]:
        """Cut `n` at the first token that meets a criterion; `out` already holds the committed tokens."""
        if self.fast:  # max length is enforced by the caller through `row_limit`
            n, stopped = truncate_at_eos(committed, n, self.eos)
            return n, stopped & live
        stopped = torch.zeros_like(live)
        for b in torch.nonzero(live).flatten().tolist():
            start = int(lengths[b])
            for j in range(int(n[b]) + 1):
                if bool(self.criteria(out[b : b + 1, : start + j + 1], None)[0]):
                    n[b], stopped[b] = j, True
                    break
        return n, stopped


def _bpd_decode(
    model: Any,
    input_ids: torch.LongTensor,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
    generation_config: Any,
    *,
    bpd: "BPDForCausalLM",
    draft_rescorer: "DraftRescorer | None" = None,
    bpd_streamer: Any = None,
    compare_unrefined: bool = False,
    **model_kwargs: Any,
) -> Any:
    batch, prompt_len = input_ids.shape
    device = input_ids.device
    cache = _validate(model, generation_config, model_kwargs)
    num_heads = bpd.config.num_draft_heads
    max_length = generation_config.max_length
    pad = generation_config._pad_token_tensor
    pad_id = int(pad) if pad is not None else 0
    return_dict = generation_config.return_dict_in_generate
    keep_scores = return_dict and generation_config.output_scores
    keep_logits = return_dict and generation_config.output_logits
    scorer = _Scorer(logits_processor, generation_config.do_sample)
    stopper = _Stopper(stopping_criteria)
    if draft_rescorer is not None:
        draft_rescorer.reset()
    accepts_positions = "position_ids" in inspect.signature(model.forward).parameters

    attn = model_kwargs.get("attention_mask")
    attn = torch.ones_like(input_ids) if attn is None else attn.long()
    dense = bool(attn.all())  # no padding and no holes: the model may run without a mask (as plain decoding does)
    if not dense and not accepts_positions:
        raise ValueError(f"{type(model).__name__} takes no `position_ids`: `use_bpd=True` needs them with padding.")
    out = torch.full((batch, max_length + num_heads + 1), pad_id, dtype=torch.long, device=device)
    out[:, :prompt_len] = input_ids
    lengths = torch.full((batch,), prompt_len, dtype=torch.long, device=device)
    row_limit = torch.full_like(lengths, max_length)
    stop_len = torch.full_like(lengths, -1)  # where a row first met a stopping criterion
    live = torch.ones(batch, dtype=torch.bool, device=device)
    live_calls = torch.zeros_like(lengths)
    steps: list[torch.Tensor] = []
    unrefined: list[torch.Tensor] = []  # accepted lengths the heads' own argmax drafts would have had
    row_scores: list[list[torch.Tensor]] = [[] for _ in range(batch)]
    row_logits: list[list[torch.Tensor]] = [[] for _ in range(batch)]
    draft_time = 0.0

    def forward(ids: torch.LongTensor, positions: torch.LongTensor, logits_to_keep: int = 0, mask: Any = None) -> Any:
        kwargs = {"position_ids": positions} if accepts_positions else {}
        if model._supports_logits_to_keep():
            kwargs["logits_to_keep"] = logits_to_keep
        if mask is None and not dense:
            mask = attn
        return model(
            input_ids=ids, attention_mask=mask, cache=cache, use_cache=True, output_hidden_states=True,
            return_dict=True, **kwargs,
        )  # fmt: skip

    def commit(targets: torch.LongTensor, scores: torch.Tensor, logits: torch.Tensor, n: torch.LongTensor) -> torch.LongTensor:
        """Write `targets[b, : n_b + 1]` for live rows, apply stopping criteria; return the final `n`."""
        nonlocal live
        width = targets.shape[1]
        offsets = torch.arange(width, device=device)
        valid = (offsets[None] <= n[:, None]) & live[:, None]
        index = (lengths[:, None] + offsets).clamp(max=out.shape[1] - 1)
        out.scatter_(1, index, torch.where(valid, targets, out.gather(1, index)))
        n, stopped = stopper(out, lengths, targets, n.clone(), live)
        cut = (offsets[None] > n[:, None]) & valid  # written, then cut by a stopping criterion
        out.scatter_(1, index, torch.where(cut, pad_id, out.gather(1, index)))
        if keep_scores or keep_logits:
            for b in torch.nonzero(live).flatten().tolist():
                if keep_scores:
                    row_scores[b].extend(scores[b, : int(n[b]) + 1])
                if keep_logits:
                    row_logits[b].extend(logits[b, : int(n[b]) + 1])
        if bpd_streamer is not None:
            bpd_streamer.put(targets[0, : int(n[0]) + 1].cpu())
        lengths.add_(torch.where(live, n + 1, 0))
        live_calls.add_(live.long())
        _apply_stops(stopped)
        return n

    def _apply_stops(stopped: torch.BoolTensor) -> None:
        nonlocal live
        stop_len.copy_(torch.where(stopped & (stop_len < 0), lengths, stop_len))
        if stopper.has_eos:  # like plain decoding: a finished row is padded from here on
            live = live & ~stopped
        elif bool((stop_len >= 0).all()):  # no EOS criterion: every row runs until the last one stops
            final = int(stop_len.max())
            row_limit.clamp_(max=final)
            out[:, final:] = pad_id
            lengths.clamp_(max=final)
        live = live & (lengths < row_limit)

    def draft(hidden: torch.Tensor) -> torch.LongTensor:
        nonlocal draft_time
        start = time.perf_counter()
        logits = bpd.draft_logits(hidden).float()  # (B, h, V)
        if draft_rescorer is None:
            drafts = logits.argmax(dim=-1)[:, None]  # (B, 1, h)
        else:
            drafts = draft_rescorer(out, lengths, logits)
            if drafts.dim() != 3 or drafts.shape[0] != batch or drafts.shape[2] != num_heads or drafts.shape[1] < 1:
                raise ValueError(f"draft_rescorer must return (batch, p, {num_heads}) drafts, got {tuple(drafts.shape)}.")
        draft_time += time.perf_counter() - start
        if compare_unrefined:  # verified in the same call as an extra last draft, never chosen
            drafts = torch.cat([drafts.to(device), logits.argmax(dim=-1)[:, None].to(device)], dim=1)
        return drafts.to(device)

    # Prefill: one serial call gives the first token and the first drafts.
    positions = (attn.cumsum(-1) - 1).clamp(min=0)
    fwd = forward(input_ids, positions, logits_to_keep=1)
    logits = fwd.logits[:, -1:].float()  # (B, 1, V)
    no_drafts = torch.zeros(batch, 1, 0, dtype=torch.long, device=device)
    scores = scorer.scores(logits, out, lengths, no_drafts, torch.zeros(1, dtype=torch.long), live)
    commit(scorer.select(scores), scores, logits, torch.zeros_like(lengths))
    hidden = fwd.hidden_states[-1][:, -1]  # (B, d)
    next_pos = attn.sum(-1)  # position id of the last committed token, not yet in the cache
    serial_calls = 1
    rows = torch.arange(batch, device=device)
    del fwd

    while bool(live.any()):
        remaining = row_limit - lengths
        num_tokens = min(num_heads, int(remaining[live].max()) - 1)
        drafts = draft(hidden)[:, :, :num_tokens]  # (B, p, h')
        layout = tree_layout(drafts.shape[1], num_tokens, device)
        width = layout.width
        block = torch.cat([out.gather(1, lengths[:, None] - 1), drafts.flatten(1)], dim=1)  # (B, W)
        positions = next_pos[:, None] + layout.depth
        if width == num_tokens + 1:  # one draft: a plain causal block, 2D mask (none at all if dense)
            attn = torch.cat([attn, live[:, None].long().expand(batch, width)], dim=1)
            dense = dense and bool(live.all())
            fwd = forward(block, positions)
        else:
            mask = tree_attention_mask(attn, layout, live, model.dtype)
            attn = torch.cat([attn, live[:, None].long().expand(batch, width)], dim=1)
            dense = False
            fwd = forward(block, positions, mask=mask)
        serial_calls += 1
        logits = fwd.logits.float()  # (B, W, V)
        node_tokens = drafts[:, layout.draft_of_node]  # (B, W, h')
        scores = scorer.scores(logits, out, lengths, node_tokens, layout.depth, live)
        canon = canonical_nodes(drafts, layout)  # (B, p, h' + 1): one target per distinct prefix
        targets = scorer.select(scores).gather(1, canon.flatten(1)).view(canon.shape)
        if compare_unrefined:
            unrefined.append(torch.where(live, accepted_lengths(drafts[:, -1], targets[:, -1]), -1))
            best, n = select_best_draft(drafts[:, :-1], targets[:, :-1])
        else:
            best, n = select_best_draft(drafts, targets)
        n = cap_accepted(n, remaining)
        path = canon[rows, best]  # (B, h' + 1) block nodes along the chosen draft
        was_live = live.clone()
        n = commit(targets[rows, best], scores.gather(1, _expand(path, scores)), logits.gather(1, _expand(path, logits)),
                   torch.where(live, n, 0))  # fmt: skip
        steps.append(torch.where(was_live, n, -1))
        hidden = fwd.hidden_states[-1][rows, path[rows, n]]  # (B, d) at the bonus token's parent
        keep = torch.where(was_live, n + 1, 0)
        kept = int(keep.max())
        if width != num_tokens + 1:  # move each row's kept nodes (root + accepted drafts) to the front
            chosen = layout.node_index[best]  # (B, h' + 1)
            rank = torch.full((batch, width), width, dtype=torch.long, device=device)
            rank.scatter_(1, chosen, torch.arange(num_tokens + 1, device=device).expand(batch, -1).contiguous())
            rank = torch.where(rank < keep[:, None], rank, width + torch.arange(width, device=device))
            compact_block(cache, width, rank.argsort(dim=1))
        if kept < width:
            cache.crop(-(width - kept))
            attn = attn[:, : attn.shape[1] - (width - kept)]
        holes = torch.arange(kept, device=device)[None] >= keep[:, None]  # (B, kept)
        if bool(holes.any()):
            attn[:, attn.shape[1] - kept :] = attn[:, attn.shape[1] - kept :].masked_fill(holes, 0)
            dense = False
        next_pos = next_pos + keep
        del fwd

    if bpd_streamer is not None:
        bpd_streamer.end()
    sequences = out[:, : int(lengths.max())]
    if not return_dict:
        return sequences
    generated = lengths - prompt_len
    per_row = generated.float() / live_calls.clamp(min=1).float()
    width = sequences.shape[1] - prompt_len
    return BPDGenerateOutput(
        sequences=sequences,
        scores=_stack_rows(row_scores, width) if keep_scores else None,
        logits=_stack_rows(row_logits, width) if keep_logits else None,
        num_serial_calls=serial_calls,
        num_generated_tokens=int(generated.sum()),
        block_efficiency=float(per_row.mean()) if batch > 1 else block_efficiency(int(generated[0]), serial_calls),
        accepted_lengths=torch.stack(steps) if steps else torch.zeros((0, batch), dtype=torch.long),
        unrefined_accepted_lengths=torch.stack(unrefined) if unrefined else None,
        draft_time_s=draft_time,
    )


def _expand(index: torch.LongTensor, like: torch.Tensor) -> torch.LongTensor:
    """`(B, n)` node indices -> `(B, n, V)` for gathering rows of `(B, W, V)`."""
    return index[:, :, None].expand(-1, -1, like.shape[-1])


def _stack_rows(rows: list[list[torch.Tensor]], width: int) -> tuple[torch.Tensor, ...]:
    """Per-row lists of `(V,)` tensors -> a tuple over generated positions of `(B, V)`; zeros after a row ended."""
    vocab = next(t for row in rows for t in row).shape[-1]
    stacked = torch.zeros(len(rows), width, vocab)
    for b, row in enumerate(rows):
        if row:
            stacked[b, : len(row)] = torch.stack(row[:width])
    return tuple(stacked.unbind(1))
