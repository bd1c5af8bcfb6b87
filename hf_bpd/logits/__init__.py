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
    "ConfidenceCalibration", "DraftContext", "DraftRescorer", "DraftState", "Drafter", "Drafts", "DynamicTreeDrafter",
    "HeadsDrafter", "LatticeRescorer", "NeuralRescorer", "NgramRescorer", "OracleDrafter", "PBestRescorer",
    "SearchDrafter", "StaticTreeDrafter", "build_static_tree", "sample_chains", "sample_tree",
)  # fmt: skip

__all__ = [
    "NeuralHook", "NgramHook", "RefinementHook", "TopKLattice", "is_kenlm_available", "ngram_pbest", "pbest_paths",
    *_DRAFTER_NAMES, "RESCORER_DEFAULTS", "RescorerDefaults", "TuningResult", "tune_rescorer",
]  # fmt: skip


def __getattr__(name: str) -> Any:
    if name in _DRAFTER_NAMES:  # moved to hf_bpd.drafters (imported on use: the drafters import this package)
        from .. import drafters

        return getattr(drafters, name)
    if name in ("RESCORER_DEFAULTS", "RescorerDefaults"):
        from . import defaults

        return getattr(defaults, name)
    if name in ("tune_rescorer", "TuningResult"):  # the tuning tool lives in `hf_bpd.tools.tune`
        from ..tools import tune

        return getattr(tune, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
