"""
The top-k lattice of independent draft heads and its maths: validation, exact p-best paths, the sampling proposal.

Kim et al. (section 7) start every draft refinement from a "sausage" lattice: position `i` offers the `k` tokens
head `i` ranks highest, with their log-probabilities. A path picks one token per position; its head score is the
sum of the picked log-probabilities. Rescorers choose paths; they never touch the verifier. The lattice drafters live in `hf_bpd.drafters`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

LN10 = math.log(10.0)


@dataclass
class TopKLattice:
    """
    The `k` best tokens of each draft head and their log-probabilities.

    Args:
        tokens (`torch.LongTensor` of shape `(batch, h, k)`): token ids, best first at each position.
        logprobs (`torch.FloatTensor` of shape `(batch, h, k)`): natural-log head probabilities of `tokens`
            (`log_softmax` over the whole vocabulary, so they are comparable across heads), descending.
    """

    tokens: torch.LongTensor
    logprobs: torch.FloatTensor

    @classmethod
    def from_logits(cls, draft_logits: torch.Tensor, top_k: int) -> TopKLattice:
        """
        Args:
            draft_logits (`torch.FloatTensor` of shape `(batch, h, vocab)`): raw draft-head logits.
            top_k (`int`): `k`, tokens kept per head; `1 <= top_k <= vocab`.
        Returns:
            [`TopKLattice`] with `(batch, h, top_k)` tensors.
        """
        if draft_logits.dim() != 3:
            raise ValueError(f"draft_logits must be (batch, h, vocab), got shape {tuple(draft_logits.shape)}.")
        check_top_k(top_k, draft_logits.shape[-1])
        logprobs = torch.log_softmax(draft_logits.float(), dim=-1)
        values, tokens = logprobs.topk(top_k, dim=-1)  # sorted, descending
        return cls(tokens=tokens, logprobs=values)

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    @property
    def num_heads(self) -> int:
        return self.tokens.shape[1]

    @property
    def top_k(self) -> int:
        return self.tokens.shape[2]

    def path_tokens(self, paths: torch.LongTensor) -> torch.LongTensor:
        """
        Args:
            paths (`torch.LongTensor` of shape `(batch, p, h)`): lattice indices in `[0, k)` per position.
        Returns:
            `torch.LongTensor` of shape `(batch, p, h)`: the token ids of those paths.
        """
        batch, num_paths, h = paths.shape
        expanded = self.tokens[:, None].expand(batch, num_paths, h, self.top_k)
        return expanded.gather(-1, paths.to(self.tokens.device)[..., None]).squeeze(-1)

    def path_logprobs(self, paths: torch.LongTensor) -> torch.FloatTensor:
        """Head score of each path, `(batch, p)`: the sum of its log-probabilities."""
        batch, num_paths, h = paths.shape
        expanded = self.logprobs[:, None].expand(batch, num_paths, h, self.top_k)
        return expanded.gather(-1, paths.to(self.logprobs.device)[..., None]).squeeze(-1).sum(-1)


def pbest_paths(scores: torch.FloatTensor, num_paths: int) -> tuple[torch.LongTensor, torch.FloatTensor]:
    """
    The exact `num_paths` best paths through a sausage lattice whose path score is a sum of independent
    per-position scores, without enumerating the `k ** h` paths.

    Position by position, only the `p` best prefixes can start one of the `p` best paths (if a prefix is beaten by
    `p` others, the same suffix after each of them beats every path through it), so keeping the top `p` of the
    `p * k` extensions at each position is exact: `O(h * p * k)` work, batched over rows.

    Args:
        scores (`torch.FloatTensor` of shape `(batch, h, k)`): score of each token at each position.
        num_paths (`int`): `p`, at most `k ** h`.
    Returns:
        `(paths, path_scores)`: lattice indices `(batch, p, h)` and scores `(batch, p)`, best first.
    """
    batch, h, k = scores.shape
    check_num_drafts(num_paths, k, h)
    totals = scores[:, 0, :]  # (B, k): prefixes of length 1
    paths = torch.arange(k, device=scores.device).view(1, k, 1).expand(batch, k, 1)
    keep = min(num_paths, k)
    totals, order = totals.topk(keep, dim=-1)
    paths = paths.gather(1, order[..., None])
    for i in range(1, h):
        cand = totals[:, :, None] + scores[:, i, None, :]  # (B, n, k)
        n = cand.shape[1]
        keep = min(num_paths, n * k)
        totals, flat = cand.flatten(1).topk(keep, dim=-1)  # (B, keep)
        parent, token = flat // k, flat % k
        paths = torch.cat([paths.gather(1, parent[..., None].expand(-1, -1, i)), token[..., None]], dim=-1)
    return paths, totals


# ------------------------------------------------------------------------------------------------ validation
def check_alpha(alpha: float) -> float:
    """`alpha` must lie in `[0, 1]`: `(1 - alpha) * head + alpha * lm`."""
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(
            f"alpha must be a number in [0, 1] (the weight of the rescoring LM against the heads), got {alpha!r}."
        )
    return float(alpha)


def check_top_k(top_k: int, vocab_size: int | None = None) -> int:
    """`top_k` must be an int >= 1 and, once the vocabulary is known, at most its size."""
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise ValueError(f"top_k must be an integer >= 1 (tokens kept per draft head), got {top_k!r}.")
    if vocab_size is not None and top_k > vocab_size:
        raise ValueError(
            f"top_k={top_k} is larger than the vocabulary ({vocab_size} tokens): use top_k <= {vocab_size}."
        )
    return top_k


def check_num_drafts(num_drafts: int, top_k: int | None = None, num_heads: int | None = None) -> int:
    """`num_drafts` must be an int >= 1 and, once `h` is known, at most the `top_k ** h` paths of the lattice."""
    if not isinstance(num_drafts, int) or isinstance(num_drafts, bool) or num_drafts < 1:
        raise ValueError(f"num_drafts must be an integer >= 1 (drafts verified per step), got {num_drafts!r}.")
    if top_k is not None and num_heads is not None and num_drafts > top_k**num_heads:
        raise ValueError(
            f"num_drafts={num_drafts} is larger than the {top_k**num_heads} paths of a top-{top_k} lattice over "
            f"{num_heads} draft heads: lower num_drafts or raise top_k."
        )
    return num_drafts


def lattice_proposal(
    state: Any,
    tokens: torch.LongTensor,
    head_logprobs: torch.FloatTensor,
    lm_logprobs: torch.FloatTensor | None,
    alpha: float,
    vocab_size: int,
) -> tuple[torch.LongTensor, torch.FloatTensor]:
    """
    Draw one lattice position of several chains from the rescorer's reweighted distribution, and return it as `q`.

    The proposal of a chain at position `i` is the interpolated score of the rescorer's greedy search,
    `(1 - alpha) * head_logprob_i(t) + alpha * lm_logprob(t | committed prefix, the chain's tokens 1..i-1)`, on the
    head's top-k tokens `t` (`-inf` elsewhere), through the generation's position-free warpers (temperature, top-k,
    top-p, ...: the same as `p`), then softmax. Tokens outside the lattice have `q = 0`, which is exact: the
    residual `norm(max(0, p - q))` supplies them. The proposal depends on the committed prefix and the chain's own
    earlier tokens only, the condition of `hf_bpd.sampling` for a node whose parent is the chain's previous token.

    Args:
        state ([`~hf_bpd.logits.DraftState`]): supplies the warpers (`proposal_probs`).
        tokens (`torch.LongTensor` of shape `(N, k)`): the lattice tokens of position `i`, one row per chain.
        head_logprobs (`torch.FloatTensor` of shape `(N, k)`): their head log-probabilities (natural log).
        lm_logprobs (`torch.FloatTensor` of shape `(N, k)`, *optional*): their LM log-probabilities (natural log)
            given each chain's prefix; None when `alpha == 0`.
        alpha (`float`): LM weight.
        vocab_size (`int`): `V`.
    Returns:
        `(token, q)`: the drawn tokens `(N,)` and the proposals `(N, V)` (float32, zero outside the lattice).
    """
    scores = (1.0 - alpha) * head_logprobs.float()
    if lm_logprobs is not None and alpha > 0.0:
        scores = scores + alpha * lm_logprobs.to(scores.device).float()
    full = torch.full((tokens.shape[0], vocab_size), float("-inf"), device=scores.device)
    q = state.proposal_probs(full.scatter_(-1, tokens.to(scores.device), scores))
    return torch.multinomial(q, num_samples=1)[:, 0], q


def leading_pads(input_ids: torch.LongTensor, lengths: torch.LongTensor, pad_token_id: int | None) -> torch.LongTensor:
    """
    Number of left-padding tokens of each row (`0` everywhere when `pad_token_id` is None).

    Args:
        input_ids (`torch.LongTensor` of shape `(batch, buffer_len)`).
        lengths (`torch.LongTensor` of shape `(batch,)`): committed lengths; a row made only of pads counts as
            having `lengths[b] - 1` pads so that its last token is still seen.
    Returns:
        `torch.LongTensor` of shape `(batch,)`.
    """
    if pad_token_id is None:
        return torch.zeros_like(lengths)
    is_pad = (input_ids == pad_token_id).long().cumprod(dim=-1).sum(dim=-1)  # length of the leading pad run
    return torch.minimum(is_pad, (lengths - 1).clamp(min=0))
