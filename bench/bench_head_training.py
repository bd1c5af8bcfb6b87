"""Head-training throughput on SmolLM2-135M: the plain trainer against cached features + a draft vocabulary.

    python bench/bench_head_training.py --steps 6 --batch 4 --seq-len 256 --json bench/results/head_training.json

Both variants run BPDTrainer (hard self-distillation, frozen base, h ResBlock heads, bf16 autocast) on the same
token batches of raw training-split text, at equal batch; the median step time after one warm-up step is reported,
and tokens/s = batch x seq_len / step time. `plain` runs the base forward on every step and projects every head to
the full 49,152-token vocabulary; `cached-kK` reads the base's hidden states extracted once (the extraction's own
throughput is reported separately: it is paid once, not per epoch) and projects to K tokens. Variants alternate
(interleaved repeats) so both see the same machine load.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=6, help="timed steps per variant and round (after 1 warm-up step)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--draft-vocab", default="4096,8192", help="comma-separated K values for the cached variants")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--corpora", type=Path, default=REPO.parent / "shared" / "corpora")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    import torch
    from datasets import Dataset
    from transformers import TrainerCallback

    from hf_bpd import BPDForCausalLM
    from hf_bpd.features import CachedFeatures, draft_vocab_from_counts, extract_features
    from hf_bpd.smollm2 import load_smollm2
    from hf_bpd.trainer import BPDTrainer, BPDTrainingArguments
    from hf_bpd_bench.reference import split_reference_corpora

    if args.threads:
        torch.set_num_threads(args.threads)
    base, tok = load_smollm2(dtype=torch.float32)
    splits = split_reference_corpora(args.corpora)
    rng = random.Random(0)
    n_rows = args.batch * (args.steps + 1) * args.rounds
    rows = []
    for i in range(n_rows):
        text = rng.choice(splits[("austen", "shakespeare", "kjv", "python")[i % 4]]["train"])
        start = rng.randrange(0, max(1, len(text) - args.seq_len * 8))
        rows.append(tok(text[start : start + args.seq_len * 8], add_special_tokens=False)["input_ids"][: args.seq_len])
    tmp = Path(tempfile.mkdtemp(prefix="bench_heads_"))
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        shards = extract_features(base, rows, tmp / "features", seq_len=args.seq_len, batch_size=args.batch)
    extraction_tok_s = n_rows * args.seq_len / (time.perf_counter() - start)
    features = CachedFeatures(shards)

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []

        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self.t0)

    def run(variant: str) -> list[float]:
        kwargs = dict(num_draft_heads=args.heads)
        if variant == "plain":
            data = Dataset.from_dict({"input_ids": rows})
        else:
            k = int(variant.split("-k")[1])
            kwargs["draft_vocab_size"] = k
            data = features
        model = BPDForCausalLM.from_base(base, **kwargs)
        if variant != "plain":
            model.set_draft_vocab(draft_vocab_from_counts(features.target_counts(base.config.vocab_size), k))
        targs = BPDTrainingArguments(
            output_dir=str(tmp / variant),
            use_cpu=True,
            report_to="none",
            bf16=True,
            disable_tqdm=True,
            per_device_train_batch_size=args.batch,
            max_steps=args.steps + 1,
            save_strategy="no",
            logging_steps=1000,
            distillation="hard",
            learning_rate=1e-3,
            seed=0,
        )
        timer = StepTimer()
        BPDTrainer(model, targs, train_dataset=data, callbacks=[timer]).train()
        return timer.times[1:]

    variants = ["plain"] + [f"cached-k{k}" for k in args.draft_vocab.split(",")]
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(args.rounds):
        for v in variants:
            times[v] += run(v)
    tokens = args.batch * args.seq_len
    report = {
        "model": "SmolLM2-135M-Instruct (Q4_1 dequantised)",
        "batch": args.batch,
        "seq_len": args.seq_len,
        "heads": args.heads,
        "threads": torch.get_num_threads(),
        "autocast": "bfloat16",
        "feature_extraction_tokens_per_s": round(extraction_tok_s, 1),
        "variants": {
            v: {
                "median_step_s": round(statistics.median(t), 3),
                "tokens_per_s": round(tokens / statistics.median(t), 1),
                "steps": len(t),
            }
            for v, t in times.items()
        },
    }
    plain = report["variants"]["plain"]["tokens_per_s"]
    for v in variants:
        report["variants"][v]["speedup_vs_plain"] = round(report["variants"][v]["tokens_per_s"] / plain, 2)
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
