"""
Calibrate a static draft tree for a set of heads (Medusa's `medusa_choices`), and pick its node budget.

    hf-bpd tune --tree --model reference/heads --prompts reference/prompts/tune.jsonl --num-nodes 8 16 32 \
        --output tree.json --save-model heads_with_tree/
    python -m hf_bpd_bench.tree_tune --model DIR --prompts prompts.jsonl --num-nodes 16

The heads' top-k accuracies are measured on the model's own greedy continuations of the prompts (what verification
accepts): `accuracy[j][r]` = how often head `j + 1`'s rank-`r` token is the base model's token. The tree is then
built node by node, best expected gain first ([`~hf_bpd.logits.tree.build_static_tree`]). With several
`--num-nodes`, each tree is decoded on the prompts and the fastest (tokens per second on this machine) is kept.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from hf_bpd.drafters.tree import ConfidenceCalibration, StaticTreeDrafter, build_static_tree, expected_accepted_length
from hf_bpd.logits.lattice import LN10
from hf_bpd.tree import check_tree_choices

logger = logging.getLogger(__name__)

TREE_FILE_FORMAT = "hf_bpd.draft_tree/1"


def heads_fingerprint(model: Any) -> str:
    """A short hash of the heads' weights (rounded to bfloat16, so fp32 and bf16 copies of one checkpoint agree)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.heads.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.bfloat16).float().numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass
class TreeCalibration:
    """
    Args:
        draft_tree (`list[list[int]]`): the tree (index paths, best first).
        accuracy (`list[list[float]]`): `(h, k)` per-head top-k accuracies it was built from.
        expected_accepted_length (`float`): Medusa's estimate for the tree (sum over nodes of the product of the
            accuracies along the path).
        num_draft_heads (`int`), heads_fingerprint (`str`): which heads it belongs to.
        num_positions (`int`): positions the accuracies were measured at.
        budgets (`list[dict]`): with several node budgets, each one's measured block efficiency and tokens/s.
    """

    draft_tree: list[list[int]]
    accuracy: list[list[float]]
    expected_accepted_length: float
    num_draft_heads: int
    heads_fingerprint: str
    num_positions: int
    budgets: list[dict[str, Any]] = field(default_factory=list)

    def save(self, path: str | Path) -> None:
        """Write the tree file (JSON)."""
        Path(path).write_text(json.dumps({"format": TREE_FILE_FORMAT, **asdict(self)}, indent=1))


def measure_topk_accuracy(
    model: Any, prompts_ids: Sequence[torch.LongTensor], top_k: int = 10, max_new_tokens: int = 64
) -> tuple[torch.Tensor, int]:
    """
    Per-head top-k accuracies on the model's own greedy continuations of the prompts.

    Args:
        model ([`~hf_bpd.BPDForCausalLM`]), prompts_ids: prompts, each `(T,)` or `(1, T)` (decoded one at a time).
        top_k (`int`): ranks measured per head.
    Returns:
        `(accuracy, positions)`: `(h, top_k)` fractions of positions where head `j + 1`'s rank-`r` token was the
        model's token, and the number of positions per head.
    """
    h = int(model.config.num_draft_heads)
    hits = torch.zeros(h, top_k, dtype=torch.float64)
    counts = torch.zeros(h, dtype=torch.float64)
    for ids in prompts_ids:
        ids, seq, draft = _continuation_and_drafts(model, ids, max_new_tokens)
        start = ids.shape[1] - 1  # from the last prompt token on: what decoding drafts from
        top = draft.topk(top_k, dim=-1).indices  # (T, h, k)
        for j in range(h):
            t = torch.arange(start, seq.shape[1] - 2 - j)
            if t.numel() == 0:
                continue
            truth = seq[0, t + 2 + j]
            hits[j] += (top[t, j] == truth[:, None]).double().sum(0).cpu()
            counts[j] += t.numel()
    if counts.min() == 0:
        raise ValueError(
            "No positions to measure: give longer continuations (max_new_tokens > h + 1) or more prompts."
        )
    return (hits / counts[:, None]).float(), int(counts[0])


def _continuation_and_drafts(model: Any, ids: torch.LongTensor, max_new_tokens: int) -> tuple[torch.Tensor, ...]:
    """`(ids (1, T), seq (1, T + n), draft (T + n, h, V))`: the model's greedy continuation and the heads' logits
    along it (head `j` at position `t` predicts token `t + 2 + j`)."""
    ids = (ids if ids.dim() == 2 else ids[None]).to(model.device)
    with torch.no_grad():
        seq = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False, use_bpd=True
        )
        draft = model(input_ids=seq).draft_logits[0].float()
    return ids, seq, draft


