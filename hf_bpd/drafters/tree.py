"""
Tree drafters: verify a prefix tree of the heads' top-k candidates in one forward call (Medusa's static trees,
EAGLE-2-style dynamic trees), instead of `p` separate chains that repeat their shared prefixes.

A node is an index path `(r_1, .., r_d)` into the top-k lattice: its token at depth `j` is head `j`'s rank-`r_j`
token of the row. All rows of a batch share one tree *shape* per step, each with its own tokens; the decode loop
verifies it with a tree attention mask and per-node positions and compacts the accepted path's cache entries
(`hf_bpd.tree`). Greedy output stays identical to plain decoding. With `do_sample=True` (speculative sampling, the
default `bpd_sampling`), both drafters keep their shape but fill it with tokens sampled from the heads' proposals,
siblings without replacement ([`sample_tree`]), and return the proposals: the loop verifies them by multi-draft
recursive rejection sampling (`hf_bpd.sampling`); with `bpd_sampling="match"` they draft top-k tokens, verified by
"sample, then match" (siblings carry distinct tokens, so a node's sample follows at most one child).

- [`StaticTreeDrafter`]: a fixed tree (e.g. `BPDConfig.draft_tree`, calibrated by [`build_static_tree`] from the
  heads' measured top-k accuracies with Medusa's greedy node-by-node construction).
- [`DynamicTreeDrafter`]: per step, the `num_nodes` nodes of highest path confidence (the product of the heads'
  probabilities, optionally mixed with an n-gram's, `(1 - alpha) * head + alpha * ngram` in log space), cut where the
  confidence falls below `min_confidence` (adaptive draft length).
"""

from __future__ import annotations

import functools
import heapq
import math
from collections.abc import Sequence
from typing import Any

import torch

from ..logits.lattice import LN10, check_alpha, check_top_k
from ..logits.ngram import committed_contexts
from ..tree import DraftTree, check_tree_choices, choices_layout, tree_from_parents
from .base import DraftContext, Drafter, TimingStats
from .calibration import CALIBRATION_EDGES, ConfidenceCalibration  # noqa: F401  (CALIBRATION_EDGES re-exported)

DraftState = DraftContext  # annotations below


