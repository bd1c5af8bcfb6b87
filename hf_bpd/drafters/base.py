"""
The drafter contract, like transformers' `CandidateGenerator`: at every step the decode loop hands a
[`DraftContext`] to `Drafter.propose` and gets a [`~hf_bpd.tree.DraftTree`] (chains through
`DraftTree.from_chains`); after verification it calls `Drafter.update` with what each row accepted; `reset` runs at
the start of every `generate` call. The loop owns the timing (`BPDGenerateOutput.draft_time_s`).

A drafter declares what it needs: `hidden_states` (`"last"`: the hidden state that predicted the last committed
token; `"committed"`: also those of every token the last step committed) and `requires_independent_heads` (a
search exact only when each head reads the hidden state alone); [`check_drafter_heads`] refuses a wrong pair.

The older interfaces keep working through thin adapters with a `DeprecationWarning`: a subclass implementing
`get_drafts(state)` (returning `(batch, p, h)` tokens, [`Drafts`] or a `DraftTree`), and [`DraftRescorer`]'s
`__call__(input_ids, lengths, draft_logits)`.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from ..tree import DraftTree


class DraftHeadsView:
    """
    What a drafter may use of the model: its draft heads, not the model.

    Attributes:
        independent (`bool`): head `i` reads only the hidden state (see `hf_bpd.heads`).
        num_heads (`int`): `h`.
        vocab_size (`int`): the base vocabulary the drafts are ids of.
        head_type (`str`): `BPDConfig.head_type`.
        draft_token_map (`torch.LongTensor`, *optional*): the draft vocabulary (`K` base ids), None for all.
        draft_tree (`list[list[int]]`, *optional*): the checkpoint's static tree (`BPDConfig.draft_tree`).
        position_limit (`int`, *optional*): the base model's position limit.
    """

    def __init__(self, model: Any):
        self._model = model
        config = model.config
        self.independent = bool(getattr(model.heads, "independent", True))
        self.num_heads = int(config.num_draft_heads)
        self.vocab_size = int(config.base_vocab_size)
        self.head_type = config.head_type
        self.draft_tree = getattr(config, "draft_tree", None)
        self.position_limit = _position_limit(model)
        self.reads_context = bool(getattr(model.heads, "reads_context", False))
        self.context_cache: Any = None  # the decode loop's `ContextCache` for context heads

    @property
    def draft_token_map(self) -> torch.LongTensor | None:
        return self._model.draft_token_map

    @property
    def draft_inverse_map(self) -> torch.LongTensor | None:
        """`(V,)`: each base token's column in the draft vocabulary, `-1` outside it (None without one)."""
        return self._model.draft_inverse_map

    def logits(
        self,
        hidden: torch.Tensor,
        prev_tokens: torch.LongTensor | None = None,
        full_vocab: bool = True,
        num_heads: int | None = None,
    ) -> torch.Tensor:
        """`BPDForCausalLM.draft_logits`: `(..., h or k, V)` from hidden states `(..., d)` (and `prev_tokens`)."""
        return self._model.draft_logits(hidden, prev_tokens, full_vocab=full_vocab, num_heads=num_heads)

    def argmax(self, hidden: torch.Tensor, prev_tokens: torch.LongTensor | None = None) -> torch.LongTensor:
        """The heads' greedy tokens `(..., h or k)` as base ids (no full-vocabulary tensor is built)."""
        return self._model.draft_argmax(hidden, prev_tokens)

    def path_states(self, hidden: torch.Tensor, last_tokens: torch.LongTensor) -> Any:
        """
        Heads with a recurrent state (`hf_bpd.recurrent_heads`) or a context cache (`hf_bpd.context_heads`): a
        per-step cache scoring a node in one step.

        Raises:
            `ValueError` for context heads outside the decode loop (no `context_cache` was set on this view).
        """
        if getattr(self._model.heads, "reads_context", False):
            if self.context_cache is None:
                raise ValueError(
                    f"head_type={self.head_type!r} heads attend over the committed context, which only the decode "
                    "loop keeps (`generate(use_bpd=True)`); a DraftContext built by hand has none."
                )
            return self._model.heads.path_states(self._model, self.context_cache, last_tokens)
        if not hasattr(self._model.heads, "step"):
            return None
        from ..recurrent_heads import PathStates

        return PathStates(self._model, hidden, last_tokens)


