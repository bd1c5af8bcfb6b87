"""
Tune a rescorer's `alpha`, `top_k` and `num_drafts` on held-out prompts by block efficiency (Kim et al. tune
`alpha` per dataset this way).

    hf-bpd tune --model reference/heads --rescorer ngram --ngram ngram4.bin --alphas 0 0.25 0.5 0.75 --top-ks 4 8
    python -m hf_bpd_bench.tune --model DIR --rescorer neural --lm reference/small --prompts prompts.jsonl
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hf_bpd import metrics
from hf_bpd.data import load_prompts, tokenize_prompts
from hf_bpd.drafters import Drafter

logger = logging.getLogger(__name__)

RescorerFactory = Callable[..., Drafter]  # make_rescorer(alpha=..., top_k=..., num_drafts=...)


@dataclass
class TuningResult:
    """
    Args:
        best (`dict`): the row of `table` with the highest mean block efficiency (ties: the first tried).
        table (`list[dict]`): one row per tried configuration: `alpha`, `top_k`, `num_drafts`,
            `block_efficiency` (mean over prompts), `tokens_per_s`, `rescore_ms_per_call`, `error` (None when it
            ran). A `baseline` row (plain BPD, no rescorer) comes first when requested; it is never `best`.
    """

    best: dict[str, Any]
    table: list[dict[str, Any]] = field(default_factory=list)

    def to_markdown(self) -> str:
        """The table as GitHub markdown."""
        columns = ("alpha", "top_k", "num_drafts", "block_efficiency", "tokens_per_s", "rescore_ms_per_call", "error")
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        for row in self.table:
            cells = []
            for column in columns:
                value = row.get(column)
                cells.append(f"{value:.3f}" if isinstance(value, float) else ("" if value is None else str(value)))
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)


def _as_prompts(prompts_ids: Sequence[torch.LongTensor] | torch.LongTensor) -> list[torch.LongTensor]:
    """One `(1, T)` tensor per prompt."""
    if isinstance(prompts_ids, torch.Tensor):
        if prompts_ids.dim() == 1:
            return [prompts_ids[None]]
        return [row[None] for row in prompts_ids]
    prompts = [p if p.dim() == 2 else p[None] for p in prompts_ids]
    if not prompts or any(p.shape[0] != 1 or p.shape[1] == 0 for p in prompts):
        raise ValueError("prompts_ids must be non-empty prompts: 1D tensors, (1, T) tensors or a (N, T) tensor.")
    return prompts


def evaluate_rescorer(
    model: Any,
    rescorer: Drafter | None,
    prompts: list[torch.LongTensor],
    max_new_tokens: int,
    **generate_kwargs: Any,
) -> dict[str, float]:
    """
    Decode each prompt alone with `generate(..., use_bpd=True)` and average the statistics.

    Returns:
        `dict` with `block_efficiency`, `tokens_per_s` and `rescore_ms_per_call` (drafting time per verify step, as
        the loop measures it), all as `hf_bpd.metrics` defines them, over all prompts.
    """
    tokens, calls, wall, draft_s, steps = 0, 0, 0.0, 0.0, 0
    for ids in prompts:
        ids = ids.to(model.device)
        start = time.perf_counter()
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            use_bpd=True,
            draft_rescorer=rescorer,
            return_dict_in_generate=True,
            **generate_kwargs,
        )
        wall += time.perf_counter() - start
        tokens += int(out.num_generated_tokens)
        calls += int(metrics.rows_from_accepted(out.accepted_lengths)[1].sum())
        draft_s += out.draft_time_s
        steps += out.accepted_lengths.shape[0]
    return {
        "block_efficiency": metrics.block_efficiency(tokens, calls),
        "tokens_per_s": metrics.tokens_per_second(tokens, wall),
        "rescore_ms_per_call": metrics.draft_ms_per_step(draft_s, steps),
    }


def tune_rescorer(
    model: Any,
    make_rescorer: RescorerFactory,
    prompts_ids: Sequence[torch.LongTensor] | torch.LongTensor,
    alphas: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    top_ks: Sequence[int] = (4, 8),
    num_drafts_list: Sequence[int] = (1,),
    max_new_tokens: int = 64,
    include_baseline: bool = True,
    **generate_kwargs: Any,
) -> TuningResult:
    """
    Grid search of a rescorer's configuration by mean block efficiency on held-out prompts (greedy decoding).

    Args:
        model ([`~hf_bpd.BPDForCausalLM`]): the model with its draft heads.
        make_rescorer (`Callable`): `make_rescorer(alpha=..., top_k=..., num_drafts=...)` returns a fresh
            [`~hf_bpd.logits.DraftRescorer`] (e.g. `lambda **c: NgramRescorer(path, **c)`).
        prompts_ids (`Sequence[torch.LongTensor]` or `torch.LongTensor`): prompts, each `(T,)` or `(1, T)`, or one
            `(N, T)` tensor of unpadded prompts; each is decoded alone (batch 1).
        alphas, top_ks, num_drafts_list: the grid. Configurations with `num_drafts > top_k ** h` are skipped.
        max_new_tokens (`int`, defaults to 64): tokens generated per prompt.
        include_baseline (`bool`, defaults to `True`): also measure plain BPD (no rescorer) as a reference row.
        generate_kwargs: more `generate` arguments (e.g. `eos_token_id`).
    Returns:
        [`TuningResult`]: the best configuration and the table of all tried ones.
    Raises:
        RuntimeError: when no configuration could run (the errors are in the message).
    """
    prompts = _as_prompts(prompts_ids)
    num_heads = int(model.config.num_draft_heads)
    generate_kwargs.setdefault("do_sample", False)
    table: list[dict[str, Any]] = []
    if include_baseline:
        row = {"alpha": None, "top_k": None, "num_drafts": 1, "baseline": True, "error": None}
        row.update(evaluate_rescorer(model, None, prompts, max_new_tokens, **generate_kwargs))
        table.append(row)
        logger.info("baseline (plain BPD): block efficiency %.3f", row["block_efficiency"])
    for top_k in top_ks:
        for num_drafts in num_drafts_list:
            for alpha in alphas:
                row = {"alpha": alpha, "top_k": top_k, "num_drafts": num_drafts, "baseline": False, "error": None}
                if num_drafts > top_k**num_heads:
                    row["error"] = f"skipped: num_drafts > top_k ** h = {top_k**num_heads}"
                    table.append(row)
                    continue
                try:
                    rescorer = make_rescorer(alpha=alpha, top_k=top_k, num_drafts=num_drafts)
                    row.update(evaluate_rescorer(model, rescorer, prompts, max_new_tokens, **generate_kwargs))
                except (ValueError, RuntimeError, NotImplementedError) as err:
                    row["error"] = f"{type(err).__name__}: {err}"
                    logger.warning("alpha=%s top_k=%s num_drafts=%s failed: %s", alpha, top_k, num_drafts, err)
                else:
                    logger.info(
                        "alpha=%s top_k=%s num_drafts=%s: block efficiency %.3f, %.2f ms/call",
                        alpha,
                        top_k,
                        num_drafts,
                        row["block_efficiency"],
                        row["rescore_ms_per_call"],
                    )
                table.append(row)
    ran = [row for row in table if row["error"] is None and not row["baseline"]]
    if not ran:
        errors = "; ".join(sorted({str(row["error"]) for row in table if row["error"]}))
        raise RuntimeError(f"No rescorer configuration ran: {errors}")
    best = max(ran, key=lambda row: row["block_efficiency"])  # max keeps the first of equal rows
    return TuningResult(best=best, table=table)


# ------------------------------------------------------------------------------------------------ CLI
def _make_factory(args: argparse.Namespace, model: Any, tokenizer: Any) -> RescorerFactory:
    from hf_bpd.logits import NeuralRescorer, NgramRescorer, PBestRescorer

    vocab = model.config.base_vocab_size
    if args.rescorer == "ngram":
        if not args.ngram:
            raise SystemExit("--rescorer ngram needs --ngram PATH (a KenLM model over token ids).")
        from hf_bpd.logits.ngram import load_kenlm

        ngram, _ = load_kenlm(args.ngram)  # loaded once, shared by every configuration
        NgramRescorer(ngram, top_k=1, vocab_size=vocab)  # fail early on a foreign vocabulary
        return lambda **c: NgramRescorer(ngram, pad_token_id=tokenizer.pad_token_id, **c)
    if args.rescorer == "neural":
        if not args.lm:
            raise SystemExit("--rescorer neural needs --lm PATH (a small causal LM sharing the tokenizer).")
        from transformers import AutoModelForCausalLM

        lm = AutoModelForCausalLM.from_pretrained(args.lm, dtype=torch.float32).to(model.device).eval()

        def neural(alpha: float, top_k: int, num_drafts: int) -> Drafter:
            if num_drafts != 1:
                raise ValueError("NeuralRescorer proposes one draft (num_drafts=1).")
            return NeuralRescorer(lm, top_k=top_k, alpha=alpha, pad_token_id=tokenizer.pad_token_id)

        return neural
    return lambda alpha, top_k, num_drafts: PBestRescorer(top_k=top_k, num_drafts=num_drafts)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `tune` arguments (shared with the `hf-bpd` CLI)."""
    parser.add_argument("--model", required=True, help="BPDForCausalLM checkpoint folder.")
    parser.add_argument("--base", default=None, help="Base model folder/name (default: the checkpoint's own).")
    parser.add_argument("--tokenizer", default=None, help="Tokenizer (default: the base model's).")
    parser.add_argument("--rescorer", choices=("ngram", "neural", "pbest"), required=True)
    parser.add_argument("--ngram", default=None, help="KenLM model over token ids (for --rescorer ngram).")
    parser.add_argument("--lm", default=None, help="Small causal LM folder/name (for --rescorer neural).")
    parser.add_argument(
        "--prompts",
        required=True,
        help='Held-out prompts: JSONL ({"prompt": text} or {"messages": chat}) or text lines.',
    )
    parser.add_argument("--max-prompts", type=int, default=20, help="Use the first N prompts (default 20).")
    parser.add_argument("--max-prompt-tokens", type=int, default=256, help="Keep the last N prompt tokens.")
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--top-ks", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--num-drafts", type=int, nargs="+", default=[1])
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", default=None, help="Write the table and the best configuration to this JSON.")
    return parser


