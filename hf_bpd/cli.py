"""
The `hf-bpd` command.

    hf-bpd bench   [--model DIR] [--prompts FILE.jsonl] [--methods ...] [--max-new-tokens N] [--batch-size B ...] [--json OUT]
    hf-bpd analyze [--model DIR] [--prompts FILE.jsonl] [--out DIR]
    hf-bpd build-ngram ...   (KenLM n-gram over token ids; see hf_bpd/logits/build_ngram.py)
    hf-bpd tune ...          (alpha / k / p search; see hf_bpd/logits/tuning.py)

Defaults point at the shipped reference stack under `reference/` (heads, base, small LM, n-gram, prompts).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

REFERENCE = Path(__file__).resolve().parents[1] / "reference"
DELEGATED = {"build-ngram": "hf_bpd.logits.build_ngram", "tune": "hf_bpd.logits.tuning"}


def _reference(name: str) -> str | None:
    path = REFERENCE / name
    return str(path) if path.exists() else None


def _default_ngram() -> str | None:
    folder = REFERENCE / "ngram"
    found = sorted(folder.glob("*.binary")) + sorted(folder.glob("*.arpa")) if folder.is_dir() else []
    return str(found[0]) if found else None


def _load_resources(args: argparse.Namespace, need_small: bool, need_ngram: bool) -> Any:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .benchmark import Resources
    from .modeling_bpd import BPDForCausalLM, tokenizer_source

    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.model or not Path(args.model).exists():
        raise SystemExit(f"No BPD model at {args.model!r}: pass --model DIR (a BPDForCausalLM checkpoint).")
    base = args.base or None
    model = BPDForCausalLM.from_pretrained(args.model, base_model=base, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source(args.model, model, args.tokenizer, base))
    small = None
    if need_small and args.small_lm:
        small = AutoModelForCausalLM.from_pretrained(args.small_lm, dtype=torch.float32).eval()
    return Resources(model=model, tokenizer=tokenizer, small_lm=small, ngram_path=args.ngram if need_ngram else None)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=_reference("heads"), help="BPD checkpoint folder (default: reference/heads)")
    p.add_argument("--base", default=None, help="base model folder/name (default: the checkpoint's own)")
    p.add_argument("--tokenizer", default=None, help="tokenizer (default: the base model's)")
    p.add_argument("--prompts", default=_reference("prompts/validation.jsonl"),
                   help='JSONL, one {"prompt": text, "domain": optional} a line (default: shipped validation prompts)')
    p.add_argument("--max-prompts", type=int, default=None, help="at most this many prompts per domain")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--small-lm", default=_reference("small"), help="small LM: neural rescorer and assistant model")
    p.add_argument("--ngram", default=_default_ngram(), help="KenLM model over token ids (.binary or .arpa)")
    # Defaults tuned by block efficiency with `hf-bpd tune` on reference/prompts/tune.jsonl (disjoint from the
    # prompts the benchmark uses by default); the commands and tables are in BENCHMARKS.md.
    p.add_argument("--top-k", type=int, default=8, help="lattice top-k of the rescorers")
    p.add_argument("--num-drafts", type=int, default=4, help="drafts verified per step by bpd-ngram / bpd-pbest*")
    p.add_argument("--alpha-ngram", type=float, default=0.5, help="n-gram weight of bpd-ngram / bpd-pbest")
    p.add_argument("--alpha-neural", type=float, default=0.75, help="small-LM weight of bpd-neural")
    p.add_argument("--threads", type=int, default=None, help="torch threads")


def cmd_bench(args: argparse.Namespace) -> int:
    from .benchmark import METHODS, BenchConfig, benchmark, format_table, load_prompts

    methods = args.methods or list(METHODS)
    res = _load_resources(args, need_small=any(m in methods for m in ("assisted", "bpd-neural")),
                          need_ngram=any(m in methods for m in ("bpd-ngram", "bpd-pbest")))  # fmt: skip
    prompts = load_prompts(args.prompts, args.max_prompts)
    results = {}
    for batch_size in args.batch_size:
        cfg = BenchConfig(max_new_tokens=args.max_new_tokens, batch_size=batch_size, repeats=args.repeats,
                          top_k=args.top_k, num_drafts=args.num_drafts, alpha_ngram=args.alpha_ngram,
                          alpha_neural=args.alpha_neural, oracle_top_k=args.oracle_top_k)  # fmt: skip
        report = benchmark(res, prompts, methods, cfg, progress=not args.no_progress)
        print(f"\n== batch size {batch_size} ==" + format_table(report))
        results[str(batch_size)] = report
    first = results[str(args.batch_size[0])]
    payload = {"methods": first["methods"], "domains": first["domains"], "config": first["config"],
               "by_batch_size": results, "model": args.model}  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(payload, indent=2))
        print(f"\nwrote {args.json}")
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from .analysis import analyze, plot
    from .benchmark import load_prompts

    res = _load_resources(args, need_small=False, need_ngram=bool(args.ngram))
    compare = None
    if res.ngram_path:
        from .logits import NgramRescorer

        compare = NgramRescorer(res.ngram_path, top_k=args.top_k, alpha=args.alpha_ngram, num_drafts=1)
    prompts = load_prompts(args.prompts, args.max_prompts)
    report = analyze(res, prompts, args.max_new_tokens, compare=compare)
    paths = plot(report, args.out)
    report.pop("_raw")
    (Path(args.out) / "analysis.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    print("plots:", *map(str, paths))
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="hf-bpd", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    bench = sub.add_parser("bench", help="compare decoding methods on prompts (interleaved repeats, medians)")
    _common(bench)
    bench.add_argument("--methods", nargs="+", default=None, help="default: all")
    bench.add_argument("--batch-size", type=int, nargs="+", default=[1], help="one or more batch sizes")
    bench.add_argument("--repeats", type=int, default=3)
    bench.add_argument("--oracle-top-k", type=int, default=8)
    bench.add_argument("--json", default=None, help="write the figures to this JSON file")
    bench.add_argument("--no-progress", action="store_true")
    bench.set_defaults(func=cmd_bench)

    ana = sub.add_parser("analyze", help="draft repetition, head entropy / h_max, oracle top-k efficiency, plots")
    _common(ana)
    ana.add_argument("--out", default="analysis", help="folder for the PNG plots and analysis.json")
    ana.set_defaults(func=cmd_analyze)

    for name in DELEGATED:
        sub.add_parser(name, help=f"see `hf-bpd {name} --help`", add_help=False)

    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in DELEGATED:  # their own argparse parsers take the rest, options included
        return _delegate(DELEGATED[argv[0]], argv[1:])
    args = parser.parse_args(argv)
    return args.func(args)


def _delegate(module: str, rest: list[str]) -> int:
    import importlib

    return importlib.import_module(module).main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