def calibrate_confidence(
    model: Any,
    prompts_ids: Sequence[torch.LongTensor],
    top_k: int = 8,
    max_new_tokens: int = 64,
    ngram: Any = None,
    alpha: float = 0.5,
) -> ConfidenceCalibration:
    """
    Per-depth conditional acceptance rates for [`~hf_bpd.logits.DynamicTreeDrafter`]'s `calibration`: on the
    model's own greedy continuations of the prompts, every top-k candidate of head `j + 1` whose parent path is the
    model's continuation (heads `1..j` each had the right token in their top-k) is one observation: its own
    log-score (head log-probability, or `(1 - alpha) * head + alpha * n-gram` with `ngram`) and whether it is the
    model's token. Binned and made monotone by [`ConfidenceCalibration.fit`].

    Args:
        model ([`~hf_bpd.BPDForCausalLM`]), prompts_ids: prompts, each `(T,)` or `(1, T)` (unpadded).
        top_k (`int`): candidates per head, as the drafter's `top_k`.
        ngram (`str`, `os.PathLike` or `kenlm.Model`, *optional*), alpha (`float`): the drafter's n-gram mix.
    """
    h = int(model.config.num_draft_heads)
    head_weight, lm = 1.0, None
    if ngram is not None:
        import kenlm

        from hf_bpd.logits.lattice import check_alpha
        from hf_bpd.logits.ngram import NgramRescorer

        head_weight = 1.0 - check_alpha(alpha)
        lm = NgramRescorer(ngram, top_k=1, alpha=alpha)
    scores: list[list[torch.Tensor]] = [[] for _ in range(h)]
    hits: list[list[torch.Tensor]] = [[] for _ in range(h)]
    for ids in prompts_ids:
        ids, seq, draft = _continuation_and_drafts(model, ids, max_new_tokens)
        values, top = torch.log_softmax(draft, dim=-1).topk(top_k, dim=-1)  # (T, h, k)
        values, top, tokens = values.cpu(), top.cpu(), seq[0].tolist()
        for t in range(ids.shape[1] - 1, len(tokens) - 2):
            for j in range(min(h, len(tokens) - 2 - t)):
                truth = tokens[t + 2 + j]
                own = head_weight * values[t, j].clone()
                if lm is not None:
                    context, out = lm.context_state(tokens[: t + 2 + j]), kenlm.State()
                    own += torch.tensor(
                        [alpha * LN10 * lm.model.BaseScore(context, str(c), out) for c in top[t, j].tolist()]
                    )
                hit = top[t, j] == truth
                scores[j].append(own)
                hits[j].append(hit)
                if not bool(hit.any()):  # deeper nodes under this position have a wrong parent path
                    break
    if any(not rows for rows in scores):
        raise ValueError(
            "No positions to measure: give longer continuations (max_new_tokens > h + 1) or more prompts."
        )
    return ConfidenceCalibration.fit([torch.cat(r) for r in scores], [torch.cat(r) for r in hits])


def calibrate_draft_tree(
    model: Any,
    prompts_ids: Sequence[torch.LongTensor],
    num_nodes: int | Sequence[int] = 16,
    top_k: int = 10,
    max_new_tokens: int = 64,
) -> TreeCalibration:
    """
    Measure the heads' top-k accuracies and build the static tree (Medusa's greedy construction) for a node budget.
    With several budgets, each tree is decoded on the same prompts and the one with the most tokens per second wins.

    Returns:
        [`TreeCalibration`]; `model.config.draft_tree = result.draft_tree` makes `save_pretrained` carry it.
    """
    from .tune import evaluate_rescorer

    accuracy, positions = measure_topk_accuracy(model, prompts_ids, top_k, max_new_tokens)
    budgets = [num_nodes] if isinstance(num_nodes, int) else list(num_nodes)
    trees = {n: build_static_tree(accuracy, n) for n in budgets}
    table: list[dict[str, Any]] = []
    best = budgets[0]
    if len(budgets) > 1:
        for n in budgets:
            row = {"num_nodes": n, "expected_accepted_length": expected_accepted_length(trees[n], accuracy)}
            row.update(
                evaluate_rescorer(
                    model,
                    StaticTreeDrafter(trees[n]),
                    [p if p.dim() == 2 else p[None] for p in prompts_ids],
                    max_new_tokens,
                )
            )
            logger.info(
                "num_nodes=%d: block efficiency %.3f, %.1f tokens/s", n, row["block_efficiency"], row["tokens_per_s"]
            )
            table.append(row)
        best = max(table, key=lambda r: r["tokens_per_s"])["num_nodes"]
    return TreeCalibration(
        draft_tree=trees[best],
        accuracy=accuracy.tolist(),
        expected_accepted_length=expected_accepted_length(trees[best], accuracy),
        num_draft_heads=int(model.config.num_draft_heads),
        heads_fingerprint=heads_fingerprint(model),
        num_positions=positions,
        budgets=table,
    )


