"""Self-distillation throughput: SmolLM2 answer tokens per second by batch size, with and without BPD.

    python bench/bench_answers.py --batch-sizes 1 8 32 --prompts 32 --max-new-tokens 96 --dtype bfloat16

Times `generate` over the same training-split chat prompts (left padding, greedy) for each batch size, plain and with
`use_bpd=True` (identical output, so either yields exact self-distillation data), and prints answer tokens/s.
The fastest setting is what `examples/build_smollm2.py --stages answers --answer-batch N` should run with.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from hf_bpd.smollm2 import cache_root, load_smollm2


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--prompts", type=int, default=32, help="training prompts timed (the same for every setting)")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--heads", default="reference/smollm2-heads", help="heads for the use_bpd=True rows ('' skips)")
    p.add_argument(
        "--work-dir", type=Path, default=Path(os.environ.get("HF_BPD_WORK") or cache_root() / "smollm2_work")
    )
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    base, tok = load_smollm2(dtype=dtype)
    tok.padding_side = "left"
    rows = [json.loads(line) for line in (args.work_dir / "train_prompts.jsonl").open()][: args.prompts]
    texts = [tok.apply_chat_template(r["messages"], add_generation_prompt=True, tokenize=False) for r in rows]
    models = {"plain": base}
    if args.heads:
        from hf_bpd import BPDForCausalLM

        models["bpd"] = BPDForCausalLM.from_pretrained(args.heads, base_model=base, dtype=dtype).eval()
    results = []
    for batch in args.batch_sizes:
        for name, model in models.items():
            kwargs = {"use_bpd": True} if name == "bpd" else {}
            tokens, start = 0, time.perf_counter()
            with torch.inference_mode():
                for i in range(0, len(texts), batch):
                    enc = tok(texts[i : i + batch], return_tensors="pt", padding=True, add_special_tokens=False)
                    out = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False, **kwargs)
                    tokens += int((out[:, enc["input_ids"].shape[1] :] != tok.pad_token_id).sum())
            seconds = time.perf_counter() - start
            results.append(
                {
                    "batch": batch,
                    "method": name,
                    "tokens": tokens,
                    "seconds": round(seconds, 2),
                    "tokens_per_s": round(tokens / seconds, 1),
                }
            )
            print(json.dumps(results[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"dtype": args.dtype, "threads": torch.get_num_threads(), "results": results}))


if __name__ == "__main__":
    main()
