"""Deprecated: moved to `hf_bpd.logits.ngram_build` (this module is that one, with a `DeprecationWarning`)."""

from . import forward

forward(__name__)
