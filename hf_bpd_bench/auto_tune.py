"""
`hf-bpd tune --auto`: the checkpoint's default drafter spec (`{"type": "auto", ...}`, `hf_bpd.drafters.auto`), fitted
on tuning prompts (never the validation prompts) and written into the checkpoint's `config.json` (`drafter`).

What is fitted:
- the heads' per-depth confidence calibration (`tree_tune.calibrate_confidence`, the tree's `calibration`);
- the prompt-lookup match calibration: on the model's greedy continuations, at every generated position, the row's
  context match and how many of its tokens the model then produced, binned by suffix match length
  ([`~hf_bpd.drafters.MatchCalibration.fit`]);
- the widest tree (`num_nodes`, from `--num-nodes` candidates, 0 = no heads tree: prompt lookup alone with width from
  cost, no heads computed) and how the match joins it (`--rules`: merge, or both = switch when the match is long, which
  also skips the heads on those steps): each candidate decodes the tuning prompts (width from cost, this machine's
  measured cost curve) and the fastest is kept (interleaved repeats, medians). What it was tuned with (dtype, threads,
  CPU, medians) is written beside the spec (`drafter_tuning`): a spec tuned on one machine may not be best on another.

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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from hf_bpd.drafters import MatchCalibration, build_drafter
from hf_bpd.drafters.context_ngram import find_context_match

from .tree_tune import calibrate_confidence


def match_observations(
    seq: torch.LongTensor, prompt_len: int, max_depth: int, max_ngram: int = 3
) -> tuple[list, list]:
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


def auto_spec(
    model: Any,
    prompts: Sequence[torch.LongTensor],
    num_nodes: int = 8,
    top_k: int = 4,
    max_depth: int = 10,
    max_new_tokens: int = 64,
) -> dict[str, Any]:
    """The `"auto"` spec fitted on `prompts` (each `(T,)` or `(1, T)`), with a tree of at most `num_nodes` nodes."""
    confidence = calibrate_confidence(model, prompts, top_k=top_k, max_new_tokens=max_new_tokens)
    lengths, accepted = [], []
    for ids in prompts:
        ids = (ids if ids.dim() == 2 else ids[None]).to(model.device)
        with torch.no_grad():
            seq = model.base.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False
            )
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
            model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                use_bpd=True,
                drafter=build_drafter(model, spec),
            )
    return time.perf_counter() - start


def candidate_specs(spec: dict[str, Any], num_nodes: Sequence[int], rules: Sequence[str]) -> dict[str, dict]:
    """The specs tried, by name: `n{N}-{rule}` for a heads tree of at most `N` nodes, and `n0` for none at all
    (prompt lookup with width from cost: no heads computed, so merge and switch are the same drafter)."""
    specs: dict[str, dict] = {}
    for n in num_nodes:
        if int(n) == 0:
            specs["n0"] = {k: v for k, v in spec.items() if k != "tree"}
            continue
        for rule in rules:
            specs[f"n{int(n)}-{rule}"] = {**spec, "tree": {**spec["tree"], "num_nodes": int(n)}, "rule": rule}
    return specs


def tune_auto(
    model: Any,
    prompts: Sequence[torch.LongTensor],
    num_nodes: Sequence[int] = (0, 2, 4, 8),
    top_k: int = 4,
    max_depth: int = 10,
    max_new_tokens: int = 64,
    repeats: int = 3,
    rules: Sequence[str] = ("merge", "both"),
    spec: dict[str, Any] | None = None,
) -> tuple[dict, dict, dict]:
    """The fastest `"auto"` spec over the candidates ([`candidate_specs`]), the median seconds of each and all the
    timings (interleaved repeats: every repeat visits every candidate, in a rotated order). `spec`: an already
    fitted `"auto"` spec whose calibrations the candidates keep (default: fitted here, [`auto_spec`])."""
    if spec is None:
        spec = auto_spec(model, prompts, max(max(num_nodes), 1), top_k, max_depth, max_new_tokens)
    specs = candidate_specs(spec, num_nodes, rules)
    names = list(specs)
    for name in names:  # warm up each (and measure the cost curve once)
        decode_seconds(model, specs[name], prompts[:1], 8)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):  # interleaved: a slow patch of a shared machine hits every candidate alike
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(decode_seconds(model, specs[name], prompts, max_new_tokens))
    medians = {name: statistics.median(t) for name, t in times.items()}
    best = min(medians, key=medians.get)
    return specs[best], medians, times


def write_config(folder: str | Path, spec: dict[str, Any], tuning: dict[str, Any] | None = None) -> Path:
    """Set `drafter` (and `drafter_tuning`: what it was tuned with, when given) in the checkpoint's `config.json`
    (the rest unchanged). The `by_dtype` overrides of the config's previous spec are kept (those of `spec`, if any,
    are replaced by them), except the one for `tuning["dtype"]`: the new spec is tuned for that dtype."""
    path = Path(folder) / "config.json"
    config = json.loads(path.read_text())
    old = config.get("drafter") if isinstance(config.get("drafter"), dict) else {}
    spec = dict(spec)
    by_dtype = {k: v for k, v in (old.get("by_dtype") or {}).items() if tuning is None or k != tuning.get("dtype")}
    if by_dtype:
        spec["by_dtype"] = by_dtype
    config["drafter"] = _rounded(spec)
    if tuning is not None:
        kept = {
            k: v
            for k, v in (config.get("drafter_tuning") or {}).get("by_dtype", {}).items()
            if k != tuning.get("dtype") and k in by_dtype
        }
        config["drafter_tuning"] = _rounded({**tuning, **({"by_dtype": kept} if kept else {})})
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return path


def dtype_override(best: dict[str, Any]) -> dict[str, Any]:
    """What a tuned candidate changes in a checkpoint's spec: its whole tree (width, `top_k` and calibration, so the
    override stands whatever later happens to the spec's own tree; `None`: no tree) and its rule."""
    if best.get("tree") is None:
        return {"tree": None}
    return {"tree": dict(best["tree"]), "rule": best.get("rule", "merge")}


