"""
Scoring and stopping for the decode loop (private, beside `generation.py`): the logits processors applied to every
verified node with that node's own prefix, and the stopping criteria applied to every committed token.

`_Scorer` applies transformers' pure, position-free warpers to all verified positions in one call, processors that
read `input_ids` per row and node with exactly the prefix plain decoding would show them, and processors not known
to be pure only along the accepted path (see "Logits processors and stopping criteria: the contract" in
docs/usage.md). `_Stopper` takes the vectorised path for the generation's own `MaxLengthCriteria` /
`EosTokenCriteria` and calls any other criterion once per committed token.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.generation import (
    EosTokenCriteria,
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    LogitsProcessorList,
    MaxLengthCriteria,
    MinPLogitsWarper,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from ._validation import is_pure_processor
from .acceptance import truncate_at_eos
from .tree import TreeLayout, canonical_nodes

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


class _Scorer:
    """
    Applies the logits processors to the verified positions, each with its own row's true prefix.

    Known-pure processors (`hf_bpd._validation.PURE_PROCESSORS`) are applied at every node. With `sequential` (set
    for processors that may keep state, at batch size 1 with greedy decoding) only the nodes on the accepted path are
    scored, in order, one call per generated token: exactly the calls plain `generate` makes.
    """

    def __init__(self, logits_processor: LogitsProcessorList, do_sample: bool):
        self.processors = logits_processor
        self.position_free = all(type(p) in _POSITION_FREE_PROCESSORS for p in logits_processor)
        self.do_sample = do_sample
        self.sequential = not all(is_pure_processor(p) for p in logits_processor)
        self.stops: Any = (
            None  # `(row, ids) -> bool`: the stopping criteria, so the walk stops where plain decoding does
        )

    def scores(
        self,
        logits: torch.Tensor,
        tokens: torch.LongTensor,
        lengths: torch.LongTensor,
        live: torch.BoolTensor,
        drafts: torch.LongTensor | None = None,
        layout: TreeLayout | None = None,
    ) -> torch.Tensor:
        """
        Processed scores of the block's nodes.

        Args:
            logits (`(B, W, V)`): base logits at the block's nodes.
            tokens, lengths: committed tokens of each row.
            drafts (`(B, P, D)`), layout: the block's paths; node `w` continues the row's committed tokens with
                the first `layout.depth[w]` tokens of path `layout.draft_of_node[w]` (None: the root only).
        """
        if len(self.processors) == 0:
            return logits
        batch, width, vocab = logits.shape
        if self.position_free:
            flat = logits.reshape(batch * width, vocab)
            return self.processors(tokens[:, :1].repeat_interleave(width, 0), flat).view(batch, width, vocab)
        if self.sequential and layout is not None:
            return self._along_accepted_path(logits, tokens, lengths, live, drafts, layout)
        # Processors that read `input_ids` see, for every node, exactly what plain decoding would show there:
        # the row's committed tokens followed by the draft tokens on the path to that node. Rows differ in
        # length, so each row is scored on its own, in row `b` of a full-batch call: processors that keep
        # per-row state (e.g. the prompt padding lengths of the repetition penalty) index it by batch position.
        scores = logits.clone()
        depths = layout.depth.tolist() if layout is not None else [0] * width
        node_tokens = drafts[:, layout.draft_of_node] if layout is not None else tokens.new_zeros(batch, width, 0)
        for b in torch.nonzero(live).flatten().tolist():
            committed = tokens[b, : int(lengths[b])]
            for w in range(width):
                prefix = torch.cat([committed, node_tokens[b, w, : depths[w]]])
                scores[b, w] = self._row_call(prefix, logits[b, w], b, batch)
        return scores

    def _row_call(self, prefix: torch.LongTensor, logits: torch.Tensor, row: int, batch: int) -> torch.Tensor:
        """The processors on one node of row `row`, in that row's position of a batch-sized call."""
        return self.processors(prefix[None].expand(batch, -1), logits[None].expand(batch, -1).clone())[row]

    def _along_accepted_path(
        self,
        logits: torch.Tensor,
        tokens: torch.LongTensor,
        lengths: torch.LongTensor,
        live: torch.BoolTensor,
        drafts: torch.LongTensor,
        layout: TreeLayout,
    ) -> torch.Tensor:
        """
        Greedy only: score the root, follow the draft that equals its argmax, score that node, ... until no draft
        continues. Nodes off that path keep their raw logits: no accepted prefix reaches them, so their targets are
        never read (a path's accepted length stops at its first mismatch, and the bonus token is the mismatch node's).
        """
        scores = logits.clone()
        batch, paths, depth = drafts.shape
        canon = layout.node_index.expand(batch, -1, -1) if layout.is_chain else canonical_nodes(drafts, layout)
        for b in torch.nonzero(live).flatten().tolist():
            committed = tokens[b, : int(lengths[b])]
            target: dict[int, int] = {}
            for p in range(paths):
                for j in range(depth + 1):
                    node = int(canon[b, p, j])
                    if node not in target:
                        prefix = torch.cat([committed, drafts[b, p, :j]])
                        scores[b, node] = self._row_call(prefix, logits[b, node], b, batch)
                        target[node] = int(scores[b, node].argmax())
                    if j == depth or int(drafts[b, p, j]) != target[node]:
                        break
                    if self.stops is not None and self.stops(b, torch.cat([committed, drafts[b, p, : j + 1]])):
                        break  # plain decoding would stop after this token: no further call
        return scores

    def select(self, scores: torch.Tensor) -> torch.LongTensor:
        if not self.do_sample:
            return scores.argmax(dim=-1)
        probs = torch.softmax(scores, dim=-1)
        return torch.multinomial(probs.flatten(0, -2), num_samples=1).view(probs.shape[:-1])


