"""
Lossless speculative sampling over a draft tree: the acceptance math of `generate(..., do_sample=True,
use_bpd=True)` (the default `bpd_sampling="speculative"`). Small, pure, batch-aware functions over tensors.

One chain of drafts (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative Decoding"; Chen et
al. 2023, "Accelerating Large Language Model Decoding with Speculative Sampling"): draft `d_j` was drawn from a
proposal `q_j`; it is accepted with probability `min(1, p_j(d_j) / q_j(d_j))` where `p_j` is the base model's
(processed) distribution after the accepted prefix; at the first rejection the token is drawn from the residual
`norm(max(0, p_j - q_j))`; after the last accepted draft the "bonus" token is drawn from `p`. Every committed token
is then an exact sample of `p` given the committed prefix.

Several drafts, or a tree (SpecInfer, Miao et al. 2023, "SpecInfer: Accelerating Generative LLM Serving with Tree-
based Speculative Inference and Verification", multi-step speculative sampling; the same recursive rejection
sampling as Yang et al. 2024 "Multi-Candidate Speculative Decoding" and Jeon et al. 2024 "Recursive Speculative
Decoding"): at the accepted node the candidates (the children of every node on the accepted path, in node order) are
tried one after the other against a *running* target `r` (first `p`): candidate `c` is accepted with probability
`min(1, r(t_c) / q_c(t_c))`; on rejection `r <- norm(max(0, r - q_c))`; if all are rejected the token is drawn
from the last `r`. Induction over the candidates shows the token is an exact sample of `p`: accepting `c` yields
`min(r, q_c)`, rejecting it has probability `sum max(0, r - q_c)` and hands the rest the target
`norm(max(0, r - q_c))`, which the remaining candidates reproduce exactly *because their tokens are still
distributed as their `q`'s given everything tested so far* (tests look only at tokens and independent uniforms).

That last condition is the contract with the drafter: `q_c` is the distribution token `t_c` was drawn from, given
the tokens on the path to its parent and the candidates before it (for independent draws: given the path only). A
node's descendants must be drawn given its own path, without looking at its siblings' outcomes. Then, after a token
`t` is accepted, *every* candidate carrying `t` (drafts with equal prefixes are not merged in the p-best layout) may
continue: their children were drawn given the accepted path, whatever the tests did. Deterministic drafts are
`q = one-hot`: accepted with probability `r(d)`, rejection leaves `r` without `d`; that is exactly "sample, then
match" (`acceptance.py`), which the loop uses for drafters that return no proposals.
"""

from __future__ import annotations

import functools

import torch

SAMPLING_MODES = ("speculative", "match")


def check_sampling_mode(mode: str) -> str:
    """`bpd_sampling` must name one of [`SAMPLING_MODES`]."""
    if mode not in SAMPLING_MODES:
        raise ValueError(
            f"bpd_sampling={mode!r} is not a sampling scheme: use 'speculative' (default: drafts sampled from the "
            "drafter's proposal, accepted with probability min(1, p/q)) or 'match' (the model samples each verified "
            "position and a draft is accepted while it equals the sample). Both are exact."
        )
    return mode


