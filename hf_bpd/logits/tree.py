"""
Tree drafters: verify a prefix tree of the heads' top-k candidates in one forward call (Medusa's static trees,
EAGLE-2-style dynamic trees), instead of `p` separate chains that repeat their shared prefixes.

A node is an index path `(r_1, .., r_d)` into the top-k lattice: its token at depth `j` is head `j`'s rank-`r_j`
token of the row. All rows of a batch share one tree *shape* per step, each with its own tokens; the decode loop
verifies it with a tree attention mask and per-node positions and compacts the accepted path's cache entries
(`hf_bpd.tree`). Greedy output stays identical to plain decoding, sampling stays exact ("sample, then match" at
every node: siblings carry distinct tokens, so a node's sample follows at most one child).

- [`StaticTreeDrafter`]: a fixed tree (e.g. `BPDConfig.draft_tree`, calibrated by [`build_static_tree`] from the
  heads' measured top-k accuracies with Medusa's greedy node-by-node construction).
- [`DynamicTreeDrafter`]: per step, the `num_nodes` nodes of highest path confidence (the product of the heads'
  probabilities, optionally mixed with an n-gram's, `(1 - alpha) * head + alpha * ngram` in log space), cut where the
  confidence falls below `min_confidence` (adaptive draft length).
"""

from __future__ import annotations

import heapq
import math
import time
from typing import Any, Sequence

import torch

from ..tree import DraftTree, check_tree_choices, choices_layout, tree_from_parents
from .base import Drafter, DraftState
from .lattice import LN10, check_alpha, check_top_k, leading_pads


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


