"""
The default drafter of a checkpoint (`"auto"`): the heads' draft tree, prompt lookup merged in as one more branch,
and a verify width chosen each step from the measured cost of the forward pass.

Each step, [`AutoDrafter`]:

1. grows the heads' dynamic tree ([`DynamicTreeDrafter`], its `num_nodes` the most it may verify) and gives every
   node its calibrated acceptance (path) probability per row: the product of the per-depth conditional rates of the
   node's head log-probability ([`ConfidenceCalibration`], fitted on the checkpoint's tuning prompts);
2. looks the row's last tokens up in its own prompt and output ([`find_context_match`]) and merges the match as one
   more branch, up to `max_depth` tokens deep (deeper than the heads: prompt lookup copies long spans); a match node's
   probability is [`MatchCalibration`]'s rate for its depth and the row's suffix match length; a tree node on the
   match's path takes the larger of the two;
3. keeps the `N` most probable nodes, `N` (0 included: a plain greedy step) maximising the expected tokens per
   second `(1 + sum of the kept nodes' probabilities) / (step cost(N + 1) + draft cost)`
   (`hf_bpd.drafters.verify_width`), with the step cost from the base forward's measured cost curve
   ([`~hf_bpd.cost.ForwardCost.for_model`], measured once per machine / model / dtype / thread count and cached),
   corrected while generating by the observed seconds of the steps of each width (the loop's own work included), and
   the draft cost this drafter's own time. The match probabilities are corrected per row as the text shows how often
   its matches are right (see [`AutoDrafter`], "Learning while generating").

Merge or switch (`rule`): merging lets the width chooser weigh the match against the tree's nodes; switching
(`rule="both"`: when every live row's suffix match is `>= switch_length` the match chain replaces the tree, else
merge) also *skips the heads* on those steps: the match is looked up first and the heads' logits and tree, most of a
step's drafting time on a CPU, are computed only when needed. `tree=None` (`num_nodes` 0 in the tuner) never runs the
heads: prompt lookup with width from cost. Which pays depends on the machine and the text: `hf-bpd tune --auto`
measures the candidates (no tree, 2, 4, 8 nodes; merge or both) on the tuning prompts and keeps the fastest (on the
10M reference, fp32, 1 thread, a shared 2-core AMD EPYC: 2 nodes with "both"; `bench/results/tune_auto_10M.json`).

Batch > 1: the block has one shape, so the widest row decides (each row chooses its `N` as if alone; see
`choose_num_nodes(batch_rule="widest")`); every row still gets its own match and its own probabilities.

Uncalibrated (no `calibration` in the tree options, or no `match_calibration`): no pruning, a fixed budget: the
tree's `num_nodes` plus the match branch. Token-conditioned heads are calibrated from the log-score each node had
when the tree grew (`DraftTree.log_scores`: the head's log-probability of the node's token given its parent's
path, which the tree computes anyway; the calibration is fitted on the same quantity by
`hf_bpd_bench.tree_tune.calibrate_confidence`). With `do_sample=True` (speculative sampling) the drafter
returns the heads' sampled tree at the fixed `sampling_nodes` budget: its shape must not depend on the draws, and a
prompt-lookup branch has no proposal distribution; both keep sampling exact.
"""

from __future__ import annotations

import statistics
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..tree import DraftTree, tree_from_parents
from .base import DraftContext, Drafter
from .calibration import ConfidenceCalibration
from .context_ngram import ContextMatch, find_context_match, match_chain, merge_match, switch_to_match
from .tree import DynamicTreeDrafter
from .verify_width import choose_num_nodes, keep_columns, kept_columns

MATCH_EDGES = (2, 3, 4, 6, 8, 12)  # suffix match length bins: [1], [2], [3], [4, 5], [6, 7], [8, 11], [12+]
_COSTS: weakref.WeakKeyDictionary[Any, dict] = weakref.WeakKeyDictionary()  # base model -> {(dtype, threads): cost}


