"""Profile the `auto` drafter's propose on the 10M reference (fp32, 1 thread), one validation prompt per domain.

Command: `PYTHONPATH=$PWD OMP_NUM_THREADS=1 python bench/profile_auto_drafter.py [num_nodes] [--cprofile]`
Prints ms per step spent in propose (drafting) vs the whole generate, and optionally cProfile's top entries.
"""

import cProfile
import pstats
import sys
import time

import torch
from transformers import AutoTokenizer

from hf_bpd import BPDForCausalLM
from hf_bpd.configuration_bpd import drafter_spec_for_dtype
from hf_bpd.data import load_prompts, tokenize_prompts
from hf_bpd.drafters import build_drafter

torch.set_num_threads(1)

model = BPDForCausalLM.from_pretrained("reference/heads", dtype=torch.float32).eval()
tok = AutoTokenizer.from_pretrained("reference/heads")
rows = load_prompts("reference/prompts/validation.jsonl", tok, 3)
seen, picked = set(), []
for r in rows:
    if r["domain"] not in seen:
        seen.add(r["domain"])
        picked.append(r)
inputs = tokenize_prompts(picked, tok, 1)
spec = dict(drafter_spec_for_dtype(model.config.drafter, model.base.dtype))  # this dtype's overrides merged in
args = [a for a in sys.argv[1:] if not a.startswith("--")]
if args:
    n = int(args[0])
    spec = (
        {k: v for k, v in spec.items() if k != "tree"}
        if n == 0
        else {**spec, "tree": {**spec["tree"], "num_nodes": n}}
    )


def run():
    steps = draft = 0.0
    t0 = time.perf_counter()
    for b in inputs:
        d = build_drafter(model, spec)
        with torch.no_grad():
            model.generate(**b, max_new_tokens=64, do_sample=False, use_bpd=True, drafter=d)
        steps += len(d.widths)
        draft += d.total_propose_s if hasattr(d, "total_propose_s") else 0.0
    return time.perf_counter() - t0, steps, draft


run()
wall, steps, draft = run()
print(
    f"wall {wall:.2f}s steps {steps:.0f} -> {1000 * wall / steps:.1f} ms/step, propose {1000 * draft / max(steps, 1):.1f} ms/step"
)
if "--cprofile" in sys.argv:
    prof = cProfile.Profile()
    prof.enable()
    run()
    prof.disable()
    pstats.Stats(prof).sort_stats("cumulative").print_stats(45)
