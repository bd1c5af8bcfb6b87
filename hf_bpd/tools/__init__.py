"""
The `hf-bpd` tools, apart from the library core: `bench` (every decoding method on the same prompts), `analyze`
(draft analyses and plots), `tune` (rescorer settings by block efficiency), `build_ngram` (a KenLM n-gram over token
ids) and `reference` (the shipped reference stack: finding it, splitting its corpora).

Defaults that name reference files look for `reference/` in the current directory or in `$HF_BPD_REFERENCE`
([`~hf_bpd.tools.reference.find_reference`]); nothing points into the installed package.
"""
