"""Head training on cached SmolLM2 features: random batches against length-grouped ones (issue 18).

    HF_HUB_OFFLINE=1 python bench/bench_group_by_length.py --shards 8 --steps 8 --rounds 2 --threads 2 \
        --json bench/results/head_training_group_by_length.json

Both variants run BPDTrainer on the same cached features (the first `--shards` chat shards of the SmolLM2 work
folder + its raw windows), draft vocabulary K, batch 16, bf16 autocast; `collate_features` cuts every batch after
its last target in both. `random` is Trainer's default order; `group_by_length` is
`train_sampling_strategy="group_by_length"` (transformers' `LengthGroupedSampler` over `CachedFeatures.lengths`).
Reported: median step time after one warm-up step and target tokens trained per second (the batches' valid
targets / step time: a length-grouped batch is shorter, so steps differ in size), variants interleaved.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work-dir", type=Path, default=Path("~/.cache/hf_bpd/smollm2_work").expanduser())
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--steps", type=int, default=8, help="timed steps per variant and round (after 1 warm-up step)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--head-type", default="recurrent")
    p.add_argument("--draft-vocab-size", type=int, default=4096)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    import torch
    from transformers import TrainerCallback

    from hf_bpd import BPDForCausalLM
    from hf_bpd.features import IGNORE, CachedFeatures, draft_vocab_from_counts
    from hf_bpd.smollm2 import load_smollm2
    from hf_bpd.trainer import BPDTrainer, BPDTrainingArguments

    if args.threads:
        torch.set_num_threads(args.threads)
    feats = args.work_dir / "features"
    data = CachedFeatures(sorted((feats / "chat").glob("*.safetensors"))[: args.shards] + [feats / "raw"])
    base, tok = load_smollm2(dtype=torch.float32)
    token_map = draft_vocab_from_counts(
        data.target_counts(base.config.vocab_size), args.draft_vocab_size, [tok.eos_token_id]
    )

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.targets = [], []

        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self.t0)

    def run(strategy: str, tmp: Path) -> tuple[list[float], list[int]]:
        model = BPDForCausalLM.from_base(
            base, num_draft_heads=5, draft_vocab_size=args.draft_vocab_size, head_type=args.head_type
        )
        model.set_draft_vocab(token_map)
        targs = BPDTrainingArguments(
            output_dir=str(tmp / strategy),
            use_cpu=True,
            report_to="none",
            bf16=True,
            disable_tqdm=True,
            per_device_train_batch_size=16,
            max_steps=args.steps + 1,
            save_strategy="no",
            logging_steps=1000,
            learning_rate=1e-3,
            seed=0,
            train_sampling_strategy=strategy,
        )
        timer = Timer()
        trainer = BPDTrainer(model, targs, train_dataset=data, callbacks=[timer])
        sizes = []
        collate = trainer.data_collator

        def counting(rows):
            batch = collate(rows)
            sizes.append(int((batch["labels"] != IGNORE).sum()))
            return batch

        trainer.data_collator = counting
        trainer.train()
        return timer.times[1:], sizes[1 : len(timer.times)]

    times = {"random": [], "group_by_length": []}
    tokens = {"random": [], "group_by_length": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for strategy in times:
                t, n = run(strategy, Path(tmp))
                times[strategy] += t
                tokens[strategy] += n
    report = {
        "rows": len(data),
        "head_type": args.head_type,
        "draft_vocab_size": args.draft_vocab_size,
        "threads": torch.get_num_threads(),
        "variants": {
            s: {
                "median_step_s": round(statistics.median(times[s]), 3),
                "target_tokens_per_s": round(sum(tokens[s]) / sum(times[s]), 1),
                "steps": len(times[s]),
            }
            for s in times
        },
    }
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
