"""
`hf-bpd analyze`: Kim et al.'s section-6 analyses of the drafts on a set of prompts.

- consecutive repetition in drafts (share of neighbouring identical draft tokens, mean longest repeated run),
  before and after a rescorer;
- per-head entropy distributions, their means, and `h_max` (the largest head index up to which the mean entropy
  rises monotonically);
- oracle top-k block efficiency for several k (the heads' top-k lattice with a perfect chooser);
- accepted-length histograms of plain BPD;
- per-depth top-1 accuracy of the heads on the model's own greedy continuations, and the same given a correct prefix
  (the chance a greedy chain accepted so far is accepted one token further), for either head kind;
- the greedy chain's block efficiency replayed on those continuations from the heads' teacher-forced predictions
  (`metrics.greedy_chain_counts`) beside the decode's own: equal up to the verify forward's numerics.
For token-conditioned heads the entropies are those of each depth along the heads' own greedy chain, and the oracle
top-k lattice (exact only for independent heads) is skipped.
Plots are written as PNG files with matplotlib.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from hf_bpd import metrics
from hf_bpd.data import tokenize_prompts
from hf_bpd.drafters import DraftContext, Drafter, OracleDrafter
from hf_bpd.tree import DraftTree

from .bench import Resources

logger = logging.getLogger(__name__)


class DraftRecorder(Drafter):
    """
    Drafts with the heads' argmax (so the decode is plain BPD) and records, at every step of one `generate` call,
    the heads' entropies and drafts, and optionally what another drafter would propose. `reset` (the start of a
    `generate` call) clears the records, as for every drafter: read them after each call.
    """

    def __init__(self, compare: Drafter | None = None):
        self.compare = compare
        self.reset()

    def reset(self) -> None:
        self.entropies: list[torch.Tensor] = []  # (B, h) per step
        self.drafts: list[torch.Tensor] = []
        self.compared: list[torch.Tensor] = []
        if self.compare is not None:
            self.compare.reset()

    def propose(self, ctx: DraftContext) -> DraftTree:
        drafts = ctx.head_argmax()  # (B, h): the heads' own greedy chain (token by token for conditioned heads)
        if ctx.independent:
            logits = ctx.draft_logits()
        else:  # each depth's distribution along that chain
            logits = torch.stack([ctx.path_logits(drafts[:, :d]) for d in range(drafts.shape[1])], dim=1)
        logp = torch.log_softmax(logits.float(), dim=-1)
        self.entropies.append(-(logp.exp() * logp).sum(-1))
        self.drafts.append(drafts)
        if self.compare is not None:
            other = self.compare.propose(ctx).path_drafts()[:, 0]
            if other.shape[-1] == drafts.shape[-1]:  # near a generation's end a drafter drafts fewer tokens: skipped
                self.compared.append(other)
        return DraftTree.from_chains(drafts[:, None])

    def update(self, accepted_lengths: torch.LongTensor, chosen: torch.LongTensor) -> None:
        if self.compare is not None:  # the compared drafter sees what was really kept: the argmax draft
            self.compare.update(accepted_lengths, torch.zeros_like(chosen))


def repetition_stats(drafts: torch.Tensor) -> dict[str, float]:
    """
    Args:
        drafts (`torch.LongTensor` of shape `(num_drafts, h)`).
    Returns:
        `consecutive_repetition` (share of neighbouring pairs that are equal) and `mean_longest_run` (mean over
        drafts of the longest run of one repeated token; 1 = no repetition).
    """
    if drafts.shape[-1] < 2 or drafts.shape[0] == 0:
        return {"consecutive_repetition": 0.0, "mean_longest_run": 1.0}
    same = drafts[:, 1:] == drafts[:, :-1]  # (N, h - 1)
    run = torch.ones(drafts.shape[0], dtype=torch.long)
    longest = run.clone()
    for j in range(same.shape[1]):
        run = torch.where(same[:, j], run + 1, torch.ones_like(run))
        longest = torch.maximum(longest, run)
    return {"consecutive_repetition": float(same.float().mean()), "mean_longest_run": float(longest.float().mean())}


def h_max(mean_entropy: list[float]) -> int:
    """Largest head index (1-based) up to which the mean entropy rises monotonically."""
    index = 1
    while index < len(mean_entropy) and mean_entropy[index] > mean_entropy[index - 1]:
        index += 1
    return index


def analyze(
    res: Resources,
    prompts: list[dict],
    max_new_tokens: int,
    top_ks: tuple[int, ...] = (1, 2, 4, 8, 16),
    compare: Drafter | None = None,
    batch_size: int = 1,
) -> dict[str, Any]:
    """Run the analyses per domain; returns JSON-ready figures plus raw arrays under `"_raw"` for plotting."""
    model = res.model
    report: dict[str, Any] = {"domains": {}, "_raw": {}}
    for domain in sorted({p.get("domain", "all") for p in prompts}):
        inputs = tokenize_prompts([p for p in prompts if p.get("domain", "all") == domain], res.tokenizer, batch_size)
        recorder = DraftRecorder(compare)
        pad = res.tokenizer.pad_token_id if res.tokenizer.pad_token_id is not None else 0
        accepted, entropies, drafts, compared, depth = [], [], [], [], []
        decoded = [0, 0]  # the decode's own tokens and serial calls
        oracle = {k: [0, 0] for k in top_ks}
        for batch in inputs:
            out = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                use_bpd=True,
                drafter=recorder,
                return_dict_in_generate=True,
            )
            accepted.append(out.accepted_lengths.flatten())
            decoded[0] += out.num_generated_tokens
            decoded[1] += int(metrics.rows_from_accepted(out.accepted_lengths)[1].sum())  # calls per row
            entropies += recorder.entropies
            drafts += recorder.drafts
            compared += recorder.compared
            hidden, targets = greedy_features(
                model, out.sequences, batch.get("attention_mask"), model.generation_config.eos_token_id
            )
            depth.append((hidden, targets, out.sequences))  # context heads attend over the prompt's real tokens
            if model.independent_heads:  # the top-k lattice is exact only for independent heads
                _add_oracle_counts(oracle, model, batch, out.sequences, pad, max_new_tokens)
        entropies = torch.cat(entropies)  # (steps*B, h)
        mean_entropy = entropies.mean(0).tolist()
        eff = {k: round(metrics.block_efficiency(t, c), 3) for k, (t, c) in oracle.items() if c}
        accepted = torch.cat(accepted)
        stats = metrics.accepted_length_stats(accepted)
        figures = {
            "mean_entropy_per_head": [round(e, 3) for e in mean_entropy],
            "h_max": h_max(mean_entropy),
            "repetition_plain": repetition_stats(torch.cat(drafts)),
            "oracle_block_efficiency": eff,
            "oracle_gain_vs_k1": {k: round(v / eff[top_ks[0]] - 1, 3) for k, v in eff.items()} if eff else {},
            "block_efficiency": round(metrics.block_efficiency(*decoded), 3),
            **_depth_figures(model, depth),
            "mean_accepted_length": round(stats["mean"] or 0.0, 3),
        }
        if compare is not None:
            figures["repetition_rescored"] = repetition_stats(
                torch.cat(compared) if compared else torch.zeros(0, 1, dtype=torch.long)
            )
        report["domains"][domain] = figures
        report["_raw"][domain] = {"entropies": entropies, "accepted": accepted[accepted >= 0].tolist()}
    return report


def _add_oracle_counts(
    oracle: dict[int, list[int]], model: Any, batch: dict, reference: torch.LongTensor, pad: int, max_new_tokens: int
) -> None:
    """Add, for each `k`, the tokens and serial calls of BPD with the oracle chooser over the heads' top-k lattice."""
    for k, counts in oracle.items():
        out = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_bpd=True,
            drafter=OracleDrafter(reference, pad, top_k=k),
            return_dict_in_generate=True,
        )
        _, calls = metrics.rows_from_accepted(out.accepted_lengths)
        counts[0] += out.num_generated_tokens
        counts[1] += int(calls.sum())


