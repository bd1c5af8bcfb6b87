"""How much of a cached-feature batch is real tokens (issue 18's training cost).

    python bench/feature_lengths.py --shards 28 --batch 16

Reads the targets of the first `--shards` chat feature shards and the raw windows of the SmolLM2 work folder and
prints the mean row length up to its last target (`CachedFeatures.lengths`), and the share of the `seq_len` columns
a batch keeps after `collate_features` cuts it, for random batches and for length-grouped ones
(`train_sampling_strategy="group_by_length"`: transformers' `LengthGroupedSampler`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers.trainer_pt_utils import LengthGroupedSampler

from hf_bpd.features import CachedFeatures


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work-dir", type=Path, default=Path("~/.cache/hf_bpd/smollm2_work").expanduser())
    p.add_argument("--shards", type=int, default=28)
    p.add_argument("--batch", type=int, default=16)
    args = p.parse_args(argv)
    feats = args.work_dir / "features"
    data = CachedFeatures(sorted((feats / "chat").glob("*.safetensors"))[: args.shards] + [feats / "raw"])
    lengths = torch.tensor(data.lengths(), dtype=torch.float)
    seq_len = data.targets.shape[1]

    def kept(order: list[int]) -> float:
        batches = [order[s : s + args.batch] for s in range(0, len(order) - args.batch + 1, args.batch)]
        return float(sum(lengths[b].max() for b in batches) / (len(batches) * seq_len))

    generator = torch.Generator().manual_seed(0)
    grouped = list(LengthGroupedSampler(args.batch, lengths=lengths.long().tolist(), generator=generator))
    report = {
        "rows": len(data),
        "seq_len": seq_len,
        "mean_length": round(float(lengths.mean()), 1),
        "columns_kept_random_batches": round(kept(torch.randperm(len(data), generator=generator).tolist()), 3),
        "columns_kept_length_grouped": round(kept(grouped), 3),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
