"""Draft refinement: drafters and rescorers that change BPD drafts (never the output).

`kenlm` is imported lazily: importing this package never needs it, only building an `NgramRescorer` does.
"""

from typing import Any

from .base import Drafter, DraftRescorer, Drafts, DraftState, HeadsDrafter, sample_chains
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
    "StaticTreeDrafter",
    "TopKLattice",
    "build_static_tree",
    "is_kenlm_available",
    "ngram_pbest",
    "pbest_paths",
    "sample_chains",
    "sample_tree",
]


# Moved out of the library (hf_bpd never imports the benchmark package): name the new place.
_MOVED = {
    "tune_rescorer": "hf_bpd_bench.tune",
    "TuningResult": "hf_bpd_bench.tune",
    "RESCORER_DEFAULTS": "hf_bpd_bench.defaults",
    "RescorerDefaults": "hf_bpd_bench.defaults",
}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        raise ImportError(f"hf_bpd.logits.{name} moved to the benchmark package: from {_MOVED[name]} import {name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
