"""
`hf-bpd bench`: every decoding method on the same prompts, in one run, with interleaved repeats.

Methods: `greedy` (the base model's own generate), `bpd` (heads' argmax drafts), `bpd-ngram` (global KenLM
rescoring, best path), `bpd-neural` (local rescoring with the small LM), `bpd-pbest` (p best n-gram paths verified
together), `bpd-pbest0` (p best paths by head scores alone), `pld` (transformers' prompt lookup decoding),
`assisted` (transformers' assisted decoding with the small LM as draft model) and `oracle` (oracle top-k block
efficiency: the heads' top-k lattice with a perfect chooser; measures headroom, no wall clock).

Block efficiency is measured the same way for every method: generated tokens / (forward calls of the base model x
rows in the batch), i.e. tokens per row per serial call (calls counted by a forward hook), so BPD, prompt lookup and
assisted decoding compare on one scale and plain greedy scores 1 at every batch size. transformers' prompt lookup
and assisted decoding support batch size 1 only: at larger batch sizes they are reported as `unsupported`.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .logits.base import DraftRescorer
from .modeling_bpd import BPDForCausalLM

logger = logging.getLogger(__name__)

METHODS = ("greedy", "bpd", "bpd-ngram", "bpd-neural", "bpd-pbest", "bpd-pbest0", "pld", "assisted", "oracle")


@dataclass
class BenchConfig:
    """
    Args:
        max_new_tokens (`int`): tokens generated per prompt.
        batch_size (`int`): prompts per `generate` call (left-padded).
        repeats (`int`): interleaved timed repeats per method; the median is reported.
        top_k (`int`): lattice width for the rescorers; `num_drafts` (`int`): p for the p-best methods.
        alpha_ngram, alpha_neural (`float`): rescorer interpolation weights.
        oracle_top_k (`int`): k of the `oracle` method.
        pld_tokens (`int`): `prompt_lookup_num_tokens` for `pld`.
    """

    max_new_tokens: int = 64
    batch_size: int = 1
    repeats: int = 3
    top_k: int = 4
    num_drafts: int = 4
    alpha_ngram: float = 0.5
    alpha_neural: float = 0.5
    oracle_top_k: int = 8
    pld_tokens: int = 4
    extra: dict[str, Any] = field(default_factory=dict)


class OracleTopKDrafter(DraftRescorer):
    """
    The best path of the heads' top-k lattice, chosen with knowledge of the reference continuation: the draft
    follows the reference while each reference token lies in that head's top-k (Kim et al.'s oracle top-k).
    """

    def __init__(self, reference: torch.LongTensor, top_k: int):
        self.reference, self.top_k = reference, top_k

    def __call__(self, input_ids, lengths, draft_logits):
        batch, num_heads, _ = draft_logits.shape
        padded = torch.nn.functional.pad(self.reference, (0, num_heads), value=0)
        index = (lengths[:, None] + torch.arange(num_heads)).clamp(max=padded.shape[1] - 1)
        wanted = padded.gather(1, index)  # (B, h)
        top = draft_logits.topk(min(self.top_k, draft_logits.shape[-1]), dim=-1).indices  # (B, h, k)
        inside = (top == wanted[..., None]).any(-1).long().cumprod(-1).bool()
        return torch.where(inside, wanted, top[..., 0])[:, None]


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
    rescorers: dict[str, DraftRescorer] = field(default_factory=dict)  # built once per method (loading not timed)


# transformers' assisted generation (prompt lookup included) raises for batch size > 1 (transformers 5.x).
BATCH1_ONLY = {
    "pld": "transformers' prompt lookup decoding supports batch size 1 only",
    "assisted": "transformers' assisted decoding supports batch size 1 only",
}
FIGURE_KEYS = ("block_efficiency", "tokens_per_s", "speedup_vs_greedy", "identical_to_greedy", "mean_accepted_length",
               "rescoring_ms_per_step")  # fmt: skip


def method_kwargs(method: str, res: Resources, cfg: BenchConfig, reference: torch.Tensor | None) -> dict[str, Any]:
    """The `generate` keyword arguments of a method."""
    if method == "greedy":
        return {}
    if method == "pld":
        return {"prompt_lookup_num_tokens": cfg.pld_tokens}
    if method == "assisted":
        _need(res.small_lm, method, "a small LM (--small-lm)")
        return {"assistant_model": res.small_lm}
    kwargs: dict[str, Any] = {"use_bpd": True, "return_dict_in_generate": True}
    if method == "oracle":
        kwargs["draft_rescorer"] = OracleTopKDrafter(reference, cfg.oracle_top_k)
    elif method != "bpd":
        if method not in res.rescorers:
            res.rescorers[method] = make_rescorer(method, res, cfg)
        kwargs["draft_rescorer"] = res.rescorers[method]
    return kwargs


def make_rescorer(method: str, res: Resources, cfg: BenchConfig) -> DraftRescorer:
    """The rescorer of a `bpd-*` method (kenlm is imported lazily by `NgramRescorer`)."""
    from . import logits as L

    pad = res.tokenizer.pad_token_id
    if method in ("bpd-ngram", "bpd-pbest"):
        path = _need(res.ngram_path, method, "an n-gram model (--ngram)")
        p = 1 if method == "bpd-ngram" else cfg.num_drafts
        return L.NgramRescorer(path, top_k=cfg.top_k, alpha=cfg.alpha_ngram, num_drafts=p, pad_token_id=pad)
    if method == "bpd-neural":
        lm = _need(res.small_lm, method, "a small LM (--small-lm)")
        return L.NeuralRescorer(lm, top_k=cfg.top_k, alpha=cfg.alpha_neural, pad_token_id=pad)
    if method == "bpd-pbest0":
        return L.PBestRescorer(top_k=cfg.top_k, num_drafts=cfg.num_drafts)
    raise ValueError(f"Unknown method {method!r}; choose from {', '.join(METHODS)}.")


def _need(value: Any, method: str, what: str) -> Any:
    if value is None:
        raise ValueError(f"Method {method!r} needs {what}; pass it or leave the method out (--methods).")
    return value


def batches(prompts: list[dict], tokenizer: Any, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Left-padded tokenised batches of the prompts' `"prompt"` texts."""
    tokenizer.padding_side = "left"
    out = []
    for i in range(0, len(prompts), batch_size):
        texts = [p["prompt"] for p in prompts[i : i + batch_size]]
        out.append(dict(tokenizer(texts, return_tensors="pt", padding=True)))
    return out


