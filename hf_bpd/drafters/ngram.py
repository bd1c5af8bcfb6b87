"""
Global n-gram rescoring (Kim et al., section 7): the `p` best lattice paths under a KenLM n-gram over token ids,
interpolated with the heads' scores (the search itself: [`~hf_bpd.logits.ngram.ngram_pbest`]). Exact for
independent heads; with token-conditioned heads use a `SearchDrafter` with an [`~hf_bpd.logits.NgramHook`].
"""

from __future__ import annotations

from typing import Any

import torch

from ..logits.lattice import LN10, TopKLattice, lattice_proposal, pbest_paths
from ..logits.ngram import (
    _arpa_unigrams,
    check_ngram_vocab,
    committed_contexts,
    kenlm_context_state,
    load_kenlm,
    ngram_pbest,
)
from .base import DraftContext, Drafts
from .lattice import LatticeRescorer


class NgramRescorer(LatticeRescorer):
    """
    Global n-gram rescoring: returns the `p` best paths of the top-k lattice under
    `(1 - alpha) * head_logprob + alpha * ngram_logprob` (both natural log), searching the whole lattice exactly
    with the n-gram's state (see [`ngram_pbest`]). The n-gram's context is the last `n - 1` committed tokens of each
    row.

    With speculative sampling (`do_sample=True`, the default `bpd_sampling`) it draws `p` independent chains token
    by token from the same interpolated score on the lattice, warped like the base model's distribution, with the
    n-gram following each chain's own sampled tokens, and returns those distributions as the proposals `q`
    ([`_sample`]); the loop verifies them by multi-draft rejection sampling.

    The n-gram is a KenLM model (ARPA or binary) whose words are the base model's token ids written in decimal
    (`"17"`): build one with `hf-bpd build-ngram` ([`~hf_bpd.logits.ngram_build.build_ngram`]).

    Args:
        model (`str`, `os.PathLike` or `kenlm.Model`): path to the KenLM model, or a loaded model.
        top_k (`int`): `k`, tokens kept per head.
        alpha (`float`, defaults to 0.5): n-gram weight in `[0, 1]`; 0 gives the p-best 0-gram paths.
        num_drafts (`int`, defaults to 1): `p`, drafts returned per row, at most `top_k ** h`.
        vocab_size (`int`, *optional*): the model's vocabulary size, checked against the n-gram's words at once;
            without it the check runs at the first call with the draft logits' vocabulary.
        pad_token_id (`int`, *optional*): deprecated, only read by direct calls without `prompt_start`: in
            `generate`, where each row's prompt starts comes from the attention mask.
        beam_size (`int`, *optional*): cap on hypotheses per position (approximate, faster); None is exact.

    Example:

    ```python
    >>> from hf_bpd.drafters import NgramRescorer
    >>> rescorer = NgramRescorer("ngram4.bin", top_k=16, alpha=0.3, num_drafts=16)
    >>> out = model.generate(ids, use_bpd=True, drafter=rescorer, return_dict_in_generate=True)
    >>> rescorer.ms_per_call
    ```
    """

    def __init__(
        self,
        model: Any,
        top_k: int,
        alpha: float = 0.5,
        num_drafts: int = 1,
        vocab_size: int | None = None,
        pad_token_id: int | None = None,
        beam_size: int | None = None,
    ):
        super().__init__(top_k=top_k, alpha=alpha, num_drafts=num_drafts)
        self.instead = (
            "SearchDrafter(top_k=..., num_drafts=..., hooks=[NgramHook(path, alpha=...)]) (hf_bpd.drafters, "
            "hf_bpd.logits)"
        )
        if beam_size is not None and (not isinstance(beam_size, int) or beam_size < num_drafts):
            raise ValueError(f"beam_size must be None (exact search) or an integer >= num_drafts, got {beam_size!r}.")
        self.model, self.path = load_kenlm(model)
        self.order = int(self.model.order)
        self.pad_token_id = pad_token_id
        self.beam_size = beam_size
        self._checked_vocab: int | None = None
        if vocab_size is not None:
            self._check_vocab(vocab_size)
        elif self.path is not None and _arpa_unigrams(self.path) is not None:
            check_ngram_vocab(self.model, self.path, None)  # cheap for ARPA: words must be integers

    def _check_vocab(self, vocab_size: int) -> None:
        check_ngram_vocab(self.model, self.path, vocab_size)
        self._checked_vocab = vocab_size

    def context_state(self, tokens: list[int]) -> Any:
        """The KenLM state after `tokens` (only the last `n - 1` matter), starting from the null context."""
        return kenlm_context_state(self.model, self.order, tokens)

    def _sample(self, state: DraftContext, lattice: TopKLattice, vocab_size: int) -> Drafts:
        """
        Speculative sampling: `p` *independent* chains per row, each drawn token by token from
        [`~hf_bpd.logits.lattice.lattice_proposal`] with the n-gram scored after the row's committed context and the
        chain's own sampled tokens (its KenLM state). A chain never looks at another chain, so each token is
        distributed as its `q` given its own path, which is what multi-draft rejection sampling needs
        (`hf_bpd.sampling`). Queries are shared between chains of a row that reach the same KenLM state.
        """
        import kenlm  # a model is loaded, so kenlm is there

        if self._checked_vocab is None:
            self._check_vocab(vocab_size)
        batch, h, k = lattice.tokens.shape
        p = self.num_drafts
        device = lattice.tokens.device
        rows = torch.arange(batch, device=device).repeat_interleave(p)  # chain n belongs to row n // p
        tokens = lattice.tokens[rows]  # (B * p, h, k)
        head = lattice.logprobs[rows]
        use_lm = self.alpha > 0.0
        if use_lm:
            contexts = committed_contexts(state.tokens, state.lengths, state.prompt_start, self.order - 1)
            starts = [self.context_state(context) for context in contexts]
            chain_states = [starts[n // p] for n in range(batch * p)]
            words = [[[str(t) for t in position] for position in row] for row in lattice.tokens.cpu().tolist()]
            base_score = self.model.BaseScore
        drafted, proposals = [], []
        for i in range(h):
            lm = None
            if use_lm:
                lm_rows, nexts, seen = [], [], {}
                for n, chain_state in enumerate(chain_states):
                    key = (n // p, chain_state)
                    if key not in seen:  # chains of a row at the same state share the k queries
                        outs = [kenlm.State() for _ in range(k)]
                        scores = [base_score(chain_state, word, out) for word, out in zip(words[n // p][i], outs)]
                        seen[key] = (scores, outs)
                    lm_rows.append(seen[key][0])
                    nexts.append(seen[key][1])
                lm = torch.tensor(lm_rows, dtype=torch.float64).mul_(LN10).float()
            token, q = lattice_proposal(state, tokens[:, i], head[:, i], lm, self.alpha, vocab_size)
            drafted.append(token)
            proposals.append(q)
            if use_lm and i < h - 1:
                where = (tokens[:, i] == token.to(device)[:, None]).long()
                found = where.any(-1).tolist()
                index = where.argmax(-1).tolist()
                sampled = token.tolist()
                for n in range(batch * p):
                    if found[n]:
                        chain_states[n] = nexts[n][index[n]]
                    else:  # only a warper that adds tokens could draw outside the lattice
                        out = kenlm.State()
                        base_score(chain_states[n], str(sampled[n]), out)
                        chain_states[n] = out
        drafts = torch.stack(drafted, dim=1).view(batch, p, h).to(device)
        return Drafts(tokens=drafts, proposals=torch.stack(proposals, dim=1).view(batch, p, h, vocab_size))

    def _rescore(
        self,
        input_ids: torch.LongTensor,
        lengths: torch.LongTensor,
        lattice: TopKLattice,
        vocab_size: int,
        prompt_start: torch.LongTensor,
    ) -> torch.LongTensor:
        if self._checked_vocab is None:
            self._check_vocab(vocab_size)
        if self.alpha == 0.0:  # no n-gram term: the exact p-best of the head scores
            return pbest_paths(lattice.logprobs, self.num_drafts)[0]
        contexts = committed_contexts(input_ids, lengths, prompt_start, self.order - 1)
        tokens = lattice.tokens.cpu().tolist()  # (B, h, k)
        head = lattice.logprobs.cpu().double().numpy()
        rows = []
        for b in range(lattice.batch_size):
            context = contexts[b]
            words = [[str(t) for t in position] for position in tokens[b]]
            paths, _ = ngram_pbest(
                self.model, self.context_state(context), words, head[b], self.alpha, self.num_drafts, self.beam_size
            )
            rows.append(torch.from_numpy(paths))
        return torch.stack(rows).to(lattice.tokens.device)