def greedy_features(
    model: Any, sequences: torch.LongTensor, prompt_mask: torch.LongTensor | None, eos_token_id: int | list[int] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The base's last hidden states over prompt + greedy output and the output tokens as unshifted targets (`-100`
    on the prompt and after a row's first EOS, which stays a target: the decode generated it, also where the pad
    token is the EOS): what `metrics.depth_accuracy` scores the heads on."""
    prompt_len = sequences.shape[1] if prompt_mask is None else prompt_mask.shape[1]
    if prompt_mask is None:
        prompt_mask = torch.ones_like(sequences[:, :prompt_len])
    generated = sequences[:, prompt_len:]
    eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    is_eos = torch.isin(generated, torch.as_tensor(eos, dtype=generated.dtype)).long()
    ended = (is_eos.cumsum(1) - is_eos) > 0  # after the first EOS (the padding generate adds once a row ended)
    mask = torch.cat([prompt_mask.long(), (~ended).long()], dim=1)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model.base(input_ids=sequences, attention_mask=mask, position_ids=positions, output_hidden_states=True)
    targets = sequences.masked_fill(mask == 0, -100)
    targets[:, :prompt_len] = -100
    return out.hidden_states[-1], targets


def _depth_figures(model: Any, depth: list[tuple[torch.Tensor, torch.Tensor, torch.LongTensor]]) -> dict[str, Any]:
    """Per-depth accuracy and the replayed chain over `(hidden, targets, sequences)` batches. The heads read the
    rows' real tokens (`sequences`), not the targets: context heads attend over the prompt, whose targets are -100."""
    figures: dict[str, list[float]] = {}
    chain = [0, 0]
    for hidden, targets, sequences in depth:  # batches differ in length: score each, weight by its valid targets
        acc = metrics.depth_accuracy(model, hidden, targets, input_ids=sequences)
        chain[0] += acc.pop("chain_tokens")
        chain[1] += acc.pop("chain_calls")
        weight = int((targets != -100).sum())
        for key, values in acc.items():
            total = figures.setdefault(key, [0.0] * (len(values) + 1))
            for i, v in enumerate(values):
                total[i] += v * weight
            total[-1] += weight
    out: dict[str, Any] = {f"depth_{k}": [round(x / max(v[-1], 1), 3) for x in v[:-1]] for k, v in figures.items()}
    out["replayed_chain_block_efficiency"] = round(metrics.block_efficiency(*chain), 3)
    return out


