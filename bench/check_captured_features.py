"""Captured features against a second forward, on SmolLM2 (issue 18).

    HF_HUB_OFFLINE=1 python bench/check_captured_features.py --prompts 8 --max-new-tokens 48 --threads 2

Answers the first `--prompts` training prompts of the SmolLM2 work folder in one left-padded batch (bf16), once
with `LastHiddenStateRecorder` (the answers stage's capture) and once without, then extracts the same prompt +
answer sequences with `extract_features` (what the features stage would run). Prints whether the answers are
identical with the recorder on, the agreement of the targets, and the lowest per-row cosine similarity of the
hidden states (bf16 rounding of a batched, padded generation against an unpadded forward).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch
from safetensors.torch import load_file

from hf_bpd.features import LastHiddenStateRecorder, extract_features, generation_features
from hf_bpd.smollm2 import load_smollm2


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work-dir", default=os.path.expanduser("~/.cache/hf_bpd/smollm2_work"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = load_smollm2(dtype=torch.bfloat16)
    model.eval()
    tok.padding_side = "left"
    with open(os.path.join(args.work_dir, "train_prompts.jsonl")) as handle:
        rows = [json.loads(line) for _, line in zip(range(args.prompts), handle)]
    texts = [tok.apply_chat_template(r["messages"], add_generation_prompt=True, tokenize=False) for r in rows]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.inference_mode():
        plain = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False)
        with LastHiddenStateRecorder(model) as recorder:
            gen = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False)
        start = time.perf_counter()
        got = generation_features(
            model, enc["input_ids"], enc["attention_mask"], gen, recorder.states, tok.eos_token_id, 384
        )
        assemble = time.perf_counter() - start
    sequences = []
    width = enc["input_ids"].shape[1]
    for b in range(len(rows)):
        p_len = int(enc["attention_mask"][b].sum())
        answer = gen[b, width:].tolist()
        n = answer.index(tok.eos_token_id) + 1 if tok.eos_token_id in answer else len(answer)
        sequences.append(enc["input_ids"][b, width - p_len :].tolist() + answer[:n])
    with tempfile.TemporaryDirectory() as tmp:
        (path,) = extract_features(model, sequences, tmp, seq_len=384)
        want = load_file(path)
    valid = (want["targets"] != -100) & (got["targets"] != -100)
    agree = float((want["targets"][valid] == got["targets"][valid]).float().mean())
    cosine = [
        float(
            torch.nn.functional.cosine_similarity(
                want["hidden"][b, : len(s) - 1].float(), got["hidden"][b, : len(s) - 1].float(), dim=-1
            ).min()
        )
        for b, s in enumerate(sequences)
    ]
    print(
        json.dumps(
            {
                "answers_identical_with_recorder": bool(torch.equal(plain, gen)),
                "targets_agree": round(agree, 4),
                "targets_compared": int(valid.sum()),
                "min_cosine_per_row": [round(c, 4) for c in cosine],
                "assembling_seconds": round(assemble, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
