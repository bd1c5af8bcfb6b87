"""Moved to `hf_bpd.drafters.base`; these names keep importing from here."""

from ..drafters.base import *  # noqa: F401,F403
from ..drafters.base import DraftContext, Drafter, DraftRescorer, Drafts, DraftState, HeadsDrafter, TimingStats  # noqa: F401