def run_method(
    method: str, res: Resources, cfg: BenchConfig, inputs: list[dict[str, torch.Tensor]], references: list[torch.Tensor] | None
) -> dict[str, Any]:
    """One pass of a method over all batches: outputs, seconds, and counters."""
    model = res.model
    counter = ForwardCounter(model.base)
    outputs, generated, accepted, draft_s, steps, row_calls = [], 0, [], 0.0, 0, 0
    start = time.perf_counter()
    try:
        for i, batch in enumerate(inputs):
            kwargs = method_kwargs(method, res, cfg, references[i] if references is not None else None)
            gen = model if kwargs.get("use_bpd") else model.base
            calls_before = counter.calls
            out = gen.generate(**batch, max_new_tokens=cfg.max_new_tokens, do_sample=False, **kwargs)
            # a forward call advances every row of the batch: efficiency is per row
            row_calls += (counter.calls - calls_before) * batch["input_ids"].shape[0]
            seq = out.sequences if hasattr(out, "sequences") else out
            outputs.append(seq)
            prompt_len = batch["input_ids"].shape[1]
            new = seq[:, prompt_len:]
            generated += int((new != res.tokenizer.pad_token_id).sum()) if res.tokenizer.pad_token_id is not None else new.numel()
            if hasattr(out, "accepted_lengths"):
                acc = out.accepted_lengths
                accepted.extend(acc[acc >= 0].tolist())
                draft_s += out.draft_time_s
                steps += out.num_serial_calls
    finally:
        counter.handle.remove()
    elapsed = time.perf_counter() - start
    return {
        "outputs": outputs,
        "seconds": elapsed,
        "generated": generated,
        "serial_calls": counter.calls,
        "row_calls": row_calls,
        "accepted": accepted,
        "draft_ms_per_step": 1e3 * draft_s / steps if steps else 0.0,
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
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"Unknown methods {unknown}; choose from {', '.join(METHODS)}.")
    if "greedy" not in methods:
        methods = ["greedy", *methods]  # the reference for identity and speedup
    unsupported = {m: BATCH1_ONLY[m] for m in methods if m in BATCH1_ONLY and cfg.batch_size > 1}
    if unsupported:
        logger.warning("Batch size %d: skipping %s (%s).", cfg.batch_size, ", ".join(unsupported),
                       "; ".join(unsupported.values()))  # fmt: skip
        methods = [m for m in methods if m not in unsupported]
    domains = sorted({p.get("domain", "all") for p in prompts})
    report: dict[str, Any] = {"config": cfg.__dict__ | {"num_prompts": len(prompts)}, "domains": {}}
    bar = tqdm(total=len(domains) * cfg.repeats * len(methods), desc="bench", disable=not progress)
    for domain in domains:
        subset = [p for p in prompts if p.get("domain", "all") == domain]
        inputs = batches(subset, res.tokenizer, cfg.batch_size)
        greedy_ref = run_method("greedy", res, cfg, inputs, None)["outputs"]  # warm-up and reference
        timed: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
        for _ in range(cfg.repeats):
            for method in methods:  # interleaved: greedy, bpd, ..., greedy, bpd, ...
                timed[method].append(run_method(method, res, cfg, inputs, greedy_ref))
                bar.update(1)
        figures = {m: _figures(m, timed[m], timed["greedy"], greedy_ref) for m in methods}
        report["domains"][domain] = {"num_prompts": len(subset), "methods": figures}
    bar.close()
    report["methods"] = {m: _overall(m, report["domains"]) for m in methods}
    for m, why in unsupported.items():  # reported, not silently dropped
        skipped = dict.fromkeys(FIGURE_KEYS) | {"unsupported": why}
        report["methods"][m] = dict(skipped)
        for d in report["domains"].values():
            d["methods"][m] = dict(skipped)
    return report