def load_model_and_prompts(args: argparse.Namespace) -> tuple[Any, Any, list[torch.LongTensor]]:
    """
    The fp32 model of `--model` (on `--base`, moved to `--device`), its tokenizer, and the non-empty ones of the
    first `--max-prompts` prompts of `--prompts`, each a `(1, T)` tensor of at most `--max-prompt-tokens` tokens
    (what both `tune` and `tune --tree` load).
    """
    from transformers import AutoTokenizer

    from hf_bpd.modeling_bpd import BPDForCausalLM, tokenizer_source

    model = (
        BPDForCausalLM.from_pretrained(args.model, base_model=args.base, dtype=torch.float32).to(args.device).eval()
    )
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source(args.model, model, args.tokenizer, args.base))
    rows = load_prompts(args.prompts, tokenizer)[: args.max_prompts]
    batches = tokenize_prompts(rows, tokenizer, batch_size=1, max_prompt_tokens=args.max_prompt_tokens)
    return model, tokenizer, [batch["input_ids"] for batch in batches if batch["input_ids"].numel()]


def run_from_args(args: argparse.Namespace) -> TuningResult:
    model, tokenizer, prompts = load_model_and_prompts(args)
    result = tune_rescorer(
        model,
        _make_factory(args, model, tokenizer),
        prompts,
        alphas=args.alphas,
        top_ks=args.top_ks,
        num_drafts_list=args.num_drafts,
        max_new_tokens=args.max_new_tokens,
    )
    if args.output:
        Path(args.output).write_text(json.dumps({"best": result.best, "table": result.table}, indent=2))
    return result


