"""Per-depth accuracy of trained draft heads on held-out cached features, for any head kind (issue 17's comparison).

    python bench/eval_head_kinds.py --features ~/.cache/hf_bpd/smollm2_work/features/eval \
        --heads ~/.cache/hf_bpd/smollm2_work/heads-trained-resblock ~/.cache/hf_bpd/smollm2_work/heads-trained-recurrent \
        --json bench/results/smollm2_head_kinds_accuracy.json

`--answers <work>/answers.jsonl` (with shards captured while answering, `features/eval-gen`) scores the answers
alone: the chat prompts' positions, whose targets are the base's predictions of the prompt, are masked.

For each heads folder: `hf_bpd.metrics.depth_accuracy` on the features' hidden states and the base's greedy targets
(top-1 per depth, and top-1 given a correct prefix: the chance a greedy chain accepted so far is accepted one token
further), the greedy chain's block efficiency replayed on the held-out answers (`metrics.greedy_chain_counts`: what
`generate(use_bpd=True)` with these heads scores on that text, up to the verify forward's numerics), plus the ratio
of the second folder's figures to the first's. The heads' training record (steps, tokens, seconds) is read from
their `bpd_training.json`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from hf_bpd import BPDForCausalLM, metrics
from hf_bpd.features import CachedFeatures


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--features",
        type=Path,
        nargs="+",
        required=True,
        help="held-out feature shards: folders or files (e.g. features/eval features/eval-gen)",
    )
    p.add_argument("--heads", type=Path, nargs="+", required=True, help="trained heads folders")
    p.add_argument(
        "--answers",
        type=Path,
        default=None,
        help="answers.jsonl: score the answers only (each row's chat prompt, found from its shard's ids, masked: "
        "the shards must have been captured while answering, e.g. features/eval-gen); default: every target",
    )
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    features = CachedFeatures(args.features, soft_targets=False)
    targets = features.targets
    if args.answers is not None:
        from transformers import AutoTokenizer

        targets = answer_targets(args.features, targets, args.answers, AutoTokenizer.from_pretrained(args.heads[0]))
    report = {
        "features": [str(f) for f in args.features],
        "scope": "answers" if args.answers is not None else "every target (chat prompts included)",
        "eval_target_tokens": int((targets != -100).sum()),
        "heads": {},
    }
    for folder in args.heads:
        model = BPDForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():
            acc = metrics.depth_accuracy(model, features.hidden.float(), targets)
        info = (
            json.loads((folder / "bpd_training.json").read_text()) if (folder / "bpd_training.json").exists() else {}
        )
        keep = (
            "global_step",
            "num_input_tokens_seen",
            "train_runtime_s",
            "seconds_this_session",
            "train_target_tokens",
        )
        report["heads"][str(folder)] = {
            "head_type": model.config.head_type,
            "top1": [round(x, 4) for x in acc["top1"]],
            "top1_given_prefix": [round(x, 4) for x in acc["top1_given_prefix"]],
            "replayed_chain_block_efficiency": round(
                metrics.block_efficiency(acc["chain_tokens"], acc["chain_calls"]), 4
            ),
            "training": {k: info[k] for k in keep if k in info},
        }
        print(folder.name, model.config.head_type, report["heads"][str(folder)])
    if len(args.heads) == 2:
        a, b = (report["heads"][str(f)]["top1_given_prefix"] for f in args.heads)
        report["ratio_given_prefix"] = [round(y / x, 3) if x else None for x, y in zip(a, b)]
        print("ratio (second / first), top-1 given a correct prefix:", report["ratio_given_prefix"])
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


def answer_targets(paths: list[Path], targets: torch.Tensor, answers: Path, tok) -> torch.Tensor:
    """`targets` with every row's chat prompt masked: the answers alone, as `generate` produces them. The rows are
    those of the shards in `CachedFeatures`' order; each shard's ids (stored while answering) name its prompts,
    rendered with `tok`'s chat template."""
    from hf_bpd.features import shard_metadata

    prompts = {}
    with answers.open() as f:
        for line in f:
            record = json.loads(line)
            prompts[record["id"]] = record["messages"]
    files = [f for p in paths for f in (sorted(p.glob("*.safetensors")) if p.is_dir() else [p])]
    ids = []
    for f in files:
        meta = shard_metadata(f) or {}
        if "ids" not in meta:
            raise SystemExit(f"{f} stores no prompt ids: --answers needs shards captured while answering (*-gen).")
        ids += meta["ids"]
    if len(ids) != targets.shape[0]:
        raise SystemExit(f"The shards name {len(ids)} prompts for {targets.shape[0]} rows.")
    out = targets.clone()
    for row, key in enumerate(ids):
        text = tok.apply_chat_template(prompts[key], add_generation_prompt=True, tokenize=False)
        out[row, : len(tok(text, add_special_tokens=False)["input_ids"])] = -100
    return out


if __name__ == "__main__":
    main()
