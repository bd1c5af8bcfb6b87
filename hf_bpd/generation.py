"""
The blockwise decode loop: draft -> verify -> accept, lossless, batch-aware.

`bpd_generate` runs transformers' own `generate` preparation on the base model (generation config merge, logits
processors, stopping criteria, cache, max_length) through its `custom_generate=callable` hook; `_bpd_decode` is
that callable. The acceptance math lives in `acceptance.py`; this file only plumbs. `_BlockDecoder.step` is the
algorithm: draft (a [`~hf_bpd.logits.Drafter`]) -> verify (one forward) -> accept -> commit -> `drafter.update` ->
roll back, each a small method over one explicit [`DecodeState`].

Rows of a batch accept different numbers of drafts per step. The KV cache has one length for the whole batch, so
the rejected positions of a row that accepted fewer tokens than the best row stay in the cache as *holes*: they are
masked out in the 2D attention mask, and position ids are counted per row, so every row attends exactly to its own
committed tokens at their true positions. Trailing positions that no row kept are cropped.
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationMixin
from transformers.generation import GenerateDecoderOnlyOutput, LogitsProcessorList, StoppingCriteriaList

from ._compat import pad_token_tensor, reorder_cache_tail, supports_logits_to_keep
from ._scoring import _POSITION_FREE_PROCESSORS, _Scorer, _Stopper
from ._validation import (
    BPDOptions,
    check_prompt,
    prepare_arguments,
    refuse_bpd_only_arguments,
    uncached_start,
    validate_prepared,
)
from .acceptance import accepted_lengths, cap_accepted, select_best_draft
from .drafters import CompareUnrefined, DraftContext, Drafter, DraftHeadsView, build_drafter, checked_tree
from .metrics import block_efficiency
from .sampling import chain_rejection_sample, check_sampling_mode, tree_rejection_sample
from .tree import DraftTree, TreeLayout, canonical_nodes, compact_block, tree_attention_mask

logger = logging.getLogger(__name__)


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
        mean_verify_width (`float`): draft nodes verified per step (the block's width minus its root), averaged over
            the verify steps; 0 when every step was a plain greedy step (see `hf_bpd.drafters.auto`).
    """

    num_serial_calls: int | None = None
    num_generated_tokens: int | None = None
    block_efficiency: float | None = None
    accepted_lengths: torch.LongTensor | None = None
    unrefined_accepted_lengths: torch.LongTensor | None = None
    draft_time_s: float | None = None
    mean_verify_width: float | None = None