def plot(report: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Entropy histograms per head, oracle-efficiency curves and accepted-length histograms, as PNG files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    domains = list(report["domains"])
    paths = []

    fig, axes = plt.subplots(1, len(domains), figsize=(4 * len(domains), 3.2), squeeze=False)
    for ax, domain in zip(axes[0], domains):
        ent = report["_raw"][domain]["entropies"]
        for i in range(ent.shape[1]):
            values = ent[:, i].numpy()
            if not values.size:
                continue
            lo, hi = float(values.min()), float(values.max())
            if hi - lo < 1e-3:  # numpy cannot cut a span near float resolution into 30 bins (a near-uniform head)
                lo, hi = lo - 0.05, hi + 0.05
            ax.hist(values, bins=30, range=(lo, hi), histtype="step", density=True, label=f"head {i + 1}")
        ax.set_title(f"{domain}: h_max={report['domains'][domain]['h_max']}")
        ax.set_xlabel("entropy (nats)")
    axes[0][0].set_ylabel("density")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle("Draft-head entropy per head")
    fig.tight_layout()
    paths.append(out_dir / "entropy_per_head.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for domain in domains:
        eff = report["domains"][domain]["oracle_block_efficiency"]
        ks = sorted(int(k) for k in eff)
        ax.plot(ks, [eff[k] if k in eff else eff[str(k)] for k in ks], marker="o", label=domain)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k (top-k lattice)")
    ax.set_ylabel("oracle block efficiency")
    ax.set_title("Oracle top-k block efficiency")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out_dir / "oracle_topk.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(domains), figsize=(4 * len(domains), 3.2), squeeze=False)
    for ax, domain in zip(axes[0], domains):
        acc = report["_raw"][domain]["accepted"]
        top = max(acc) if acc else 0
        ax.hist(acc, bins=[x - 0.5 for x in range(top + 2)], rwidth=0.8)
        ax.set_title(f"{domain}: mean {report['domains'][domain]['mean_accepted_length']}")
        ax.set_xlabel("drafts accepted per step")
    axes[0][0].set_ylabel("steps")
    fig.suptitle("Accepted draft length per step (plain BPD)")
    fig.tight_layout()
    paths.append(out_dir / "accepted_lengths.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths
