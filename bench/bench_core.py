"""
How much of BPD's theoretical `h + 1` tokens per serial call the decode loop turns into wall-clock speed.

    python bench/bench_core.py                      # 10M-parameter Llama shape, h = 4, batch 1 and 4
    python bench/bench_core.py --model reference/heads --batch-sizes 1 --threads 1   # the shipped reference model
    python bench/bench_core.py --num-draft-heads 8 --new-tokens 256 --json bench_core.json
    python bench/bench_core.py --model reference/smollm2-heads --dtype bfloat16 --batch-sizes 1   # SmolLM2-135M

Plain greedy (`base.generate`) against `generate(use_bpd=True)` with *oracle* heads (`OracleDrafter`: every draft
is the base model's own greedy continuation, so each verify call accepts all `h` drafts) on a randomly initialised
model of the reference model's shape. Repeats are interleaved (greedy, BPD, greedy, BPD, ...) and the median of
each is reported, with the ratio measured in the same run. A forward hook on the base model splits each BPD step
into model forward time, draft time and the loop's own overhead (everything else). Reported besides:
`draft_loop_share` (draft + loop per BPD step as a share of one greedy step, wall time per token of `generate`),
`share_of_ideal` (speedup / block efficiency), and `heads_ms` / `heads_share`, the cost of the heads' own argmax
draft (`model.draft_argmax` on one hidden state per row), which the oracle does not pay.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_bpd import BPDForCausalLM
from hf_bpd.logits import OracleDrafter
from hf_bpd.metrics import share_of_ideal


class ForwardTimer:
    """Accumulates wall time spent inside the base model's forward."""

    def __init__(self, module: torch.nn.Module):
        self.total, self.calls, self._start = 0.0, 0, 0.0
        module.register_forward_pre_hook(self._pre)
        module.register_forward_hook(self._post)

    def _pre(self, *args):
        self._start = time.perf_counter()

    def _post(self, *args):
        self.total += time.perf_counter() - self._start
        self.calls += 1

    def reset(self):
        self.total, self.calls = 0.0, 0


def run(args: argparse.Namespace, batch: int) -> dict:
    torch.manual_seed(0)
    if args.model:  # a trained checkpoint (e.g. reference/heads): the same measurement on the real model
        model = BPDForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).eval()
        base = model.base
        base.generation_config.eos_token_id = None
        return measure(args, batch, model, base, base.config.vocab_size)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 8 // 3,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 48,
        num_key_value_heads=args.hidden // 48,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=None,
    )
    base = LlamaForCausalLM(config).eval()
    base.generation_config.eos_token_id = None
    model = BPDForCausalLM.from_base(base, num_draft_heads=args.num_draft_heads)
    return measure(args, batch, model, base, args.vocab)


def heads_ms(model: BPDForCausalLM, batch: int, repeats: int = 200) -> float:
    """Median milliseconds of the heads' own argmax draft for one step (one hidden state per row)."""
    hidden = torch.randn(batch, model.config.base_hidden_size, dtype=model.dtype)
    draft = model.draft_argmax if hasattr(model, "draft_argmax") else (lambda x: model.draft_logits(x).argmax(-1))
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            draft(hidden)
            times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def measure(args: argparse.Namespace, batch: int, model: BPDForCausalLM, base, vocab: int) -> dict:
    prompts = torch.randint(1, vocab, (batch, args.prompt_len), generator=torch.Generator().manual_seed(1))
    kwargs = dict(max_new_tokens=args.new_tokens, do_sample=False)
    reference = base.generate(prompts, **kwargs)
    oracle = OracleDrafter(reference)
    timer = ForwardTimer(base)
    greedy_s, bpd_s, steps = [], [], []
    for _ in range(args.repeats):  # interleaved
        timer.reset()
        start = time.perf_counter()
        out = base.generate(prompts, **kwargs)
        greedy_s.append(time.perf_counter() - start)
        greedy_forward = timer.total / timer.calls
        assert torch.equal(out, reference)
        timer.reset()
        start = time.perf_counter()
        res = model.generate(prompts, use_bpd=True, draft_rescorer=oracle, return_dict_in_generate=True, **kwargs)
        elapsed = time.perf_counter() - start
        bpd_s.append(elapsed)
        assert torch.equal(res.sequences, reference)
        calls = res.num_serial_calls
        steps.append(
            dict(
                forward_ms=1e3 * timer.total / calls,
                draft_ms=1e3 * res.draft_time_s / calls,
                overhead_ms=1e3 * (elapsed - timer.total - res.draft_time_s) / calls,
                greedy_forward_ms=1e3 * greedy_forward,
            )
        )
    g, b = statistics.median(greedy_s), statistics.median(bpd_s)
    tokens = batch * args.new_tokens
    step = {k: statistics.median(s[k] for s in steps) for k in steps[0]}
    greedy_step_ms = 1e3 * g / args.new_tokens  # one plain decoding step, wall time of `generate`
    heads = heads_ms(model, batch)
    return {
        "batch_size": batch,
        "num_draft_heads": model.config.num_draft_heads,
        "new_tokens": args.new_tokens,
        "parameters_M": round(sum(p.numel() for p in base.parameters()) / 1e6, 2),
        "block_efficiency": round(res.block_efficiency, 3),
        "greedy_tokens_per_s": round(tokens / g, 1),
        "bpd_tokens_per_s": round(tokens / b, 1),
        "speedup": round(g / b, 2),
        "share_of_ideal": round(share_of_ideal(g / b, res.block_efficiency), 3),
        **{k: round(v, 2) for k, v in step.items()},
        "greedy_step_ms": round(greedy_step_ms, 2),
        "draft_loop_share": round((step["draft_ms"] + step["overhead_ms"]) / greedy_step_ms, 3),
        "heads_ms": round(heads, 2),
        "heads_share": round(heads / greedy_step_ms, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", default=None, help="a BPD checkpoint (e.g. reference/heads) instead of a random model"
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16"),
        help="dtype of a --model checkpoint (e.g. bfloat16 for SmolLM2 on a CPU with native bf16)",
    )
    parser.add_argument("--hidden", type=int, default=288)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--num-draft-heads", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [run(args, batch) for batch in args.batch_sizes]
    header = list(rows[0])
    print(" | ".join(header))
    for row in rows:
        print(" | ".join(str(row[k]) for k in header))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch_threads": torch.get_num_threads(), "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
