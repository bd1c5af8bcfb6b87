"""Per-depth confidence calibration of the dynamic tree's nodes (`DynamicTreeDrafter(calibration=...)`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

# Score bins of a confidence calibration: a node's own log-score (head log-probability, or the head / n-gram mix).
CALIBRATION_EDGES = (-8.0, -6.0, -5.0, -4.0, -3.0, -2.5, -2.0, -1.5, -1.0, -0.6, -0.3)


class ConfidenceCalibration:
    """
    Per-depth calibration of the dynamic tree's node confidence: `rate[j][b]` is how often a node at depth `j + 1`
    whose own log-score (head log-probability, or `(1 - alpha) * head + alpha * n-gram`) falls in bin `b` carried
    the base model's token, *given that its parent's path did* (measured on calibration prompts by
    `hf_bpd_bench.tree_tune.calibrate_confidence`). A node's calibrated confidence is the product of these
    conditional rates along its path: an estimate of the chance that verification accepts it.

    Raw head probabilities are a poor estimate with weak heads: deeper heads are uncertain everywhere, but where the
    first tokens were right the next ones often are too (easy passages), so the raw product falls much faster with
    depth than acceptance does and a fixed budget ends wide and shallow.

    Args:
        rates (`list[list[float]]`): `(h, len(edges) + 1)` conditional acceptance rates in `(0, 1]`, non-decreasing
            along each row (bins by score, low to high).
        edges (`Sequence[float]`): ascending bin edges over the node log-score (bin `b` holds scores in
            `[edges[b - 1], edges[b])`).
    """

    def __init__(self, rates: Sequence[Sequence[float]], edges: Sequence[float] = CALIBRATION_EDGES):
        table = torch.as_tensor(rates, dtype=torch.float32)
        edge = torch.as_tensor(edges, dtype=torch.float32)
        if table.dim() != 2 or table.shape[0] < 1 or table.shape[1] != edge.numel() + 1:
            raise ValueError(
                f"rates must be an (h, {edge.numel() + 1}) table (one rate per depth and score bin), got shape "
                f"{tuple(table.shape)}."
            )
        if not bool(((table > 0) & (table <= 1)).all()) or (edge.numel() > 1 and not bool((edge.diff() > 0).all())):
            raise ValueError("rates must lie in (0, 1] and edges must ascend.")
        self.rates, self.edges = table, edge
        self.log_rates = table.log()

    @property
    def num_heads(self) -> int:
        return int(self.rates.shape[0])

    def log_confidence(self, depth: int, scores: torch.Tensor) -> torch.Tensor:
        """
        The calibrated log conditional confidence of nodes at 0-based `depth` with raw log-`scores` (`<= 0`). Within
        a bin the raw score breaks ties (`1e-3 * score`, which keeps the result `<= 0`, so confidence still only
        falls along a path).
        """
        row = self.log_rates[min(depth, self.num_heads - 1)]
        scores = scores.float().cpu()
        return row[torch.bucketize(scores, self.edges, right=True)] + 1e-3 * scores.clamp(max=0)

    def to_dict(self) -> dict[str, Any]:
        return {"rates": self.rates.tolist(), "edges": self.edges.tolist()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ConfidenceCalibration:
        return cls(data["rates"], data.get("edges", CALIBRATION_EDGES))

    @staticmethod
    def fit(
        scores: Sequence[torch.Tensor],
        hits: Sequence[torch.Tensor],
        edges: Sequence[float] = CALIBRATION_EDGES,
        prior: float = 4.0,
    ) -> ConfidenceCalibration:
        """
        Rates from observations: per depth, node log-scores and whether the node was the model's token (nodes whose
        parent path was right only). Each bin is smoothed toward the depth's overall rate (`prior` pseudo-counts)
        and made non-decreasing in the score (pool-adjacent-violators).
        """
        edge = torch.as_tensor(edges, dtype=torch.float32)
        bins = edge.numel() + 1
        rows = []
        for score, hit in zip(scores, hits):
            score, hit = torch.as_tensor(score, dtype=torch.float32), torch.as_tensor(hit, dtype=torch.float64)
            base = (float(hit.sum()) + 0.5) / (hit.numel() + 1.0)
            index = torch.bucketize(score, edge, right=True)
            n = torch.bincount(index, minlength=bins).double()
            k = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, hit)
            blocks = []  # pool adjacent violators, weighted by counts + prior
            for b in range(bins):
                blocks.append([float(k[b]) + prior * base, float(n[b]) + prior, 1])
                while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
                    hits_, total, width = blocks.pop()
                    blocks[-1][0] += hits_
                    blocks[-1][1] += total
                    blocks[-1][2] += width
            rows.append([min(max(h_ / t, 1e-4), 1.0) for h_, t, w in blocks for _ in range(w)])
        return ConfidenceCalibration(rows, edges)