class MatchCalibration:
    """
    How likely a prompt-lookup draft token is accepted: `rates[i][d]` is the probability that the match's first
    `d + 1` tokens are all the model's, for a suffix match length in bin `i` (`edges`: a length `L` is in bin
    `sum(L >= e for e in edges)`), non-increasing in `d`. Fitted by [`MatchCalibration.fit`] on tuning prompts.

    Args:
        rates (`list[list[float]]`): `(len(edges) + 1, depth)` path acceptance rates in `[0, 1]`.
        edges (`Sequence[int]`): ascending suffix match lengths opening each bin after the first.
    """

    def __init__(self, rates: Sequence[Sequence[float]], edges: Sequence[int] = MATCH_EDGES):
        table = torch.as_tensor(rates, dtype=torch.float64)
        if table.dim() != 2 or table.shape[0] != len(edges) + 1 or table.shape[1] < 1:
            raise ValueError(
                f"match calibration rates must be a ({len(edges) + 1}, depth) table (one row per suffix-match-length "
                f"bin), got shape {tuple(table.shape)}."
            )
        if not bool(((table >= 0) & (table <= 1)).all()) or list(edges) != sorted(set(edges)):
            raise ValueError("match calibration rates must lie in [0, 1] and its edges must ascend.")
        self.rates = torch.minimum(table, table.cummin(dim=1).values)  # a path is never likelier than its prefix
        self.edges = tuple(int(e) for e in edges)

    def probs(self, length: torch.LongTensor, depth: torch.LongTensor) -> torch.DoubleTensor:
        """`(..)` path probabilities of match nodes at 1-based `depth` for rows with suffix match `length` (0 where
        `length == 0`)."""
        edges = torch.tensor(self.edges, dtype=torch.long)
        bins = torch.bucketize(length.cpu().contiguous(), edges, right=True)
        d = (depth.cpu() - 1).clamp(0, self.rates.shape[1] - 1)
        value = self.rates[bins, d]
        return torch.where((length.cpu() > 0) & (depth.cpu() <= self.rates.shape[1]), value, 0.0)

    def conditional(self, length: torch.LongTensor) -> torch.DoubleTensor:
        """`(batch, depth)` conditional rates: the chance that match token `d + 1` is the model's given that tokens
        `1 .. d` were, for rows with suffix match `length` (0 for rows without a match)."""
        edges = torch.tensor(self.edges, dtype=torch.long)
        path = self.rates[torch.bucketize(length.cpu().contiguous(), edges, right=True)]  # (B, depth)
        before = torch.cat([path.new_ones(path.shape[0], 1), path[:, :-1]], dim=1)
        cond = torch.where(before > 0, path / before.clamp(min=1e-12), 0.0)
        return torch.where((length.cpu() > 0)[:, None], cond, 0.0)

    def to_dict(self) -> dict[str, Any]:
        return {"rates": [[round(float(v), 4) for v in row] for row in self.rates], "edges": list(self.edges)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MatchCalibration:
        return cls(data["rates"], data.get("edges", MATCH_EDGES))

    @classmethod
    def fit(
        cls,
        lengths: Sequence[int],
        accepted: Sequence[int],
        depth: int,
        edges: Sequence[int] = MATCH_EDGES,
        prior: float = 2.0,
    ) -> MatchCalibration:
        """
        Rates from observations: each one a suffix match length and how many of the match's tokens equalled the
        model's next tokens. Each bin is smoothed toward the pooled rate of its depth (`prior` pseudo-counts).
        """
        length = torch.as_tensor(list(lengths), dtype=torch.long)
        acc = torch.as_tensor(list(accepted), dtype=torch.long)
        bins = torch.bucketize(length, torch.tensor(list(edges), dtype=torch.long), right=True)
        d = torch.arange(1, depth + 1)
        hit = (acc[:, None] >= d[None]).double()  # (n, depth)
        pooled = (hit.sum(0) + 0.5) / (hit.shape[0] + 1.0)
        rows = []
        for i in range(len(edges) + 1):
            mine = hit[bins == i]
            rows.append(((mine.sum(0) + prior * pooled) / (mine.shape[0] + prior)).tolist())
        return cls(rows, edges)


def _cost_of(model: Any, cost: Any) -> Callable[[float], float]:
    """The forward's cost curve: given (a callable, or `[[width, seconds], ...]`), else measured once per process
    (and cached on disk by `ForwardCost.for_model`)."""
    from ..cost import ForwardCost

    if callable(cost):
        return cost
    if isinstance(cost, ForwardCost):
        return cost.cost
    if cost is not None:
        pairs = sorted((int(w), float(s)) for w, s in cost)
        return ForwardCost(widths=tuple(w for w, _ in pairs), seconds=tuple(s for _, s in pairs), key={}).cost
    base = getattr(model, "base", model)
    key = (str(base.dtype), str(base.device), torch.get_num_threads())
    curves = _COSTS.setdefault(base, {})
    if key not in curves:
        curves[key] = ForwardCost.for_model(model)
    return curves[key].cost


def _memoised(curve: Callable[[float], float]) -> Callable[[float], float]:
    """The curve with its values kept (the width chooser asks for the same few widths every step)."""
    seen: dict[float, float] = {}

    def cost(width: float) -> float:
        if width not in seen:
            seen[width] = curve(width)
        return seen[width]

    return cost


class AutoDrafter(Drafter):
    """
    Heads tree + prompt-lookup branch + verify width from cost (see the module docstring). Built from a checkpoint's
    spec `{"type": "auto", ...}` (`BPDConfig.drafter`, written by `hf-bpd tune --auto`).

    Args:
        model ([`~hf_bpd.BPDForCausalLM`]): whose forward cost is measured (at first use).
        tree (`dict`, *optional*): [`DynamicTreeDrafter`] options (`num_nodes`: the widest tree, `top_k`,
            `calibration`); None: no heads tree (prompt lookup with width from cost).
        context (`dict`, *optional*): prompt-lookup options (`max_ngram`, `min_ngram`, `max_depth`, `cyclic`);
            None: no prompt lookup.
        match_calibration ([`MatchCalibration`] or its `to_dict()`, *optional*).
        cost (`Callable[[float], float]`, [`~hf_bpd.cost.ForwardCost`] or `[[width, seconds], ...]`, *optional*):
            the forward cost curve; default: measured for this machine.
        rule (`str`, defaults to `"merge"`): `"merge"` or `"both"` (switch on a long match, else merge).
        switch_length (`int`, defaults to 4): with `rule="both"`.
        sampling_nodes (`int`, defaults to 8): the fixed tree budget when sampling.
        width_from_cost (`bool`, defaults to True): False verifies the fixed budget (for comparison).
        adapt (`bool`, defaults to True): learn while generating (see "Learning while generating" below); False
            trusts the fitted calibration and the measured curve as they are.
        adapt_prior (`float`, defaults to 4.0): pseudo-observations behind the fitted match calibration (how many
            match tokens a row must show before its own rate moves halfway from the fitted one).
        idle_after (`int`, defaults to 3), max_skip (`int`, defaults to 16): with width from cost, after
            `idle_after` steps in a row where no heads-tree node was worth verifying on its own (none kept, or only
            where the match proposed the same token with a higher probability), the heads are not run for the
            next `2 ** (idle - idle_after)` steps (at most `max_skip`; 0 never skips), then tried again: text
            where the heads do not pay stops paying for their drafting.

    Learning while generating (`adapt=True`). Two estimates are fitted away from the text at hand and are corrected by
    what each step reveals:

    - *Acceptance, per row and source (the match; the heads' tree).* The calibrations are fitted on tuning prompts of
      every kind, so they overrate matches in prose and underrate them in code. After each step the row's newly
      committed tokens show which of the last step's drafts were the model's (verified or not: a pruned node is still
      checked against the text). A row's conditional rates of a source are scaled by `(hits + adapt_prior) /
      (expected + adapt_prior)`, `expected` the sum of the fitted conditional rates of the nodes it could check: a
      shrinkage of the row's rate toward the fitted one.
    - *Step cost, per width.* A step costs its forward, its drafting and the loop's own work (scoring, acceptance,
      cache bookkeeping). The time between two steps, less the drafting, is kept per verify width; a width not seen
      yet is the measured curve scaled by the median ratio of observed to measured seconds (see `step_cost`).
    """

    def __init__(
        self,
        model: Any = None,
        tree: dict | None = None,
        context: dict | None = None,
        match_calibration: MatchCalibration | dict | None = None,
        cost: Any = None,
        rule: str = "merge",
        switch_length: int = 4,
        sampling_nodes: int = 8,
        width_from_cost: bool = True,
        adapt: bool = True,
        adapt_prior: float = 4.0,
        idle_after: int = 3,
        max_skip: int = 16,
    ):
        if rule not in ("merge", "both"):
            raise ValueError(f"AutoDrafter rule must be 'merge' or 'both', got {rule!r}.")
        if tree is None and context is None:
            raise ValueError("AutoDrafter needs `tree` (heads tree options), `context` (prompt lookup), or both.")
        self.model, self.rule, self.switch_length = model, rule, int(switch_length)
        self.tree = DynamicTreeDrafter(**tree) if tree is not None else None
        self.sampler = DynamicTreeDrafter(num_nodes=sampling_nodes, top_k=min(8, sampling_nodes))
        context = dict(context or {}) if context is not None else None
        self.context = context
        self.max_depth = int(context.get("max_depth", 10)) if context is not None else None
        if isinstance(match_calibration, dict):
            match_calibration = MatchCalibration.from_dict(match_calibration)
        self.match_calibration = match_calibration
        self._cost_spec, self._cost = cost, None
        self.width_from_cost = bool(width_from_cost)
        if not adapt_prior > 0:
            raise ValueError(f"adapt_prior must be > 0 (pseudo-observations), got {adapt_prior!r}.")
        self.adapt, self.adapt_prior = bool(adapt), float(adapt_prior)
        if idle_after < 1 or max_skip < 0:
            raise ValueError(f"Need idle_after >= 1 and max_skip >= 0, got {idle_after} and {max_skip}.")
        self.idle_after, self.max_skip = int(idle_after), int(max_skip)
        nodes = max(self.tree.num_nodes if self.tree is not None else 0, sampling_nodes)
        self.max_block_width = nodes + (self.max_depth or 0) + 1
        self.reset()

    @property
    def calibrated(self) -> bool:
        """Whether node probabilities are known (else the fixed budget is verified)."""
        tree_ok = self.tree is None or self.tree.calibration is not None
        return self.width_from_cost and tree_ok and (self.context is None or self.match_calibration is not None)

    def reset(self) -> None:
        self.widths: list[int] = []
        self.draft_s = 0.0
        self.total_propose_s = 0.0  # all of propose's own time (drafting and choosing the width), for profiling
        self._last: tuple[float, int, float] | None = None  # (start time, width, draft seconds) of the last step
        self.step_s: dict[int, deque] = {}  # verify width -> the last observed seconds of a step beyond drafting
        self._ratios: deque = deque(maxlen=9)  # the last steps' observed / measured seconds
        self._scale = 1.0  # their median
        self._idle = self._skip = 0  # steps in a row the heads' tree was not worth verifying; steps left unrun
        self._tree_probs_own: torch.Tensor | None = None  # this step's heads-tree node probabilities, if it ran
        self._drafted: dict[str, tuple] = {}  # source -> the last step's (paths, depth, cond, lengths), to score
        self.hits: dict[str, torch.Tensor] = {}  # source ("match", "tree") -> (B,) drafts right so far, per row
        self.expected: dict[str, torch.Tensor] = {}  # source -> (B,) how many the fitted calibration expected
        for drafter in (self.tree, self.sampler):
            if drafter is not None:
                drafter.reset()

    def update(self, accepted_lengths: torch.LongTensor, chosen: torch.LongTensor) -> None:
        if self.tree is not None:
            self.tree.update(accepted_lengths, chosen)

    def propose(self, ctx: DraftContext) -> DraftTree:
        if ctx.sampling:  # exact: a shape fixed before the draws, no deterministic branch
            return self.sampler.propose(ctx)
        start = time.perf_counter()
        self._track_step_cost(start)
        with torch.no_grad():
            if self.adapt:
                self._score_last_drafts(ctx)
            tree, probs = self._candidates(ctx)
            draft_s = time.perf_counter() - start
            self.draft_s = draft_s if not self.widths else 0.8 * self.draft_s + 0.2 * draft_s
            if probs is not None and tree.layout.width > 1:
                choice = choose_num_nodes(probs, self.step_cost, self.draft_s, ctx.live, "widest")
                kept = kept_columns(tree, probs, choice.num_nodes, ctx.live)
                self._track_tree_use(kept, probs)
                tree = keep_columns(tree, kept)  # what prune_tree does, the columns chosen once
            elif self._tree_probs_own is not None:  # the heads ran and nothing was worth verifying
                self._track_tree_use([], probs)
        self.widths.append(tree.layout.width - 1)
        self._last = (start, tree.layout.width, time.perf_counter() - start)
        self.total_propose_s += self._last[2]
        return tree

    # ------------------------------------------------------------------ pieces
    def _curve(self) -> Callable[[float], float]:
        if self._cost is None:
            self._cost = _memoised(_cost_of(self.model, self._cost_spec))
        return self._cost

    @property
    def overhead_s(self) -> float:
        """Observed seconds of a step beyond its forward and drafting (scoring, acceptance, cache bookkeeping),
        averaged over the widths seen (0 before any step)."""
        if not self.step_s:
            return 0.0
        curve = self._curve()
        return sum(self.step_cost(w) - curve(w) for w in self.step_s) / len(self.step_s)

    def step_cost(self, width: float) -> float:
        """
        Seconds of a step verifying `width` tokens, drafting excluded. With `adapt`: the measured forward cost
        scaled by the median observed / measured ratio of the last steps; for a width seen at least twice, the least
        of its last three observations (a step is never faster than it can be, so the least is the estimate least
        hurt by a pause; a width seen once counts only when it is cheaper than the scaled curve, so one slow step
        never locks a width out).
        """
        width = int(width)
        scaled = self._curve()(width) * self._scale
        seen = self.step_s.get(width)
        if not seen:
            return scaled
        return min(seen) if len(seen) >= 2 else min(seen[0], scaled)

    def _track_step_cost(self, now: float) -> None:
        """The last step's seconds beyond its drafting (the time since its start, less the drafting), kept per width
        and as a ratio to the measured curve (see the class docstring)."""
        if self._last is None or not self.calibrated or not self.adapt:
            return
        began, width, drafted = self._last
        seconds = max(now - began - drafted, 1e-6)
        self.step_s.setdefault(width, deque(maxlen=3)).append(seconds)
        self._ratios.append(seconds / self._curve()(width))
        self._scale = statistics.median(self._ratios)  # once per step (the chooser asks for every width)

    def _track_tree_use(self, kept: list[int], probs: torch.Tensor | None) -> None:
        """Whether this step kept a heads-tree node on its own merit (its tree probability the node's best), and the
        back-off that follows (see `idle_after`)."""
        own = self._tree_probs_own
        if own is None or probs is None or not self.max_skip:
            return
        columns = [c for c in kept if c < own.shape[1]]
        used = bool(columns) and bool(((own[:, columns] >= probs[:, columns]) & (own[:, columns] > 0)).any())
        self._idle = 0 if used else self._idle + 1
        if self._idle >= self.idle_after:
            self._skip = min(2 ** (self._idle - self.idle_after), self.max_skip)

    def _score_last_drafts(self, ctx: DraftContext) -> None:
        """Score the last step's match and tree nodes against the tokens committed since (see the class
        docstring): per row and source, the nodes that could be checked, how many were right, and how many the
        fitted calibration expected to be."""
        for source, (paths, depth, cond, lengths) in self._drafted.items():
            if paths.shape[0] != ctx.batch_size:
                continue
            hits, expected = _score_against_text(ctx, paths, depth, cond, lengths)
            if source not in self.hits or self.hits[source].shape[0] != ctx.batch_size:
                self.hits[source], self.expected[source] = torch.zeros_like(hits), torch.zeros_like(expected)
            self.hits[source] += hits
            self.expected[source] += expected
        self._drafted = {}  # each draft is scored once

    def _row_factor(self, source: str, batch: int) -> torch.DoubleTensor | None:
        """`(B,)` each row's observed / expected right drafts of `source`, shrunk toward 1 by `adapt_prior`."""
        if not self.adapt or source not in self.hits or self.hits[source].shape[0] != batch:
            return None
        prior = self.adapt_prior
        return (self.hits[source] + prior) / (self.expected[source] + prior)

    def _candidates(self, ctx: DraftContext) -> tuple[DraftTree, torch.Tensor | None]:
        """The full candidate tree and each node's probability per row `(B, W - 1)` (None: uncalibrated). The match
        comes first: when it replaces the tree (`rule="both"`, every live row's match long), the heads are never run
        (their logits and the tree are most of a step's drafting time)."""
        # conditioned heads: calibrated from the node scores the tree drafter records (no per-head logits exist)
        calibrated = self.calibrated and (
            ctx.independent or self.tree is None or getattr(self.tree, "records_log_scores", False)
        )
        self._lengths = ctx.lengths.cpu().clone()  # the loop advances `lengths` in place
        self._tree_probs_own = None
        resting = self._skip > 0 and calibrated and self.context is not None  # the heads did not pay lately
        self._skip = max(self._skip - 1, 0)
        match = switched = None
        if self.context is not None:
            depth = min(ctx.max_tokens, self.max_depth)
            options = {k: v for k, v in self.context.items() if k in ("max_ngram", "min_ngram", "cyclic")}
            match = find_context_match(ctx.tokens, ctx.lengths, ctx.prompt_start, depth, ctx.live, **options)
            if self.rule == "both":
                empty = DraftTree(tokens=ctx.tokens.new_zeros(ctx.batch_size, 0), layout=tree_from_parents((-1,)))
                switched = switch_to_match(empty, match, self.switch_length, depth, ctx.live)
        if switched is not None:
            tree, probs = switched, torch.zeros(ctx.batch_size, 0, dtype=torch.float64)
        elif self.tree is not None and ctx.num_tokens > 0 and not resting:
            tree = self.tree.propose(ctx)
            if calibrated and not ctx.independent and tree.log_scores is None:  # e.g. a sampled tree: no scores
                calibrated = False
            probs = self._tree_probs(ctx, tree) if calibrated else None
            self._tree_probs_own = probs
        else:
            tree = DraftTree(tokens=ctx.tokens.new_zeros(ctx.batch_size, 0), layout=tree_from_parents((-1,)))
            probs = torch.zeros(ctx.batch_size, 0, dtype=torch.float64)
        if match is None:
            return tree, probs
        if switched is None and tree.layout.width == 1:  # no tree: the match chain alone, node d its d-th token
            return self._match_alone(match, depth, calibrated)
        merged = tree if switched is not None else merge_match(tree, match, depth)
        if not calibrated:
            return merged, None
        probs = torch.cat([probs, probs.new_zeros(ctx.batch_size, merged.layout.width - 1 - probs.shape[1])], 1)
        return merged, self._with_match(merged, probs, match)

    def _match_alone(self, match: ContextMatch, depth: int, calibrated: bool) -> tuple[DraftTree, torch.Tensor | None]:
        """The match chain and its nodes' probabilities without a tree to merge into (what `merge_match` and
        `_with_match` give for a root-only tree, without their path comparisons: most of a step's drafting time on
        a small model)."""
        chain = match_chain(match, depth)
        width = chain.layout.width - 1
        if not calibrated:
            return chain, None
        probs = torch.zeros(match.tokens.shape[0], width, dtype=torch.float64)
        if width:
            path = self._match_path_probs(match)
            cols = min(width, path.shape[1])
            probs[:, :cols] = path[:, :cols]
            probs = torch.where(torch.arange(width)[None] < match.num_found_tokens.cpu()[:, None], probs, 0.0)
        return chain, probs

    def _with_match(self, tree: DraftTree, probs: torch.Tensor, match: ContextMatch) -> torch.Tensor:
        """Nodes on a row's match path get at least the match's calibrated probability."""
        layout = tree.layout
        if layout.width == 1:
            return probs
        paths = tree.path_drafts()[:, layout.draft_of_node[1:]].cpu()  # (B, W - 1, D): a path through each node
        d = paths.shape[-1]
        want = torch.full((paths.shape[0], d), -2, dtype=torch.long)
        m = min(d, match.tokens.shape[1])
        want[:, :m] = match.tokens[:, :m].cpu()
        depth = layout.depth[1:].cpu()
        inside = torch.arange(d)[None] < depth[:, None]  # (W - 1, D)
        on_path = ((paths == want[:, None]) | ~inside[None]).all(-1) & (
            depth[None] <= match.num_found_tokens.cpu()[:, None]
        )
        path = self._match_path_probs(match)  # (B, depth of the calibration)
        column = (depth - 1).clamp(max=path.shape[1] - 1)[None].expand(path.shape[0], -1)
        rate = torch.where(depth[None] <= path.shape[1], path.gather(1, column), 0.0)
        return torch.where(on_path, torch.maximum(probs, rate), probs)

    def _match_path_probs(self, match: ContextMatch) -> torch.DoubleTensor:
        """`(B, depth)` each row's path probability of its match's first `d + 1` tokens: the fitted conditional rates,
        scaled by the row's own record (with `adapt`), multiplied along the path."""
        cond = self.match_calibration.conditional(match.length.cpu())
        batch, depth = cond.shape
        if self.adapt:  # the match as a chain of `depth` nodes, scored next step
            tokens = match.tokens.cpu()[:, :depth]
            if tokens.shape[1] < depth:
                tokens = torch.cat([tokens, tokens.new_full((batch, depth - tokens.shape[1]), -1)], dim=1)
            paths = tokens[:, None, :].expand(batch, depth, depth)
            self._drafted["match"] = (paths, torch.arange(1, depth + 1), cond, self._lengths)
        factor = self._row_factor("match", batch)
        if factor is not None:
            cond = (cond * factor[:, None]).clamp(max=1.0)
        return cond.cumprod(dim=1)

    def _tree_probs(self, ctx: DraftContext, tree: DraftTree) -> torch.Tensor:
        """Calibrated path probabilities `(B, W - 1)` of a heads' tree: per node, the calibrated conditional rate of
        its head's log-probability of its token (given its parent's path) (scaled by the row's record, with `adapt`),
        multiplied along its path."""
        layout = tree.layout
        width = layout.width
        if width == 1 or self.tree.calibration is None:
            return torch.zeros(ctx.batch_size, width - 1, dtype=torch.float64)
        depth = layout.depth[1:].cpu()
        cal = _tree_log_conditional(ctx, tree, self.tree.calibration)  # (B, W - 1)
        if self.adapt:
            paths = tree.path_drafts()[:, layout.draft_of_node[1:]].cpu()  # (B, W - 1, D)
            self._drafted["tree"] = (paths, depth, cal.exp(), self._lengths)
        factor = self._row_factor("tree", ctx.batch_size)
        if factor is not None:
            cal = (cal + factor.log()[:, None]).clamp(max=0.0)
        ancestors = layout.visible[1:, 1:].cpu().double()  # (W - 1, W - 1): node w's path, itself included
        return (cal @ ancestors.T).exp()  # the path sum of each node's calibrated log conditional rates


def _tree_log_conditional(ctx: DraftContext, tree: DraftTree, calibration: ConfidenceCalibration) -> torch.Tensor:
    """`(B, W - 1)` per node, the calibrated log conditional rate of its head's log-probability of its token (given
    its parent's path: the tree's recorded `log_scores`, the only source for token-conditioned heads)."""
    depth = tree.layout.depth[1:].cpu()
    if tree.log_scores is not None:
        own = tree.log_scores.cpu()
    else:
        logp, ids = ctx.draft_log_probs(int(depth.max()))  # (B, D, K): the heads' tokens are draft-vocabulary ids
        tokens = tree.tokens.to(logp.device)
        column = tokens if ids is None else ctx.heads.draft_inverse_map.to(logp.device)[tokens]
        own = logp[:, depth.to(logp.device) - 1].gather(2, column.clamp(min=0)[:, :, None])[:, :, 0]
        if ids is not None:  # a token outside the draft vocabulary (none from the heads) has probability 0
            own = torch.where(column >= 0, own, torch.finfo(own.dtype).min)
        own = own.cpu()
    cal = torch.empty(ctx.batch_size, depth.numel(), dtype=torch.float64)
    for d in depth.unique().tolist():  # one calibration lookup per depth, not per node
        at = depth == d
        cal[:, at] = calibration.log_confidence(int(d) - 1, own[:, at]).double()
    return cal


def _score_against_text(
    ctx: DraftContext,
    paths: torch.LongTensor,
    depth: torch.LongTensor,
    cond: torch.Tensor,
    lengths: torch.LongTensor,
) -> tuple[torch.DoubleTensor, torch.DoubleTensor]:
    """
    Last step's draft nodes checked against the tokens committed since (whether verified or pruned: the text shows
    what the model wrote). A node can be checked when the row committed its depth and its parent's path was right.

    Args:
        paths (`(B, N, D)`): each node's path tokens (positions past its depth ignored; `-1` for no token).
        depth (`(N,)`): 1-based node depths.
        cond (`(B, N)`): each node's fitted conditional acceptance rate.
        lengths (`(B,)`): the rows' committed lengths when the nodes were drafted.
    Returns:
        `(hits, expected)`, each `(B,)` float64: nodes right, and the sum of the checked nodes' `cond` (capped at 1).
    """
    batch, _, d = paths.shape
    k = torch.arange(d)
    index = (lengths[:, None] + k).clamp(max=ctx.tokens.shape[1] - 1).to(ctx.tokens.device)
    actual = ctx.tokens.gather(1, index).cpu()  # (B, D): what the row committed after `lengths`
    same = paths == actual[:, None]  # (B, N, D)
    right = (same | (k[None] >= depth[:, None])[None]).all(dim=-1)
    parent_right = (same | (k[None] >= depth[:, None] - 1)[None]).all(dim=-1)
    own = paths.gather(2, (depth - 1).clamp(min=0)[None, :, None].expand(batch, -1, 1))[..., 0]
    known = depth[None] <= (ctx.lengths.cpu() - lengths)[:, None]
    trial = known & parent_right & (own >= 0)
    return (right & trial).sum(dim=1).double(), (cond.double().clamp(max=1.0) * trial).sum(dim=1)
