"""
Local neural rescoring (Kim et al., section 7): a small causal LM that shares the tokenizer walks the top-k lattice
left to right and picks, at each position, the token with the best interpolated score.

The LM keeps its own KV cache across decode steps and learns what each row accepted from the loop's `update`. Rows
of a batch commit different numbers of tokens, and the cache has one length for all rows, so (as in
`hf_bpd.generation`) each cache slot belongs to a row or is a *hole* of that row: holes are masked out of the 2D
attention mask and position ids are counted per row.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any

import torch

from ..logits.lattice import TopKLattice, lattice_proposal
from .base import DraftContext, Drafts
from .lattice import LatticeRescorer

logger = logging.getLogger(__name__)


class NeuralRescorer(LatticeRescorer):
    """
    Greedy walk of a small LM over the top-k lattice: at position `i` it picks
    `argmax_{t in S_i} (1 - alpha) * head_logprob_i(t) + alpha * lm_logprob(t | prefix, chosen_1..i-1)`.

    The LM keeps its own [`~transformers.DynamicCache`] across the decode steps of one `generate` call. At each step
    it feeds only the committed tokens it does not hold yet (batched over rows), then walks the lattice with `h - 1`
    forwards of one token per row. The walk's tokens are the draft: the loop's [`update`] says how many of them each
    row accepted, and those stay in the cache; the others become holes of their row (masked out, with position ids
    counted per row) and trailing slots no row uses are cropped. Nothing is re-derived by comparing tokens.

    With speculative sampling (`do_sample=True`, the default `bpd_sampling`) the walk *samples* token `i` from the
    same interpolated score on the lattice, warped like the base model's distribution
    ([`~hf_bpd.logits.lattice.lattice_proposal`]), and returns that distribution as the proposal `q`: the loop
    accepts each draft with probability `min(1, p/q)`. The cache handling is the same (the walk is the draft).
    One draft per row (`num_drafts = 1`).

    Args:
        lm (`PreTrainedModel`): a causal LM sharing the base model's tokenizer and vocabulary (e.g. a small model of
            the same family, or the base model itself as an upper bound). Used as is (put it in eval mode).
        top_k (`int`): `k`, tokens kept per head.
        alpha (`float`, defaults to 0.5): LM weight in `[0, 1]`; 0 skips the LM (plain argmax drafts).
        pad_token_id (`int`, *optional*): deprecated, only read by direct calls without `prompt_start` (in
            `generate`, where each row's prompt starts comes from the attention mask).

    Attributes:
        last_lm_logprobs (`torch.FloatTensor` of shape `(batch, h, k)`): the LM log-probabilities of the lattice
            tokens along the chosen path at the last call (for inspection and tests).

    Example:

    ```python
    >>> from hf_bpd.drafters import NeuralRescorer
    >>> rescorer = NeuralRescorer(small_lm, top_k=8, alpha=0.5, pad_token_id=tokenizer.pad_token_id)
    >>> out = model.generate(ids, attention_mask=mask, use_bpd=True, drafter=rescorer)
    ```
    """

    def __init__(self, lm: Any, top_k: int, alpha: float = 0.5, pad_token_id: int | None = None):
        super().__init__(top_k=top_k, alpha=alpha, num_drafts=1)
        self.instead = "SearchDrafter(top_k=..., hooks=[NeuralHook(lm, alpha=...)]) (hf_bpd.drafters, hf_bpd.logits)"
        if not callable(getattr(lm, "forward", None)):
            raise ValueError(f"NeuralRescorer needs a causal LM (a `PreTrainedModel`), got {type(lm).__name__}.")
        if "position_ids" not in inspect.signature(lm.forward).parameters:
            raise ValueError(
                f"NeuralRescorer needs an LM whose forward takes `position_ids`; {type(lm).__name__} does not."
            )
        self.lm = lm
        self.pad_token_id = pad_token_id
        embeddings = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
        self.lm_vocab_size = int(embeddings.weight.shape[0]) if embeddings is not None else int(lm.config.vocab_size)
        self._keeps_logits = "logits_to_keep" in inspect.signature(lm.forward).parameters
        self.reset()

    def reset(self) -> None:
        """Start of a `generate` call: drop the KV cache and the statistics."""
        super().reset()
        self._cache: Any = None
        self._slot_mask: torch.LongTensor | None = None  # (B, L): 1 where the slot is a committed token of the row
        self._start: torch.LongTensor | None = None  # (B,): left padding of each row (not fed)
        self._held: torch.LongTensor | None = None  # (B,): committed tokens of each row in the cache
        self._walk = 0  # trailing slots holding the last walk's draft tokens, until `update` says what was kept
        self.last_lm_logprobs: torch.FloatTensor | None = None

    @property
    def cached_lengths(self) -> torch.LongTensor | None:
        """Committed tokens held in the LM's cache for each row, `(batch,)` (None before the first call)."""
        return None if self._held is None else self._held.clone()

    @property
    def cache_length(self) -> int:
        """Slots in the LM's KV cache (real tokens of the longest row plus holes)."""
        return 0 if self._cache is None else int(self._cache.get_seq_length())

    def _forward(
        self, tokens: torch.LongTensor, mask: torch.LongTensor, positions: torch.LongTensor, last: torch.LongTensor
    ) -> torch.Tensor:
        """Feed `tokens` `(B, W)` after the cache; return the logits `(B, V)` at position `last[b]` of each row."""
        kwargs = {"logits_to_keep": last[:, None]} if self._keeps_logits else {}  # project only the needed positions
        out = self.lm(
            input_ids=tokens,
            attention_mask=mask,
            position_ids=positions,
            cache=self._cache,
            use_cache=True,
            return_dict=True,
            **kwargs,
        )
        if self._cache is None:
            self._cache = out.cache
            if not getattr(self._cache, "is_croppable", False):
                raise ValueError(
                    f"NeuralRescorer rolls back its drafts with `cache.crop`, but the LM returned a "
                    f"{type(self._cache).__name__}, which cannot be cropped."
                )
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        return out.logits[rows, 0] if self._keeps_logits else out.logits[rows, last]

    def _crop(self, num_slots: int) -> None:
        if num_slots > 0:
            self._cache.crop(-num_slots)
            self._slot_mask = self._slot_mask[:, :-num_slots]

    def _feed_committed(
        self, input_ids: torch.LongTensor, lengths: torch.LongTensor, prompt_start: torch.LongTensor
    ) -> torch.FloatTensor:
        """
        Feed each row's committed tokens that the cache does not hold yet (one batched forward) and return the LM
        log-probabilities `(B, V)` of the token after the last committed token. What the cache holds is known from
        the loop's feedback ([`update`]), so nothing is compared: the cache always holds a prefix of every row.
        """
        device = self.lm.device
        batch = input_ids.shape[0]
        if self._slot_mask is not None and self._slot_mask.shape[0] != batch:
            logger.debug("NeuralRescorer: batch size changed, dropping the cache.")
            self._cache = self._slot_mask = None
        lengths = lengths.to(device)
        if self._slot_mask is None:
            self._slot_mask = torch.zeros((batch, 0), dtype=torch.long, device=device)
            self._start = prompt_start.to(device)
            self._held = torch.zeros(batch, dtype=torch.long, device=device)
        self._settle(torch.zeros(batch, dtype=torch.long, device=device))  # a walk nobody reported on: rejected
        committed = lengths - self._start
        if bool((self._held >= committed).any()):  # a shorter history than held (direct calls): drop the excess
            self._drop_real_slots(torch.clamp(committed - 1, min=0))
        new = committed - self._held  # (B,) >= 1: at least the last committed token, whose logits are needed
        width = int(new.max())
        offsets = torch.arange(width, device=device)
        index = (self._start + self._held)[:, None] + offsets  # (B, W)
        block_mask = (offsets[None] < new[:, None]).long()
        block = input_ids.to(device).gather(1, index.clamp(max=input_ids.shape[1] - 1))  # holes: any valid id, masked
        positions = self._held[:, None] + offsets
        mask = torch.cat([self._slot_mask, block_mask], dim=1)
        logits = self._forward(block, mask, positions, new - 1)  # (B, V)
        self._slot_mask = mask
        self._held = committed.clone()
        return torch.log_softmax(logits.float(), dim=-1)

    def _drop_real_slots(self, keep: torch.LongTensor) -> None:
        """Keep only the first `keep[b]` committed tokens of each row in the cache: the later slots become holes."""
        rank = self._slot_mask.cumsum(-1)  # 1-based rank of each real slot
        self._slot_mask = self._slot_mask * (rank <= keep[:, None]).long()
        self._held = torch.minimum(self._held, keep)
        self._crop_unused()

    def _crop_unused(self) -> None:
        used = torch.nonzero(self._slot_mask.any(0)).flatten()
        self._crop(self._slot_mask.shape[1] - (int(used[-1]) + 1 if len(used) else 0))

    def _settle(self, accepted: torch.LongTensor) -> None:
        """The walk's first `accepted[b]` tokens were committed: keep them; the rest of the walk becomes holes."""
        if self._walk == 0:
            return
        walk = self._slot_mask.shape[1] - self._walk
        kept = accepted.to(self._slot_mask.device).clamp(min=0, max=self._walk)  # -1 (finished rows) keeps none
        inside = torch.arange(self._walk, device=kept.device)[None] < kept[:, None]
        self._slot_mask[:, walk:] = inside.long()
        self._held = self._held + kept
        self._walk = 0
        self._crop_unused()

    def update(self, accepted_lengths: torch.LongTensor, chosen: torch.LongTensor) -> None:
        """Keep the accepted part of the last walk in the LM's cache (a row's walk tokens are its draft)."""
        if self._slot_mask is not None:
            self._settle(accepted_lengths)

    def _check_lm_vocab(self, vocab_size: int) -> None:
        if self.lm_vocab_size != vocab_size:
            raise ValueError(
                f"NeuralRescorer's LM has {self.lm_vocab_size} output tokens but the draft heads score {vocab_size}: "
                "the rescoring LM must share the base model's tokenizer and vocabulary."
            )

    def _walk_lattice(
        self,
        input_ids: torch.LongTensor,
        lengths: torch.LongTensor,
        lattice: TopKLattice,
        choose: Callable[[int, torch.FloatTensor], torch.LongTensor],
        prompt_start: torch.LongTensor,
    ) -> None:
        """
        Walk the lattice left to right: at position `i`, `choose(i, lm_i)` gets the LM log-probabilities `(B, k)` of
        the lattice tokens given the committed prefix and the walk's tokens so far, and returns the walk's next
        tokens `(B,)`, which are fed to the LM (all but the last). The fed tokens are the draft: `update` keeps the
        accepted ones in the cache.
        """
        batch, h, k = lattice.tokens.shape
        device = self.lm.device
        tokens = lattice.tokens.to(device)
        logprobs = self._feed_committed(input_ids, lengths, prompt_start)  # (B, V)
        real = self._held  # (B,): position id of the next token of each row
        lm_scores = []
        for i in range(h):
            lm_i = logprobs.gather(-1, tokens[:, i])  # (B, k)
            lm_scores.append(lm_i)
            step = choose(i, lm_i).to(device)[:, None]  # (B, 1)
            if i == h - 1:
                break
            self._slot_mask = torch.cat([self._slot_mask, torch.ones((batch, 1), dtype=torch.long, device=device)], 1)
            logits = self._forward(step, self._slot_mask, (real + i)[:, None], torch.zeros_like(real))
            logprobs = torch.log_softmax(logits.float(), dim=-1)
        self._walk = h - 1  # the walk's tokens are drafts: `update` keeps the accepted ones, the rest become holes
        self.last_lm_logprobs = torch.stack(lm_scores, dim=1)  # (B, h, k)

    def _rescore(
        self,
        input_ids: torch.LongTensor,
        lengths: torch.LongTensor,
        lattice: TopKLattice,
        vocab_size: int,
        prompt_start: torch.LongTensor,
    ) -> torch.LongTensor:
        self._check_lm_vocab(vocab_size)
        batch, h, k = lattice.tokens.shape
        if self.alpha == 0.0:  # no LM term: the argmax draft
            self.last_lm_logprobs = None
            return torch.zeros((batch, 1, h), dtype=torch.long, device=lattice.tokens.device)
        device = self.lm.device
        tokens = lattice.tokens.to(device)
        head = lattice.logprobs.to(device)
        chosen = []

        def pick(i: int, lm_i: torch.FloatTensor) -> torch.LongTensor:
            best = ((1.0 - self.alpha) * head[:, i] + self.alpha * lm_i).argmax(-1)  # (B,)
            chosen.append(best)
            return tokens[:, i].gather(1, best[:, None])[:, 0]

        self._walk_lattice(input_ids, lengths, lattice, pick, prompt_start)
        return torch.stack(chosen, dim=1)[:, None].to(lattice.tokens.device)  # (B, 1, h)

    def _sample(self, state: DraftContext, lattice: TopKLattice, vocab_size: int) -> Drafts:
        """
        Speculative sampling: the walk *draws* token `i` from
        [`~hf_bpd.logits.lattice.lattice_proposal`] (the interpolated score on the lattice, warped like `p`) with
        the LM given the committed prefix and the walk's own sampled tokens, and feeds the drawn token; the drafts
        are the walk, so `update` keeps the accepted part of it in the cache exactly as in greedy decoding.
        """
        self._check_lm_vocab(vocab_size)
        batch, h, k = lattice.tokens.shape
        device = lattice.tokens.device
        drafted, proposals = [], []
        if self.alpha == 0.0:  # no LM term: the heads' lattice distribution, the LM is not run
            self.last_lm_logprobs = None
            for i in range(h):
                token, q = lattice_proposal(state, lattice.tokens[:, i], lattice.logprobs[:, i], None, 0.0, vocab_size)
                drafted.append(token)
                proposals.append(q)
        else:
            tokens = lattice.tokens.to(self.lm.device)
            head = lattice.logprobs.to(self.lm.device)

            def draw(i: int, lm_i: torch.FloatTensor) -> torch.LongTensor:
                token, q = lattice_proposal(state, tokens[:, i], head[:, i], lm_i, self.alpha, vocab_size)
                drafted.append(token)
                proposals.append(q)
                return token

            self._walk_lattice(state.tokens, state.lengths, lattice, draw, state.prompt_start)
        drafts = torch.stack(drafted, dim=1).to(device)[:, None]  # (B, 1, h)
        return Drafts(tokens=drafts, proposals=torch.stack(proposals, dim=1)[:, None].to(device))
