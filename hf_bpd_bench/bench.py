"""
`hf-bpd bench`: every decoding method on the same prompts, in one run, with interleaved repeats.

The methods are listed in `METHODS` (and by `hf-bpd bench --help`). Every figure is defined once, in
`hf_bpd.metrics`: block efficiency is generated tokens per serial call of the base model per row, so BPD, prompt
lookup and assisted decoding compare on one scale and plain greedy scores 1 at every batch size (BPD's calls per row
come from its accepted lengths; prompt lookup's and assisted decoding's from a forward hook, at batch size 1).
transformers' prompt lookup and assisted decoding support batch size 1 only: at larger batch sizes they are
reported as `unsupported`.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from hf_bpd import metrics
from hf_bpd.data import tokenize_prompts
from hf_bpd.logits import Drafter
from hf_bpd.modeling_bpd import BPDForCausalLM

from .defaults import RESCORER_DEFAULTS
from .methods import CHECKPOINT, METHODS, REFERENCE_METHOD, Part, parse_methods, resolve

logger = logging.getLogger(__name__)


@dataclass
class BenchConfig:
    """
    Args:
        max_new_tokens (`int`): tokens generated per prompt.
        batch_size (`int`): prompts per `generate` call (left-padded).
        repeats (`int`): interleaved timed repeats per method; the median is reported.
        top_k (`int`): lattice width for the rescorers; `num_drafts` (`int`): p for the p-best methods.
        tree_nodes (`int`): node budget of the dynamic trees (`bpd-tree*`); 16 = the width of 4 chains of h = 4.
        tree_min_confidence (`float`): adaptive draft length of the dynamic trees (0: always fill the budget).
        alpha_ngram, alpha_neural (`float`): rescorer interpolation weights.
        oracle_top_k (`int`): k of the `oracle` method.
        pld_tokens (`int`): `prompt_lookup_num_tokens` for `pld`.
    """

    max_new_tokens: int = 64
    batch_size: int = 1
    repeats: int = 3
    top_k: int = RESCORER_DEFAULTS.top_k
    num_drafts: int = RESCORER_DEFAULTS.num_drafts
    alpha_ngram: float = RESCORER_DEFAULTS.alpha_ngram
    alpha_neural: float = RESCORER_DEFAULTS.alpha_neural
    oracle_top_k: int = RESCORER_DEFAULTS.oracle_top_k
    pld_tokens: int = 4
    tree_nodes: int = 16
    tree_min_confidence: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


class ForwardCounter:
    """Counts forward calls of a module (the base model's serial calls)."""

    def __init__(self, module: torch.nn.Module):
        self.calls = 0
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, *args):
        self.calls += 1


@dataclass
class Resources:
    """What the methods need: the BPD model, a tokenizer, optionally the small LM and an n-gram file."""

    model: BPDForCausalLM
    tokenizer: Any
    small_lm: Any = None
    ngram_path: str | None = None
    rescorers: dict[str, Drafter] = field(default_factory=dict)  # built once per method (loading not timed)

    @property
    def draft_tree(self) -> Any:
        """The static draft tree saved with the heads (`BPDConfig.draft_tree`), or None."""
        return getattr(self.model.config, "draft_tree", None)


FIGURE_KEYS = (
    "block_efficiency",
    "tokens_per_s",
    "speedup_vs_greedy",
    "identical_to_greedy",
    "mean_accepted_length",
    "rescoring_ms_per_step",
    "mean_verify_width",
)
# transformers `generate` argument that takes a BPD drafter (one place: renamed here when the loop's name changes)
DRAFTER_KWARG = "draft_rescorer"


def method_kwargs(method: str, res: Resources, cfg: BenchConfig, reference: torch.Tensor | None) -> dict[str, Any]:
    """The `generate` keyword arguments of a method (its `METHODS` entry, resolved for this run and batch)."""
    spec = METHODS[method]
    try:
        kwargs = resolve(dict(spec.generate), cfg, res)
        if not spec.uses_bpd:
            return kwargs
        kwargs |= {"use_bpd": True, "return_dict_in_generate": True}
        if spec.drafter == CHECKPOINT:
            return kwargs
        if spec.per_batch:  # reads this batch's greedy output: built per batch
            kwargs[DRAFTER_KWARG] = make_drafter(resolve(spec.drafter, cfg, res, reference), res)
            return kwargs
        if method not in res.rescorers:  # built once (loading is not timed)
            for part in spec.needs:
                resolve(Part(part), cfg, res)
            res.rescorers[method] = make_drafter(resolve(spec.drafter, cfg, res), res)
    except ValueError as err:
        raise ValueError(f"Method {method!r} {err}") from None
    kwargs[DRAFTER_KWARG] = res.rescorers[method]
    return kwargs


