"""Deprecated: the `hf-bpd` command moved to `hf_bpd_bench.cli` (run `hf-bpd ...` or `python -m hf_bpd_bench.cli`)."""

from __future__ import annotations

import sys
import warnings


def main(argv: list[str] | None = None) -> int:
    warnings.warn(
        "hf_bpd.cli moved to hf_bpd_bench.cli; run `hf-bpd` or `python -m hf_bpd_bench.cli`.",
        DeprecationWarning,
        stacklevel=2,
    )
    from hf_bpd_bench.cli import main as bench_main

    return bench_main(argv)


if __name__ == "__main__":
    sys.exit(main())
