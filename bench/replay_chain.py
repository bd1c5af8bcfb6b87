"""Greedy chain block efficiency of several heads, replayed per task kind on the base's own answers to validation prompts.

    HF_HUB_OFFLINE=1 python bench/replay_chain.py --heads reference/smollm2-heads \
        ~/.cache/hf_bpd/smollm2_work/heads-trained-recurrent-full --max-new-tokens 128 --threads 2 \
        --json bench/results/smollm2_replayed_chain_validation.json

The base model answers every prompt of the validation file (default: the stack's, 10 per task kind for SmolLM2)
once, greedily, in left-padded batches; its last hidden states over each row's prompt + answer (padding removed)
come from one forward; then
each heads folder is scored on the answers with `hf_bpd.metrics.depth_accuracy`: top-1 per depth and the heads' own
greedy chain replayed (`metrics.greedy_chain_counts`). In fp32 the replayed tokens and calls are what
`generate(use_bpd=True, drafter="heads")` reports on the same prompts (tests/test_metrics.py), so this measures a
chain on every validation prompt and many heads for the cost of one greedy pass, where `hf-bpd bench` decodes each
method on a few prompts. It measures acceptance, not speed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from hf_bpd import BPDForCausalLM, metrics
from hf_bpd.data import load_prompts, tokenize_prompts
from hf_bpd_bench.analyze import greedy_features
from hf_bpd_bench.reference import find_reference, get_stack


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--heads", type=Path, nargs="+", required=True, help="heads folders (the first one's base is used)")
    p.add_argument("--stack", default="smollm2", help="whose validation prompts (default smollm2)")
    p.add_argument("--prompts", type=Path, default=None, help="a prompts file instead of the stack's validation file")
    p.add_argument("--max-prompts", type=int, default=None, help="per task kind (default: all)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=10)
    p.add_argument("--dtype", default="float32", help="float32 (the replay equals the decode) or bfloat16")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    for name in ("max_new_tokens", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}.")
    if args.max_prompts is not None and args.max_prompts < 1:
        p.error(f"--max-prompts must be >= 1 (prompts per task kind), got {args.max_prompts}.")
    if args.dtype not in ("float32", "bfloat16", "float16"):
        p.error(f"--dtype must be float32, bfloat16 or float16, got {args.dtype!r}.")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    first = BPDForCausalLM.from_pretrained(args.heads[0], dtype=dtype).eval()
    base = first.base
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.heads[0])
    path = args.prompts or find_reference(get_stack(args.stack).prompts)
    prompts = load_prompts(path, tok, args.max_prompts)
    kinds = sorted({p.get("domain", "all") for p in prompts})

    start = time.monotonic()
    answers: dict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
    eos = first.generation_config.eos_token_id
    for kind in kinds:
        for batch in tokenize_prompts([p for p in prompts if p.get("domain", "all") == kind], tok, args.batch_size):
            with torch.no_grad():
                seq = base.generate(**batch, max_new_tokens=args.max_new_tokens, do_sample=False)
            # one row at a time, its left padding removed: heads that attend over the context (head_type="context")
            # see the row from its first token at position 0, as the decode does, and read its real tokens
            for row, mask in zip(seq, batch["attention_mask"]):
                left = int((mask == 0).sum())
                ids = row[None, left:]
                hidden, targets = greedy_features(first, ids, mask[None, left:], eos)
                answers.setdefault(kind, []).append((hidden, targets, ids))
    answered = time.monotonic() - start
    tokens = {k: sum(int((t != -100).sum()) for _, t, _ in v) for k, v in answers.items()}
    report = {
        "prompts": str(path),
        "num_prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        "dtype": args.dtype,
        "answer_tokens": tokens,
        "answer_seconds": round(answered, 1),
        "heads": {},
    }
    print(f"{len(prompts)} prompts, {sum(tokens.values())} answer tokens in {answered:.0f} s")
    for folder in args.heads:
        model = first if folder == args.heads[0] else BPDForCausalLM.from_pretrained(folder, base_model=base)
        entry = score_heads(model.to(dtype).eval(), answers, tokens)
        report["heads"][str(folder)] = entry
        per_kind = {k: v["replayed_chain_block_efficiency"] for k, v in entry["kinds"].items()}
        print(f"{folder}: chain {entry['replayed_chain_block_efficiency']} {per_kind}, top-1 {entry['top1']}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


def score_heads(
    model: BPDForCausalLM,
    answers: dict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]],
    tokens: dict[str, int],
) -> dict:
    """Replayed chain block efficiency and top-1 per depth of one heads folder, per task kind and overall."""
    entry = {"head_type": model.config.head_type, "num_draft_heads": model.config.num_draft_heads, "kinds": {}}
    total = [0, 0]
    top1 = torch.zeros(model.config.num_draft_heads)
    for kind, batches in answers.items():
        counts = [0, 0]
        kind_top1 = torch.zeros_like(top1)
        for hidden, targets, input_ids in batches:
            with torch.no_grad():
                acc = metrics.depth_accuracy(model, hidden, targets, input_ids=input_ids)
            counts = [counts[0] + acc["chain_tokens"], counts[1] + acc["chain_calls"]]
            kind_top1 += torch.tensor(acc["top1"]) * int((targets != -100).sum())
        entry["kinds"][kind] = {
            "replayed_chain_block_efficiency": round(metrics.block_efficiency(*counts), 3),
            "top1": [round(x, 4) for x in (kind_top1 / tokens[kind]).tolist()],
        }
        total = [total[0] + counts[0], total[1] + counts[1]]
        top1 += kind_top1
    entry["replayed_chain_block_efficiency"] = round(metrics.block_efficiency(*total), 3)
    entry["top1"] = [round(x, 4) for x in (top1 / sum(tokens.values())).tolist()]
    return entry


if __name__ == "__main__":
    main()
