"""
Deprecated: the tools moved out of the library into the `hf_bpd_bench` package (the `hf-bpd` command, benchmark,
tuning, analyses, reference stacks); the KenLM builder moved to `hf_bpd.logits.ngram_build`.

`hf_bpd.tools.<name>` still imports, with a `DeprecationWarning`, and is the new module itself (so attributes set on
it reach the code that runs). `hf_bpd` never imports this package.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from types import ModuleType

MOVED = {
    "analyze": "hf_bpd_bench.analyze",
    "bench": "hf_bpd_bench.bench",
    "build_ngram": "hf_bpd.logits.ngram_build",
    "machine": "hf_bpd_bench.machine",
    "reference": "hf_bpd_bench.reference",
    "tree_tune": "hf_bpd_bench.tree_tune",
    "tune": "hf_bpd_bench.tune",
}


def forward(old: str) -> ModuleType:
    """Warn that `old` (e.g. `hf_bpd.tools.bench`) moved, and stand its replacement in for it in `sys.modules`."""
    new = MOVED[old.rsplit(".", 1)[1]]
    warnings.warn(f"{old} moved to {new}; import it from there.", DeprecationWarning, stacklevel=3)
    module = importlib.import_module(new)
    sys.modules[old] = module
    return module
