"""The "p-best 0-gram" baseline: the `p` best lattice paths by head scores alone (Kim et al., section 7)."""

from __future__ import annotations

import torch

from ..logits.lattice import TopKLattice, pbest_paths
from .base import DraftContext, Drafts, sample_chains
from .lattice import LatticeRescorer


class PBestRescorer(LatticeRescorer):
    """
    Proposes the `p` best paths of the top-k lattice by the heads' own log-probabilities, no language model: the
    baseline that separates the gain of verifying several drafts from the gain of a rescoring LM. Exact: the path
    score is a sum of independent per-position scores, so a top-`p` merge per position finds the `p` best paths
    without enumerating the `k ** h` of them. With `num_drafts=1` it proposes the plain argmax draft.

    Args:
        top_k (`int`): `k`, tokens kept per head.
        num_drafts (`int`, defaults to 1): `p`, at most `top_k ** h`.

    Example:

    ```python
    >>> from hf_bpd.drafters import PBestRescorer
    >>> out = model.generate(ids, use_bpd=True, drafter=PBestRescorer(top_k=16, num_drafts=16))
    ```
    """

    def __init__(self, top_k: int, num_drafts: int = 1):
        super().__init__(top_k=top_k, alpha=0.0, num_drafts=num_drafts)

    def _chains(self, state: DraftContext) -> torch.LongTensor | Drafts:
        """
        Greedy decoding: the `p` best paths. Speculative sampling (`state.sampling`): `p` independent chains, token
        `j` drawn from head `j`'s proposal restricted to its top-k (renormalised): the lattice's own distribution,
        which depends on the committed prefix only; the loop verifies them with multi-draft rejection sampling.
        """
        if not state.sampling:
            return super()._chains(state)
        with self.timed():
            probs = state.head_probs()  # (B, h, V)
            top = probs.topk(min(self.top_k, probs.shape[-1]), dim=-1).indices
            kept = torch.zeros_like(probs).scatter_(-1, top, probs.gather(-1, top))
            return sample_chains(kept / kept.sum(-1, keepdim=True), self.num_drafts)

    def _rescore(
        self,
        input_ids: torch.LongTensor,
        lengths: torch.LongTensor,
        lattice: TopKLattice,
        vocab_size: int,
        prompt_start: torch.LongTensor,
    ) -> torch.LongTensor:
        paths, _ = pbest_paths(lattice.logprobs, self.num_drafts)
        return paths
