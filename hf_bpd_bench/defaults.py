"""The tuned rescorer settings per shipped stack, shared by `hf-bpd bench`, `analyze`, `tune` and the bench scripts."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RescorerDefaults:
    """
    Rescorer settings tuned by block efficiency with `hf-bpd tune` on `reference/prompts/tune.jsonl` (disjoint from
    the benchmark's validation prompts); the tables are `bench/results/tune_ngram.json` and `tune_neural.json`.

    Args:
        top_k (`int`): `k`, lattice tokens per head.
        num_drafts (`int`): `p`, drafts verified per step by the p-best methods.
        alpha_ngram (`float`): n-gram weight (`bpd-ngram`, `bpd-pbest`).
        alpha_neural (`float`): small-LM weight (`bpd-neural`).
        oracle_top_k (`int`): `k` of the oracle top-k drafter.
    """

    top_k: int = 8
    num_drafts: int = 4
    alpha_ngram: float = 0.5
    alpha_neural: float = 0.75
    oracle_top_k: int = 8


RESCORER_DEFAULTS = RescorerDefaults()


# Per shipped stack (`hf-bpd bench --stack NAME`); each tuned on its own tuning prompts, never on the benchmark's.
STACK_RESCORER_DEFAULTS = {"reference": RESCORER_DEFAULTS, "smollm2": RESCORER_DEFAULTS}


def rescorer_defaults(stack: str | None = None) -> RescorerDefaults:
    """The tuned defaults of a stack (the reference stack's when `stack` is None or unknown)."""
    return STACK_RESCORER_DEFAULTS.get(stack or "reference", RESCORER_DEFAULTS)
