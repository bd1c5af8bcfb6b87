"""
How drafts are proposed: one contract, `Drafter.propose(ctx: DraftContext) -> DraftTree`, and the drafters.

- [`HeadsDrafter`]: the heads' own chain (the default).
- [`SearchDrafter`]: a beam / greedy search over per-path head scores, rescored by `hf_bpd.logits` hooks (every
  head type).
- Kim et al.'s lattice drafters, exact for independent heads: [`PBestRescorer`], [`NgramRescorer`],
  [`NeuralRescorer`].
- Trees: [`StaticTreeDrafter`], [`DynamicTreeDrafter`]. Prompt lookup: [`ContextNgramDrafter`] (alone, or merged
  into / switched with another drafter's tree). The composed default [`AutoDrafter`] (`"auto"`): heads tree + prompt
  lookup + a verify width chosen each step from the measured forward cost (`verify_width`). Diagnostics: [`OracleDrafter`], [`CompareUnrefined`].

`DRAFTERS` names them for `build_drafter(model, spec)` and `BPDConfig.drafter`. A new drafter is one file plus a
registry entry.
"""

from .auto import AutoDrafter, MatchCalibration
from .base import (
    ChainDrafter,
    DraftContext,
    Drafter,
    DraftHeadsView,
    DraftRescorer,
    Drafts,
    DraftState,
    HeadsDrafter,
    TimingStats,
    as_draft_tree,
    check_drafter_heads,
    checked_tree,
    sample_chains,
)
from .compare import CompareUnrefined
from .context_ngram import ContextNgramDrafter
from .lattice import LatticeRescorer
from .neural import NeuralRescorer
from .ngram import NgramRescorer
from .oracle import OracleDrafter
from .pbest import PBestRescorer
from .registry import DRAFTERS, build_drafter
from .search import SearchDrafter
from .tree import ConfidenceCalibration, DynamicTreeDrafter, StaticTreeDrafter, build_static_tree, sample_tree

__all__ = [
    "DRAFTERS",
    "AutoDrafter",
    "ContextNgramDrafter",
    "MatchCalibration",
    "ChainDrafter",
    "CompareUnrefined",
    "ConfidenceCalibration",
    "DraftContext",
    "DraftHeadsView",
    "DraftRescorer",
    "DraftState",
    "Drafter",
    "Drafts",
    "DynamicTreeDrafter",
    "HeadsDrafter",
    "LatticeRescorer",
    "NeuralRescorer",
    "NgramRescorer",
    "OracleDrafter",
    "PBestRescorer",
    "SearchDrafter",
    "StaticTreeDrafter",
    "TimingStats",
    "as_draft_tree",
    "build_drafter",
    "build_static_tree",
    "check_drafter_heads",
    "checked_tree",
    "sample_chains",
    "sample_tree",
]