def position_limit(model: Any) -> int | None:
    """The base model's position limit (`max_position_embeddings` or GPT-2's `n_positions`), None when unknown."""
    base = getattr(model, "base", model)
    config = getattr(base, "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_num_nodes(num_nodes: Any, limit: int | None = None) -> int:
    """A node budget is an integer >= 1; a verify block of `num_nodes + 1` tokens must fit the position limit."""
    if isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or num_nodes < 1:
        raise ValueError(f"num_nodes must be an integer >= 1 (draft tokens verified per step), got {num_nodes!r}.")
    if limit is not None and num_nodes + 1 > limit:
        raise ValueError(
            f"num_nodes={num_nodes} needs a verify block of {num_nodes + 1} tokens, more than the model's position "
            f"limit ({limit}): use num_nodes <= {limit - 1} (a few dozen is typical)."
        )
    return num_nodes


class _Timed(TimingStats, Drafter):
    """A tree drafter with the lattice rescorers' timing statistics (`time_s`, `calls`, `ms_per_call`)."""

    def __init__(self) -> None:
        self.reset_timing()

    def reset(self) -> None:
        self.reset_timing()

    def propose(self, ctx: DraftContext) -> DraftTree:
        with self.timed(), torch.no_grad():
            return self._tree(ctx)

    def _tree(self, state: DraftState) -> DraftTree:
        raise NotImplementedError


def sample_tree(probs: torch.Tensor | None, layout: Any, path_probs: Any = None) -> DraftTree:
    """
    Fill a tree shape with sampled tokens, for speculative sampling (`hf_bpd.sampling.tree_rejection_sample`).

    The heads' distributions depend on the committed prefix only (each head reads the last committed hidden state),
    so every node at depth `d` draws from head `d`'s proposal `probs[:, d - 1]`. The children of a node are drawn
    one after another *without replacement* (in node order, the order the verifier tries them): a child's proposal
    is the head's distribution without its earlier siblings' tokens, renormalised, which is exactly "the
    distribution it was drawn from, given its parent's path and the candidates before it". When no probability is
    left (more children than tokens in the proposal's support, e.g. under top-k), the child is the head's most
    likely token drawn from a one-hot proposal (a wasted node, still exact). The shape itself must not depend on
    the draws (here: a fixed or top-k-derived shape, chosen before sampling).

    With token-conditioned heads the proposal of a node's children depends on the node's path: pass `path_probs`,
    and each node's children are drawn from that node's own `q = path_probs(path)` (computed once per node, from the
    tokens already drawn on its path).

    Args:
        probs (`torch.FloatTensor` of shape `(batch, D, vocab)`): the proposal of each depth (independent heads).
        layout ([`~hf_bpd.tree.TreeLayout`]): the shape, at most `D` deep.
        path_probs (`Callable`, *optional*): `path_probs(path) -> (batch, vocab)`, the proposal of the token after
            `path` `(batch, d)` (replaces `probs`).
    Returns:
        [`~hf_bpd.tree.DraftTree`] with `tokens` `(batch, W - 1)` and `proposals` `(batch, W - 1, vocab)`.
    """
    parents = layout.parent.tolist()
    depth = layout.depth.tolist()
    first: dict[int, torch.Tensor] = {}  # per parent: the proposal of its children
    if path_probs is None:
        batch, _, vocab = probs.shape
        device = probs.device
        node_q = lambda w: probs[:, depth[w]].float()  # noqa: E731  (children of a depth-d node: head d + 1)
    else:
        node_q = None
    tokens = proposals = None
    left: dict[int, torch.Tensor] = {}  # per parent: the head's mass not yet drawn by its earlier children
    for w in range(1, len(parents)):
        parent = parents[w]
        if parent not in first:
            if node_q is not None:
                first[parent] = node_q(parent)
            else:
                first[parent] = path_probs(_node_path(tokens, parents, parent)).float()
        if tokens is None:
            batch, vocab = first[parent].shape
            device = first[parent].device
            tokens = torch.zeros(batch, len(parents) - 1, dtype=torch.long, device=device)
            proposals = torch.zeros(batch, len(parents) - 1, vocab, dtype=torch.float32, device=device)
        q = left.get(parent, first[parent])
        total = q.sum(-1, keepdim=True)
        spent = total[:, 0] <= 1e-12
        one_hot = torch.nn.functional.one_hot(first[parent].argmax(-1), vocab).float()
        q = torch.where(spent[:, None], one_hot, q / total.clamp(min=1e-30))
        token = torch.multinomial(q, num_samples=1)[:, 0]
        tokens[:, w - 1] = token
        proposals[:, w - 1] = q
        left[parent] = q.scatter(1, token[:, None], 0.0)
    if tokens is None:  # the root alone
        batch = probs.shape[0] if probs is not None else 0
        tokens = torch.zeros(batch, 0, dtype=torch.long)
    return DraftTree(tokens=tokens, layout=layout, proposals=proposals)


def _node_path(tokens: torch.LongTensor | None, parents: Sequence[int], node: int) -> torch.LongTensor | None:
    """The tokens `(batch, depth)` on the path root -> `node` (node `w`'s token is column `w - 1`)."""
    chain = []
    while node > 0:
        chain.append(node - 1)
        node = parents[node]
    if tokens is None:
        return None
    return tokens[:, chain[::-1]]


class StaticTreeDrafter(_Timed):
    """
    Verifies the same tree shape every step, filled with each row's top-k tokens (Medusa's `medusa_choices`).

    Args:
        choices (`list[list[int]]`, *optional*): the tree as index paths, e.g. `[[0], [1], [0, 0], [0, 1], [0, 0, 0]]`
            (every prefix of a path must be a path too; depth at most `h`). Default: the model's
            `config.draft_tree` (saved with the heads by `hf-bpd tune --tree`).

    Example:

    ```python
    >>> from hf_bpd.logits import StaticTreeDrafter
    >>> out = model.generate(ids, use_bpd=True, draft_rescorer=StaticTreeDrafter([[0], [1], [0, 0], [0, 0, 0]]))
    ```
    """

    def __init__(self, choices: Sequence[Sequence[int]] | None = None):
        super().__init__()
        self.choices = tuple(check_tree_choices(choices)) if choices is not None else None
        self._built: dict[Any, Any] = {}

    def _tree(self, state: DraftState) -> DraftTree:
        choices = self.choices
        if choices is None:
            config_tree = state.heads.draft_tree
            if config_tree is None:
                raise ValueError(
                    "StaticTreeDrafter() without `choices` uses the model's `config.draft_tree`, which is not set: "
                    "calibrate one with `hf-bpd tune --tree` (hf_bpd_bench.tree_tune) or pass choices=[[0], ...]."
                )
            choices = tuple(tuple(path) for path in config_tree)
        device = state.hidden.device
        key = (choices, device)
        if key not in self._built:
            check_tree_choices([list(p) for p in choices], num_heads=state.num_heads, top_k=state.vocab_size)
            check_num_nodes(len(choices), state.heads.position_limit)
            self._built = {key: choices_layout(choices, device)}
        layout, head, rank = self._built[key]
        if state.sampling:  # the fixed shape, filled with sampled tokens (ranks are not used)
            return sample_ctx_tree(state, layout)
        top_k = int(rank.max()) + 1
        if not state.independent:  # each node's children: the top-k of the heads given the node's own path
            return DraftTree(tokens=_conditioned_ranks(state, layout, rank, top_k), layout=layout)
        top = state.draft_logits().topk(top_k, dim=-1).indices  # (B, h, k)
        return DraftTree(tokens=top[:, head, rank], layout=layout)


def sample_ctx_tree(ctx: DraftContext, layout: Any) -> DraftTree:
    """[`sample_tree`] with the context's heads: per depth (independent heads) or per node (conditioned heads)."""
    if ctx.independent:
        return sample_tree(ctx.head_probs()[:, : layout.max_depth], layout)
    root = ctx.tokens.new_zeros(ctx.batch_size, 0)
    return sample_tree(None, layout, lambda path: ctx.proposal_probs(ctx.path_logits(root if path is None else path)))


def _conditioned_ranks(ctx: DraftContext, layout: Any, rank: torch.LongTensor, top_k: int) -> torch.LongTensor:
    """Node tokens `(batch, W - 1)`: node `w` is rank `rank[w - 1]` of the heads' top-k given its parent's path."""
    parents = layout.parent.tolist()
    ranks = rank.tolist()
    tokens = ctx.tokens.new_zeros(ctx.batch_size, len(parents) - 1)
    top: dict[int, torch.LongTensor] = {}
    for w in range(1, len(parents)):
        parent = parents[w]
        if parent not in top:
            path = _node_path(tokens, parents, parent)
            top[parent] = ctx.path_topk(path, top_k)[1].to(tokens.device)  # (B, k)
        tokens[:, w - 1] = top[parent][:, ranks[w - 1]]
    return tokens


class DynamicTreeDrafter(_Timed):
    """
    Grows a new tree every step: the `num_nodes` index paths of the top-k lattice with the highest path confidence,
    where a path's confidence is the product of its heads' probabilities (EAGLE-2's rule; the heads are independent
    of one another, so it is exact over the lattice), optionally mixed with an n-gram's log-probability of the
    path's tokens: `exp((1 - alpha) * sum head_logprob + alpha * sum ngram_logprob)`. With a batch, one shape serves
    all rows: the nodes with the highest *mean* confidence over the live rows (the batch's expected accepted tokens).

    The search is exact: the confidence only falls along a path, so the best `num_nodes` nodes form a prefix tree, and
    each depth only needs the children of the `num_nodes` best nodes of the depth above (`O(h * num_nodes * k)`).

    Args:
        num_nodes (`int`): node budget (the verify block has `num_nodes + 1` tokens), `>= 1`.
        top_k (`int`, defaults to 8): `k`, children considered per node (lattice tokens per head).
        min_confidence (`float`, defaults to 0.0): adaptive draft length: nodes whose confidence is below this are
            not drafted, so a path stops where acceptance is unlikely and the block can be smaller than the budget.
            0 always fills the budget (fixed size).
        ngram (`str`, `os.PathLike` or `kenlm.Model`, *optional*): a KenLM model over token ids to mix in.
        alpha (`float`, defaults to 0.5): weight of the n-gram (only with `ngram`).
        pad_token_id (`int`, *optional*): left padding kept out of the n-gram's context.
        max_depth (`int`, *optional*): deepest node (default: `h`).
        calibration ([`ConfidenceCalibration`] or its `to_dict()`, *optional*): rank nodes by calibrated
            confidence (per-depth conditional acceptance rates of the node's own score, measured on calibration
            prompts by `hf_bpd_bench.tree_tune.calibrate_confidence`) instead of the raw product; calibrate with the
            same `ngram` and `alpha`. `min_confidence` then applies to the calibrated confidence.
        full_path (`bool`, defaults to False): always include the path to the most confident deepest node (the
            chain a p-best rescorer would rank first), the rest of the budget best first.
    """

    records_log_scores = True  # its trees carry each node's own log-score (`DraftTree.log_scores`)

    def __init__(
        self,
        num_nodes: int,
        top_k: int = 8,
        min_confidence: float = 0.0,
        ngram: Any = None,
        alpha: float = 0.5,
        pad_token_id: int | None = None,
        max_depth: int | None = None,
        calibration: ConfidenceCalibration | dict[str, Any] | None = None,
        full_path: bool = False,
    ):
        super().__init__()
        if isinstance(calibration, dict):
            calibration = ConfidenceCalibration.from_dict(calibration)
        if calibration is not None and not isinstance(calibration, ConfidenceCalibration):
            raise ValueError(
                f"calibration must be a ConfidenceCalibration (hf_bpd_bench.tree_tune.calibrate_confidence) or its "
                f"to_dict(), got {type(calibration).__name__}."
            )
        self.calibration = calibration
        self.full_path = bool(full_path)
        self.num_nodes = check_num_nodes(num_nodes)
        self.top_k = check_top_k(top_k)
        number = isinstance(min_confidence, (int, float)) and not isinstance(min_confidence, bool)
        if not number or not 0 <= min_confidence < 1:
            raise ValueError(
                f"min_confidence must be a number in [0, 1) (a path probability), got {min_confidence!r}."
            )
        self.log_min = math.log(min_confidence) if min_confidence > 0 else -math.inf
        self.min_confidence = float(min_confidence)
        if max_depth is not None:
            check_num_nodes(max_depth)
        self.max_depth = max_depth
        self.alpha = check_alpha(alpha) if ngram is not None else 0.0
        self.pad_token_id = pad_token_id
        self.ngram = None
        if ngram is not None:
            from .ngram import NgramRescorer

            self.ngram = NgramRescorer(ngram, top_k=1, alpha=self.alpha, pad_token_id=pad_token_id)
        self._checked = False

    def _tree(self, state: DraftState) -> DraftTree:
        if not self._checked:
            check_num_nodes(self.num_nodes, state.heads.position_limit if state.heads is not None else None)
            check_top_k(self.top_k, state.vocab_size)
            if self.calibration is not None and self.calibration.num_heads < state.num_heads:
                raise ValueError(
                    f"The confidence calibration covers {self.calibration.num_heads} depths but the model has "
                    f"{state.num_heads} draft heads: calibrate it for these heads (calibrate_confidence)."
                )
            self._checked = True
        # a tree of N nodes is at most N deep: the heads below that depth are never read (nor run)
        depth = min(state.num_heads, state.num_tokens, self.max_depth or state.num_heads, self.num_nodes)
        if depth == 0:  # the loop verifies no draft token this step
            return DraftTree(tokens=state.input_ids.new_zeros(state.batch_size, 0), layout=tree_from_parents((-1,)))
        k = min(self.top_k, self.num_nodes)
        expand = None
        if state.independent:
            logprobs, tokens = state.draft_topk(depth, k)  # (B, D, k): only the heads the tree reaches
        else:  # each node's children from the heads given its own path
            logprobs = tokens = state.tokens.new_zeros(state.batch_size, depth, k)  # shapes only
            expand = functools.partial(_expand_by_path, state, k)
        live = state.live if bool(state.live.any()) else torch.ones_like(state.live)
        if self.ngram is not None and self.ngram._checked_vocab is None:
            self.ngram._check_vocab(state.vocab_size)
        contexts = self._contexts(state) if self.ngram is not None else None
        parents, tokens_of_node, log_scores = grow_tree(
            logprobs,
            tokens,
            live,
            self.num_nodes,
            self.log_min,
            self._ngram_scorer(contexts) if contexts else None,
            self.alpha,
            self.calibration,
            self.full_path,
            expand,
            return_log_scores=True,
        )
        layout = tree_from_parents(parents, state.hidden.device)
        if state.sampling:  # the shape chosen from the top-k lattice, filled with sampled tokens
            return sample_ctx_tree(state, layout)
        return DraftTree(tokens=tokens_of_node, layout=layout, log_scores=log_scores)

    # ------------------------------------------------------------------ n-gram
    def _contexts(self, state: DraftContext) -> list[Any]:
        """The KenLM state after each row's last `n - 1` committed tokens."""
        contexts = committed_contexts(state.tokens, state.lengths, state.prompt_start, self.ngram.order - 1)
        return [self.ngram.context_state(context) for context in contexts]

    def _ngram_scorer(self, contexts: list[Any]) -> Any:
        import kenlm

        model = self.ngram.model

        def score(b: int, parent_state: Any, token: int) -> tuple[float, Any]:
            out = kenlm.State()
            return model.BaseScore(contexts[b] if parent_state is None else parent_state, str(token), out), out

        return score


def grow_tree(
    logprobs: torch.Tensor,
    tokens: torch.LongTensor,
    live: torch.BoolTensor,
    num_nodes: int,
    log_min: float = -math.inf,
    ngram_score: Any = None,
    alpha: float = 0.0,
    calibration: ConfidenceCalibration | None = None,
    full_path: bool = False,
    expand: Any = None,
    return_log_scores: bool = False,
) -> tuple[tuple[int, ...], torch.LongTensor] | tuple[tuple[int, ...], torch.LongTensor, torch.Tensor]:
    """
    The best `num_nodes` nodes of the top-k lattice by mean path confidence over the live rows, as a tree.

    Args:
        logprobs, tokens (`(batch, D, k)`): each head's top-k log-probabilities (descending) and tokens.
        live (`(batch,)`): rows whose confidence counts.
        num_nodes (`int`): node budget; `log_min`: drop nodes whose log mean confidence is below it.
        ngram_score (`Callable`, *optional*): `(row, parent_state or None, token) -> (log10 prob, state)`.
        alpha (`float`): n-gram weight (with `ngram_score`).
        calibration ([`ConfidenceCalibration`], *optional*): maps each node's own log-score at its depth to a
            calibrated log conditional confidence (the path confidence is their sum).
        full_path (`bool`): reserve part of the budget for the path to the most confident node of the deepest
            level (so the tree reaches the depth a chain would), the rest best first.
        expand (`Callable`, *optional*): token-conditioned heads: `expand(d, paths)` gives the top-k
            log-probabilities and tokens `(batch, m, k)` of the children of `m` nodes at depth `d` from their paths
            `(batch, m, d)`; `logprobs` and `tokens` then only give the shape `(batch, D, k)`.
        return_log_scores (`bool`): also return each chosen node's own log-score per row `(batch, W - 1)` (before
            the calibration; float32, on the CPU).
    Returns:
        `(parents, node_tokens)`: parent pointers (the root first, `-1`; nodes by depth, best first) and each
        non-root node's token per row `(batch, W - 1)`; with `return_log_scores`, the log-scores third.
    """
    batch, depth, k = logprobs.shape
    rows = torch.nonzero(live).flatten()
    log_rows = math.log(max(len(rows), 1))
    head_weight = 1.0 - alpha if ngram_score is not None else 1.0
    levels = []  # per depth: (parent candidate in the level above (m*k,), tokens (B, m*k), key (m*k,))
    raw_levels = []  # per depth: each candidate's own log-score before the calibration (B, m*k)
    prev_scores = torch.zeros(batch, 1)
    prev_states: list[list[Any]] | None = [[None] for _ in range(batch)] if ngram_score is not None else None
    kept = torch.zeros(1, dtype=torch.long)
    prev_paths = tokens.new_zeros(batch, 1, 0)  # (B, candidates of the level above, d): each candidate's path
    for d in range(depth):
        m = kept.numel()
        parent = kept.repeat_interleave(k)  # (m*k,) index into the level above
        rank = torch.arange(k).repeat(m)
        if expand is None:
            level_logprobs, level_tokens = logprobs[:, d, rank], tokens[:, d, rank]  # (B, m*k)
        else:
            level_logprobs, level_tokens = (x.reshape(batch, m * k) for x in expand(d, prev_paths[:, kept]))
        prev_paths = torch.cat([prev_paths[:, parent], level_tokens[:, :, None].to(prev_paths.device)], dim=2)
        own = head_weight * level_logprobs.cpu()  # (B, m*k): each candidate's own log-score
        states = None
        if ngram_score is not None:
            toks = level_tokens.tolist()
            states = [[None] * len(rank) for _ in range(batch)]
            extra = torch.zeros(batch, len(rank))
            par = parent.tolist()
            for b in rows.tolist():
                for c in range(len(rank)):
                    log10, out = ngram_score(b, prev_states[b][par[c]], toks[b][c])
                    extra[b, c] = alpha * LN10 * log10
                    states[b][c] = out
            own = own + extra
        raw = own
        if calibration is not None:
            own = calibration.log_confidence(d, own)
        scores = prev_scores[:, parent] + own  # (B, m*k)
        key = torch.logsumexp(scores[rows], dim=0) - log_rows  # (m*k,) log mean confidence
        levels.append((parent, level_tokens, key))
        raw_levels.append(raw)
        order = torch.argsort(key, descending=True, stable=True)[:num_nodes]
        kept = order[key[order] >= log_min]
        if kept.numel() == 0:
            break
        prev_scores = scores
        prev_states = states
    # The best `num_nodes` over all depths (stable: on equal keys the shallower node, i.e. the parent, comes first).
    keys = torch.cat([key for _, _, key in levels])
    level_of = torch.cat([torch.full((len(key),), d, dtype=torch.long) for d, (_, _, key) in enumerate(levels)])
    offset = torch.tensor([0] + [len(key) for _, _, key in levels]).cumsum(0)
    order = torch.argsort(keys, descending=True, stable=True)
    order = order[keys[order] >= log_min]
    reserved: list[int] = []
    if full_path and len(order):  # the path to the most confident node of the deepest level that passes log_min
        deepest = max(int(level_of[c]) for c in order.tolist())
        local = int(torch.argmax(levels[deepest][2]))
        for d in range(deepest, -1, -1):
            reserved.append(int(offset[d]) + local)
            local = int(levels[d][0][local])
        reserved = reserved[-num_nodes:]  # a budget below the depth keeps the path's top
    taken = set(reserved)
    order = reserved + [c for c in order.tolist() if c not in taken][: num_nodes - len(reserved)]
    chosen = sorted(order, key=lambda c: (int(level_of[c]), -float(keys[c]), c))
    node_of = {c: w + 1 for w, c in enumerate(chosen)}
    parents, node_tokens, node_scores = [-1], [], []
    for c in chosen:
        d = int(level_of[c])
        local = c - int(offset[d])
        parent_local = int(levels[d][0][local])
        parents.append(0 if d == 0 else node_of[int(offset[d - 1]) + parent_local])
        node_tokens.append(levels[d][1][:, local])
        node_scores.append(raw_levels[d][:, local])
    if not node_tokens:
        found = (tuple(parents), tokens.new_zeros(batch, 0))
        return (*found, torch.zeros(batch, 0)) if return_log_scores else found
    found = (tuple(parents), torch.stack(node_tokens, dim=1).to(tokens.device))
    return (*found, torch.stack(node_scores, dim=1).float()) if return_log_scores else found


def _expand_by_path(ctx: DraftContext, k: int, depth: int, paths: torch.LongTensor) -> tuple[torch.Tensor, ...]:
    """`grow_tree`'s `expand` for token-conditioned heads: the top-k children of each node `(B, m, k)`."""
    batch, m, _ = paths.shape
    rows = torch.arange(batch, device=paths.device).repeat_interleave(m)
    flat = paths.reshape(batch * m, depth).to(ctx.tokens.device)
    logprobs, tokens = ctx.path_topk(flat, k, rows.to(ctx.tokens.device))
    return logprobs.view(batch, m, k), tokens.view(batch, m, k)


# ------------------------------------------------------------------------------------------------ static trees
def build_static_tree(accuracy: torch.Tensor | Sequence[Sequence[float]], num_nodes: int) -> list[list[int]]:
    """
    Medusa's greedy construction of a static tree: a node `(r_1, .., r_d)` is worth `prod_j accuracy[j][r_j]` (the
    chance that the base model's next `d` tokens are those ranks, heads assumed independent), and the expected
    accepted length of a tree is the sum of its nodes' worth; nodes are added best first up to the budget. A child
    is never worth more than its parent, so the result is a prefix tree.

    Args:
        accuracy (`(h, k)`): `accuracy[j][r]`, how often head `j + 1`'s rank-`r` token is the base model's token.
        num_nodes (`int`): node budget.
    Returns:
        The tree as index paths, best first (`BPDConfig.draft_tree` / `StaticTreeDrafter(choices)`).
    """
    acc = torch.as_tensor(accuracy, dtype=torch.float64)
    if acc.dim() != 2 or acc.numel() == 0:
        raise ValueError(
            f"accuracy must be an (h, k) table of per-head top-k accuracies, got shape {tuple(acc.shape)}."
        )
    check_num_nodes(num_nodes)
    h, k = acc.shape
    heap = [(-float(acc[0, r]), (r,)) for r in range(k)]
    heapq.heapify(heap)
    chosen: list[list[int]] = []
    while heap and len(chosen) < num_nodes:
        worth, path = heapq.heappop(heap)
        chosen.append(list(path))
        if len(path) < h:
            for r in range(k):
                heapq.heappush(heap, (worth * float(acc[len(path), r]), path + (r,)))
    return chosen


def expected_accepted_length(choices: Sequence[Sequence[int]], accuracy: torch.Tensor | Sequence) -> float:
    """Sum over the tree's nodes of the product of the accuracies along its path (Medusa's estimate)."""
    acc = torch.as_tensor(accuracy, dtype=torch.float64)
    return float(sum(math.prod(float(acc[j, r]) for j, r in enumerate(path)) for path in choices))