def make_drafter(spec: dict[str, Any], res: Resources) -> Drafter:
    """
    A drafter from a resolved drafter spec `{"type": name, **options}` (a `METHODS` entry's `drafter`).

    Today's drafter classes behind one function; with `hf_bpd`'s drafter registry this becomes
    `build_drafter(res.model, spec)`.
    """
    from hf_bpd import logits as L

    options = {key: value for key, value in spec.items() if key != "type"}
    pad = res.tokenizer.pad_token_id
    kind = spec["type"]
    if kind == "ngram":
        return L.NgramRescorer(**options, pad_token_id=pad)
    if kind == "neural":
        return L.NeuralRescorer(**options, pad_token_id=pad)
    if kind == "pbest":
        return L.PBestRescorer(**options)
    if kind == "tree":
        return L.DynamicTreeDrafter(**options, pad_token_id=pad)
    if kind == "tree-static":
        return L.StaticTreeDrafter(**options)
    if kind == "oracle":
        return L.OracleDrafter(pad_token_id=pad if pad is not None else 0, **options)
    if kind == "heads":
        return L.HeadsDrafter()
    from hf_bpd.drafters import build_drafter

    return build_drafter(res.model, spec)  # every other registered drafter, by its registry name


def run_method(
    method: str,
    res: Resources,
    cfg: BenchConfig,
    inputs: list[dict[str, torch.Tensor]],
    references: list[torch.Tensor] | None,
) -> dict[str, Any]:
    """One pass of a method over all batches: outputs, seconds, and the counts `hf_bpd.metrics` turns into figures."""
    model = res.model
    pad = res.tokenizer.pad_token_id
    counter = ForwardCounter(model.base)
    outputs, accepted, tokens, calls, draft_s, steps, nodes = [], [], 0, 0, 0.0, 0, 0.0
    start = time.perf_counter()
    try:
        for i, batch in enumerate(inputs):
            kwargs = method_kwargs(method, res, cfg, references[i] if references is not None else None)
            gen = model if kwargs.get("use_bpd") else model.base
            calls_before = counter.calls
            out = gen.generate(**batch, max_new_tokens=cfg.max_new_tokens, do_sample=False, **kwargs)
            seq = out.sequences if hasattr(out, "sequences") else out
            outputs.append(seq)
            new = seq[:, batch["input_ids"].shape[1] :]
            row_tokens = (new != pad).sum(-1) if pad is not None else torch.full((new.shape[0],), new.shape[1])
            if hasattr(out, "accepted_lengths"):  # BPD: the calls each row took part in, from its accepted lengths
                row_calls = metrics.rows_from_accepted(out.accepted_lengths)[1]
                accepted.append(out.accepted_lengths.flatten())
                draft_s += out.draft_time_s
                steps += out.accepted_lengths.shape[0]
                nodes += (out.mean_verify_width or 0.0) * out.accepted_lengths.shape[0]
            elif not METHODS[method].generate:  # plain decoding: one token per row per call
                row_calls = row_tokens
            else:  # prompt lookup / assisted decoding (batch size 1): the calls the forward hook counted
                row_calls = torch.full_like(row_tokens, counter.calls - calls_before)
            tokens += int(row_tokens.sum())
            calls += int(row_calls.sum())
    finally:
        counter.handle.remove()
    return {
        "outputs": outputs,
        "seconds": time.perf_counter() - start,
        "generated": tokens,
        "row_calls": calls,
        "accepted": torch.cat(accepted) if accepted else torch.zeros(0, dtype=torch.long),
        "draft_ms_per_step": metrics.draft_ms_per_step(draft_s, steps),
        "verify_nodes": nodes,  # draft nodes verified, summed over verify steps
        "verify_steps": steps,
    }


