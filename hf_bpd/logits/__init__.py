"""Draft refinement: rescorers that change BPD drafts (never the output).

`kenlm` is imported lazily: importing this package never needs it, only building an `NgramRescorer` does.
"""

from typing import Any

from .base import DraftRescorer
from .lattice import LatticeRescorer, TopKLattice, pbest_paths
from .neural import NeuralRescorer
from .ngram import NgramRescorer, is_kenlm_available, ngram_pbest
from .oracle import OracleDrafter
from .pbest import PBestRescorer

__all__ = [
    "DraftRescorer",
    "LatticeRescorer",
    "NeuralRescorer",
    "NgramRescorer",
    "OracleDrafter",
    "PBestRescorer",
    "TopKLattice",
    "TuningResult",
    "is_kenlm_available",
    "ngram_pbest",
    "pbest_paths",
    "tune_rescorer",
]


def __getattr__(name: str) -> Any:
    # The tuning helpers load on first use, so that `python -m hf_bpd.logits.tuning` runs a fresh module.
    if name in ("tune_rescorer", "TuningResult"):
        from . import tuning

        return getattr(tuning, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
