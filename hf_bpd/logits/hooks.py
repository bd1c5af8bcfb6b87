"""
Refinement hooks, `LogitsProcessor`-style: `hook(input_ids, scores, attention_mask=None) -> scores`.

A search drafter (`hf_bpd.drafters.SearchDrafter`, the dynamic tree) expands draft nodes depth by depth; at each
expansion the heads give the next-token scores of every node (log-probabilities, `-inf` outside the top-k the search
considers) and the hooks rescore them given each node's whole prefix: the committed tokens, then the node's path.
Kim et al.'s rescorers are such hooks: the n-gram ([`NgramHook`]) and the small neural LM ([`NeuralHook`]), each
`(1 - alpha) * score + alpha * lm_logprob(token | prefix)` on the considered tokens. The same hooks serve independent
and token-conditioned heads, chains, beams and trees.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from .lattice import LN10, check_alpha
from .ngram import _arpa_unigrams, check_ngram_vocab, kenlm_context_state, load_kenlm


class RefinementHook:
    """
    Rescores draft scores given each node's prefix. Subclasses implement `__call__`.

    Args (of `__call__`):
        input_ids (`torch.LongTensor` of shape `(N, L)`): each node's prefix, right-aligned: the row's real committed
            tokens, then the node's path; `attention_mask` marks the real tokens.
        scores (`torch.FloatTensor` of shape `(N, V)`): the next-token scores of the `N` nodes (natural-log
            probabilities; `-inf` for tokens the search does not consider).
        attention_mask (`torch.LongTensor` of shape `(N, L)`, *optional*): 1 on real tokens (default: all).
    Returns:
        `torch.FloatTensor` of shape `(N, V)`: the new scores (`-inf` stays `-inf`).
    """

    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor, attention_mask: torch.LongTensor | None = None
    ) -> torch.FloatTensor:
        raise NotImplementedError


def _interpolate(scores: torch.FloatTensor, lm: torch.FloatTensor, alpha: float) -> torch.FloatTensor:
    """`(1 - alpha) * scores + alpha * lm` where `scores` is finite; `-inf` elsewhere."""
    finite = torch.isfinite(scores)
    mixed = (1.0 - alpha) * scores + alpha * lm.to(scores.device, scores.dtype)
    return torch.where(finite, mixed, scores)


class NgramHook(RefinementHook):
    """
    A KenLM n-gram over token ids: `(1 - alpha) * score + alpha * ln P_ngram(token | last n - 1 tokens)` on the
    considered tokens (only those are queried).

    Args:
        model (`str`, `os.PathLike` or `kenlm.Model`): the n-gram (words are token ids, see `hf-bpd build-ngram`).
        alpha (`float`, defaults to 0.5): n-gram weight in `[0, 1]`.
        vocab_size (`int`, *optional*): checked against the n-gram's words at once.
    """

    def __init__(self, model: Any, alpha: float = 0.5, vocab_size: int | None = None):
        self.alpha = check_alpha(alpha)
        self.model, self.path = load_kenlm(model)
        self.order = int(self.model.order)
        if vocab_size is not None or (self.path is not None and _arpa_unigrams(self.path) is not None):
            check_ngram_vocab(self.model, self.path, vocab_size)
        self._states: dict[tuple[int, ...], Any] = {}

    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor, attention_mask: torch.LongTensor | None = None
    ) -> torch.FloatTensor:
        import kenlm

        width = max(self.order - 1, 0)
        real = attention_mask.sum(-1).tolist() if attention_mask is not None else [input_ids.shape[1]] * len(scores)
        ids = input_ids[:, -width:].tolist() if width else [[] for _ in real]
        lm = torch.zeros(scores.shape, dtype=torch.float64)
        finite = torch.isfinite(scores).cpu()
        out = kenlm.State()
        for n, row in enumerate(ids):
            context = tuple(row[len(row) - min(width, int(real[n])) :]) if width else ()
            state = self._states.get(context)
            if state is None:
                if len(self._states) > 4096:
                    self._states.clear()
                state = self._states[context] = kenlm_context_state(self.model, self.order, list(context))
            for token in torch.nonzero(finite[n]).flatten().tolist():
                lm[n, token] = self.model.BaseScore(state, str(token), out)
        return _interpolate(scores, (lm * LN10).float(), self.alpha)


class NeuralHook(RefinementHook):
    """
    A small causal LM sharing the base model's tokenizer: `(1 - alpha) * score + alpha * log P_lm(token | prefix)`.
    Runs the LM over each node's whole prefix (no cache across steps: for the paper's cached greedy walk over
    independent heads use `hf_bpd.drafters.NeuralRescorer`).

    Args:
        lm (`PreTrainedModel`): the LM (its forward must take `position_ids`). Used as is (put it in eval mode).
        alpha (`float`, defaults to 0.5): LM weight in `[0, 1]`.
    """

    def __init__(self, lm: Any, alpha: float = 0.5):
        self.alpha = check_alpha(alpha)
        if "position_ids" not in inspect.signature(lm.forward).parameters:
            raise ValueError(
                f"NeuralHook needs an LM whose forward takes `position_ids`; {type(lm).__name__} does not."
            )
        self.lm = lm

    @torch.no_grad()
    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor, attention_mask: torch.LongTensor | None = None
    ) -> torch.FloatTensor:
        device = self.lm.device
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = self.lm(
            input_ids=input_ids.to(device),
            attention_mask=mask.to(device),
            position_ids=positions.to(device),
            use_cache=False,
        ).logits[:, -1]
        if logits.shape[-1] != scores.shape[-1]:
            raise ValueError(
                f"NeuralHook's LM has {logits.shape[-1]} output tokens but the draft scores have {scores.shape[-1]}: "
                "the LM must share the base model's tokenizer and vocabulary."
            )
        return _interpolate(scores, torch.log_softmax(logits.float(), dim=-1), self.alpha)
