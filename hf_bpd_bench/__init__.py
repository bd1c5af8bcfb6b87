"""
hf_bpd_bench: the `hf-bpd` command, the benchmark and its method registry, tuning, analyses, and the shipped
reference / SmolLM2 stacks. It depends on `hf_bpd`; `hf_bpd` never imports it.

- `methods`: `METHODS`, one [`MethodSpec`] per bench method (the only place a method is defined).
- `bench`: the harness (`benchmark`, `BenchConfig`, `Resources`, `format_table`).
- `cli`: `hf-bpd bench | analyze | tune | build-ngram | export` (argument errors before torch is imported).
- `stacks`: which stack (small LM, n-gram, prompts) goes with a model, checked before anything is loaded.
- `reference`, `machine`, `defaults`, `analyze`, `tune`, `tree_tune`: the stack files, the machine record, the tuned
  per-stack rescorer settings, the analyses and the tuning tools.

Importing this package imports neither torch nor transformers (the CLI parses its arguments first).
"""