def load_tree_file(path: str | Path, model: Any = None) -> list[list[int]]:
    """
    Read a tree file written by [`TreeCalibration.save`]; with `model`, check that it was calibrated for its heads.

    Raises:
        ValueError: the file is not a tree file, the tree is invalid, or it belongs to other heads.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Draft tree file not found: {path}. Write one with `hf-bpd tune --tree --output`.")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not a draft tree file (not JSON: {err}).") from None
    if not isinstance(data, dict) or data.get("format") != TREE_FILE_FORMAT:
        raise ValueError(f'{path} is not a draft tree file (no "format": "{TREE_FILE_FORMAT}").')
    tree = [list(p) for p in check_tree_choices(data.get("draft_tree"))]
    if model is not None:
        h = int(model.config.num_draft_heads)
        redo = "calibrate a tree for these heads: `hf-bpd tune --tree --model <their folder>`"
        if data.get("num_draft_heads") != h:
            raise ValueError(
                f"{path} was calibrated for {data.get('num_draft_heads')} draft heads, the model has {h}: {redo}."
            )
        check_tree_choices(tree, num_heads=h)
        if data.get("heads_fingerprint") != heads_fingerprint(model):
            raise ValueError(
                f"{path} was calibrated for other heads (fingerprint {data.get('heads_fingerprint')}, these heads: "
                f"{heads_fingerprint(model)}): its accuracies do not describe them; {redo}."
            )
    return tree


# ------------------------------------------------------------------------------------------------ CLI
def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", required=True, help="BPDForCausalLM checkpoint folder.")
    parser.add_argument("--base", default=None, help="Base model folder/name (default: the checkpoint's own).")
    parser.add_argument("--tokenizer", default=None, help="Tokenizer (default: the base model's).")
    parser.add_argument("--prompts", required=True, help="Calibration prompts (JSONL or text lines).")
    parser.add_argument("--max-prompts", type=int, default=20, help="Use the first N prompts (default 20).")
    parser.add_argument("--max-prompt-tokens", type=int, default=256, help="Keep the last N prompt tokens.")
    parser.add_argument(
        "--num-nodes",
        type=int,
        nargs="+",
        default=[16],
        help="Node budget(s); with several, the fastest on these prompts is kept.",
    )
    parser.add_argument("--top-k", type=int, default=10, help="Ranks measured per head (default 10).")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", default=None, help="Write the tree file (JSON) here.")
    parser.add_argument(
        "--save-model",
        default=None,
        help="Save the heads with the tree in their config (BPDConfig.draft_tree) to this folder.",
    )
    return parser


def run_from_args(args: argparse.Namespace) -> TreeCalibration:
    from transformers import AutoTokenizer

    from hf_bpd.data import load_prompts, tokenize_prompts
    from hf_bpd.drafters.tree import check_num_nodes
    from hf_bpd.modeling_bpd import BPDForCausalLM, tokenizer_source

    for n in args.num_nodes:
        check_num_nodes(n)
    model = (
        BPDForCausalLM.from_pretrained(args.model, base_model=args.base, dtype=torch.float32).to(args.device).eval()
    )
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source(args.model, model, args.tokenizer, args.base))
    rows = load_prompts(args.prompts, tokenizer)[: args.max_prompts]
    batches = tokenize_prompts(rows, tokenizer, batch_size=1, max_prompt_tokens=args.max_prompt_tokens)
    prompts = [batch["input_ids"] for batch in batches if batch["input_ids"].numel()]
    result = calibrate_draft_tree(model, prompts, args.num_nodes, args.top_k, args.max_new_tokens)
    if args.output:
        result.save(args.output)
    if args.save_model:
        model.config.draft_tree = result.draft_tree
        model.save_pretrained(args.save_model)
    return result


def main(argv: Sequence[str] | None = None) -> None:
    """`hf-bpd tune --tree` / `python -m hf_bpd_bench.tree_tune`."""
    parser = argparse.ArgumentParser(description="Calibrate a static draft tree for a BPD model.", prog="tune --tree")
    add_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = run_from_args(parser.parse_args(argv))
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        parser.exit(1, f"tune --tree: error: {err}\n")
    for j, row in enumerate(result.accuracy):
        print(f"head {j + 1} top-k accuracy: " + " ".join(f"{a:.3f}" for a in row))
    for row in result.budgets:
        print(
            f"num_nodes={row['num_nodes']}: block efficiency {row['block_efficiency']:.3f}, "
            f"{row['tokens_per_s']:.1f} tokens/s"
        )
    print(f"tree: {len(result.draft_tree)} nodes, expected accepted length {result.expected_accepted_length:.3f}")
    print(json.dumps(result.draft_tree))


if __name__ == "__main__":
    main()
