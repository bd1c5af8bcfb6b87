"""
One definition of each decoding metric, shared by `generate`'s statistics ([`~hf_bpd.BPDGenerateOutput`]),
`hf-bpd bench`, `hf-bpd analyze` and `hf-bpd tune`.

- **block efficiency**: generated tokens per serial call of the base model, per row: the tokens all rows generated
  divided by the serial calls each row took part in while it was still generating (a call advances every row of
  the batch). The prefill counts as a call. Plain decoding scores exactly 1 at every batch size; BPD at most
  `h + 1`.
- **accepted length**: draft tokens a row accepted at one verify step (`-1` marks a row that had finished).
- **tokens/s**: generated tokens (all rows) per second of wall time.
- **draft (rescoring) time per step**: seconds the loop spent computing drafts, per verify step.
- **share of the ideal speedup**: `speedup / block_efficiency` (1 when a block costs what one plain step costs).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def block_efficiency(num_generated_tokens: int | Sequence[int], num_serial_calls: int | Sequence[int]) -> float:
    """
    Generated tokens per serial call of the base model, per row.

    Args:
        num_generated_tokens (`int` or per-row sequence/tensor): tokens generated (by each row).
        num_serial_calls (`int` or per-row sequence/tensor): serial calls (each row took part in while generating).
    Returns:
        `sum(tokens) / sum(calls)`; 0 when there was no call.
    """
    tokens = _total(num_generated_tokens)
    calls = _total(num_serial_calls)
    return tokens / calls if calls > 0 else 0.0


def rows_from_accepted(accepted_lengths: torch.LongTensor) -> tuple[torch.LongTensor, torch.LongTensor]:
    """
    Tokens generated and serial calls taken part in, per row, from a BPD run's accepted lengths.

    Args:
        accepted_lengths (`torch.LongTensor` of shape `(steps, batch)`): as in `BPDGenerateOutput`, `-1` once a row
            finished. The prefill (one token, one call per row) is counted too.
    Returns:
        `(tokens, calls)`, each `(batch,)`. (Rows cut at `max_length` or by a stopping criterion inside a block
        commit fewer tokens than `accepted + 1`; `generate` reports the exact counts, this is for logs of steps.)
    """
    live = accepted_lengths >= 0
    tokens = 1 + torch.where(live, accepted_lengths + 1, 0).sum(0)
    calls = 1 + live.long().sum(0)
    return tokens, calls


def accepted_length_stats(accepted_lengths: torch.Tensor | Sequence[int]) -> dict[str, float | int | list[int] | None]:
    """
    Args:
        accepted_lengths: accepted lengths of any shape (`-1` entries, finished rows, are ignored).
    Returns:
        `mean` (None without any step), `steps` (counted entries), `histogram` (`histogram[n]` = steps that
        accepted `n` drafts).
    """
    values = torch.as_tensor(accepted_lengths, dtype=torch.long).flatten()
    values = values[values >= 0]
    if values.numel() == 0:
        return {"mean": None, "steps": 0, "histogram": []}
    return {
        "mean": float(values.float().mean()),
        "steps": int(values.numel()),
        "histogram": torch.bincount(values).tolist(),
    }


def mean_accepted_length(accepted_lengths: torch.Tensor | Sequence[int]) -> float | None:
    """Mean drafts accepted per verify step and live row (None without any step)."""
    return accepted_length_stats(accepted_lengths)["mean"]  # type: ignore[return-value]


def tokens_per_second(num_generated_tokens: int, seconds: float) -> float:
    """Generated tokens per second of wall time."""
    return num_generated_tokens / seconds if seconds > 0 else 0.0


def draft_ms_per_step(draft_time_s: float, num_steps: int) -> float:
    """Milliseconds spent drafting (heads and any rescorer) per verify step."""
    return 1000.0 * draft_time_s / num_steps if num_steps > 0 else 0.0


def speedup(baseline_seconds: float, seconds: float) -> float:
    """How many times faster than the baseline (same tokens)."""
    return baseline_seconds / seconds if seconds > 0 else 0.0


def share_of_ideal(speedup_value: float, block_efficiency_value: float) -> float:
    """`speedup / block_efficiency`: the part of the block efficiency that the loop turns into wall-clock speed."""
    return speedup_value / block_efficiency_value if block_efficiency_value > 0 else 0.0


def leading_correct(
    draft_logits: torch.Tensor, labels: torch.LongTensor, ignore_index: int = -100
) -> torch.LongTensor:
    """
    How many draft heads in a row, from the first, predict their token at each position: the drafts a greedy chain
    drafted there would have accepted.

    Args:
        draft_logits (`torch.Tensor` of shape `(batch, seq_len, h, vocab)`): draft logits at every position (token-
            conditioned heads teacher-forced on `labels`, which is what a greedy chain feeds them while its prefix is
            right).
        labels (`torch.LongTensor` of shape `(batch, seq_len)`): unshifted targets in the logits' vocabulary (head `i`
            at position `t` is scored against `labels[t + i + 2]`), `ignore_index` where masked or outside a draft
            vocabulary: such a target is never predicted.
    Returns:
        `torch.LongTensor` of shape `(batch, seq_len)`, values in `0 .. h`.
    """
    batch, seq_len, num_heads, _ = draft_logits.shape
    best = draft_logits.argmax(-1)  # (B, T, h)
    right = torch.zeros(batch, seq_len, num_heads, dtype=torch.long, device=draft_logits.device)
    for i in range(num_heads):
        span = seq_len - i - 2
        if span <= 0:
            break
        target = labels[:, i + 2 :]
        right[:, :span, i] = ((best[:, :span, i] == target) & (target != ignore_index)).long()
    return right.cumprod(-1).sum(-1)


def greedy_chain_counts(
    leading: torch.LongTensor, labels: torch.LongTensor, ignore_index: int = -100
) -> tuple[int, int]:
    """
    Tokens and serial calls of greedy chain BPD (Stern et al., 2018, sections 3-4: predict, verify, accept, with
    the verify call also proposing the next block) replayed on known greedy text: the block efficiency of the heads'
    own argmax chain (`drafter="heads"`) without running the decode loop, from their teacher-forced predictions.

    Every maximal run of valid labels `labels[s:e]` is one generation whose prompt ends at `s - 1` (a run starting at
    position 0 starts at 1: the first token has no position before it). The prefill is a call at `s - 1`; the call
    at position `t` (the last accepted one) commits the base's token `t + 1` and makes the drafts that the next
    call accepts, `leading[t]` of them, so the next call's position is `t + 1 + leading[t]`; the run is done once
    the token `e - 1` is committed. The counts equal what `generate(use_bpd=True, drafter="heads")` reports
    (`num_generated_tokens`, and the serial calls each row took part in) when the labels are the decode's own
    output, each run starts right after its prompt, and the verify forward's hidden states equal the ones
    `leading` was computed from (tested in fp32). Unlike the mean accepted length over *all* positions, which
    usually overstates it, this weights positions as the decode visits them: a stretch the chain crosses in few
    steps counts for few steps.

    Args:
        leading (`torch.LongTensor` of shape `(batch, seq_len)`): from [`leading_correct`].
        labels (`torch.LongTensor` of shape `(batch, seq_len)`): the same unshifted targets.
    Returns:
        `(tokens, calls)`; `tokens / calls` is the block efficiency.
    """
    tokens = calls = 0
    for valid, accepted in zip((labels != ignore_index).tolist(), leading.tolist()):
        end = 0
        while end < len(valid):
            start = end
            while start < len(valid) and not valid[start]:
                start += 1
            end = start
            while end < len(valid) and valid[end]:
                end += 1
            start = max(start, 1)
            if end <= start:
                continue
            tokens += end - start
            position = start - 1  # the prefill's last position
            calls += 1
            while position + 1 < end - 1:  # the token `end - 1` is not committed yet
                position += 1 + accepted[position]
                calls += 1
    return tokens, calls


def _total(value: int | Sequence[int] | torch.Tensor) -> float:
    if isinstance(value, torch.Tensor):
        return float(value.sum())
    if isinstance(value, (int, float)):
        return float(value)
    return float(sum(value))


@torch.no_grad()
def depth_accuracy(
    model: torch.nn.Module,
    base_hidden_states: torch.Tensor,
    targets: torch.LongTensor,
    batch_size: int = 8,
    input_ids: torch.LongTensor | None = None,
) -> dict[str, list[float] | int]:
    """
    Per-depth top-1 accuracy of a model's draft heads on known targets, for either head kind: `top1` (head `i`
    against the token `i + 2` ahead; token-conditioned heads teacher-forced on `targets`) and `top1_given_prefix`
    (among the positions where the heads before it were right: the chance a greedy chain accepted so far is accepted
    one token further, see [`~hf_bpd.losses.prefix_accuracy_counts`]).

    Args:
        model ([`BPDForCausalLM`]): the model (its heads are run on the given hidden states; the base is not run).
        base_hidden_states (`torch.Tensor` of shape `(n, seq_len, d)`): the base's last hidden states (e.g.
            [`~hf_bpd.features.CachedFeatures.hidden`]).
        targets (`torch.LongTensor` of shape `(n, seq_len)`): unshifted targets, `-100` where masked (the base's
            greedy tokens for what greedy BPD accepts).
        input_ids (`torch.LongTensor` of shape `(n, seq_len)`, *optional*): what token-conditioned heads read
            (teacher forcing; e.g. [`~hf_bpd.features.CachedFeatures.input_ids`], the rows' real tokens); defaults
            to `targets`.
    Returns:
        `{"top1": [h floats], "top1_given_prefix": [h floats], "chain_tokens": int, "chain_calls": int}`: the last
        two from [`greedy_chain_counts`] (their ratio is the greedy chain's block efficiency on this text).
    """
    from .losses import head_accuracy_counts, prefix_accuracy_counts

    h = model.config.num_draft_heads
    sums = torch.zeros(4, h)
    chain = [0, 0]
    for i in range(0, base_hidden_states.shape[0], batch_size):
        hidden, labels = base_hidden_states[i : i + batch_size], targets[i : i + batch_size]
        reads = labels if input_ids is None else input_ids[i : i + batch_size]
        compact = model(base_hidden_states=hidden, draft_input_ids=reads, draft_full_vocab=False).draft_logits
        labels = model.to_draft_ids(labels)
        top1, _, total = head_accuracy_counts(compact, labels, top_k=1)
        hits, given = prefix_accuracy_counts(compact, labels)
        sums += torch.stack([top1, total, hits, given]).float().cpu()
        # runs of text from the base-vocabulary targets: a token outside a draft vocabulary ends a chain, not a run
        leading = leading_correct(compact, labels).cpu()
        for j, count in enumerate(greedy_chain_counts(leading, targets[i : i + batch_size].cpu())):
            chain[j] += count
    return {
        "top1": (sums[0] / sums[1].clamp(min=1)).tolist(),
        "top1_given_prefix": (sums[2] / sums[3].clamp(min=1)).tolist(),
        "chain_tokens": chain[0],
        "chain_calls": chain[1],
    }