class _Stopper:
    """
    Applies the stopping criteria to each committed token of each row. Only criteria of exactly transformers'
    `MaxLengthCriteria` / `EosTokenCriteria` types take the vectorised path (their own `max_length` and EOS ids, which
    may be the user's, not the generation config's); any other is called per token with that row's tokens and scores.
    """

    def __init__(self, stopping_criteria: StoppingCriteriaList):
        self.criteria = stopping_criteria
        self.fast = all(type(c) in (MaxLengthCriteria, EosTokenCriteria) for c in stopping_criteria)
        eos = [c.eos_token_id for c in stopping_criteria if type(c) is EosTokenCriteria]
        self.eos = torch.cat([e.flatten() for e in eos]) if eos else None
        lengths = [c.max_length for c in stopping_criteria if type(c) is MaxLengthCriteria]
        self.max_length = min(lengths) if lengths else None  # the tightest MaxLengthCriteria, user's or generate's
        self.has_eos = any(hasattr(c, "eos_token_id") for c in stopping_criteria)
        self.may_cut = not self.fast or self.eos is not None  # whether a row's tokens can be cut inside a block
        self.batch = 1
        self._seen: dict[tuple[int, int], bool] = {}  # (row, length) -> stopped, asked ahead by the scorer's walk

    def stops(self, row: int, ids: torch.LongTensor) -> bool:
        """Whether row `row` stops once it holds `ids` (each criterion called once per row and length)."""
        key = (row, int(ids.shape[0]))
        if key not in self._seen:
            if self.fast:
                self._seen[key] = self.eos is not None and bool(torch.isin(ids[-1], self.eos.to(ids.device)))
            else:
                self._seen[key] = bool(self.criteria(ids[None].expand(self.batch, -1), None)[row])
        return self._seen[key]

    def __call__(
        self,
        out: torch.LongTensor,
        lengths: torch.LongTensor,
        committed: torch.LongTensor,
        n: torch.LongTensor,
        live: torch.BoolTensor,
    ) -> tuple[torch.LongTensor, torch.BoolTensor]:
        """
        Cut `n` at the first token that meets a criterion; `out` already holds the committed tokens. The criteria get
        `scores=None`, as in plain `generate` without `output_scores`.
        """
        if self.fast:  # max length is enforced by the caller through `row_limit`
            self._seen.clear()
            n, stopped = truncate_at_eos(committed, n, self.eos)
            return n, stopped & live
        stopped = torch.zeros_like(live)
        self.batch = out.shape[0]
        for b in torch.nonzero(live).flatten().tolist():
            start = int(lengths[b])
            for j in range(int(n[b]) + 1):
                if self.stops(b, out[b, : start + j + 1]):
                    n[b], stopped[b] = j, True
                    break
        self._seen.clear()
        return n, stopped
