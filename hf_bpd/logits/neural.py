"""
Local neural rescoring (Kim et al., section 7): a small causal LM that shares the tokenizer walks the top-k lattice
left to right and picks, at each position, the token with the best interpolated score.

The LM keeps its own KV cache across decode steps. Rows of a batch commit different numbers of tokens, and the cache
has one length for all rows, so (as in `hf_bpd.generation`) each cache slot belongs to a row or is a *hole* of
that row: holes are masked out of the 2D attention mask and position ids are counted per row.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch

from .lattice import LatticeRescorer, TopKLattice, leading_pads

logger = logging.getLogger(__name__)


class NeuralRescorer(LatticeRescorer):
    """
    Greedy walk of a small LM over the top-k lattice: at position `i` it picks
    `argmax_{t in S_i} (1 - alpha) * head_logprob_i(t) + alpha * lm_logprob(t | prefix, chosen_1..i-1)`.

    The LM keeps its own [`~transformers.DynamicCache`] across the decode steps of one `generate` call: at each call
    it compares its cached tokens with each row's committed prefix `input_ids[b, : lengths[b]]`, drops what differs
    (holes, then `cache.crop` of the trailing slots no row uses) and feeds only the new committed tokens, batched
    over rows. The walk then costs `h - 1` forwards of one token per row, which are cropped again afterwards (they
    are drafts, not committed).

    Args:
        lm (`PreTrainedModel`): a causal LM sharing the base model's tokenizer and vocabulary (e.g. a small model of
            the same family, or the base model itself as an upper bound). Used as is (put it in eval mode).
        top_k (`int`): `k`, tokens kept per head.
        alpha (`float`, defaults to 0.5): LM weight in `[0, 1]`; 0 skips the LM (plain argmax drafts).
        pad_token_id (`int`, *optional*): left-padding id of the prompts; leading pads of a row are masked out.
            Without it they are fed to the LM like any token (drafts only get a little worse).

    Attributes:
        last_lm_logprobs (`torch.FloatTensor` of shape `(batch, h, k)`): the LM log-probabilities of the lattice
            tokens along the chosen path at the last call (for inspection and tests).

    Example:

    ```python
    >>> from hf_bpd.logits import NeuralRescorer
    >>> rescorer = NeuralRescorer(small_lm, top_k=8, alpha=0.5, pad_token_id=tokenizer.pad_token_id)
    >>> out = model.generate(ids, attention_mask=mask, use_bpd=True, draft_rescorer=rescorer)
    ```
    """

    def __init__(self, lm: Any, top_k: int, alpha: float = 0.5, pad_token_id: int | None = None):
        super().__init__(top_k=top_k, alpha=alpha, num_drafts=1)
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
        """Drop the KV cache and the statistics (called at the start of every `generate`)."""
        super().reset()
        self._cache: Any = None
        self._slot_tokens: torch.LongTensor | None = None  # (B, L): token of each cache slot
        self._slot_mask: torch.LongTensor | None = None  # (B, L): 1 where the slot is a real token of the row
        self.last_lm_logprobs: torch.FloatTensor | None = None

    @property
    def cached_lengths(self) -> torch.LongTensor | None:
        """Committed tokens held in the LM's cache for each row, `(batch,)` (None before the first call)."""
        return None if self._slot_mask is None else self._slot_mask.sum(-1)

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
            input_ids=tokens, attention_mask=mask, position_ids=positions, cache=self._cache, use_cache=True,
            return_dict=True, **kwargs,
        )  # fmt: skip
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
            self._slot_tokens = self._slot_tokens[:, :-num_slots]
            self._slot_mask = self._slot_mask[:, :-num_slots]

    def _sync(self, input_ids: torch.LongTensor, lengths: torch.LongTensor) -> torch.FloatTensor:
        """
        Bring the LM's cache to each row's committed prefix (longest common prefix kept, the rest fed in one batched
        forward) and return the LM log-probabilities `(B, V)` of the token after the last committed token.
        """
        device = self.lm.device
        batch = input_ids.shape[0]
        if self._slot_mask is not None and self._slot_mask.shape[0] != batch:
            logger.debug("NeuralRescorer: batch size changed, dropping the cache.")
            self._cache = self._slot_tokens = self._slot_mask = None
        if self._slot_mask is None:
            self._slot_tokens = torch.zeros((batch, 0), dtype=torch.long, device=device)
            self._slot_mask = torch.zeros((batch, 0), dtype=torch.long, device=device)
        ids = input_ids.to(device)
        starts = leading_pads(input_ids, lengths, self.pad_token_id).tolist()
        ends = lengths.tolist()
        new_tokens: list[torch.LongTensor] = []
        kept_lengths: list[int] = []
        for b in range(batch):
            committed = ids[b, starts[b] : ends[b]]
            slots = torch.nonzero(self._slot_mask[b]).flatten()
            cached = self._slot_tokens[b, slots]
            common = min(len(committed), len(cached))
            differs = torch.nonzero(committed[:common] != cached[:common]).flatten()
            keep = int(differs[0]) if len(differs) else common
            keep = min(keep, len(committed) - 1)  # always feed the last committed token: its logits are needed
            self._slot_mask[b, slots[keep:]] = 0  # rejected or stale slots become holes
            kept_lengths.append(keep)
            new_tokens.append(committed[keep:])
        used = torch.nonzero(self._slot_mask.any(0)).flatten()
        self._crop(self._slot_mask.shape[1] - (int(used[-1]) + 1 if len(used) else 0))  # trailing slots nobody uses

        width = max(len(t) for t in new_tokens)
        block = torch.zeros((batch, width), dtype=torch.long, device=device)
        block_mask = torch.zeros_like(block)
        for b, tokens in enumerate(new_tokens):
            block[b, : len(tokens)] = tokens
            block[b, len(tokens) :] = tokens[-1]  # holes: any valid id, masked out
            block_mask[b, : len(tokens)] = 1
        kept = torch.tensor(kept_lengths, device=device)
        positions = kept[:, None] + torch.arange(width, device=device)  # (B, W)
        mask = torch.cat([self._slot_mask, block_mask], dim=1)
        last = torch.tensor([len(t) - 1 for t in new_tokens], device=device)
        logits = self._forward(block, mask, positions, last)  # (B, V)
        self._slot_tokens = torch.cat([self._slot_tokens, block], dim=1)
        self._slot_mask = mask
        return torch.log_softmax(logits.float(), dim=-1)

    def _rescore(
        self, input_ids: torch.LongTensor, lengths: torch.LongTensor, lattice: TopKLattice, vocab_size: int
    ) -> torch.LongTensor:
        if self.lm_vocab_size != vocab_size:
            raise ValueError(
                f"NeuralRescorer's LM has {self.lm_vocab_size} output tokens but the draft heads score {vocab_size}: "
                "the rescoring LM must share the base model's tokenizer and vocabulary."
            )
        batch, h, k = lattice.tokens.shape
        if self.alpha == 0.0:  # no LM term: the argmax draft
            self.last_lm_logprobs = None
            return torch.zeros((batch, 1, h), dtype=torch.long, device=lattice.tokens.device)
        device = self.lm.device
        tokens = lattice.tokens.to(device)
        head = lattice.logprobs.to(device)
        logprobs = self._sync(input_ids, lengths)  # (B, V)
        real = self._slot_mask.sum(-1)  # (B,): position id of the next token of each row
        chosen, lm_scores = [], []
        for i in range(h):
            lm_i = logprobs.gather(-1, tokens[:, i])  # (B, k)
            pick = ((1.0 - self.alpha) * head[:, i] + self.alpha * lm_i).argmax(-1)  # (B,)
            chosen.append(pick)
            lm_scores.append(lm_i)
            if i == h - 1:
                break
            step = tokens[:, i].gather(1, pick[:, None])  # (B, 1)
            self._slot_mask = torch.cat([self._slot_mask, torch.ones((batch, 1), dtype=torch.long, device=device)], 1)
            self._slot_tokens = torch.cat([self._slot_tokens, step], dim=1)
            logits = self._forward(step, self._slot_mask, (real + i)[:, None], torch.zeros_like(real))
            logprobs = torch.log_softmax(logits.float(), dim=-1)
        self._crop(h - 1)  # the walk's tokens are drafts, not committed
        self.last_lm_logprobs = torch.stack(lm_scores, dim=1)  # (B, h, k)
        return torch.stack(chosen, dim=1)[:, None].to(lattice.tokens.device)  # (B, 1, h)
