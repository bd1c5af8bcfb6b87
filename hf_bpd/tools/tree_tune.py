"""Deprecated: moved to `hf_bpd_bench.tree_tune` (this module is that one, with a `DeprecationWarning`)."""

from . import forward

_module = forward(__spec__.name if __name__ == "__main__" else __name__)

if __name__ == "__main__":  # `python -m hf_bpd.tools.tree_tune` as before
    _module.main()