def benchmark(
    res: Resources,
    prompts: list[dict],
    methods: list[str],
    cfg: BenchConfig,
    progress: bool = True,
) -> dict[str, Any]:
    """
    Run `methods` on `prompts` (grouped by their `"domain"`), `cfg.repeats` interleaved repeats each.

    Returns:
        `{"config": ..., "methods": {name: figures}, "domains": {domain: {"methods": {name: figures}}}}` where the
        figures are `block_efficiency`, `tokens_per_s`, `speedup_vs_greedy`, `identical_to_greedy`,
        `mean_accepted_length`, `rescoring_ms_per_step`, `seconds`.
    """
    methods = parse_methods(methods)
    if REFERENCE_METHOD not in methods:
        methods = [REFERENCE_METHOD, *methods]  # the reference for identity and speedup
    unsupported = _unsupported(methods, res, cfg)
    by_reason: dict[str, list[str]] = {}
    for m, why in unsupported.items():
        by_reason.setdefault(why, []).append(m)
    for why, skipped in by_reason.items():
        logger.warning("Batch size %d: skipping %s: %s.", cfg.batch_size, ", ".join(skipped), why)
    if unsupported:
        methods = [m for m in methods if m not in unsupported]
    domains = sorted({p.get("domain", "all") for p in prompts})
    report: dict[str, Any] = {"config": cfg.__dict__ | {"num_prompts": len(prompts)}, "domains": {}}
    bar = tqdm(total=len(domains) * cfg.repeats * len(methods), desc="bench", disable=not progress)
    # one untimed call of every method first: one-time costs (the default drafter measures this machine's forward cost
    # curve on its first call, once per machine, model, dtype and thread count; lazy imports) are not steady state
    first = tokenize_prompts(prompts[:1], res.tokenizer, 1)
    for method in methods:
        if METHODS[method].timed:
            run_method(method, res, cfg, first, None)
    for domain in domains:
        subset = [p for p in prompts if p.get("domain", "all") == domain]
        inputs = tokenize_prompts(subset, res.tokenizer, cfg.batch_size)
        greedy_ref = run_method(REFERENCE_METHOD, res, cfg, inputs, None)["outputs"]  # warm-up and reference
        timed: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
        for _ in range(cfg.repeats):
            for method in methods:  # interleaved: greedy, bpd, ..., greedy, bpd, ...
                timed[method].append(run_method(method, res, cfg, inputs, greedy_ref))
                bar.update(1)
        figures = {m: _figures(m, timed[m], timed[REFERENCE_METHOD], greedy_ref) for m in methods}
        report["domains"][domain] = {"num_prompts": len(subset), "methods": figures}
    bar.close()
    report["methods"] = {m: _overall(m, report["domains"]) for m in methods}
    for m, why in unsupported.items():  # reported, not silently dropped
        skipped = dict.fromkeys(FIGURE_KEYS) | {"unsupported": why}
        report["methods"][m] = dict(skipped)
        for d in report["domains"].values():
            d["methods"][m] = dict(skipped)
    return report


def _unsupported(methods: list[str], res: Resources, cfg: BenchConfig) -> dict[str, str]:
    """
    The methods that cannot run here, with why: batch size 1 only, a static tree the heads do not carry, or a search
    of the heads' top-k lattice with token-conditioned heads (exact only for independent ones).
    """
    unsupported = {m: METHODS[m].batch1_only for m in methods if METHODS[m].batch1_only and cfg.batch_size > 1}
    for m in methods:
        if METHODS[m].lattice and not res.model.independent_heads:
            unsupported[m] = (
                "searches the heads' top-k lattice (Kim et al.), exact only for independent heads; "
                f"head_type={res.model.config.head_type!r} heads read the drafted tokens: bpd-tree and "
                "bpd-tree-ngram rank the searched paths instead"
            )
        if "draft_tree" in METHODS[m].parts() and res.draft_tree is None:
            unsupported[m] = (
                "the heads carry no static tree (BPDConfig.draft_tree): calibrate one with "
                "`hf-bpd tune --tree --save-model DIR`"
            )
    return unsupported


