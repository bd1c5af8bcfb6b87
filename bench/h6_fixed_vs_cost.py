"""Width from cost vs fixed budgets of the same composed drafter, 10M reference, validation prompts (3/domain)."""
import json, statistics, sys, time
import torch
torch.set_num_threads(1)
from transformers import AutoTokenizer
from hf_bpd import BPDForCausalLM
from hf_bpd.data import load_prompts, tokenize_prompts
from hf_bpd.drafters import build_drafter

model = BPDForCausalLM.from_pretrained("reference/heads", dtype=torch.float32).eval()
tok = AutoTokenizer.from_pretrained("reference/heads")
rows = load_prompts("reference/prompts/validation.jsonl", tok, 3)
spec = dict(model.config.drafter)
variants = {"cost": spec}
for n in (4, 16):
    variants[f"fixed{n}"] = {**spec, "tree": {**spec["tree"], "num_nodes": n}, "width_from_cost": False}

domains = sorted({r["domain"] for r in rows})
NEW = int(sys.argv[1]) if len(sys.argv) > 1 else 64
res = {}
for d in domains:
    inputs = tokenize_prompts([r for r in rows if r["domain"] == d], tok, 1)
    times = {k: [] for k in ["greedy", *variants]}
    width = {}
    for rep in range(2):
        for k in times:
            t0 = time.perf_counter(); ws = []
            for b in inputs:
                with torch.no_grad():
                    if k == "greedy":
                        model.generate(**b, max_new_tokens=NEW, do_sample=False)
                    else:
                        o = model.generate(**b, max_new_tokens=NEW, do_sample=False, use_bpd=True,
                                           drafter=build_drafter(model, variants[k]), return_dict_in_generate=True)
                        ws.append(o.mean_verify_width)
            times[k].append(time.perf_counter() - t0)
            if ws: width[k] = round(sum(ws) / len(ws), 2)
    g = statistics.median(times["greedy"])
    res[d] = {k: (round(g / statistics.median(v), 2), width.get(k)) for k, v in times.items()}
    print(d, res[d], flush=True)
print(json.dumps(res))
