"""Deprecated: moved to `hf_bpd_bench.tune` (this module is that one, with a `DeprecationWarning`)."""

from . import forward

forward(__name__)
