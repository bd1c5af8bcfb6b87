"""Draft refinement: rescorers that change BPD drafts (never the output)."""

from .base import DraftRescorer
from .oracle import OracleDrafter

__all__ = ["DraftRescorer", "OracleDrafter"]