def main(argv: Sequence[str] | None = None) -> None:
    """`hf-bpd tune` / `python -m hf_bpd_bench.tune` (`--tree`: calibrate a static draft tree, see `tree_tune`;
    `--auto`: fit the checkpoint's default drafter spec, see `auto_tune`)."""
    import sys

    args_list = list(sys.argv[1:] if argv is None else argv)
    if "--auto" in args_list:  # the checkpoint's default drafter spec (hf_bpd_bench.auto_tune)
        from .auto_tune import main as auto_main

        return auto_main([a for a in args_list if a != "--auto"])
    if "--tree" in args_list:
        from .tree_tune import main as tree_main

        return tree_main([a for a in args_list if a != "--tree"])
    parser = argparse.ArgumentParser(
        description="Tune a draft rescorer by block efficiency. Two other modes: `hf-bpd tune --auto ...` fits the "
        "checkpoint's default drafter (`hf-bpd tune --auto --help`), `hf-bpd tune --tree ...` calibrates a static "
        "draft tree (`hf-bpd tune --tree --help`).",
        prog="tune",
    )
    add_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = run_from_args(parser.parse_args(argv))
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        parser.exit(1, f"tune: error: {err}\n")
    print(result.to_markdown())
    print(
        f"best: alpha={result.best['alpha']} top_k={result.best['top_k']} num_drafts={result.best['num_drafts']} "
        f"block_efficiency={result.best['block_efficiency']:.3f}"
    )


if __name__ == "__main__":
    main()