def _uniform(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Uniforms in `[0, 1)` for the accept tests (one place, so a test can bias it on purpose)."""
    return torch.rand(shape, device=device)


@functools.lru_cache(maxsize=64)
def _levels(parent: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """Nodes grouped by depth (node 0 the root), each level in node order; checks that parents come first."""
    depth = [0] * len(parent)
    for v in range(1, len(parent)):
        if not 0 <= parent[v] < v:
            raise ValueError(f"tree parents must precede their children (node {v} has parent {parent[v]}).")
        depth[v] = depth[parent[v]] + 1
    levels: list[list[int]] = [[] for _ in range(max(depth) + 1)]
    for v, d in enumerate(depth):
        levels[d].append(v)
    return tuple(tuple(level) for level in levels)


def tree_rejection_sample(
    target_probs: torch.Tensor,
    parent: torch.LongTensor,
    tokens: torch.LongTensor,
    proposals: torch.Tensor,
    candidate: torch.BoolTensor | None = None,
) -> tuple[torch.LongTensor, torch.LongTensor, torch.LongTensor]:
    """
    Multi-draft recursive rejection sampling over a draft tree (see the module docstring), batched over rows.

    Args:
        target_probs (`torch.FloatTensor` of shape `(batch, W, V)`): `p` at each node: the base model's processed
            distribution of the token after the node's path.
        parent (`torch.LongTensor` of shape `(W,)`): parent of each node; node 0 is the root (the last committed
            token, its entry is ignored); parents precede their children. Siblings are tried in node order.
        tokens (`torch.LongTensor` of shape `(batch, W)`): the draft token of each node (the root's is ignored).
        proposals (`torch.FloatTensor` of shape `(batch, W, V)`): `q` of each node: the distribution its token was
            drawn from, given its parent's path (and the candidates tried before it).
        candidate (`torch.BoolTensor` of shape `(W,)`, *optional*): nodes that may be accepted (default all).
    Returns:
        `(last, n, token)`, each `(batch,)`: the first node at the end of the accepted path (0: nothing accepted),
        the number of accepted draft tokens, and the token drawn after them (from the residual at the first
        rejection, or from `p` at `last` when every level accepted).
    """
    batch, width, _ = target_probs.shape
    device = target_probs.device
    rows = torch.arange(batch, device=device)
    parents = tuple(int(x) for x in parent.tolist())
    levels = _levels(parents)
    allowed = [True] * width if candidate is None else candidate.tolist()
    alive = torch.zeros(batch, width, dtype=torch.bool, device=device)  # nodes whose path is the accepted path
    alive[:, 0] = True
    last = torch.zeros(batch, dtype=torch.long, device=device)
    n = torch.zeros_like(last)
    going = torch.ones(batch, dtype=torch.bool, device=device)
    residual = target_probs[:, 0].float()
    for level in levels[1:]:
        nodes = [v for v in level if allowed[v]]
        if not nodes:
            break
        chosen = torch.full_like(last, -1)  # token accepted at this level
        for v in nodes:
            trying = going & alive[:, parents[v]] & (chosen < 0)
            t = tokens[:, v]
            q = proposals[:, v].float()
            q_t, r_t = q.gather(1, t[:, None])[:, 0], residual.gather(1, t[:, None])[:, 0]
            # accept with probability min(1, r(t) / q(t)); strict `<`, so r(t) == 0 never accepts
            accept = trying & (_uniform((batch,), device) * q_t < r_t)
            chosen = torch.where(accept, t, chosen)
            reject = trying & ~accept
            if bool(reject.any()):
                rest = (residual - q).clamp(min=0)
                total = rest.sum(-1, keepdim=True)
                # total == 0 only when r == q, which accepts with probability 1 (a float rounding away from it)
                rest = torch.where(total > 0, rest / total.clamp(min=1e-30), residual)
                residual = torch.where(reject[:, None], rest, residual)
        got = chosen >= 0
        level_index = torch.tensor(nodes, device=device)
        on_path = alive[:, parent.to(device)[level_index]] & (tokens[:, level_index] == chosen[:, None]) & got[:, None]
        alive = torch.zeros_like(alive)
        alive[:, level_index] = on_path
        first = level_index[on_path.long().argmax(dim=1)]  # the first node carrying the accepted token
        last = torch.where(got, first, last)
        n = n + got.long()
        residual = torch.where(got[:, None], target_probs[rows, first].float(), residual)
        going = going & got
        if not bool(going.any()):
            break
    token = torch.multinomial(residual, num_samples=1)[:, 0]
    return last, n, token


def chain_rejection_sample(
    target_probs: torch.Tensor, drafts: torch.LongTensor, proposals: torch.Tensor
) -> tuple[torch.LongTensor, torch.LongTensor]:
    """
    Speculative sampling of one chain of drafts per row (Leviathan et al. 2023, Algorithm 1), vectorised over the
    chain: the same distribution as [`tree_rejection_sample`] on a chain, with one draw of uniforms.

    Args:
        target_probs (`torch.FloatTensor` of shape `(batch, h + 1, V)`): `p` after the root and after each draft.
        drafts (`torch.LongTensor` of shape `(batch, h)`).
        proposals (`torch.FloatTensor` of shape `(batch, h, V)`): `q_j` each draft was drawn from.
    Returns:
        `(n, token)`, each `(batch,)`: accepted drafts and the token drawn after them.
    """
    batch, h = drafts.shape
    rows = torch.arange(batch, device=drafts.device)
    p = target_probs.float()
    if h == 0:  # no draft fits before max_length: the model's own token
        return torch.zeros_like(rows), torch.multinomial(p[:, 0], num_samples=1)[:, 0]
    q = proposals.float()
    p_d = p[:, :h].gather(2, drafts[..., None])[..., 0]  # (B, h)
    q_d = q.gather(2, drafts[..., None])[..., 0]
    accept = _uniform((batch, h), drafts.device) * q_d < p_d
    n = accept.long().cumprod(dim=1).sum(dim=1)  # (B,)
    at = p[rows, n]  # (B, V): p where the chain stopped
    rejected = n < h
    rest = (at - q[rows, n.clamp(max=h - 1)]).clamp(min=0)
    total = rest.sum(-1, keepdim=True)
    rest = torch.where(total > 0, rest / total.clamp(min=1e-30), at)
    final = torch.where(rejected[:, None], rest, at)
    return n, torch.multinomial(final, num_samples=1)[:, 0]
