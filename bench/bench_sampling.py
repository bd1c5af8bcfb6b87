"""
Accepted drafts per step when sampling: speculative sampling (the default) against "sample, then match", beside
greedy, per validation domain of the reference model.

    python bench/bench_sampling.py --max-prompts 4 --max-new-tokens 64 --json bench/results/bench_sampling.json
    python bench/bench_sampling.py --max-prompts 3 --seeds 1 --drafters ngram --ngram reference/ngram/ngram4.binary \
        --json bench/results/bench_sampling_ngram.json

For each domain: the first `--max-prompts` validation prompts, batch 1, `--seeds` sampling seeds per prompt. Methods:
greedy BPD (the heads' argmax drafts), then for each temperature `do_sample=True` with `bpd_sampling="speculative"`
and `"match"`, with the heads (one chain) and with `PBestRescorer(top_k, num_drafts)` (several sampled chains,
multi-draft rejection sampling), and with `--ngram PATH` an `NgramRescorer(PATH, top_k=--ngram-top-k,
alpha=--ngram-alpha, num_drafts=--ngram-num-drafts)` (greedy: its p best lattice paths; speculative: p independent
chains sampled from its reweighted lattice distribution, returned as `q`; match: its p best paths). `--drafters`
picks which of them run. Figure: mean accepted drafts per verify step (`accepted_lengths >= 0`), and its
ratio to greedy's. The generation config is the checkpoint's (e.g. transformers' default `top_k=50` applies).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import AutoTokenizer

from hf_bpd import BPDForCausalLM
from hf_bpd.data import load_prompts, tokenize_prompts
from hf_bpd.logits import NgramRescorer, PBestRescorer


def accepted_per_step(model, ids, mask, new_tokens, drafter, seed, **kwargs):
    torch.manual_seed(seed)
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=new_tokens,
        use_bpd=True,
        draft_rescorer=drafter,
        return_dict_in_generate=True,
        **kwargs,
    )
    acc = out.accepted_lengths[out.accepted_lengths >= 0]
    return int(acc.sum()), int(acc.numel())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="reference/heads")
    parser.add_argument("--prompts", default="reference/prompts/validation.jsonl")
    parser.add_argument("--max-prompts", type=int, default=4, help="prompts per domain")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperatures", default="0.7,1.0")
    parser.add_argument("--seeds", type=int, default=2, help="sampling seeds per prompt")
    parser.add_argument("--top-k", type=int, default=8, help="lattice top-k of the p-best drafter")
    parser.add_argument("--num-drafts", type=int, default=4, help="chains of the p-best drafter (0: skip it)")
    parser.add_argument("--ngram", default=None, help="KenLM model: also run an NgramRescorer (e.g. ngram4.binary)")
    parser.add_argument("--ngram-top-k", type=int, default=8)
    parser.add_argument("--ngram-alpha", type=float, default=0.5)
    parser.add_argument("--ngram-num-drafts", type=int, default=4)
    parser.add_argument("--drafters", default="heads,pbest,ngram", help="which drafters run (comma-separated)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = BPDForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).eval()
    tok = AutoTokenizer.from_pretrained(args.model)
    prompts = load_prompts(args.prompts, tok)  # the tokenizer renders chat ("messages") prompts
    domains = sorted({p.get("domain", "all") for p in prompts})
    temps = [float(t) for t in args.temperatures.split(",")]
    wanted = set(args.drafters.split(","))
    drafters = {}
    if "heads" in wanted:
        drafters["heads"] = lambda: None
    if args.num_drafts and "pbest" in wanted:
        drafters[f"pbest{args.num_drafts}"] = lambda: PBestRescorer(top_k=args.top_k, num_drafts=args.num_drafts)
    if args.ngram and "ngram" in wanted:
        ngram = NgramRescorer(
            args.ngram,
            top_k=args.ngram_top_k,
            alpha=args.ngram_alpha,
            num_drafts=args.ngram_num_drafts,
            pad_token_id=tok.pad_token_id,
        )
        drafters[f"ngram{args.ngram_num_drafts}"] = lambda: ngram  # loaded once; `generate` resets it per call
    if not drafters:
        raise SystemExit(f"--drafters {args.drafters!r} selects nothing (heads, pbest, ngram; ngram needs --ngram).")
    report = {"config": vars(args), "domains": {}}
    start = time.perf_counter()
    for domain in domains:
        subset = [p for p in prompts if p.get("domain", "all") == domain][: args.max_prompts]
        counts: dict[str, list[int]] = {}

        def add(name, pair, counts=counts):
            total = counts.setdefault(name, [0, 0])
            total[0] += pair[0]
            total[1] += pair[1]

        for enc in tokenize_prompts(subset, tok, 1):  # batch 1, chat prompts rendered as `generate` expects
            ids, mask = enc["input_ids"], enc["attention_mask"]
            for dname, make in drafters.items():
                add(
                    f"greedy/{dname}",
                    accepted_per_step(model, ids, mask, args.max_new_tokens, make(), 0, do_sample=False),
                )
                for t in temps:
                    for mode in ("speculative", "match"):
                        for seed in range(args.seeds):
                            add(
                                f"T={t}/{dname}/{mode}",
                                accepted_per_step(
                                    model,
                                    ids,
                                    mask,
                                    args.max_new_tokens,
                                    make(),
                                    seed,
                                    do_sample=True,
                                    temperature=t,
                                    bpd_sampling=mode,
                                ),
                            )
        figures = {name: round(a / max(s, 1), 3) for name, (a, s) in counts.items()}
        for name in list(figures):
            if name.startswith("T="):
                dname = name.split("/")[1]
                figures[name + "/vs_greedy"] = round(figures[name] / max(figures[f"greedy/{dname}"], 1e-9), 3)
        report["domains"][domain] = figures
        print(domain, json.dumps(figures, indent=1), flush=True)
    report["seconds"] = round(time.perf_counter() - start, 1)
    print(f"{report['seconds']} s")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=1)


if __name__ == "__main__":
    main()
