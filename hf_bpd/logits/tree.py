"""Moved to `hf_bpd.drafters.tree`; these names keep importing from here."""

from ..drafters.tree import *  # noqa: F401,F403
from ..drafters.tree import (  # noqa: F401
    CALIBRATION_EDGES,
    ConfidenceCalibration,
    DynamicTreeDrafter,
    StaticTreeDrafter,
    build_static_tree,
    check_num_nodes,
    expected_accepted_length,
    grow_tree,
    sample_tree,
)
