"""Width from cost vs fixed budgets of the composed `auto` drafter, 10M reference (fp32, 1 thread), validation prompts.

Command (the figures in bench/results/fixed_vs_cost_10M.json):
    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python bench/bench_verify_width.py --new 64 --per-domain 3 --repeats 3 \
        --json bench/results/fixed_vs_cost_10M.json

Variants: `cost` is the checkpoint's default spec (`config.drafter`, width chosen each step from the measured cost);
`fixed-n{N}` verifies every candidate node every step (`width_from_cost=False`) of the same spec with a heads tree of
`N` nodes (`N = 0`: the prompt-lookup chain alone, up to `max_depth` tokens), plus `fixed-n0-d{D}` (the chain cut at
`D` tokens). Each repeat runs every variant (and greedy) over a domain's prompts in a rotated order; medians.
"""

import argparse
import json
import statistics
import time

import torch
from transformers import AutoTokenizer

from hf_bpd import BPDForCausalLM
from hf_bpd.configuration_bpd import drafter_spec_for_dtype
from hf_bpd.cost import cpu_model
from hf_bpd.data import load_prompts, tokenize_prompts
from hf_bpd.drafters import build_drafter

parser = argparse.ArgumentParser()
parser.add_argument("--new", type=int, default=64)
parser.add_argument("--per-domain", type=int, default=3)
parser.add_argument("--repeats", type=int, default=3)
parser.add_argument("--json", default=None)
args = parser.parse_args()
torch.set_num_threads(1)
model = BPDForCausalLM.from_pretrained("reference/heads", dtype=torch.float32).eval()
tok = AutoTokenizer.from_pretrained("reference/heads")
rows = load_prompts("reference/prompts/validation.jsonl", tok, args.per_domain)
spec = dict(drafter_spec_for_dtype(model.config.drafter, model.base.dtype))  # this dtype's overrides merged in
tree = spec.get("tree") or {**dict(json.load(open("bench/results/tune_auto_10M.json"))["spec"]).get("tree", {})}
base = {k: v for k, v in spec.items() if k != "tree"}
variants = {"cost": spec}
for n in (0, 2, 4, 8):
    fixed = {**base, "width_from_cost": False}
    if n:
        fixed["tree"] = {**tree, "num_nodes": n}
    variants[f"fixed-n{n}"] = fixed
for d in (3, 6):
    variants[f"fixed-n0-d{d}"] = {**base, "width_from_cost": False, "context": {**base["context"], "max_depth": d}}

domains = sorted({r["domain"] for r in rows})
res = {
    "machine": cpu_model(),
    "threads": 1,
    "dtype": "float32",
    "max_new_tokens": args.new,
    "spec": spec,
    "domains": {},
}
for dom in domains:
    inputs = tokenize_prompts([r for r in rows if r["domain"] == dom], tok, 1)
    names = ["greedy", *variants]
    times = {k: [] for k in names}
    width = {}
    for rep in range(args.repeats):
        for k in names[rep % len(names) :] + names[: rep % len(names)]:
            t0 = time.perf_counter()
            ws = []
            for b in inputs:
                with torch.no_grad():
                    if k == "greedy":
                        model.generate(**b, max_new_tokens=args.new, do_sample=False)
                    else:
                        o = model.generate(
                            **b,
                            max_new_tokens=args.new,
                            do_sample=False,
                            use_bpd=True,
                            drafter=build_drafter(model, variants[k]),
                            return_dict_in_generate=True,
                        )
                        ws.append(o.mean_verify_width)
            times[k].append(time.perf_counter() - t0)
            if ws:
                width[k] = round(sum(ws) / len(ws), 2)
    g = statistics.median(times["greedy"])
    res["domains"][dom] = {
        k: {
            "speedup": round(g / statistics.median(v), 3),
            "mean_width": width.get(k),
            "times_s": [round(t, 4) for t in v],
        }
        for k, v in times.items()
    }
    print(dom, {k: (v["speedup"], v["mean_width"]) for k, v in res["domains"][dom].items()}, flush=True)
if args.json:
    open(args.json, "w").write(json.dumps(res, indent=1) + "\n")