class _Timed(Drafter):
    """Timing statistics like the lattice rescorers' (`time_s`, `calls`, `ms_per_call`)."""

    def __init__(self) -> None:
        self.time_s = 0.0
        self.calls = 0

    def reset(self) -> None:
        self.time_s = 0.0
        self.calls = 0

    @property
    def ms_per_call(self) -> float:
        return 1000.0 * self.time_s / max(self.calls, 1)

    def get_drafts(self, state: DraftState) -> DraftTree:
        start = time.perf_counter()
        try:
            with torch.no_grad():
                return self._tree(state)
        finally:
            self.time_s += time.perf_counter() - start
            self.calls += 1

    def _tree(self, state: DraftState) -> DraftTree:
        raise NotImplementedError


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
            config_tree = getattr(state.model.config, "draft_tree", None)
            if config_tree is None:
                raise ValueError(
                    "StaticTreeDrafter() without `choices` uses the model's `config.draft_tree`, which is not set: "
                    "calibrate one with `hf-bpd tune --tree` (hf_bpd.tools.tree_tune) or pass choices=[[0], ...]."
                )
            choices = tuple(tuple(path) for path in config_tree)
        device = state.hidden.device
        key = (choices, device)
        if key not in self._built:
            check_tree_choices([list(p) for p in choices], num_heads=state.num_heads, top_k=state.vocab_size)
            check_num_nodes(len(choices), position_limit(state.model))
            self._built = {key: choices_layout(choices, device)}
        layout, head, rank = self._built[key]
        top_k = int(rank.max()) + 1
        top = state.draft_logits().topk(top_k, dim=-1).indices  # (B, h, k)
        return DraftTree(tokens=top[:, head, rank], layout=layout)


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
    """

    def __init__(
        self,
        num_nodes: int,
        top_k: int = 8,
        min_confidence: float = 0.0,
        ngram: Any = None,
        alpha: float = 0.5,
        pad_token_id: int | None = None,
        max_depth: int | None = None,
    ):
        super().__init__()
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
            check_num_nodes(self.num_nodes, position_limit(state.model))
            check_top_k(self.top_k, state.vocab_size)
            self._checked = True
        depth = min(state.num_heads, state.num_tokens, self.max_depth or state.num_heads)
        if depth == 0:  # the loop verifies no draft token this step
            return DraftTree(tokens=state.input_ids.new_zeros(state.batch_size, 0), layout=tree_from_parents((-1,)))
        logits = state.draft_logits()[:, :depth].float()  # (B, D, V)
        logprobs, tokens = torch.log_softmax(logits, dim=-1).topk(min(self.top_k, self.num_nodes), dim=-1)
        live = state.live if bool(state.live.any()) else torch.ones_like(state.live)
        if self.ngram is not None and self.ngram._checked_vocab is None:
            self.ngram._check_vocab(state.vocab_size)
        contexts = self._contexts(state) if self.ngram is not None else None
        parents, tokens_of_node = grow_tree(
            logprobs, tokens, live, self.num_nodes, self.log_min, self._ngram_scorer(contexts) if contexts else None,
            self.alpha,
        )  # fmt: skip
        return DraftTree(tokens=tokens_of_node, layout=tree_from_parents(parents, state.hidden.device))

    # ------------------------------------------------------------------ n-gram
    def _contexts(self, state: DraftState) -> list[Any]:
        """The KenLM state after each row's last `n - 1` committed tokens."""
        ngram = self.ngram
        starts = leading_pads(state.input_ids, state.lengths, self.pad_token_id).tolist()
        ends = state.lengths.tolist()
        width = ngram.order - 1
        rows = []
        for b in range(state.batch_size):
            begin = max(starts[b], ends[b] - width)
            rows.append(ngram.context_state(state.input_ids[b, begin : ends[b]].tolist() if width > 0 else []))
        return rows

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
) -> tuple[tuple[int, ...], torch.LongTensor]:
    """
    The best `num_nodes` nodes of the top-k lattice by mean path confidence over the live rows, as a tree.

    Args:
        logprobs, tokens (`(batch, D, k)`): each head's top-k log-probabilities (descending) and tokens.
        live (`(batch,)`): rows whose confidence counts.
        num_nodes (`int`): node budget; `log_min`: drop nodes whose log mean confidence is below it.
        ngram_score (`Callable`, *optional*): `(row, parent_state or None, token) -> (log10 prob, state)`.
        alpha (`float`): n-gram weight (with `ngram_score`).
    Returns:
        `(parents, node_tokens)`: parent pointers (the root first, `-1`; nodes by depth, best first) and each
        non-root node's token per row `(batch, W - 1)`.
    """
    batch, depth, k = logprobs.shape
    rows = torch.nonzero(live).flatten()
    log_rows = math.log(max(len(rows), 1))
    head_weight = 1.0 - alpha if ngram_score is not None else 1.0
    levels = []  # per depth: (parent candidate in the level above (m*k,), rank (m*k,), row scores (B, m*k), key)
    prev_scores = torch.zeros(batch, 1)
    prev_states: list[list[Any]] | None = [[None] for _ in range(batch)] if ngram_score is not None else None
    kept = torch.zeros(1, dtype=torch.long)
    for d in range(depth):
        m = kept.numel()
        parent = kept.repeat_interleave(k)  # (m*k,) index into the level above
        rank = torch.arange(k).repeat(m)
        scores = prev_scores[:, parent] + head_weight * logprobs[:, d, rank].cpu()  # (B, m*k)
        states = None
        if ngram_score is not None:
            toks = tokens[:, d, rank].tolist()
            states = [[None] * len(rank) for _ in range(batch)]
            extra = torch.zeros(batch, len(rank))
            par = parent.tolist()
            for b in rows.tolist():
                for c in range(len(rank)):
                    log10, out = ngram_score(b, prev_states[b][par[c]], toks[b][c])
                    extra[b, c] = alpha * LN10 * log10
                    states[b][c] = out
            scores = scores + extra
        key = torch.logsumexp(scores[rows], dim=0) - log_rows  # (m*k,) log mean confidence
        levels.append((parent, rank, key))
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
    order = torch.argsort(keys, descending=True, stable=True)[:num_nodes]
    order = order[keys[order] >= log_min]
    chosen = sorted(order.tolist(), key=lambda c: (int(level_of[c]), -float(keys[c]), c))
    node_of = {c: w + 1 for w, c in enumerate(chosen)}
    parents, heads, ranks, paths = [-1], [], [], []
    for c in chosen:
        d = int(level_of[c])
        local = c - int(offset[d])
        parent_local = int(levels[d][0][local])
        parents.append(0 if d == 0 else node_of[int(offset[d - 1]) + parent_local])
        heads.append(d)
        ranks.append(int(levels[d][1][local]))
    head = torch.tensor(heads, dtype=torch.long, device=tokens.device)
    rank = torch.tensor(ranks, dtype=torch.long, device=tokens.device)
    return tuple(parents), tokens[:, head, rank]


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