class BPDGenerationMixin(GenerationMixin):
    """
    `generate` with `use_bpd=True`: blockwise parallel decoding. Mixed into [`~hf_bpd.BPDForCausalLM`], which provides
    `base` (the wrapped causal LM), `heads` and `config.num_draft_heads`.
    """

    def generate(self, inputs: torch.Tensor | None = None, generation_config: Any = None, **kwargs: Any) -> Any:
        """
        `generate` of the base model; with `use_bpd=True`, blockwise parallel decoding with the same output.

        Args:
            inputs (`torch.LongTensor` of shape `(batch, prompt_len)`, *optional*): the prompt, left-padded.
            use_bpd (`bool`, *optional*): decode blockwise (draft -> verify -> accept). Defaults to
                `generation_config.use_bpd` if set there, else `False` (the base model's own `generate`).
            drafter ([`~hf_bpd.logits.Drafter`], `str` or `dict`, *optional*): proposes the drafts (never changes
                the output): an instance, a registered name (`"heads"`, `"tree"`, `"auto"`, ...) or a spec dict
                `{"type": name, **options}` (`hf_bpd.drafters.build_drafter`). Defaults to the checkpoint's
                recommended drafter (`config.drafter`), else the heads' own argmax.
                `draft_rescorer=` is its older name.
            compare_unrefined (`bool`, *optional*): with a `drafter`, also verify the heads' own argmax draft in the
                same call and report its accepted lengths (`unrefined_accepted_lengths`) beside the drafter's.
            bpd_sampling (`str`, *optional*, defaults to `"speculative"`): with `do_sample=True`, how drafts are
                verified (both exact): `"speculative"` accepts each draft with probability `min(1, p/q)` (Leviathan
                et al. 2023; recursive rejection sampling for several drafts); `"match"` samples the model's token at
                every verified position and accepts while the draft equals it.
            bpd_pure_processors (`bool`, *optional*, defaults to `False`): declare that the custom logits processors
                passed are pure functions of `(input_ids, scores)` (see docs/usage.md, "Logits processors").
            kwargs: every usual `generate` argument (`max_new_tokens`, `attention_mask`, `do_sample`, `cache`,
                `logits_processor`, `stopping_criteria`, `streamer`, `return_dict_in_generate`, ...).
        Returns:
            What the base model's `generate` returns; with `return_dict_in_generate=True` and `use_bpd=True` a
            [`BPDGenerateOutput`] with BPD statistics.
        """
        use_bpd = kwargs.pop("use_bpd", None)
        if use_bpd is None:
            use_bpd = bool(getattr(generation_config or self.generation_config, "use_bpd", False))
        if not use_bpd:
            check_prompt(inputs, kwargs)
            refuse_bpd_only_arguments(kwargs)
            return self.base.generate(inputs, generation_config=generation_config, **kwargs)
        return bpd_generate(self, inputs, generation_config=generation_config, **kwargs)

    def compute_transition_scores(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The base model's `compute_transition_scores` (the scores of a BPD output are the base model's)."""
        return self.base.compute_transition_scores(*args, **kwargs)


def bpd_generate(bpd: Any, inputs: torch.Tensor | None = None, generation_config: Any = None, **kwargs: Any) -> Any:
    """`generate(..., use_bpd=True)` of a [`BPDGenerationMixin`] model; see there."""
    inputs, kwargs, options = prepare_arguments(bpd, inputs, generation_config, kwargs)
    # the user's drafter, else the checkpoint's recommended one; either way checked against the heads' kind
    drafter = build_drafter(bpd, options.drafter if options.drafter is not None else bpd.config.drafter)
    decode = functools.partial(_bpd_decode, bpd=bpd, bpd_options=options, bpd_drafter=drafter)
    return bpd.base.generate(
        inputs, generation_config=generation_config, custom_generate=decode, streamer=options.streamer, **kwargs
    )


def align_heads_to_base(bpd: Any) -> None:
    """
    Move the heads (and their own projections / buffers) to the base's dtype and device if they drifted apart (e.g.
    only `model.base` was moved). A preparation step, not a check: it runs only when they differ, and says so.
    """
    target = bpd.get_output_embeddings().weight
    prefix = f"{bpd.base_model_prefix}."
    own = [p for name, p in bpd.named_parameters() if not name.startswith(prefix)]
    if all(p.dtype == target.dtype and p.device == target.device for p in own):
        return
    logger.warning(
        "The draft heads are %s on %s but the base model is %s on %s (was only `model.base` moved?): casting the heads "
        "to match. Move the whole model with `model.to(...)` to avoid this.",
        own[0].dtype,
        own[0].device,
        target.dtype,
        target.device,
    )
    for name, module in bpd.named_children():
        if name != bpd.base_model_prefix:
            module.to(device=target.device, dtype=target.dtype)
    for name, buffer in list(bpd.named_buffers(recurse=False)):
        setattr(bpd, name, buffer.to(device=target.device))


@dataclass
class DecodeState:
    """
    Everything the loop advances, one tensor per concept (`B` rows, `C` cache slots).

    Args:
        tokens (`(B, max_length + h + 1)`): committed tokens of each row: the prompt with its left padding, then the
            generated tokens; pad ids after `lengths[b]`.
        lengths (`(B,)`): committed length of each row.
        live (`(B,)`): rows still generating.
        row_limit (`(B,)`): length at which a row stops (`max_length`, lowered when stopping criteria end the batch).
        stop_len (`(B,)`): length at which a row first met a stopping criterion, `-1` before.
        attention_mask (`(B, C)`): 1 where a cache slot holds a committed token of the row; 0 for left padding and
            for *holes* (a row's rejected drafts that another row's kept tokens keep in the cache).
        dense (`bool`): no padding and no holes, so the model runs without a mask, as plain decoding does.
        next_position (`(B,)`): position id of the last committed token, which is not in the cache yet.
        hidden (`(B, d)`): the base model's last hidden state where it predicted the last committed token.
        row_calls (`(B,)`): serial calls each row took part in while generating.
        serial_calls (`int`): forward calls of the base model.
    """

    tokens: torch.LongTensor
    lengths: torch.LongTensor
    live: torch.BoolTensor
    row_limit: torch.LongTensor
    stop_len: torch.LongTensor
    attention_mask: torch.LongTensor
    dense: bool
    next_position: torch.LongTensor
    hidden: torch.Tensor | None = None
    row_calls: torch.LongTensor | None = None
    serial_calls: int = 0
    committed_hidden: torch.Tensor | None = None  # (B, n, d): for drafters asking for `hidden_states="committed"`
    committed_count: torch.LongTensor | None = None  # (B,): valid entries of `committed_hidden`


@dataclass
class VerifiedBlock:
    """
    One verify call over a tree of `W` nodes under the root (the last committed token): `p` chains of `h'` tokens
    (`W = 1 + p * h'`) or a prefix tree with `P` root-to-leaf paths of at most `D` tokens.

    Args:
        drafts (`(B, P, D)`): the tokens along each path (`-1` past its leaf), layout ([`~hf_bpd.tree.TreeLayout`]).
        logits, scores (`(B, W, V)`): the base model's logits at the block's nodes, and after the logits processors.
        hidden (`(B, W, d)`): last hidden states at the nodes.
        canon (`(B, P, D + 1)`): node of each path prefix whose target counts (one per distinct prefix).
        targets (`(B, P, D + 1)`): the base model's token (argmax or sample) after each path prefix.
    """

    drafts: torch.LongTensor
    layout: TreeLayout
    logits: torch.Tensor
    scores: torch.Tensor
    hidden: torch.Tensor
    canon: torch.LongTensor
    targets: torch.LongTensor


class _LastHidden:
    """
    The base model's last hidden state, read as the input of its output projection (a forward hook), so the verify
    call needs no `output_hidden_states` (every layer's states) and only the rows the projection sees.
    """

    def __init__(self, model: Any):
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        self.value: torch.Tensor | None = None
        self.handle = head.register_forward_hook(self._hook) if isinstance(head, torch.nn.Module) else None

    def _hook(self, module: Any, args: tuple, output: Any) -> None:
        self.value = args[0]

    def take(self) -> torch.Tensor | None:
        value, self.value = self.value, None
        return value

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


class _BlockDecoder:
    """The draft -> verify -> accept -> roll back loop over a [`DecodeState`]; `run` reads as the algorithm."""

    def __init__(
        self,
        model: Any,
        bpd: Any,
        cache: Any,
        generation_config: Any,
        logits_processor: LogitsProcessorList,
        stopping_criteria: StoppingCriteriaList,
        drafter: Drafter,
        streamer: Any,
        compare_unrefined: bool,
        sampling: str = "speculative",
    ):
        self.model, self.bpd, self.cache, self.drafter = model, bpd, cache, drafter
        self.heads = DraftHeadsView(bpd)  # what drafters see of the model
        # heads that attend over the context (`hf_bpd.context_heads`) read every committed position's state
        self.reads_context = self.heads.reads_context
        self.wants_committed = getattr(drafter, "hidden_states", "last") == "committed" or self.reads_context
        self.prompt_hidden: torch.Tensor | None = None  # (B, F, d) the prefill's states, for context heads
        self.prompt_start: torch.LongTensor | None = None  # first real token of each row (from the attention mask)
        self.num_heads = bpd.config.num_draft_heads
        # drafters deeper than the heads (prompt lookup) declare `max_depth`; the token buffer leaves room for it
        declared = getattr(drafter, "max_depth", None)
        self.max_depth = max(self.num_heads, declared if isinstance(declared, int) else 0)
        self.max_length = generation_config.max_length
        pad = pad_token_tensor(generation_config)
        self.pad_id = int(pad) if pad is not None else 0
        return_dict = generation_config.return_dict_in_generate
        self.keep_scores = bool(return_dict and generation_config.output_scores)
        self.keep_logits = bool(return_dict and generation_config.output_logits)
        self.scorer = _Scorer(logits_processor, generation_config.do_sample)
        self.stopper = _Stopper(stopping_criteria)
        self.streamer = streamer
        # speculative sampling: drafters that sample return their proposals, warped like `p` where that is sound
        # (the position-free warpers only: the proposal of a draft never sees the draft prefix's input_ids)
        self.proposal_warper = None
        if generation_config.do_sample and check_sampling_mode(sampling) == "speculative":
            warpers = LogitsProcessorList(p for p in logits_processor if type(p) in _POSITION_FREE_PROCESSORS)
            self.proposal_warper = functools.partial(_warp, warpers)
        self.accepts_positions = "position_ids" in inspect.signature(model.forward).parameters
        self.keeps_logits = supports_logits_to_keep(model)
        # argmax of the raw logits equals argmax of a float copy: copy only for processors, sampling or outputs
        self.float_logits = bool(
            len(logits_processor) or generation_config.do_sample or self.keep_scores or self.keep_logits
        )
        self.last_hidden = _LastHidden(model)  # removed again at the end of `run`
        self.accepted: list[torch.Tensor] = []
        self.unrefined: list[torch.Tensor] = []  # what the heads' own argmax drafts would have accepted
        self.row_scores: list[list[torch.Tensor]] = []
        self.row_logits: list[list[torch.Tensor]] = []
        self.draft_time_s = 0.0
        self.verified_nodes: list[int] = []  # draft nodes of each verify step

    # ---------------------------------------------------------------------------------------------- the algorithm
    def run(self, input_ids: torch.LongTensor, attention_mask: torch.LongTensor | None) -> DecodeState:
        try:
            state = self.prefill(input_ids, attention_mask)
            while bool(state.live.any()):
                self.step(state)
        finally:
            self.last_hidden.remove()
            self.heads.context_cache = None  # the context heads' cache lives for one call
        return state

    def step(self, state: DecodeState) -> None:
        """One serial call of the base model: commits between 1 and `h + 1` tokens per live row."""
        remaining = state.row_limit - state.lengths  # tokens each row may still commit
        room = int(remaining[state.live].max()) - 1
        tree = self.draft(state, min(self.num_heads, room), min(self.max_depth, room))  # one tree-shaped block
        self.verified_nodes.append(tree.layout.width - 1)
        block = self.verify(state, tree)  # one forward over all drafts
        best, n, targets = self.accept(state, block, remaining, tree)  # each row's kept path, length, tokens
        rows = torch.arange(best.shape[0], device=best.device)
        path = block.canon[rows, best]  # (B, D + 1): the nodes of each row's kept path
        was_live = state.live  # `commit` rebinds `state.live`
        n = self.commit(state, targets, n, block, path)  # write tokens, stopping criteria
        accepted = torch.where(was_live, n, -1)
        self.accepted.append(accepted)
        self.drafter.update(accepted, best)
        self.roll_back(state, block, best, path, n, was_live)

    # ---------------------------------------------------------------------------------------------- the steps
    def prefill(self, input_ids: torch.LongTensor, attention_mask: torch.LongTensor | None) -> DecodeState:
        """
        One serial call over the prompt gives the first token and the heads' first input. A cache that already holds
        the prompt's first tokens (passed as `cache=`) is continued: only the others are fed, as plain `generate`
        does; the attention mask then covers every cache slot.
        """
        batch, prompt_len = input_ids.shape
        device = input_ids.device
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
        dense = bool(mask.all())  # no padding: the model may run without a mask (as plain decoding does)
        if not dense and not self.accepts_positions:
            raise ValueError(
                f"{type(self.model).__name__} takes no `position_ids`: `use_bpd=True` needs them with padding."
            )
        limit = self.stopper.max_length if self.stopper.max_length is not None else self.max_length
        tokens = torch.full((batch, limit + self.max_depth + 1), self.pad_id, dtype=torch.long, device=device)
        tokens[:, :prompt_len] = input_ids
        lengths = torch.full((batch,), prompt_len, dtype=torch.long, device=device)
        state = DecodeState(
            tokens=tokens,
            lengths=lengths,
            live=torch.ones(batch, dtype=torch.bool, device=device),
            row_limit=torch.full_like(lengths, limit),
            stop_len=torch.full_like(lengths, -1),
            attention_mask=mask,
            dense=dense,
            next_position=mask.sum(-1),
            row_calls=torch.zeros_like(lengths),
        )
        self.row_scores = [[] for _ in range(batch)]
        self.row_logits = [[] for _ in range(batch)]
        self.prompt_slots = mask.shape[1]
        feed = input_ids[:, uncached_start(self.cache, input_ids, attention_mask) :]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -feed.shape[1] :]
        logits, hidden = self.forward(state, feed, positions, logits_to_keep=1)
        logits = logits[:, -1:]  # (B, 1, V)
        scores = self.scorer.scores(logits, tokens, lengths, state.live)
        root = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.commit(
            state, self.scorer.select(scores), torch.zeros_like(lengths), _Prefill(logits=logits, scores=scores), root
        )
        state.hidden = hidden[:, -1]  # (B, d)
        if self.reads_context:
            self._start_context(state, feed, mask[:, -feed.shape[1] :])
        return state

    def _start_context(self, state: DecodeState, feed: torch.LongTensor, mask: torch.LongTensor) -> None:
        """
        Heads that read the context: a fresh context (`heads.new_context`, e.g. a
        [`~hf_bpd.context_heads.ContextCache`]) holding the prompt's pairs `(h_s, x_{s+1})`
        but the last (its state predicted the first generated token: the first step adds it with that token). A
        prompt given partly in `cache=` has no states for those tokens: the context starts at the first fed one.
        """
        context = self.bpd.heads.new_context(feed.shape[0], feed.device)
        hidden, self.prompt_hidden = self.prompt_hidden, None
        valid = mask[:, :-1].bool() & mask[:, 1:].bool()
        context.append(hidden[:, :-1], feed[:, 1:], valid)
        self.heads.context_cache = context

    def draft(self, state: DecodeState, num_tokens: int, max_tokens: int | None = None) -> DraftTree:
        """The drafter's [`~hf_bpd.tree.DraftTree`] for this step, cut to depth `max_tokens` (`num_tokens <= h` for
        the heads; deeper for a drafter declaring `max_depth`)."""
        start = time.perf_counter()
        ctx = self.context(state, num_tokens, max_tokens)
        tree = checked_tree(self.drafter.propose(ctx), ctx)
        self.draft_time_s += time.perf_counter() - start
        return tree

    def context(self, state: DecodeState, num_tokens: int, max_tokens: int | None = None) -> DraftContext:
        """What the drafter sees: committed tokens, where each prompt starts, the heads and their inputs."""
        if self.prompt_start is None:  # the first real token of each row: its first attended cache slot
            self.prompt_start = state.attention_mask.ne(0).long().argmax(dim=-1)
        committed, count = state.committed_hidden, state.committed_count
        if self.wants_committed and committed is None:  # after the prefill: the state that predicted its token
            committed, count = state.hidden[:, None], torch.ones_like(state.lengths)
        if self.reads_context:  # the pairs the last step completed: each committed token with the state before it
            offsets = torch.arange(committed.shape[1], device=count.device)
            index = (state.lengths - count)[:, None] + offsets
            tokens = state.tokens.gather(1, index.clamp(min=0, max=state.tokens.shape[1] - 1))
            self.heads.context_cache.append(committed, tokens, offsets[None] < count[:, None])
        return DraftContext(
            state.tokens,
            state.lengths,
            state.live,
            self.heads,
            state.hidden,
            num_tokens,
            self.proposal_warper,
            self.prompt_start,
            committed,
            count,
            max_tokens,
            self.max_depth,
        )

    def verify(self, state: DecodeState, tree: DraftTree) -> VerifiedBlock:
        """
        One forward of the base model over `[last token, node tokens...]`: every draft in one tree-shaped block
        (a tree attention mask, position ids by depth); the targets are read along each root-to-leaf path.
        """
        layout = tree.layout
        drafts = tree.path_drafts()  # (B, P, D): one chain per path, -1 past its leaf
        batch = drafts.shape[0]
        last = state.tokens.gather(1, state.lengths[:, None] - 1)
        ids = torch.cat([last, tree.tokens], dim=1)  # (B, W)
        positions = state.next_position[:, None] + layout.depth
        chain = layout.is_chain
        mask = None if chain else tree_attention_mask(state.attention_mask, layout, state.live, self.model.dtype)
        state.attention_mask = torch.cat(
            [state.attention_mask, state.live[:, None].long().expand(-1, layout.width)], 1
        )
        state.dense = state.dense and chain and bool(state.live.all())
        logits, hidden = self.forward(state, ids, positions, mask=mask)  # (B, W, V), (B, W, d)
        scores = self.scorer.scores(logits, state.tokens, state.lengths, state.live, drafts, layout)
        canon = layout.node_index.expand(batch, -1, -1) if chain else canonical_nodes(drafts, layout)
        targets = self.scorer.select(scores).gather(1, canon.flatten(1)).view(canon.shape)  # (B, p, h' + 1)
        return VerifiedBlock(drafts, layout, logits, scores, hidden, canon, targets)

    def accept(
        self, state: DecodeState, block: VerifiedBlock, remaining: torch.LongTensor, tree: DraftTree
    ) -> tuple[torch.LongTensor, torch.LongTensor, torch.LongTensor]:
        """
        Each row's kept path, its accepted length (capped at what a row may commit) and the `(B, D + 1)` tokens it
        commits along it (`[:n + 1]`: the accepted drafts, then the model's own token). Greedy and "sample, then
        match": the path with the longest prefix equal to the model's targets. Sampled drafts with proposals:
        speculative sampling (`hf_bpd.sampling`).
        """
        drafts, targets = block.drafts, block.targets
        chosen = tree.candidate_paths()  # (P,) or None: paths marked never-chosen are only reported
        if chosen is not None:
            others = accepted_lengths(drafts[:, ~chosen], targets[:, ~chosen]).amax(dim=1)
            self.unrefined.append(torch.where(state.live, others, -1))
            keep = torch.nonzero(chosen).flatten()
            drafts, targets = drafts[:, keep], targets[:, keep]
        if tree.proposals is not None:
            best, n, targets = self._speculative(block, tree)
            return best, cap_accepted(n, remaining), targets
        best, n = select_best_draft(drafts, targets)
        rows = torch.arange(best.shape[0], device=best.device)
        targets = targets[rows, best]
        return (best if chosen is None else keep[best]), cap_accepted(n, remaining), targets

    def _speculative(self, block: VerifiedBlock, tree: DraftTree) -> tuple[torch.LongTensor, ...]:
        """
        Speculative sampling over the block's tree: `p` is the processed scores' softmax at every node (the logits
        processors that read `input_ids` saw each node's own prefix, see `_Scorer`), `q` the drafter's proposals.
        """
        layout = block.layout
        probs = torch.softmax(block.scores.float(), dim=-1)  # (B, W, V)
        batch, width, vocab = probs.shape
        rows = torch.arange(batch, device=probs.device)
        if layout.is_chain:  # one draft: the vectorised chain
            n, token = chain_rejection_sample(probs, tree.tokens, tree.proposals)
            best = torch.zeros_like(n)
        else:
            tokens = torch.cat([tree.tokens.new_zeros(batch, 1), tree.tokens], dim=1)  # (B, W), the root's unused
            proposals = torch.cat([tree.proposals.new_zeros(batch, 1, vocab), tree.proposals], dim=1)
            last, n, token = tree_rejection_sample(probs, layout.parent, tokens, proposals, tree.candidate)
            best = layout.draft_of_node[last]  # a path through the accepted node (its prefix is the accepted one)
        kept = torch.cat([block.drafts[rows, best].clamp(min=0), token[:, None]], dim=1)  # (B, D + 1)
        targets = kept.scatter(1, n[:, None], token[:, None])  # the accepted drafts, then the drawn token
        return best, n, targets

    def commit(
        self, state: DecodeState, targets: torch.LongTensor, n: torch.LongTensor, block: Any, path: torch.LongTensor
    ) -> torch.LongTensor:
        """Write `targets[b, : n_b + 1]` for live rows, apply the stopping criteria; return the final `n`."""
        n = torch.where(state.live, n, 0)
        offsets = torch.arange(targets.shape[1], device=targets.device)
        valid = (offsets[None] <= n[:, None]) & state.live[:, None]
        index = (state.lengths[:, None] + offsets).clamp(max=state.tokens.shape[1] - 1)
        state.tokens.scatter_(1, index, torch.where(valid, targets, state.tokens.gather(1, index)))
        n, stopped = self.stopper(state.tokens, state.lengths, targets, n.clone(), state.live)
        cut = (offsets[None] > n[:, None]) & valid  # written, then cut by a stopping criterion
        if self.stopper.may_cut:
            state.tokens.scatter_(1, index, torch.where(cut, self.pad_id, state.tokens.gather(1, index)))
        if self.keep_scores or self.keep_logits:
            self._record(state, block, path, n)
        if self.streamer is not None:
            self.streamer.put(targets[0, : int(n[0]) + 1].cpu())
        state.lengths.add_(torch.where(state.live, n + 1, 0))
        state.row_calls.add_(state.live.long())
        self._apply_stops(state, stopped)
        return n

    def roll_back(
        self,
        state: DecodeState,
        block: VerifiedBlock,
        best: torch.LongTensor,
        path: torch.LongTensor,
        n: torch.LongTensor,
        was_live: torch.BoolTensor,
    ) -> None:
        """Drop the rejected nodes from the cache (holes where another row keeps more) and move to the next step."""
        batch, width = block.hidden.shape[0], block.layout.width
        rows = torch.arange(batch, device=n.device)
        state.hidden = block.hidden[rows, path[rows, n]]  # (B, d) where the base model predicted the bonus token
        keep = torch.where(was_live, n + 1, 0)  # the root and the accepted drafts of each row
        kept = int(keep.max())
        if self.wants_committed:  # the states that predicted each committed token: the root, then the accepted nodes
            index = path[:, :kept, None].expand(-1, -1, block.hidden.shape[-1])  # no row committed more than `kept`
            state.committed_hidden = block.hidden.gather(1, index)
            state.committed_count = keep
        if not block.layout.is_chain:  # a tree: move each row's kept nodes (its path's first `keep`) to the front
            depth = torch.arange(path.shape[1], device=n.device).expand(batch, -1)
            slot = torch.where(depth < keep[:, None], path, width)  # a path's padding goes to a spare column
            rank = torch.full((batch, width + 1), width, dtype=torch.long, device=n.device)
            rank = rank.scatter(1, slot, depth.contiguous())[:, :width]
            rank = torch.where(rank < keep[:, None], rank, width + torch.arange(width, device=n.device))
            compact_block(self.cache, width, rank.argsort(dim=1))
        if kept < width:  # no row kept these trailing nodes
            self.cache.crop(-(width - kept))
            state.attention_mask = state.attention_mask[:, : state.attention_mask.shape[1] - (width - kept)]
        if batch > 1:  # (one row keeps all it verified)
            holes = torch.arange(kept, device=n.device)[None] >= keep[:, None]  # (B, kept)
            if bool(holes.any()):
                tail = state.attention_mask[:, -kept:]
                state.attention_mask[:, -kept:] = tail.masked_fill(holes, 0)
                state.dense = False
        state.next_position = state.next_position + keep

    # ---------------------------------------------------------------------------------------------- helpers
    def forward(
        self,
        state: DecodeState,
        ids: torch.LongTensor,
        positions: torch.LongTensor,
        mask: Any = None,
        logits_to_keep: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One serial call of the base model: logits `(B, W, V)` and the last hidden states `(B, W', d)`."""
        kwargs: dict[str, Any] = {"position_ids": positions} if self.accepts_positions else {}
        if self.keeps_logits:
            kwargs["logits_to_keep"] = logits_to_keep
        if mask is None and not state.dense:
            mask = state.attention_mask
        prefill = state.serial_calls == 0
        hooked = self.last_hidden.handle is not None
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            cache=self.cache,
            use_cache=True,
            return_dict=True,
            output_hidden_states=prefill or not hooked,
            **kwargs,
        )
        state.serial_calls += 1
        if prefill and self.reads_context:
            self.prompt_hidden = out.hidden_states[-1]
        hidden = self.last_hidden.take()
        if hidden is None:  # the model projects without calling its output module: read every layer's states
            self.last_hidden.remove()
            hidden = out.hidden_states[-1]
        logits = out.logits
        return (logits.float() if self.float_logits else logits), hidden

    def _record(self, state: DecodeState, block: Any, path: torch.LongTensor, n: torch.LongTensor) -> None:
        scores = block.scores.gather(1, _expand(path, block.scores))
        logits = block.logits.gather(1, _expand(path, block.logits))
        for b in torch.nonzero(state.live).flatten().tolist():
            if self.keep_scores:
                self.row_scores[b].extend(scores[b, : int(n[b]) + 1].float())
            if self.keep_logits:
                self.row_logits[b].extend(logits[b, : int(n[b]) + 1].float())

    def _apply_stops(self, state: DecodeState, stopped: torch.BoolTensor) -> None:
        state.stop_len.copy_(torch.where(stopped & (state.stop_len < 0), state.lengths, state.stop_len))
        if self.stopper.has_eos:  # like plain decoding: a finished row is padded from here on
            state.live = state.live & ~stopped
        elif bool((state.stop_len >= 0).all()):  # no EOS criterion: every row runs until the last one stops
            final = int(state.stop_len.max())
            state.row_limit.clamp_(max=final)
            state.tokens[:, final:] = self.pad_id
            state.lengths.clamp_(max=final)
        state.live = state.live & (state.lengths < state.row_limit)

    def output(self, state: DecodeState, prompt_len: int, return_dict: bool) -> Any:
        if self.streamer is not None:
            self.streamer.end()
        sequences = state.tokens[:, : int(state.lengths.max())]
        if return_dict or getattr(self.cache, "_is_user_defined", False):  # the cache outlives `generate`
            self._close_holes(state)
        if not return_dict:
            return sequences
        batch = sequences.shape[0]
        generated = state.lengths - prompt_len
        width = sequences.shape[1] - prompt_len
        return BPDGenerateOutput(
            sequences=sequences,
            scores=_stack_rows(self.row_scores, width) if self.keep_scores else None,
            logits=_stack_rows(self.row_logits, width) if self.keep_logits else None,
            num_serial_calls=state.serial_calls,
            num_generated_tokens=int(generated.sum()),
            block_efficiency=block_efficiency(generated, state.row_calls),
            accepted_lengths=torch.stack(self.accepted)
            if self.accepted
            else torch.zeros((0, batch), dtype=torch.long),
            unrefined_accepted_lengths=torch.stack(self.unrefined) if self.unrefined else None,
            draft_time_s=self.draft_time_s,
            mean_verify_width=sum(self.verified_nodes) / len(self.verified_nodes) if self.verified_nodes else 0.0,
            cache=self.cache,
        )

    def _close_holes(self, state: DecodeState) -> None:
        """
        Move each row's generated cache slots before its holes (batch > 1) and crop the slots no row needs, so that,
        as after plain `generate`, slot `j` holds the row's token `j` for every committed token but the last. A row
        that finished before the longest one is followed by slots of other data (plain `generate` holds its padding
        there): mask them out if the cache is reused.
        """
        region = state.attention_mask[:, self.prompt_slots :]
        width = region.shape[1]
        if width == 0 or bool(region.all()):
            return
        order = torch.sort((region == 0).long(), dim=1, stable=True).indices
        reorder_cache_tail(self.cache, width, order)
        keep = int(region.sum(1).max())
        if keep < width:
            self.cache.crop(-(width - keep))
        state.attention_mask = torch.cat(
            [state.attention_mask[:, : self.prompt_slots], region.gather(1, order)[:, :keep]], 1
        )


@dataclass
class _Prefill:
    """The prefill's one position, shaped like a [`VerifiedBlock`] for `commit`."""

    logits: torch.Tensor
    scores: torch.Tensor


def _bpd_decode(
    model: Any,
    input_ids: torch.LongTensor,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
    generation_config: Any,
    *,
    bpd: Any,
    bpd_options: BPDOptions,
    bpd_drafter: Drafter,
    **model_kwargs: Any,
) -> Any:
    """The `custom_generate` callable: transformers has prepared everything, BPD checks it, then decodes."""
    plan = validate_prepared(
        model,
        input_ids,
        generation_config,
        logits_processor,
        stopping_criteria,
        model_kwargs,
        bpd_drafter,
        bpd_options,
        bpd.config.num_draft_heads,
    )
    align_heads_to_base(bpd)  # after every check: a refused call leaves the model as it was
    drafter = CompareUnrefined(bpd_drafter) if bpd_options.compare_unrefined else bpd_drafter  # a diagnostic
    drafter.reset()
    decoder = _BlockDecoder(
        model,
        bpd,
        plan.cache,
        generation_config,
        logits_processor,
        stopping_criteria,
        drafter,
        bpd_options.streamer,
        bpd_options.compare_unrefined,
        bpd_options.sampling,
    )
    decoder.scorer.sequential = plan.sequential_scoring
    decoder.scorer.stops = decoder.stopper.stops
    state = decoder.run(input_ids, model_kwargs.get("attention_mask"))
    return decoder.output(state, input_ids.shape[1], generation_config.return_dict_in_generate)


def _warp(warpers: LogitsProcessorList, scores: torch.Tensor) -> torch.Tensor:
    """Position-free warpers over `(N, V)` scores (they never read `input_ids`)."""
    return warpers(scores.new_zeros(scores.shape[0], 1, dtype=torch.long), scores) if len(warpers) else scores


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
