"""
`hf-bpd tune --auto`: the checkpoint's default drafter spec (`{"type": "auto", ...}`, `hf_bpd.drafters.auto`), fitted
on tuning prompts (never the validation prompts) and written into the checkpoint's `config.json` (`drafter`).

What is fitted:
- the heads' per-depth confidence calibration (`tree_tune.calibrate_confidence`, the tree's `calibration`);
- the prompt-lookup match calibration: on the model's greedy continuations, at every generated position, the row's
  context match and how many of its tokens the model then produced, binned by suffix match length
  ([`~hf_bpd.drafters.MatchCalibration.fit`]);
- the widest tree (`num_nodes`, from `--num-nodes` candidates): each candidate's spec decodes the tuning prompts
  (width from cost, this machine's measured cost curve) and the fastest is kept (interleaved repeats, medians).

Example:

```
OMP_NUM_THREADS=1 hf-bpd tune --auto --model reference/heads --prompts reference/prompts/tune.jsonl --write-config
```
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from hf_bpd.drafters import MatchCalibration, build_drafter
from hf_bpd.drafters.context_ngram import find_context_match

from .tree_tune import calibrate_confidence


def match_observations(seq: torch.LongTensor, prompt_len: int, max_depth: int, max_ngram: int = 3) -> tuple[list, list]:
    """At each generated position of `seq` `(T,)`: the suffix match length of the context's match (rows without a
    match are skipped) and how many of its continuation tokens equal the tokens the model produced next."""
    lengths, accepted = [], []
    tokens = seq[None]
    for t in range(prompt_len, seq.shape[0] - 1):
        match = find_context_match(tokens, torch.tensor([t]), torch.tensor([0]), max_depth, max_ngram=max_ngram)
        if not bool(match.found[0]):
            continue
        cont = match.tokens[0]
        truth = seq[t : t + max_depth]
        k = min(int(match.num_found_tokens[0]), truth.shape[0])
        same = (cont[:k] == truth[:k]).long().cumprod(0)
        lengths.append(int(match.length[0]))
        accepted.append(int(same.sum()))
    return lengths, accepted


def auto_spec(model: Any, prompts: Sequence[torch.LongTensor], num_nodes: int = 8, top_k: int = 4,
              max_depth: int = 10, max_new_tokens: int = 64) -> dict[str, Any]:  # fmt: skip
    """The `"auto"` spec fitted on `prompts` (each `(T,)` or `(1, T)`), with a tree of at most `num_nodes` nodes."""
    confidence = calibrate_confidence(model, prompts, top_k=top_k, max_new_tokens=max_new_tokens)
    lengths, accepted = [], []
    for ids in prompts:
        ids = (ids if ids.dim() == 2 else ids[None]).to(model.device)
        with torch.no_grad():
            seq = model.base.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                      do_sample=False)  # fmt: skip
        got = match_observations(seq[0].cpu(), ids.shape[1], max_depth)
        lengths += got[0]
        accepted += got[1]
    if not lengths:
        raise ValueError("No prompt-lookup match on the tuning prompts: give more or longer prompts.")
    return {
        "type": "auto",
        "tree": {"num_nodes": int(num_nodes), "top_k": int(top_k), "calibration": confidence.to_dict()},
        "context": {"max_ngram": 3, "min_ngram": 1, "max_depth": int(max_depth)},
        "match_calibration": MatchCalibration.fit(lengths, accepted, max_depth).to_dict(),
    }


def decode_seconds(model: Any, spec: Any, prompts: Sequence[torch.LongTensor], max_new_tokens: int) -> float:
    """Wall-clock seconds to decode all `prompts` with `use_bpd=True` and the drafter `spec`."""
    start = time.perf_counter()
    for ids in prompts:
        ids = (ids if ids.dim() == 2 else ids[None]).to(model.device)
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                           use_bpd=True, drafter=build_drafter(model, spec))  # fmt: skip
    return time.perf_counter() - start


def tune_auto(model: Any, prompts: Sequence[torch.LongTensor], num_nodes: Sequence[int] = (4, 8, 16), top_k: int = 4,
              max_depth: int = 10, max_new_tokens: int = 64, repeats: int = 2) -> tuple[dict, dict]:  # fmt: skip
    """The fastest `"auto"` spec over the `num_nodes` candidates, and the median seconds of each."""
    spec = auto_spec(model, prompts, max(num_nodes), top_k, max_depth, max_new_tokens)
    specs = {n: {**spec, "tree": {**spec["tree"], "num_nodes": int(n)}} for n in num_nodes}
    decode_seconds(model, specs[num_nodes[0]], prompts[:1], 8)  # warm up (and measure the cost curve once)
    times: dict[int, list[float]] = {n: [] for n in num_nodes}
    for r in range(repeats):  # interleaved: a slow patch of a shared machine hits every candidate alike
        for n in list(num_nodes)[r % len(num_nodes) :] + list(num_nodes)[: r % len(num_nodes)]:
            times[n].append(decode_seconds(model, specs[n], prompts, max_new_tokens))
    medians = {n: statistics.median(t) for n, t in times.items()}
    best = min(medians, key=medians.get)
    return specs[best], medians


def write_config(folder: str | Path, spec: dict[str, Any]) -> Path:
    """Set `drafter` in the checkpoint's `config.json` (the rest unchanged)."""
    path = Path(folder) / "config.json"
    config = json.loads(path.read_text())
    config["drafter"] = _rounded(spec)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return path


def _rounded(value: Any) -> Any:
    """Floats to 4 decimals (a readable config; calibration rates need no more)."""
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def main(argv: Sequence[str] | None = None) -> None:
    from transformers import AutoTokenizer

    from hf_bpd.data import load_prompts, tokenize_prompts
    from hf_bpd.modeling_bpd import BPDForCausalLM, tokenizer_source

    parser = argparse.ArgumentParser(prog="tune --auto", description="Fit the checkpoint's default drafter spec.")
    parser.add_argument("--model", required=True, help="BPDForCausalLM checkpoint folder.")
    parser.add_argument("--prompts", required=True, help="Tuning prompts (JSONL or text lines), never validation.")
    parser.add_argument("--max-prompts", type=int, default=12)
    parser.add_argument("--max-prompt-tokens", type=int, default=256)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--num-nodes", type=int, nargs="+", default=[4, 8, 16], help="Widest-tree candidates.")
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--max-depth", type=int, default=10, help="Deepest prompt-lookup draft.")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--write-config", action="store_true", help="Write the spec into the checkpoint's config.")
    args = parser.parse_args(argv)
    model = BPDForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).eval()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source(args.model, model, None, None))
    rows = load_prompts(args.prompts, tokenizer)[: args.max_prompts]
    batches = tokenize_prompts(rows, tokenizer, batch_size=1, max_prompt_tokens=args.max_prompt_tokens)
    prompts = [batch["input_ids"] for batch in batches if batch["input_ids"].numel()]
    spec, medians = tune_auto(model, prompts, args.num_nodes, args.top_k, args.max_depth, args.max_new_tokens,
                              args.repeats)  # fmt: skip
    for n, seconds in sorted(medians.items()):
        print(f"num_nodes={n}: {seconds:.2f} s (median of {args.repeats})")
    print(f"best: num_nodes={spec['tree']['num_nodes']}")
    if args.write_config:
        print(f"wrote {write_config(args.model, spec)}")
    else:
        print(json.dumps(_rounded(spec)))


if __name__ == "__main__":
    main()