def write_dtype_override(folder: str | Path, dtype: str, best: dict[str, Any], tuning: dict[str, Any]) -> Path:
    """Record the fastest candidate for `dtype` as `drafter["by_dtype"][dtype]` (and its timings under
    `drafter_tuning["by_dtype"][dtype]`) in the checkpoint's `config.json`; the spec itself is unchanged."""
    path = Path(folder) / "config.json"
    config = json.loads(path.read_text())
    config["drafter"].setdefault("by_dtype", {})[dtype] = dtype_override(best)
    config.setdefault("drafter_tuning", {}).setdefault("by_dtype", {})[dtype] = _rounded(tuning)
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


def _parser() -> argparse.ArgumentParser:
    """The arguments of `tune --auto`; nonsense values (no candidates, negative counts) are refused by argparse."""

    def count(minimum: int):
        def parse(text: str) -> int:
            value = int(text)
            if value < minimum:
                raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
            return value

        return parse

    parser = argparse.ArgumentParser(prog="tune --auto", description="Fit the checkpoint's default drafter spec.")
    parser.add_argument("--model", required=True, help="BPDForCausalLM checkpoint folder.")
    parser.add_argument("--prompts", required=True, help="Tuning prompts (JSONL or text lines), never validation.")
    parser.add_argument("--max-prompts", type=count(1), default=12)
    parser.add_argument("--max-prompt-tokens", type=int, default=256)
    parser.add_argument("--max-new-tokens", type=count(1), default=64)
    parser.add_argument(
        "--num-nodes",
        type=count(0),
        nargs="+",
        default=[0, 2, 4, 8],
        help="Widest-tree candidates (0: no heads tree, prompt lookup with width from cost).",
    )
    parser.add_argument(
        "--rules",
        nargs="+",
        default=["merge", "both"],
        choices=["merge", "both"],
        help="How the prompt-lookup match joins the tree: merge, or both (switch when long).",
    )
    parser.add_argument("--top-k", type=count(1), default=None, help="Tree branching (default 4).")
    parser.add_argument("--max-depth", type=count(1), default=None, help="Deepest prompt-lookup draft (default 10).")
    parser.add_argument(
        "--repeats",
        type=count(1),
        default=3,
        help="Interleaved timings of each candidate, median kept (default 3: the median of two is their mean and cannot "
        "reject a slow patch of a shared machine; BENCHMARKS.md, stop 33).",
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's).")
    parser.add_argument("--json", default=None, help="Write every timing here (JSON).")
    write = parser.add_mutually_exclusive_group()
    write.add_argument("--write-config", action="store_true", help="Write the spec into the checkpoint's config.")
    write.add_argument(
        "--dtype-override",
        action="store_true",
        help="Keep the checkpoint's 'auto' spec (its calibrations, top-k and depth); time its tree widths and rules "
        "in --dtype and write the fastest as the spec's override for that dtype (drafter.by_dtype), used whenever "
        "the base runs in it. For machines or dtypes other than the one the spec was tuned on.",
    )
    return parser


def _spec_to_override(args: argparse.Namespace) -> dict[str, Any]:
    """`--dtype-override`: the checkpoint's fitted `"auto"` spec (without its overrides), or a `SystemExit` saying why
    it cannot be kept."""
    from hf_bpd import BPDConfig

    current = BPDConfig.from_pretrained(args.model).drafter
    if args.top_k is not None or args.max_depth is not None:
        raise SystemExit(
            "--dtype-override keeps the checkpoint's fitted spec, its top-k and depth included: drop --top-k and "
            "--max-depth, or re-tune the whole spec with --write-config."
        )
    if not (isinstance(current, dict) and current.get("type") == "auto"):
        raise SystemExit(
            f"--dtype-override keeps the checkpoint's 'auto' spec, but {args.model}'s config holds "
            f"drafter={current!r}: run `tune --auto --write-config` first."
        )
    if not current.get("tree"):
        raise SystemExit(
            f"--dtype-override times the heads tree widths of the checkpoint's spec, but {args.model}'s spec has "
            "no heads tree (prompt lookup alone won when it was tuned): re-tune it with --write-config (its "
            "calibrations are fitted for the tree candidates of --num-nodes) and then override."
        )
    return {k: v for k, v in current.items() if k != "by_dtype"}


def main(argv: Sequence[str] | None = None) -> None:
    from transformers import AutoTokenizer

    from hf_bpd.data import load_prompts, tokenize_prompts
    from hf_bpd.modeling_bpd import BPDForCausalLM, tokenizer_source

    args = _parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    fitted = _spec_to_override(args) if args.dtype_override else None
    model = BPDForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).eval()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source(args.model, model, None, None))
    rows = load_prompts(args.prompts, tokenizer)[: args.max_prompts]
    batches = tokenize_prompts(rows, tokenizer, batch_size=1, max_prompt_tokens=args.max_prompt_tokens)
    prompts = [batch["input_ids"] for batch in batches if batch["input_ids"].numel()]
    spec, medians, times = tune_auto(
        model,
        prompts,
        args.num_nodes,
        4 if args.top_k is None else args.top_k,
        10 if args.max_depth is None else args.max_depth,
        args.max_new_tokens,
        args.repeats,
        args.rules,
        spec=fitted,
    )
    best = min(medians, key=medians.get)
    for name, seconds in medians.items():
        print(f"{name}: {seconds:.2f} s (median of {args.repeats})")
    print(f"best: {best}")
    from hf_bpd.cost import cpu_model

    tuning = {
        "prompts": str(args.prompts),
        "num_prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "repeats": args.repeats,
        "best": best,
        "median_s": medians,
    }
    if args.json:
        Path(args.json).write_text(json.dumps({**tuning, "times_s": times, "spec": _rounded(spec)}, indent=1) + "\n")
    if args.dtype_override:
        print(
            f"wrote {args.dtype}: {dtype_override(spec)} to {write_dtype_override(args.model, args.dtype, spec, tuning)}"
        )
    elif args.write_config:
        print(f"wrote {write_config(args.model, spec, tuning)}")
    else:
        print(json.dumps(_rounded(spec)))


if __name__ == "__main__":
    main()