def _position_limit(model: Any) -> int | None:
    base = getattr(model, "base", model)
    config = getattr(base, "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


class DraftContext:
    """
    What a drafter sees at one decode step. The heads' logits are computed on first use and then reused, so a
    drafter that does not read them (the oracle) costs nothing, and two readers pay once.

    Args:
        tokens (`torch.LongTensor` of shape `(batch, buffer_len)`): committed tokens of each row (prompt with its left
            padding, then generated tokens); only `tokens[b, prompt_start[b] : lengths[b]]` are real. The drafts
            continue the last committed token `tokens[b, lengths[b] - 1]`.
        lengths (`torch.LongTensor` of shape `(batch,)`): committed length of each row.
        live (`torch.BoolTensor` of shape `(batch,)`): rows still generating (drafts of finished rows are ignored).
        heads ([`DraftHeadsView`]): the draft heads.
        hidden (`torch.Tensor` of shape `(batch, hidden)`): the base model's last hidden state at the position that
            predicted the last committed token: the heads' input.
        num_tokens (`int`): draft tokens the loop will verify, `<= h` (fewer near `max_length`); deeper nodes are cut.
        proposal_warper (`Callable`, *optional*): set when the loop verifies by speculative sampling; turns scores
            `(..., vocab)` into the scores a proposal is sampled from (see `proposal_probs`).
        prompt_start (`torch.LongTensor` of shape `(batch,)`, *optional*): first real token of each row (from the
            attention mask; defaults to 0).
        committed_hidden (`torch.Tensor` of shape `(batch, n, hidden)`, *optional*): for drafters declaring
            `hidden_states = "committed"`: the hidden states at the positions that predicted each token the last
            step committed (the last valid one is `hidden`); `committed_count[b]` of them are valid, left-aligned.
        committed_count (`torch.LongTensor` of shape `(batch,)`, *optional*): see `committed_hidden`.
        max_tokens (`int`, *optional*): draft tokens the loop verifies along a path this step for drafters deeper
            than the heads (a drafter's `max_depth`, e.g. prompt lookup's long matches), cut near `max_length`;
            defaults to `num_tokens`.
        max_depth (`int`, *optional*): the deepest tree the loop accepts from this drafter (`max(h, max_depth)`);
            defaults to `h`.
    """

    def __init__(
        self,
        tokens: torch.LongTensor,
        lengths: torch.LongTensor,
        live: torch.BoolTensor,
        heads: DraftHeadsView | None,
        hidden: torch.Tensor | None,
        num_tokens: int,
        proposal_warper: Callable[[torch.Tensor], torch.Tensor] | None = None,
        prompt_start: torch.LongTensor | None = None,
        committed_hidden: torch.Tensor | None = None,
        committed_count: torch.LongTensor | None = None,
        max_tokens: int | None = None,
        max_depth: int | None = None,
    ):
        self.tokens = tokens
        self.max_tokens = num_tokens if max_tokens is None else max(int(max_tokens), num_tokens)
        self._max_depth = max_depth
        self.lengths = lengths
        self.live = live
        self.heads = heads
        self.hidden = hidden
        self.num_tokens = num_tokens
        self.proposal_warper = proposal_warper
        self.prompt_start = prompt_start if prompt_start is not None else torch.zeros_like(lengths)
        self.committed_hidden = committed_hidden
        self.committed_count = committed_count
        self._logits: torch.Tensor | None = None
        self._log_probs: torch.Tensor | None = None  # compact, the first heads only (`draft_log_probs`)
        self._argmax: torch.LongTensor | None = None
        self._head_probs: torch.Tensor | None = None
        self._path_states: Any = None

    @property
    def input_ids(self) -> torch.LongTensor:
        """`tokens` (the name of the older [`DraftState`])."""
        return self.tokens

    @property
    def max_depth(self) -> int:
        """The deepest draft tree the loop accepts this generation (`h` unless the drafter declares more)."""
        return self.num_heads if self._max_depth is None else max(int(self._max_depth), self.num_heads)

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    @property
    def num_heads(self) -> int:
        """`h`, the number of draft heads."""
        return self.heads.num_heads if self.heads is not None else int(self._logits.shape[-2])

    @property
    def vocab_size(self) -> int:
        """Size of the vocabulary the drafts are ids of (the base model's)."""
        return self.heads.vocab_size if self.heads is not None else int(self._logits.shape[-1])

    @property
    def independent(self) -> bool:
        """Whether the heads' distributions are fixed given the committed prefix (see `hf_bpd.heads`)."""
        return self.heads is None or self.heads.independent

    @property
    def sampling(self) -> bool:
        """Whether drafts sampled from a proposal (returned with it in the `DraftTree`) are verified by speculative
        sampling this step; otherwise a drafter proposes its best guess (verified by "sample, then match")."""
        return self.proposal_warper is not None

    def last_tokens(self) -> torch.LongTensor:
        """`(batch,)`: the last committed token of each row (`x_{t+1}`, the first conditioning token)."""
        return self.tokens.gather(1, (self.lengths - 1).clamp(min=0)[:, None])[:, 0]

    def draft_logits(self) -> torch.Tensor:
        """Independent heads: their logits `(batch, h, vocab)` over the full vocabulary (computed once)."""
        if self._logits is None:
            if not self.independent:
                raise ValueError(
                    f"head_type={self.heads.head_type!r} heads read the drafted tokens: there are no per-head logits "
                    "given the committed prefix alone; use `ctx.path_logits(paths)` (the search drafters do)."
                )
            self._logits = self.heads.logits(self.hidden)
        return self._logits

    head_logits = draft_logits

    def draft_log_probs(self, depth: int | None = None) -> tuple[torch.Tensor, torch.LongTensor | None]:
        """
        Independent heads: float32 log-probabilities of the first `depth` heads (default all `h`) over the draft
        vocabulary, `(batch, depth, K)`, and the `(K,)` base-vocabulary ids of its columns (None when the columns are
        the base vocabulary itself). Cheaper than `draft_logits()`: only `depth` heads run and nothing of the base
        vocabulary's size is built (with a draft vocabulary, a token outside it has probability 0 either way).
        Computed once per step for the deepest `depth` asked.
        """
        depth = self.num_heads if depth is None else max(1, min(int(depth), self.num_heads))
        if self._logits is not None or self.heads is None:  # the full logits exist already (or were given)
            return torch.log_softmax(self.draft_logits()[:, :depth].float(), dim=-1), None
        if self._log_probs is None or self._log_probs.shape[1] < depth:
            if not self.independent:
                self.draft_logits()  # raises the token-conditioned heads' error
            compact = self.heads.logits(self.hidden, full_vocab=False, num_heads=depth)
            self._log_probs = torch.log_softmax(compact.float(), dim=-1)
        return self._log_probs[:, :depth], self.heads.draft_token_map

    def draft_topk(self, depth: int, k: int) -> tuple[torch.Tensor, torch.LongTensor]:
        """The `k` most probable tokens of each of the first `depth` heads: log-probabilities `(batch, depth, k)` and
        base-vocabulary ids `(batch, depth, k)` (see `draft_log_probs`)."""
        log_probs, ids = self.draft_log_probs(depth)
        if ids is not None and k > log_probs.shape[-1]:  # more than the draft vocabulary holds: the full ranking
            return torch.log_softmax(self.draft_logits()[:, :depth].float(), dim=-1).topk(k, dim=-1)
        top = log_probs.topk(k, dim=-1)
        return top.values, top.indices if ids is None else ids[top.indices]

    def path_logits(self, paths: torch.LongTensor, rows: torch.LongTensor | None = None) -> torch.Tensor:
        """
        The heads' logits of the token after each path: `(N, vocab)`.

        Args:
            paths (`torch.LongTensor` of shape `(N, d)`): draft tokens after the last committed token (`d >= 0`).
            rows (`torch.LongTensor` of shape `(N,)`, *optional*): the row of each path (default: `paths` has one
                path per row).
        Returns:
            The scores of draft token `d + 1`: head `d`'s logits (independent heads) or the conditioned heads'
            output `d` given `[x_{t+1}, paths]`.
        """
        rows = torch.arange(paths.shape[0], device=paths.device) if rows is None else rows
        depth = paths.shape[1]
        if self.independent:
            return self.draft_logits()[rows, depth]
        if self._path_states is None:
            self._path_states = self.heads.path_states(self.hidden, self.last_tokens()) or False
        if self._path_states:  # one recurrent step per node, its parent's state looked up
            return self._path_states.logits(paths, rows)
        prev = torch.cat([self.last_tokens()[rows][:, None], paths], dim=1)  # (N, d + 1)
        return self.heads.logits(self.hidden[rows], prev)[:, depth]

    def path_topk(
        self, paths: torch.LongTensor, k: int, rows: torch.LongTensor | None = None
    ) -> tuple[torch.Tensor, torch.LongTensor]:
        """
        The `k` most probable tokens after each path: float32 log-probabilities `(N, k)` and base ids `(N, k)`, the
        top-k of `log_softmax(path_logits(paths, rows))` computed over the draft vocabulary when there is one
        (nothing of the base vocabulary's size is built: a token outside it has probability 0 either way).
        """
        rows = torch.arange(paths.shape[0], device=paths.device) if rows is None else rows
        ids = self.heads.draft_token_map if self.heads is not None else None
        depth = paths.shape[1]
        if ids is None or k > ids.numel():
            top = torch.log_softmax(self.path_logits(paths, rows).float(), dim=-1).topk(k, dim=-1)
            return top.values, top.indices
        if self.independent:
            log_probs, columns = self.draft_log_probs(depth + 1)  # columns None: the full logits were there first
            top = log_probs[rows, depth].topk(k, dim=-1)
            return top.values, top.indices if columns is None else columns.to(top.indices.device)[top.indices]
        else:
            if self._path_states is None:
                self._path_states = self.heads.path_states(self.hidden, self.last_tokens()) or False
            if self._path_states:
                compact = self._path_states.logits(paths, rows, full_vocab=False)
            else:
                prev = torch.cat([self.last_tokens()[rows][:, None], paths], dim=1)
                compact = self.heads.logits(self.hidden[rows], prev, full_vocab=False)[:, depth]
            top = torch.log_softmax(compact.float(), dim=-1).topk(k, dim=-1)
        return top.values, ids.to(top.indices.device)[top.indices]

    def proposal_probs(self, scores: torch.Tensor) -> torch.FloatTensor:
        """
        The proposal distribution of scores `(..., vocab)`: the generation's position-free warpers, then softmax, in
        float32. Any proposal is exact as long as the drafts are really drawn from it.
        """
        scores = scores.float()
        if self.proposal_warper is not None:
            shape = scores.shape
            scores = self.proposal_warper(scores.reshape(-1, shape[-1])).view(shape)
        return torch.softmax(scores, dim=-1)

    def head_probs(self) -> torch.FloatTensor:
        """Independent heads: their proposal distributions `(batch, h, vocab)` (computed once)."""
        if self._head_probs is None:
            self._head_probs = self.proposal_probs(self.draft_logits())
        return self._head_probs

    def head_argmax(self) -> torch.LongTensor:
        """The heads' own greedy chain `(batch, h)` (computed once; token by token for conditioned heads)."""
        if self._argmax is None:
            if not self.independent:
                self._argmax = greedy_chain(self, self.num_heads)
            elif self._logits is None and self.heads is not None:
                self._argmax = self.heads.argmax(self.hidden)
            else:
                self._argmax = self.draft_logits().argmax(dim=-1)
        return self._argmax


class DraftState(DraftContext):
    """
    Deprecated name and signature of [`DraftContext`]: `DraftState(model, input_ids, lengths, live, hidden,
    num_tokens, proposal_warper=None)` (the model is wrapped in a [`DraftHeadsView`]; prompts start at 0).
    """

    def __init__(
        self,
        model: Any,
        input_ids: torch.LongTensor,
        lengths: torch.LongTensor,
        live: torch.BoolTensor,
        hidden: torch.Tensor | None,
        num_tokens: int,
        proposal_warper: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        heads = DraftHeadsView(model) if model is not None else None
        super().__init__(input_ids, lengths, live, heads, hidden, num_tokens, proposal_warper)


def greedy_chain(ctx: DraftContext, length: int) -> torch.LongTensor:
    """The heads' greedy chain `(batch, length)`, each token given the chain so far (token-conditioned heads)."""
    path = ctx.tokens.new_zeros(ctx.batch_size, 0)
    for _ in range(length):
        path = torch.cat([path, ctx.path_topk(path, 1)[1]], dim=1)
    return path


@dataclass
class Drafts:
    """
    Chain drafts with the distributions they were sampled from (the older `get_drafts` return type; see
    `DraftTree.from_chains`).

    Args:
        tokens (`torch.LongTensor` of shape `(batch, p, h)`): the drafts.
        proposals (`torch.FloatTensor` of shape `(batch, p, h, vocab)`, *optional*): `proposals[b, k, j]` is the
            distribution `tokens[b, k, j]` was drawn from, given the committed tokens and `tokens[b, k, :j]`.
    """

    tokens: torch.LongTensor
    proposals: torch.FloatTensor | None = None


def sample_chains(probs: torch.FloatTensor, num_drafts: int) -> Drafts:
    """
    `num_drafts` independent chains per row, token `j` drawn from `probs[:, j]` (independent heads: it depends on the
    committed prefix only).

    Args:
        probs (`torch.FloatTensor` of shape `(batch, h, vocab)`).
    Returns:
        [`Drafts`] with `(batch, num_drafts, h)` tokens and `(batch, num_drafts, h, vocab)` proposals.
    """
    batch, h, vocab = probs.shape
    flat = probs.reshape(batch * h, vocab)
    tokens = torch.multinomial(flat, num_drafts, replacement=True).view(batch, h, num_drafts).transpose(1, 2)
    return Drafts(tokens=tokens, proposals=probs[:, None].expand(batch, num_drafts, h, vocab))


def as_draft_tree(drafts: torch.LongTensor | Drafts | DraftTree, ctx: DraftContext) -> DraftTree:
    """The older return types of `get_drafts` as one [`~hf_bpd.tree.DraftTree`] cut to `ctx.num_tokens`."""
    if isinstance(drafts, DraftTree):
        return drafts
    proposals = None
    if isinstance(drafts, Drafts):
        drafts, proposals = drafts.tokens, drafts.proposals
    if (
        not isinstance(drafts, torch.Tensor)
        or drafts.dim() != 3
        or drafts.shape[0] != ctx.batch_size
        or drafts.shape[2] != ctx.num_heads
        or drafts.shape[1] < 1
    ):
        shape = tuple(drafts.shape) if isinstance(drafts, torch.Tensor) else type(drafts).__name__
        raise ValueError(f"draft_rescorer must return (batch, p, {ctx.num_heads}) drafts, got {shape}.")
    return chains(ctx, drafts, proposals)


def chains(ctx: DraftContext, drafts: torch.LongTensor, proposals: torch.Tensor | None = None) -> DraftTree:
    """`(batch, p, h)` chains (and their `(batch, p, h, V)` proposals when sampling) as a tree cut to depth
    `ctx.num_tokens`."""
    n = ctx.num_tokens
    drafts = drafts[:, :, :n].to(ctx.tokens.device)
    if proposals is not None and ctx.sampling:
        return DraftTree.from_chains(drafts, proposals[:, :, :n].to(ctx.tokens.device))
    return DraftTree.from_chains(drafts)


def checked_tree(tree: DraftTree, ctx: DraftContext) -> DraftTree:
    """What the loop verifies: a well-formed tree at most `ctx.max_depth` deep (`h` unless the drafter declares a
    deeper `max_depth`), cut to `ctx.max_tokens`, on the tokens' device (proposals dropped unless sampling)."""
    if not isinstance(tree, DraftTree):
        raise ValueError(f"Drafter.propose must return a hf_bpd.tree.DraftTree, got {type(tree).__name__}.")
    width = tree.layout.width
    if tree.tokens.dim() != 2 or tree.tokens.shape != (ctx.batch_size, width - 1):
        raise ValueError(
            f"A DraftTree of {width} nodes needs tokens of shape ({ctx.batch_size}, {width - 1}) (every node but the "
            f"root), got {tuple(tree.tokens.shape)}."
        )
    if tree.layout.max_depth > ctx.max_depth:
        raise ValueError(
            f"The draft tree is {tree.layout.max_depth} tokens deep but the model has {ctx.num_heads} draft heads and "
            f"the drafter declares max_depth={ctx.max_depth}: a tree may be at most {ctx.max_depth} deep (set the "
            "drafter's `max_depth` attribute to draft deeper, e.g. prompt lookup)."
        )
    tree = tree.truncate(ctx.max_tokens)
    device = ctx.tokens.device
    proposals = tree.proposals.to(device) if ctx.sampling and tree.proposals is not None else None
    if tree.tokens.device == device and proposals is tree.proposals:
        return tree
    return DraftTree(tree.tokens.to(device), tree.layout, proposals, tree.candidate)


class Drafter:
    """
    Proposes the drafts that the base model verifies. It changes only the drafts: the verifier, and so the output of
    `generate`, are untouched. Subclasses implement `propose`; drafters that keep state across steps (a KV cache,
    statistics) also implement `update` and `reset`. Pass one as `generate(..., use_bpd=True, drafter=...)`.

    Attributes:
        num_drafts (`int`): `p`, chains proposed per row (informational).
        hidden_states (`"last"` or `"committed"`): the hidden states the drafter needs in its context.
        requires_independent_heads (`bool`): the drafter is exact only for heads that read the hidden state alone
            (the lattice searches); [`check_drafter_heads`] refuses token-conditioned heads.
        instead (`str`): what to use with token-conditioned heads (named in the refusal).
        max_depth (`int`, *optional*): deepest draft path the drafter may propose when deeper than the heads' `h`
            (prompt lookup); the loop then sizes its buffers for it and passes `ctx.max_tokens`. None: `h`.
    """

    num_drafts: int = 1
    hidden_states: ClassVar[Literal["last", "committed"]] = "last"
    requires_independent_heads: bool = False
    instead: ClassVar[str] = ""
    max_depth: int | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "get_drafts" in cls.__dict__ and "propose" not in cls.__dict__:
            warnings.warn(
                f"{cls.__name__} implements `get_drafts(state)`, the older drafter interface: implement "
                "`propose(ctx) -> hf_bpd.tree.DraftTree` instead (chains: `DraftTree.from_chains`).",
                DeprecationWarning,
                stacklevel=2,
            )
            inherited = next((c.__dict__["propose"] for c in cls.__mro__[1:] if "propose" in c.__dict__), None)
            cls._inherited_propose = inherited
            cls.propose = _propose_by_get_drafts

    def reset(self) -> None:
        """Called once at the start of every `generate` call: drop all per-call state. The default keeps none."""

    def propose(self, ctx: DraftContext) -> DraftTree:
        """
        Args:
            ctx ([`DraftContext`]): committed tokens, live rows, the heads and their inputs at the current step.
        Returns:
            [`~hf_bpd.tree.DraftTree`]: the drafts as one tree (chains: `DraftTree.from_chains`, best first), with
            the proposals each token was drawn from when `ctx.sampling` and the drafts are sampled.
        """
        raise NotImplementedError(
            f"{type(self).__name__} does not implement `propose(ctx) -> DraftTree` (nor the older `get_drafts`)."
        )

    def get_drafts(self, state: DraftContext) -> Any:
        """Deprecated: the drafts of `state` (built-in chain drafters return their older types)."""
        inherited = getattr(type(self), "_inherited_propose", None)
        if inherited is not None and inherited is not _propose_by_get_drafts:
            return inherited(self, state)
        if type(self).propose is _propose_by_get_drafts:
            raise NotImplementedError(f"{type(self).__name__} does not implement `propose` or `get_drafts`.")
        return self.propose(state)

    def update(self, accepted_lengths: torch.LongTensor, chosen: torch.LongTensor) -> None:
        """
        Called after every verify step, once the loop has committed the step's tokens.

        Args:
            accepted_lengths (`torch.LongTensor` of shape `(batch,)`): draft tokens each row accepted (the row
                committed `accepted_lengths[b] + 1` tokens), `-1` for a row that had finished before this step.
            chosen (`torch.LongTensor` of shape `(batch,)`): index of the path each row kept.
        """


def _propose_by_get_drafts(self: Drafter, ctx: DraftContext) -> DraftTree:
    """The adapter of a subclass written for `get_drafts`."""
    return as_draft_tree(self.get_drafts(ctx), ctx)


class ChainDrafter(Drafter):
    """A drafter of `(batch, p, h)` chains: subclasses implement `_chains(ctx)` (tokens, or [`Drafts`])."""

    def propose(self, ctx: DraftContext) -> DraftTree:
        return as_draft_tree(self._chains(ctx), ctx)

    def get_drafts(self, state: DraftContext) -> torch.LongTensor | Drafts:
        """Deprecated: the chains as `(batch, p, h)` tokens or [`Drafts`] (use `propose`)."""
        return self._chains(state)

    def _chains(self, ctx: DraftContext) -> torch.LongTensor | Drafts:
        raise NotImplementedError


class HeadsDrafter(ChainDrafter):
    """The heads' own drafts: greedy, each head's argmax (plain blockwise parallel decoding, the default)."""

    def _chains(self, ctx: DraftContext) -> torch.LongTensor | Drafts:
        if ctx.sampling:
            if ctx.independent:
                # Head i's distribution q_i reads only the hidden state of the last committed token, so it is a
                # fixed distribution given the committed prefix; drawing d_i independently of d_1..d_{i-1} is exact
                # (the tests of d_1..d_{i-1} never look at d_i).
                return sample_chains(ctx.head_probs(), 1)
            return sample_conditioned_chain(ctx, ctx.num_tokens)
        return ctx.head_argmax()[:, None]  # (B, 1, h)


def sample_conditioned_chain(ctx: DraftContext, length: int) -> Drafts:
    """One chain per row drawn token by token, each from the heads' proposal given the chain so far."""
    path = ctx.tokens.new_zeros(ctx.batch_size, 0)
    proposals = []
    for _ in range(length):
        q = ctx.proposal_probs(ctx.path_logits(path))
        proposals.append(q)
        path = torch.cat([path, torch.multinomial(q, 1)], dim=1)
    pad = ctx.num_heads - length  # the loop keeps `num_tokens`; fill the rest to `h`
    tokens = torch.nn.functional.pad(path, (0, pad))[:, None]
    q = torch.stack(proposals, 1) if proposals else path.new_zeros(ctx.batch_size, 0, ctx.vocab_size).float()
    return Drafts(tokens=tokens, proposals=torch.nn.functional.pad(q, (0, 0, 0, pad))[:, None])


class DraftRescorer(ChainDrafter):
    """
    Deprecated: a drafter written as a function of the heads' logits; subclasses implement `__call__(input_ids,
    lengths, draft_logits) -> (batch, num_drafts, h)`. Implement `Drafter.propose` instead.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__call__" in cls.__dict__ and not cls.__module__.startswith("hf_bpd."):
            warnings.warn(
                f"{cls.__name__} implements `DraftRescorer.__call__`, the older drafter interface: implement "
                "`hf_bpd.drafters.Drafter.propose(ctx) -> DraftTree` instead.",
                DeprecationWarning,
                stacklevel=2,
            )

    def _chains(self, ctx: DraftContext) -> torch.LongTensor:
        return self(ctx.tokens, ctx.lengths, ctx.draft_logits().float())

    def __call__(
        self, input_ids: torch.LongTensor, lengths: torch.LongTensor, draft_logits: torch.FloatTensor
    ) -> torch.LongTensor:
        """
        Args:
            input_ids (`torch.LongTensor` of shape `(batch, buffer_len)`): committed tokens of each row.
            lengths (`torch.LongTensor` of shape `(batch,)`): committed length of each row.
            draft_logits (`torch.FloatTensor` of shape `(batch, h, vocab)`): head `i` scores the token `i + 1`
                positions after the last committed token.
        Returns:
            `torch.LongTensor` of shape `(batch, num_drafts, h)`: the drafts, best first.
        """
        raise NotImplementedError(
            f"{type(self).__name__} is a DraftRescorer without `__call__`: implement "
            "`__call__(input_ids, lengths, draft_logits)`, or derive from `hf_bpd.drafters.Drafter` and implement "
            "`propose(ctx)` (the older `get_drafts(state)` still works)."
        )


def check_drafter_heads(drafter: Drafter, heads: DraftHeadsView) -> None:
    """
    The one check of a (heads, drafter) pair: a drafter whose search is exact only for independent heads (the
    top-k lattice of Kim et al.) is refused for token-conditioned heads, naming what to use instead.

    Raises:
        ValueError: with the drafter, the head type, and the replacement.
    """
    if getattr(drafter, "requires_independent_heads", False) and not heads.independent:
        instead = getattr(drafter, "instead", "") or "a search drafter (hf_bpd.drafters.SearchDrafter)"
        raise ValueError(
            f"{type(drafter).__name__} searches the heads' top-k lattice, which is exact only for independent heads "
            f"(each reading the last hidden state alone); head_type={heads.head_type!r} heads read the drafted "
            f"tokens. Use {instead} instead."
        )


class TimingStats:
    """
    Drafting-time statistics of a drafter since its last `reset()`: `time_s`, `calls` and `ms_per_call`. Wrap each
    drafting call in `with self.timed():`.
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
