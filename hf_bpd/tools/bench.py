"""Deprecated: moved to `hf_bpd_bench.bench` (this module is that one, with a `DeprecationWarning`)."""

from . import forward

_module = forward(__spec__.name if __name__ == "__main__" else __name__)
