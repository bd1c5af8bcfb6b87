"""
Draft refinement: the hooks that rescore draft scores given each node's prefix (`LogitsProcessor`-style,
[`NgramHook`], [`NeuralHook`]) and the maths of the heads' top-k lattice (Kim et al.).

The drafters moved to `hf_bpd.drafters`; their old names still import from here. `kenlm` is imported lazily.
"""

from typing import Any

from .hooks import NeuralHook, NgramHook, RefinementHook
from .lattice import TopKLattice, pbest_paths
from .ngram import is_kenlm_available, ngram_pbest

_DRAFTER_NAMES = (
    "ConfidenceCalibration",
    "DraftContext",
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
    "build_static_tree",
    "sample_chains",
    "sample_tree",
)

__all__ = [
    "NeuralHook",
    "NgramHook",
    "RefinementHook",
    "TopKLattice",
    "is_kenlm_available",
    "ngram_pbest",
    "pbest_paths",
    *_DRAFTER_NAMES,
]

# Moved out of the library (hf_bpd never imports the benchmark package): name the new place.
_MOVED = {
    "tune_rescorer": "hf_bpd_bench.tune",
    "TuningResult": "hf_bpd_bench.tune",
    "RESCORER_DEFAULTS": "hf_bpd_bench.defaults",
    "RescorerDefaults": "hf_bpd_bench.defaults",
}


def __getattr__(name: str) -> Any:
    if name in _DRAFTER_NAMES:  # moved to hf_bpd.drafters (imported on use: the drafters import this package)
        from .. import drafters

        return getattr(drafters, name)
    if name in _MOVED:
        raise ImportError(f"hf_bpd.logits.{name} moved to the benchmark package: from {_MOVED[name]} import {name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