def _figures(method: str, runs: list[dict], greedy_runs: list[dict], greedy_ref: list[torch.Tensor]) -> dict[str, Any]:
    seconds = statistics.median(r["seconds"] for r in runs)
    greedy_seconds = statistics.median(r["seconds"] for r in greedy_runs)
    first = runs[0]
    identical = all(torch.equal(a, b) for a, b in zip(first["outputs"], greedy_ref))
    mean_accepted = metrics.mean_accepted_length(first["accepted"])
    fig = {
        "block_efficiency": round(metrics.block_efficiency(first["generated"], first["row_calls"]), 3),
        "tokens_per_s": round(metrics.tokens_per_second(first["generated"], seconds), 2),
        "speedup_vs_greedy": round(metrics.speedup(greedy_seconds, seconds), 3),
        "identical_to_greedy": identical,
        "mean_accepted_length": round(mean_accepted, 3) if mean_accepted is not None else None,
        "rescoring_ms_per_step": round(first["draft_ms_per_step"], 3),
        "seconds": round(seconds, 3),
        "generated_tokens": first["generated"],
        "row_calls": first["row_calls"],
        "steps": int((first["accepted"] >= 0).sum()),
        "mean_verify_width": _mean_width(first),
        "accepted_histogram": torch.bincount(first["accepted"][first["accepted"] >= 0]).tolist(),
    }
    if not METHODS[method].timed:  # headroom measure: no wall clock
        fig["tokens_per_s"] = fig["speedup_vs_greedy"] = None
    return fig


def _mean_width(run: dict[str, Any]) -> float | None:
    """Draft nodes verified per verify step (BPD methods; width from cost varies it step by step)."""
    return round(run["verify_nodes"] / run["verify_steps"], 3) if run.get("verify_steps") else None


def _overall(method: str, domains: dict[str, Any]) -> dict[str, Any]:
    """Totals over domains: every figure from summed tokens, calls, steps and seconds (the same rules as per domain)."""
    figs = [d["methods"][method] for d in domains.values()]
    greedy = [d["methods"][REFERENCE_METHOD] for d in domains.values()]
    tokens = sum(f["generated_tokens"] for f in figs)
    seconds = sum(f["seconds"] for f in figs)
    steps = sum(f["steps"] for f in figs)
    accepted = [(f["mean_accepted_length"], f["steps"]) for f in figs if f["mean_accepted_length"] is not None]
    rescoring = sum(f["rescoring_ms_per_step"] * f["steps"] for f in figs)
    timed = METHODS[method].timed
    return {
        "block_efficiency": round(metrics.block_efficiency(tokens, sum(f["row_calls"] for f in figs)), 3),
        "tokens_per_s": round(metrics.tokens_per_second(tokens, seconds), 2) if timed else None,
        "speedup_vs_greedy": round(metrics.speedup(sum(g["seconds"] for g in greedy), seconds), 3) if timed else None,
        "identical_to_greedy": all(f["identical_to_greedy"] for f in figs),
        "mean_accepted_length": round(sum(m * n for m, n in accepted) / steps, 3) if accepted and steps else None,
        "rescoring_ms_per_step": round(rescoring / steps, 3) if steps else 0.0,
        "mean_verify_width": _mean_of(figs, "mean_verify_width"),
    }


def _mean_of(figs: list[dict[str, Any]], key: str) -> float | None:
    values = [f[key] for f in figs if f.get(key) is not None]
    return round(sum(values) / len(values), 3) if values else None


def format_table(report: dict[str, Any]) -> str:
    """A plain-text table per domain for people."""
    cols = FIGURE_KEYS
    lines = []
    sections = [("all domains", report["methods"])] + [(d, v["methods"]) for d, v in report["domains"].items()]
    for name, methods in sections:
        lines.append(f"\n[{name}]")
        lines.append(f"{'method':<12}" + "".join(f"{c:>24}" for c in cols))
        for m, f in methods.items():
            if f.get("unsupported"):
                lines.append(f"{m:<12}  ({f['unsupported']})")
            else:
                lines.append(f"{m:<12}" + "".join(f"{str(f.get(c)):>24}" for c in cols))
    return "\n".join(lines)