def _figures(method: str, runs: list[dict], greedy_runs: list[dict], greedy_ref: list[torch.Tensor]) -> dict[str, Any]:
    seconds = statistics.median(r["seconds"] for r in runs)
    greedy_seconds = statistics.median(r["seconds"] for r in greedy_runs)
    first = runs[0]
    identical = all(torch.equal(a, b) for a, b in zip(first["outputs"], greedy_ref))
    accepted = first["accepted"]
    fig = {
        "block_efficiency": round(first["generated"] / max(first["row_calls"], 1), 3),
        "tokens_per_s": round(first["generated"] / seconds, 2),
        "speedup_vs_greedy": round(greedy_seconds / seconds, 3),
        "identical_to_greedy": identical,
        "mean_accepted_length": round(sum(accepted) / len(accepted), 3) if accepted else None,
        "rescoring_ms_per_step": round(first["draft_ms_per_step"], 3),
        "seconds": round(seconds, 3),
        "generated_tokens": first["generated"],
    }
    if method == "oracle":  # headroom measure: no wall clock
        fig["tokens_per_s"] = fig["speedup_vs_greedy"] = None
    return fig


def _overall(method: str, domains: dict[str, Any]) -> dict[str, Any]:
    """Totals over domains: efficiency and speed from summed tokens, calls and seconds."""
    figs = [d["methods"][method] for d in domains.values()]
    greedy = [d["methods"]["greedy"] for d in domains.values()]
    tokens = sum(f["generated_tokens"] for f in figs)
    seconds = sum(f["seconds"] for f in figs)
    eff = [f["block_efficiency"] for f in figs]
    acc = [f["mean_accepted_length"] for f in figs if f["mean_accepted_length"] is not None]
    out = {
        "block_efficiency": round(statistics.mean(eff), 3),
        "tokens_per_s": round(tokens / seconds, 2) if method != "oracle" else None,
        "speedup_vs_greedy": round(sum(g["seconds"] for g in greedy) / seconds, 3) if method != "oracle" else None,
        "identical_to_greedy": all(f["identical_to_greedy"] for f in figs),
        "mean_accepted_length": round(statistics.mean(acc), 3) if acc else None,
        "rescoring_ms_per_step": round(statistics.mean(f["rescoring_ms_per_step"] for f in figs), 3),
    }
    return out


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


def load_prompts(path: str | Path, max_prompts_per_domain: int | None = None) -> list[dict]:
    """Read a prompts JSONL (`{"prompt": text, "domain": optional}` a line), keeping at most N per domain."""
    prompts, seen = [], {}
    for i, line in enumerate(Path(path).read_text().splitlines()):
        if not line.strip():
            continue
        row = json.loads(line)
        if not isinstance(row.get("prompt"), str) or not row["prompt"]:
            raise ValueError(f"{path}:{i + 1}: every line needs a non-empty \"prompt\" text field.")
        domain = row.setdefault("domain", "all")
        seen[domain] = seen.get(domain, 0) + 1
        if max_prompts_per_domain is None or seen[domain] <= max_prompts_per_domain:
            prompts.append(row)
    if not prompts:
        raise ValueError(f"{path} holds no prompts.")
    return prompts

