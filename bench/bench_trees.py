"""
Draft trees against p-best chains at equal verify width, and against greedy (issue 11).

    python bench/bench_trees.py --max-prompts 2 --json bench/results/trees.json

On the shipped reference (`reference/heads`, its n-gram, `reference/prompts/validation.jsonl`), batch 1, greedy:
every method's output is checked token for token against the base model's `generate`. A static tree is calibrated
first on `reference/prompts/tune.jsonl` (disjoint from the validation prompts) unless the heads carry one. Widths:
`p` chains of `h` tokens verify `1 + p * h` tokens; a tree of `N` nodes verifies `1 + N`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from hf_bpd import BPDForCausalLM, metrics
from hf_bpd.data import load_prompts, tokenize_prompts
from hf_bpd.logits import DynamicTreeDrafter, NgramRescorer, PBestRescorer, StaticTreeDrafter
from hf_bpd_bench.tree_tune import calibrate_confidence, calibrate_draft_tree


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reference", default="reference")
    parser.add_argument("--max-prompts", type=int, default=2, help="prompts per domain")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--calibration-prompts", type=int, default=8, help="tune prompts, round robin over domains")
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    parser.add_argument("--methods", default=None, help="comma-separated substrings: run only matching methods")
    parser.add_argument("--domains", default=None, help="comma-separated domains (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ref = Path(args.reference)
    model = BPDForCausalLM.from_pretrained(ref / "heads", dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(ref / "tokenizer")
    h, k, pad = model.config.num_draft_heads, args.top_k, tok.pad_token_id
    ngram = str(ref / "ngram" / "ngram4.binary")

    def prompts_of(path: Path, per_domain: int | None) -> dict[str, list]:
        rows = load_prompts(path, tok)
        out: dict[str, list] = {}
        for row in rows:
            domain = out.setdefault(row.get("domain", "all"), [])
            if per_domain is None or len(domain) < per_domain:
                domain.append(row)
        return {d: [b["input_ids"] for b in tokenize_prompts(r, tok, 1)] for d, r in out.items()}

    start = time.perf_counter()
    by_domain = list(prompts_of(ref / "prompts" / "tune.jsonl", None).values())  # round robin over the domains
    calibration = [ps[i] for i in range(max(map(len, by_domain))) for ps in by_domain if i < len(ps)]
    calibration = calibration[: args.calibration_prompts]
    trees = {}
    for n in (16,):
        trees[n] = calibrate_draft_tree(model, calibration, n, top_k=10, max_new_tokens=args.max_new_tokens)
    print(
        f"calibrated static trees on {len(calibration)} tune prompts in {time.perf_counter() - start:.0f} s; "
        f"accuracy (h x 4): {[[round(a, 3) for a in row[:4]] for row in trees[16].accuracy]}"
    )
    start_conf = time.perf_counter()
    conf = calibrate_confidence(model, calibration, top_k=k, max_new_tokens=args.max_new_tokens)
    conf_ngram = calibrate_confidence(
        model, calibration, top_k=k, max_new_tokens=args.max_new_tokens, ngram=ngram, alpha=args.alpha
    )
    print(f"calibrated tree confidence (heads; heads + n-gram) in {time.perf_counter() - start_conf:.0f} s")

    methods = {  # name: (drafter factory, verify width)
        "bpd": (lambda: None, 1 + h),
        "pbest0 p=4": (lambda: PBestRescorer(top_k=k, num_drafts=4), 1 + 4 * h),
        "tree N=16": (lambda: DynamicTreeDrafter(16, top_k=k), 17),
        "tree-static N=16": (lambda: StaticTreeDrafter(trees[16].draft_tree), 17),
        "pbest-ngram p=4": (
            lambda: NgramRescorer(ngram, top_k=k, alpha=args.alpha, num_drafts=4, pad_token_id=pad),
            1 + 4 * h,
        ),
        "tree-ngram N=16": (
            lambda: DynamicTreeDrafter(16, top_k=k, ngram=ngram, alpha=args.alpha, pad_token_id=pad),
            17,
        ),
        "tree N=16 adaptive 0.05": (lambda: DynamicTreeDrafter(16, top_k=k, min_confidence=0.05), 17),
        "tree calibrated N=16": (lambda: DynamicTreeDrafter(16, top_k=k, calibration=conf), 17),
        "tree-ngram calibrated N=16": (
            lambda: DynamicTreeDrafter(
                16, top_k=k, ngram=ngram, alpha=args.alpha, pad_token_id=pad, calibration=conf_ngram
            ),
            17,
        ),
        "pbest0 p=8": (lambda: PBestRescorer(top_k=k, num_drafts=8), 1 + 8 * h),
        "tree N=32": (lambda: DynamicTreeDrafter(32, top_k=k), 33),
        "tree calibrated N=32": (lambda: DynamicTreeDrafter(32, top_k=k, calibration=conf), 33),
        "pbest-ngram p=8": (
            lambda: NgramRescorer(ngram, top_k=k, alpha=args.alpha, num_drafts=8, pad_token_id=pad),
            1 + 8 * h,
        ),
        "tree-ngram N=32": (
            lambda: DynamicTreeDrafter(32, top_k=k, ngram=ngram, alpha=args.alpha, pad_token_id=pad),
            33,
        ),
        "tree-ngram calibrated N=32": (
            lambda: DynamicTreeDrafter(
                32, top_k=k, ngram=ngram, alpha=args.alpha, pad_token_id=pad, calibration=conf_ngram
            ),
            33,
        ),
    }
    if args.methods:
        wanted = [w.strip() for w in args.methods.split(",")]
        methods = {n: m for n, m in methods.items() if n == "bpd" or any(w == n for w in wanted)}
    report: dict = {
        "config": vars(args),
        "static_trees": {n: t.draft_tree for n, t in trees.items()},
        "accuracy": trees[16].accuracy,
        "confidence_calibration": conf.to_dict(),
        "confidence_calibration_ngram": conf_ngram.to_dict(),
        "domains": {},
    }
    for domain, prompts in prompts_of(ref / "prompts" / "validation.jsonl", args.max_prompts).items():
        if args.domains and domain not in args.domains.split(","):
            continue
        greedy_s, refs = 0.0, []
        for ids in prompts:
            model.base.generate(ids, max_new_tokens=4, do_sample=False)  # warm-up
            t0 = time.perf_counter()
            refs.append(model.base.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False))
            greedy_s += time.perf_counter() - t0
        rows = {"greedy": {"seconds": round(greedy_s, 3)}}
        for name, (factory, width) in methods.items():
            drafter = factory()
            tokens = calls = 0
            seconds, identical, hist = 0.0, True, []
            for ids, want in zip(prompts, refs):
                t0 = time.perf_counter()
                out = model.generate(
                    ids,
                    max_new_tokens=args.max_new_tokens,
                    do_sample=False,
                    use_bpd=True,
                    draft_rescorer=drafter,
                    return_dict_in_generate=True,
                )
                seconds += time.perf_counter() - t0
                identical &= torch.equal(out.sequences, want)
                tokens += out.num_generated_tokens
                calls += int(metrics.rows_from_accepted(out.accepted_lengths)[1].sum())
                hist.append(out.accepted_lengths.flatten())
            acc = torch.cat(hist)
            rows[name] = {
                "width": width,
                "block_efficiency": round(metrics.block_efficiency(tokens, calls), 3),
                "speedup_vs_greedy": round(greedy_s / seconds, 3),
                "identical_to_greedy": identical,
                "accepted_histogram": torch.bincount(acc[acc >= 0], minlength=h + 1).tolist(),
            }
        report["domains"][domain] = rows
        print(f"\n[{domain}] ({len(prompts)} prompts, {args.max_new_tokens} new tokens)")
        for name, r in rows.items():
            print(f"  {name:<26} {json.dumps(r)}")
    report["seconds"] = round(time.perf_counter() - start, 1)
    print(f"\ntotal {report['seconds']} s")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
