"""
The drafter interface: one shape for every way of proposing drafts, like transformers' `CandidateGenerator`.

At every step the decode loop hands a [`DraftState`] to `Drafter.get_drafts` and gets `(batch, p, h)` draft tokens;
after the base model has verified them it calls `Drafter.update` with what each row accepted. `reset` runs once at
the start of every `generate` call. The loop owns the timing (`BPDGenerateOutput.draft_time_s`).

Implementations: [`HeadsDrafter`] (the heads' own argmax, the default), the lattice rescorers
([`~hf_bpd.logits.LatticeRescorer`]: p-best, n-gram, neural), [`~hf_bpd.logits.OracleDrafter`] and any tree drafter.
[`DraftRescorer`] keeps the older `__call__(input_ids, lengths, draft_logits)` interface working.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch


class DraftState:
    """
    What a drafter sees at one decode step. The heads' logits are computed on first use and then reused, so a
    drafter that does not read them (the oracle) costs nothing, and two readers pay once.

    Args:
        model ([`~hf_bpd.BPDForCausalLM`]): the model whose heads draft.
        input_ids (`torch.LongTensor` of shape `(batch, buffer_len)`): committed tokens of each row (prompt with
            its left padding, then generated tokens); only `input_ids[b, : lengths[b]]` is meaningful. The drafts
            continue the last committed token `input_ids[b, lengths[b] - 1]`.
        lengths (`torch.LongTensor` of shape `(batch,)`): committed length of each row.
        live (`torch.BoolTensor` of shape `(batch,)`): rows still generating (drafts of finished rows are ignored).
        hidden (`torch.Tensor` of shape `(batch, hidden)`): the base model's last hidden state at the position that
            predicted the last committed token: the heads' input.
        num_tokens (`int`): draft tokens the loop will verify, `<= h` (fewer near `max_length`); drafters return
            `h` tokens anyway and the loop keeps the first `num_tokens`.
        proposal_warper (`Callable`, *optional*): set when the loop verifies by speculative sampling
            (`do_sample=True`, `bpd_sampling="speculative"`): turns scores `(..., vocab)` into the scores a proposal
            is sampled from (the generation's position-free warpers: temperature, top-k, top-p, ...). A drafter
            that *samples* its drafts returns them in a [`Drafts`] with the probabilities it sampled from; see
            `sampling` and `proposal_probs`.
        prompt_start (`torch.LongTensor` of shape `(batch,)`, *optional*): index of each row's first real token (after
            its left padding, from the attention mask); None: every column is a real token (no padding).
    """

    def __init__(
        self,
        model: Any,
        input_ids: torch.LongTensor,
        lengths: torch.LongTensor,
        live: torch.BoolTensor,
        hidden: torch.Tensor,
        num_tokens: int,
        proposal_warper: Callable[[torch.Tensor], torch.Tensor] | None = None,
        prompt_start: torch.LongTensor | None = None,
    ):
        self.model = model
        self.prompt_start = torch.zeros_like(lengths) if prompt_start is None else prompt_start
        self.input_ids = input_ids
        self.lengths = lengths
        self.live = live
        self.hidden = hidden
        self.num_tokens = num_tokens
        self.proposal_warper = proposal_warper
        self._logits: torch.Tensor | None = None
        self._argmax: torch.LongTensor | None = None
        self._head_probs: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_heads(self) -> int:
        """`h`, the number of draft heads."""
        return int(self.model.config.num_draft_heads)

    @property
    def vocab_size(self) -> int:
        """Size of the vocabulary the drafts are ids of (the base model's)."""
        return int(self.model.config.base_vocab_size)

    def draft_logits(self) -> torch.Tensor:
        """The heads' logits `(batch, h, vocab)` over the full vocabulary, in the model's dtype (computed once)."""
        if self._logits is None:
            self._logits = self.model.draft_logits(self.hidden)
        return self._logits

    @property
    def sampling(self) -> bool:
        """Whether drafts sampled from a proposal (returned as [`Drafts`] with it) are verified by speculative
        sampling this step; otherwise a drafter proposes its best guess (and a [`Drafts`] without `proposals`
        or a plain tensor is verified by "sample, then match")."""
        return self.proposal_warper is not None

    def proposal_probs(self, scores: torch.Tensor) -> torch.FloatTensor:
        """
        The proposal distribution of scores `(..., vocab)`: the generation's position-free warpers, then softmax,
        in float32. Any proposal is exact as long as the drafts are really drawn from it; warping `q` like `p` only
        makes them closer (fewer drafts wasted on tokens that top-k / top-p remove from `p`).
        """
        scores = scores.float()
        if self.proposal_warper is not None:
            shape = scores.shape
            scores = self.proposal_warper(scores.reshape(-1, shape[-1])).view(shape)
        return torch.softmax(scores, dim=-1)

    def head_probs(self) -> torch.FloatTensor:
        """The heads' proposal distributions `(batch, h, vocab)` (`proposal_probs` of their logits, computed once)."""
        if self._head_probs is None:
            self._head_probs = self.proposal_probs(self.draft_logits())
        return self._head_probs

    def head_argmax(self) -> torch.LongTensor:
        """The heads' own draft `(batch, h)`: each head's most likely token (computed once)."""
        if self._argmax is None:
            if self._logits is None and hasattr(self.model, "draft_argmax"):
                self._argmax = self.model.draft_argmax(self.hidden)
            else:
                self._argmax = self.draft_logits().argmax(dim=-1)
        return self._argmax


@dataclass
class Drafts:
    """
    Drafts with the distributions they were sampled from, what speculative sampling needs to verify them.

    Args:
        tokens (`torch.LongTensor` of shape `(batch, p, h)`): the drafts.
        proposals (`torch.FloatTensor` of shape `(batch, p, h, vocab)`, *optional*): `proposals[b, k, j]` is the
            distribution `tokens[b, k, j]` was drawn from, given the committed tokens and `tokens[b, k, :j]` (and,
            for drafts sampled one after another at the same prefix, given the earlier ones). The draws must use
            fresh randomness: nothing about the verifier's tests. None: deterministic drafts, verified by "sample,
            then match".
    """

    tokens: torch.LongTensor
    proposals: torch.FloatTensor | None = None


def sample_chains(probs: torch.FloatTensor, num_drafts: int) -> Drafts:
    """
    `num_drafts` independent chains per row, token `j` drawn from `probs[:, j]` (which depends on the committed
    prefix only, as the heads' distributions do: they read the hidden state of the last committed token).

    Args:
        probs (`torch.FloatTensor` of shape `(batch, h, vocab)`).
    Returns:
        [`Drafts`] with `(batch, num_drafts, h)` tokens and `(batch, num_drafts, h, vocab)` proposals.
    """
    batch, h, vocab = probs.shape
    flat = probs.reshape(batch * h, vocab)
    tokens = torch.multinomial(flat, num_drafts, replacement=True).view(batch, h, num_drafts).transpose(1, 2)
    return Drafts(tokens=tokens, proposals=probs[:, None].expand(batch, num_drafts, h, vocab))


class Drafter:
    """
    Proposes the drafts that the base model verifies. It changes only the drafts: the verifier, and so the output of
    `generate`, are untouched.

    Pass an instance to `model.generate(..., use_bpd=True, draft_rescorer=...)`. Subclasses implement `get_drafts`;
    drafters that keep state across steps (a KV cache, statistics) also implement `update` and `reset`.

    Attributes:
        num_drafts (`int`): `p`, how many drafts `get_drafts` returns per row (verified together in one call).
    """

    num_drafts: int = 1

    def reset(self) -> None:
        """Called once at the start of every `generate` call: drop all per-call state. The default keeps none."""

    def get_drafts(self, state: DraftState) -> "torch.LongTensor | Drafts":
        """
        Args:
            state ([`DraftState`]): committed tokens, live rows, and the heads' input of the current step.
        Returns:
            `torch.LongTensor` of shape `(batch, num_drafts, h)`: the drafts, best first (ties go to the first); or,
            when `state.sampling`, [`Drafts`] whose `proposals` are the distributions the drafts were sampled from
            (verified by speculative sampling, which accepts far more than "sample, then match").
        """
        raise NotImplementedError

    def update(self, accepted_lengths: torch.LongTensor, chosen: torch.LongTensor) -> None:
        """
        Called after every verify step, once the loop has committed the step's tokens.

        Args:
            accepted_lengths (`torch.LongTensor` of shape `(batch,)`): draft tokens each row accepted (the row
                committed `accepted_lengths[b] + 1` tokens: the accepted drafts, then the base model's own), `-1`
                for a row that had finished before this step.
            chosen (`torch.LongTensor` of shape `(batch,)`): index of the draft each row kept, in `[0, num_drafts)`.
        """


class HeadsDrafter(Drafter):
    """The heads' own drafts: each head's argmax (plain blockwise parallel decoding, the default)."""

    def get_drafts(self, state: DraftState) -> "torch.LongTensor | Drafts":
        if state.sampling:
            # Head i's distribution q_i reads only the hidden state of the last committed token, so it is a fixed
            # distribution given the committed prefix. Drafts of heads i > 1 are not conditioned on the earlier
            # draft tokens, and need not be: speculative sampling only needs draft i to be distributed as a known
            # q_i given the prefix it continues, and d_i, drawn independently of d_1..d_{i-1}, still is after
            # conditioning on them having been accepted (the tests of d_1..d_{i-1} never look at d_i).
            return sample_chains(state.head_probs(), 1)
        return state.head_argmax()[:, None]  # (B, 1, h)


class DraftRescorer(Drafter):
    """
    A drafter written as a function of the heads' logits, like transformers' `LogitsProcessor`: subclasses implement
    `__call__(input_ids, lengths, draft_logits) -> (batch, num_drafts, h)`. (This was the only drafter interface
    before [`Drafter`]; subclasses written for it keep working unchanged.)
    """

    def get_drafts(self, state: DraftState) -> torch.LongTensor:
        return self(state.input_ids, state.lengths, state.draft_logits().float())

    def __call__(
        self, input_ids: torch.LongTensor, lengths: torch.LongTensor, draft_logits: torch.FloatTensor
    ) -> torch.LongTensor:
        """
        Args:
            input_ids (`torch.LongTensor` of shape `(batch, buffer_len)`): committed tokens of each row (see
                [`DraftState`]).
            lengths (`torch.LongTensor` of shape `(batch,)`): committed length of each row.
            draft_logits (`torch.FloatTensor` of shape `(batch, h, vocab)`): head `i` scores the token `i + 1`
                positions after the last committed token.
        Returns:
            `torch.LongTensor` of shape `(batch, num_drafts, h)`: the drafts, best first.
        """
        raise NotImplementedError(
            f"{type(self).__name__} is a DraftRescorer without `__call__`: implement "
            "`__call__(input_ids, lengths, draft_logits)`, or derive from `hf_bpd.logits.Drafter` and implement "
            "`get_drafts(state)`."
        )


class TimingStats:
    """
    Drafting-time statistics of a drafter since its last `reset()`: `time_s`, `calls` and `ms_per_call` (reported
    by `hf-bpd tune` and the benchmarks). Wrap each drafting call in `with self.timed():`.
    """

    time_s: float = 0.0
    calls: int = 0

    def reset_timing(self) -> None:
        self.time_s, self.calls = 0.0, 0

    @property
    def ms_per_call(self) -> float:
        """Mean drafting time per call (milliseconds) since the last `reset()`."""
        return 1000.0 * self.time_s / max(self.calls, 1)

    @contextmanager
    def timed(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.time_s += time.perf_counter() - start
            self.calls += 1
