"""Draft refinement: drafters and rescorers that change BPD drafts (never the output).

`kenlm` is imported lazily: importing this package never needs it, only building an `NgramRescorer` does.
"""

from typing import Any

from .base import Drafter, DraftRescorer, Drafts, DraftState, HeadsDrafter, sample_chains
from .defaults import RESCORER_DEFAULTS, RescorerDefaults
from .lattice import LatticeRescorer, TopKLattice, pbest_paths
from .neural import NeuralRescorer
from .ngram import NgramRescorer, is_kenlm_available, ngram_pbest
from .oracle import OracleDrafter
from .pbest import PBestRescorer
from .tree import ConfidenceCalibration, DynamicTreeDrafter, StaticTreeDrafter, build_static_tree, sample_tree

__all__ = [
    "ConfidenceCalibration",
    "DraftRescorer",
    "DraftState",
    "Drafter",
    "DynamicTreeDrafter",
    "Drafts",
    "HeadsDrafter",
    "LatticeRescorer",
    "NeuralRescorer",
    "NgramRescorer",
    "OracleDrafter",
    "PBestRescorer",
    "RESCORER_DEFAULTS",
    "RescorerDefaults",
    "StaticTreeDrafter",
    "TopKLattice",
    "TuningResult",
    "build_static_tree",
    "is_kenlm_available",
    "ngram_pbest",
    "pbest_paths",
    "sample_chains",
    "sample_tree",
    "tune_rescorer",
]


def __getattr__(name: str) -> Any:
    # The tuning tool lives in `hf_bpd.tools.tune`; its two public names stay importable from here.
    if name in ("tune_rescorer", "TuningResult"):
        from ..tools import tune

        return getattr(tune, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
