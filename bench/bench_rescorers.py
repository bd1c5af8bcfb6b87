"""
Rescoring cost per decode step of each draft rescorer, on CPU, outside the decode loop.

    python bench/bench_rescorers.py --ngram ngram4.bin                       # h = 4, k = 8, p = 16, batch 1 and 4
    python bench/bench_rescorers.py --ngram ngram4.bin --top-k 16 --num-drafts 16 --threads 1 --json out.json

Each rescorer is called as the decode loop calls it, on a simulated decode through held-out prompts: the committed
prefix of every row grows by 1 .. h + 1 tokens per step (so the neural rescorer's cache is exercised the way
`generate` exercises it). Draft logits are synthetic: head `i` ranks the true token `i + 1` ahead and `k - 1`
tokens drawn from the corpus' own token stream near the top, so the n-gram meets the states it would meet on real
text. The neural LM is `--lm` (e.g. reference/small) or a randomly initialised Llama of the given size (its weights do
not change the cost).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from hf_bpd.data import load_prompts
from hf_bpd.logits import NeuralRescorer, NgramRescorer, PBestRescorer


def synthetic_logits(stream: list[int], pos: list[int], num_heads: int, top_k: int, vocab: int, rng: random.Random):
    """`(B, h, V)` logits: the true next tokens and corpus tokens on top, the rest noise."""
    logits = torch.randn(len(pos), num_heads, vocab)
    for b, t in enumerate(pos):
        for i in range(num_heads):
            for _ in range(top_k - 1):
                logits[b, i, stream[rng.randrange(len(stream))]] += 6.0 + rng.random()
            logits[b, i, stream[(t + 1 + i) % len(stream)]] += 6.0 + 2 * rng.random()
    return logits


def run(rescorer, stream: list[int], args: argparse.Namespace, batch: int, vocab: int) -> float:
    """Median ms per call over `args.calls` simulated decode steps."""
    rng = random.Random(0)
    rescorer.reset()
    pos = [64 + 97 * b for b in range(batch)]
    times = []
    for _ in range(args.calls):
        width = max(pos) + 1
        ids = torch.zeros((batch, width), dtype=torch.long)
        for b, t in enumerate(pos):  # left-padded committed prefixes
            ids[b, width - t - 1 :] = torch.tensor(stream[: t + 1])
        lengths = torch.full((batch,), width)
        logits = synthetic_logits(stream, pos, args.num_draft_heads, args.top_k, vocab, rng)
        start = time.perf_counter()
        rescorer(ids, lengths, logits)
        times.append(1000 * (time.perf_counter() - start))
        if max(pos) > args.max_context:
            rescorer.reset()
            pos = [64 + 97 * b for b in range(batch)]
        pos = [t + rng.randint(1, args.num_draft_heads + 1) for t in pos]
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ngram", default=None, help="KenLM model over the tokenizer's ids (skip n-gram if unset)")
    parser.add_argument("--tokenizer", default="reference/tokenizer")
    parser.add_argument("--prompts", default="reference/prompts/validation.jsonl")
    parser.add_argument("--num-draft-heads", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--num-drafts", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--max-context", type=int, default=1024)
    parser.add_argument("--lm", default=None, help="small LM folder for the neural rescorer (default: a random Llama)")
    parser.add_argument("--lm-hidden", type=int, default=256)
    parser.add_argument("--lm-layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    vocab = len(tokenizer)
    text = "\n\n".join(row["prompt"] for row in load_prompts(args.prompts))
    stream = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    lm_config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=args.lm_hidden,
        intermediate_size=4 * args.lm_hidden,
        num_hidden_layers=args.lm_layers,
        num_attention_heads=max(1, args.lm_hidden // 64),
        max_position_embeddings=4096,
    )
    lm = (
        AutoModelForCausalLM.from_pretrained(args.lm, dtype=torch.float32) if args.lm else LlamaForCausalLM(lm_config)
    ).eval()
    params = sum(p.numel() for p in lm.parameters()) / 1e6
    h, k, p = args.num_draft_heads, args.top_k, args.num_drafts
    rescorers = {
        f"pbest (p={p})": lambda: PBestRescorer(top_k=k, num_drafts=p),
        f"neural ({params:.1f}M Llama)": lambda: NeuralRescorer(lm, top_k=k, alpha=args.alpha, pad_token_id=0),
    }
    if args.ngram:
        rescorers["ngram (p=1)"] = lambda: NgramRescorer(args.ngram, top_k=k, alpha=args.alpha, pad_token_id=0)
        rescorers[f"ngram (p={p})"] = lambda: NgramRescorer(
            args.ngram, top_k=k, alpha=args.alpha, num_drafts=p, pad_token_id=0
        )
    results = {}
    for name, make in rescorers.items():
        rescorer = make()
        for batch in args.batch_size:
            ms = run(rescorer, stream, args, batch, vocab)
            results[f"{name}, batch {batch}"] = ms
            print(f"{name:32s} batch {batch}: {ms:8.2f} ms/call  (h={h}, k={k}, {args.threads} thread(s))")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"config": vars(args), "ms_per_call": results}, handle, indent=2)


if __name__ == "__main__":
    main()
