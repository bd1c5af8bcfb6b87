"""Soft (top-k) targets and flatness data selection against hard targets, on SmolLM2 captured features (issue 18).

    HF_HUB_OFFLINE=1 python bench/soft_targets_selection.py --shards 12 --steps 150 --threads 2 \
        --json bench/results/smollm2_soft_targets_selection.json

The first `--shards` training shards captured while answering (`features/chat-gen`) get the base's top-`k`
distribution from their stored hidden states (`hf_bpd.features.add_soft_targets`, in place: what
`build_smollm2.py --stages features --soft-top-k k` does to them). Then one set of heads per arm, each from the
same initialisation, data order, batch, learning rate and number of steps (`BPDTrainer`, length-grouped batches,
bf16 autocast, cosine schedule):

- `hard`: the base's greedy tokens (the shipped recipe);
- `soft`: cross-entropy to the base's top-k distribution (`distillation="soft"`);
- `flat-<f>`: hard targets at only the `f` least certain positions (`CachedFeatures.keep_least_certain`, the
  "flatness" selection of arXiv 2601.18902, reported to keep ~96% of the speedup at half the data). Only the loss is
  masked: token-conditioned heads still read every token, and the batches come in the same order.

`--arms` runs some of them; with `--json`, arms already in the file are kept (a run per arm adds up).

Reported: held-out top-1 per depth (`hf_bpd.metrics.depth_accuracy`, hard greedy targets of the held-out answers in
`features/eval` + `features/eval-gen`), the targets each arm trained on, and its wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work-dir", type=Path, default=Path("~/.cache/hf_bpd/smollm2_work").expanduser())
    p.add_argument("--shards", type=int, default=12, help="captured training shards (128 answers each)")
    p.add_argument("--top-k", type=int, default=16)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--flat-fraction", type=float, default=0.5)
    p.add_argument("--arms", default="hard,soft,flat", help="comma-separated: hard, soft, flat")
    p.add_argument("--head-type", default="recurrent")
    p.add_argument("--draft-vocab-size", type=int, default=4096)
    p.add_argument("--eval-rows", type=int, default=512, help="held-out rows evaluated (0: all)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    import torch

    from hf_bpd import BPDForCausalLM, metrics
    from hf_bpd.features import CachedFeatures, add_soft_targets, draft_vocab_from_counts
    from hf_bpd.smollm2 import load_smollm2
    from hf_bpd.trainer import BPDTrainer, BPDTrainingArguments

    if args.threads:
        torch.set_num_threads(args.threads)
    feats = args.work_dir / "features"
    shards = sorted((feats / "chat-gen").glob("*.safetensors"))[: args.shards]
    if len(shards) < args.shards:
        raise SystemExit(f"{feats / 'chat-gen'} holds {len(shards)} shards; --shards asks for {args.shards}.")
    base, tok = load_smollm2(dtype=torch.float32)
    start = time.monotonic()
    add_soft_targets(base, shards, args.top_k)
    soft_seconds = time.monotonic() - start
    evaluation = CachedFeatures(
        sorted((feats / "eval").glob("*.safetensors")) + sorted((feats / "eval-gen").glob("*.safetensors")),
        soft_targets=False,
    )
    rows = slice(None) if not args.eval_rows else slice(0, args.eval_rows)
    eval_hidden, eval_targets = evaluation.hidden[rows].float(), evaluation.targets[rows]
    full = CachedFeatures(shards)
    token_map = draft_vocab_from_counts(
        full.target_counts(base.config.vocab_size), args.draft_vocab_size, [tok.eos_token_id]
    )
    report = {
        "shards": [s.name for s in shards],
        "train_rows": len(full),
        "train_target_tokens": full.num_target_tokens(),
        "top_k": args.top_k,
        "soft_targets_seconds": round(soft_seconds),
        "eval_rows": int(eval_hidden.shape[0]),
        "eval_target_tokens": int((eval_targets != -100).sum()),
        "steps": args.steps,
        "batch": args.batch,
        "lr": args.lr,
        "head_type": args.head_type,
        "threads": torch.get_num_threads(),
        "arms": {},
    }
    if args.json and args.json.exists():  # earlier runs' arms, when they trained on the same data and budget
        earlier = json.loads(args.json.read_text())
        same = ("shards", "steps", "batch", "lr", "head_type", "top_k", "eval_rows")
        if all(earlier.get(k) == report[k] for k in same):
            report["arms"] = earlier.get("arms", {})
    for arm in args.arms.split(","):
        data = CachedFeatures(shards)
        if arm == "flat":
            data.keep_least_certain(args.flat_fraction)
        elif arm not in ("hard", "soft"):
            raise SystemExit(f"unknown arm {arm!r}: hard, soft or flat")
        torch.manual_seed(0)
        model = BPDForCausalLM.from_base(
            base, num_draft_heads=5, draft_vocab_size=args.draft_vocab_size, head_type=args.head_type
        )
        model.set_draft_vocab(token_map)
        with tempfile.TemporaryDirectory() as tmp:
            targs = BPDTrainingArguments(
                output_dir=tmp,
                use_cpu=True,
                report_to="none",
                bf16=True,
                disable_tqdm=True,
                per_device_train_batch_size=args.batch,
                train_sampling_strategy="group_by_length",
                max_steps=args.steps,
                learning_rate=args.lr,
                warmup_steps=min(50, args.steps // 5),
                lr_scheduler_type="cosine",
                weight_decay=0.0,
                save_strategy="no",
                logging_steps=max(1, args.steps // 5),
                distillation="soft" if arm == "soft" else "hard",
                head_loss_weighting="geometric",
                seed=0,
            )
            t0 = time.monotonic()
            BPDTrainer(model, targs, train_dataset=data).train()
            seconds = time.monotonic() - t0
        model.eval()
        with torch.no_grad():
            acc = metrics.depth_accuracy(model, eval_hidden, eval_targets)
        name = f"flat-{args.flat_fraction:g}" if arm == "flat" else arm
        report["arms"][name] = {
            "train_target_tokens": data.num_target_tokens(),
            "seconds": round(seconds),
            "top1": [round(x, 4) for x in acc["top1"]],
            "top1_given_prefix": [round(x, 4) for x in acc["top1_given_prefix"]],
        }
        print(name, report["arms"][name], flush=True)
        if args.json:  # after every arm: a stopped run keeps what it measured
            args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
