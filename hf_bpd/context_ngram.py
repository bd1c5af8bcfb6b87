"""Moved to [`hf_bpd.drafters.context_ngram`]; this module re-exports it so older imports keep working."""

from .drafters.context_ngram import (  # noqa: F401
    RULES,
    ContextMatch,
    ContextNgramDrafter,
    find_context_match,
    match_chain,
    merge_match,
    prompt_start_of,
    switch_to_match,
)
