"""Moved to [`hf_bpd.drafters.verify_width`]; this module re-exports it so older imports keep working."""

from .drafters.verify_width import (  # noqa: F401
    BATCH_RULES,
    WidthChoice,
    WidthFromCost,
    choose_num_nodes,
    expected_rates,
    monotone_node_probs,
    prune_tree,
    sorted_node_probs,
)
