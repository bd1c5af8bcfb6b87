"""Does a draft head that attends over the context predict x_{t+2} better? A training-only probe (issue 18).

    HF_HUB_OFFLINE=1 python bench/probe_context_head.py --train-shards 28 --steps 376 --threads 1 \
        --json bench/results/smollm2_context_head_probe.json

    # many epochs over every training shard (also those captured while answering), EAGLE's feature loss,
    # checkpointed every 200 steps and resumable (--resume), a held-out curve every 500 steps
    HF_HUB_OFFLINE=1 python bench/probe_context_head.py --train-shards all --steps 9000 --feature-loss-weight 1 \
        --threads 2 --minutes 95 --checkpoint ~/.cache/hf_bpd/smollm2_work/context-probe.pt --resume \
        --eval-every 500 --json bench/results/smollm2_context_head_long.json

    # the trained probe on the base's own answers to the validation chat prompts, beside heads folders on the same
    # answers (what bench/replay_chain.py reports for heads: top-1 of head 1 per task kind)
    HF_HUB_OFFLINE=1 python bench/probe_context_head.py --train-shards all --validation --threads 2 \
        --checkpoint ~/.cache/hf_bpd/smollm2_work/context-probe-long.pt --heads reference/smollm2-heads \
        --json bench/results/smollm2_context_head_validation.json

Our heads see the base model's last hidden state `h_t` and the embedding of `x_{t+1}` only; the base model predicts
`x_{t+2}` from `h_{t+1}`, which attends over the whole context. EAGLE (and Hydra++, "one decoder layer over the base
hidden states") give the draft model that attention: one decoder layer over `fc([h_s; E(x_{s+1})])` for `s <= t`,
causal, then the base's (frozen) output projection restricted to the draft vocabulary. This script trains exactly
that first-depth predictor on the same cached features, data, draft vocabulary, batch, steps and learning-rate
schedule as the shipped recipe's heads (`build_smollm2.py --stages heads`), and reports held-out top-1 of `x_{t+2}`
(head 1's target) beside that of given heads folders on the same positions (over the targets inside the draft
vocabulary, as `hf_bpd.metrics.depth_accuracy` counts, and over all targets). The decoder layer is transformers' own
Llama layer (a 1-layer `LlamaModel` fed `inputs_embeds`), sized like the base's layers. It is a probe, not a head
kind: there is no decoding with it (that needs a draft KV cache in the loop).

`--feature-loss-weight w` adds EAGLE's feature regression (Li et al. 2024, "EAGLE", section 4.2): the layer's output
at position t also regresses, by smooth L1, onto the base's own next hidden state `h_{t+1}` (post final norm, the
vector the base's `lm_head` reads), which the cache already holds: a 576-dimensional target per position instead of
one token.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import LlamaConfig, LlamaModel

from hf_bpd import BPDForCausalLM, metrics
from hf_bpd.features import IGNORE, CachedFeatures, collate_features, draft_vocab_from_counts

WORK = Path("~/.cache/hf_bpd/smollm2_work").expanduser()


class ContextHead(nn.Module):
    """`x_{t+2}` from `fc([h_t; E(x_{t+1})])` through `layers` causal decoder layers over the positions `<= t`."""

    def __init__(self, base_config, embed: nn.Module, projection: torch.Tensor, layers: int):
        super().__init__()
        d = base_config.hidden_size
        config = LlamaConfig(
            vocab_size=1,  # the layer is fed inputs_embeds; its own embedding is unused
            bos_token_id=None,
            eos_token_id=None,
            pad_token_id=None,
            hidden_size=d,
            intermediate_size=base_config.intermediate_size,
            num_hidden_layers=layers,
            num_attention_heads=base_config.num_attention_heads,
            num_key_value_heads=base_config.num_key_value_heads,
            max_position_embeddings=base_config.max_position_embeddings,
            rope_theta=getattr(base_config, "rope_theta", 10000.0),
            rms_norm_eps=base_config.rms_norm_eps,
        )
        self.fc = nn.Linear(2 * d, d)
        self.layers = LlamaModel(config)
        self.embed = embed  # frozen: the base model's own input embedding
        self.register_buffer("projection", projection)  # frozen: the base lm_head's draft-vocabulary rows (K, d)

    def forward(self, hidden: torch.Tensor, next_tokens: torch.LongTensor, mask: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            e = self.embed(next_tokens.clamp(min=0))
        x = self.fc(torch.cat([hidden.to(e.dtype), e], dim=-1))
        out = self.layers(inputs_embeds=x, attention_mask=mask).last_hidden_state
        return out @ self.projection.T, out  # (B, T, K) draft logits, (B, T, d) the predicted h_{t+1}

    def chained(self, hidden: torch.Tensor, next_tokens: torch.LongTensor, after_tokens: torch.LongTensor):
        """
        Depth 1 as `forward`, and depth 2 chained as EAGLE drafts (section 4.1): at position `t+1` the layer reads
        `fc([ĥ_{t+1}; E(x_{t+2})])`, its own predicted feature with the token after, attending to the real positions
        `<= t` and itself (one extra query per position, through a 4D mask; EAGLE-3's "training-time test" trains
        exactly these queries). Rows are right-padded: a real position never attends to the padding after it.

        Args: hidden `(B, n, d)`, next_tokens `x_{t+1}` and after_tokens `x_{t+2}`, `(B, n)`.
        Returns: draft logits `(B, n, K)` of `x_{t+2}`, the predicted `h_{t+1}` `(B, n, d)`, draft logits of
        `x_{t+3}` and the predicted `h_{t+2}`.
        """
        n = hidden.shape[1]
        with torch.no_grad():
            e1, e2 = self.embed(next_tokens.clamp(min=0)), self.embed(after_tokens.clamp(min=0))
        x = self.fc(torch.cat([hidden.to(e1.dtype), e1], dim=-1))
        out = self.layers(inputs_embeds=x, attention_mask=torch.ones_like(next_tokens)).last_hidden_state
        chain = self.fc(torch.cat([out.to(e2.dtype), e2.to(out.dtype)], dim=-1))
        i = torch.arange(n, device=hidden.device)
        causal = i[:, None] >= i[None, :]
        mask = torch.zeros(2 * n, 2 * n, dtype=torch.bool, device=hidden.device)
        mask[:n, :n] = causal
        mask[n:, :n] = causal
        mask[n:, n:] = torch.eye(n, dtype=torch.bool, device=hidden.device)
        both = self.layers(
            inputs_embeds=torch.cat([x, chain.to(x.dtype)], dim=1),
            attention_mask=mask[None, None].expand(hidden.shape[0], 1, -1, -1),
            position_ids=torch.cat([i, i + 1])[None].expand(hidden.shape[0], -1),
        ).last_hidden_state
        out2 = both[:, n:]
        return out @ self.projection.T, out, out2 @ self.projection.T, out2


def batches(features: CachedFeatures, batch: int, generator: torch.Generator):
    """Length-grouped random batches (as the recipe's group_by_length), cut after their last target."""
    order = torch.randperm(len(features), generator=generator).tolist()
    lengths = features.lengths()
    mega = batch * 50
    out = []
    for s in range(0, len(order), mega):
        chunk = sorted(order[s : s + mega], key=lambda i: -lengths[i])
        out += [chunk[i : i + batch] for i in range(0, len(chunk), batch)]
    perm = torch.randperm(len(out), generator=generator).tolist()
    return [out[i] for i in perm]


def inputs(rows: dict, to_draft: torch.Tensor):
    """(h_t, x_{t+1}, mask, x_{t+2} as draft ids, x_{t+2}, h_{t+1}, where h_{t+1} is a real answer position)."""
    hidden, labels = rows["base_hidden_states"].float(), rows["labels"]
    nxt = torch.full_like(labels, 0)
    nxt[:, :-1] = labels[:, 1:].clamp(min=0)  # x_{t+1}: the base's greedy token after t
    target = torch.full_like(labels, IGNORE)
    target[:, :-2] = labels[:, 2:]  # x_{t+2}
    valid = target != IGNORE
    draft_target = torch.where(valid, to_draft[target.clamp(min=0)], IGNORE)
    next_hidden = torch.zeros_like(hidden)
    next_hidden[:, :-1] = hidden[:, 1:]
    # right padding under a causal mask: a real position never attends to the padding after it
    return hidden, nxt, torch.ones_like(labels), draft_target, target, next_hidden, valid


def chain_inputs(rows: dict, to_draft: torch.Tensor):
    """Depth 2's (x_{t+2} as input, x_{t+3} as draft ids, h_{t+2}, where x_{t+3} is a target)."""
    hidden, labels = rows["base_hidden_states"].float(), rows["labels"]
    after = torch.zeros_like(labels)
    after[:, :-2] = labels[:, 2:].clamp(min=0)
    target = torch.full_like(labels, IGNORE)
    target[:, :-3] = labels[:, 3:]
    valid = target != IGNORE
    draft_target = torch.where(valid, to_draft[target.clamp(min=0)], IGNORE)
    next2_hidden = torch.zeros_like(hidden)
    next2_hidden[:, :-2] = hidden[:, 2:]
    return after, draft_target, next2_hidden, valid


def hit_counts(pred: torch.Tensor, target: torch.Tensor, to_draft: torch.Tensor) -> torch.LongTensor:
    """(hits, targets, targets inside the draft vocabulary) of predicted base token ids against targets."""
    valid = target != IGNORE
    in_vocab = valid & (to_draft[target.clamp(min=0)] != IGNORE)
    return torch.stack([((pred == target) & valid).sum(), valid.sum(), in_vocab.sum()])


def held_out_top1(model, held, to_draft, token_map, rows: int | None = None) -> dict:
    """Top-1 of x_{t+2} on the first `rows` held-out rows (all by default): over every target, and in-vocabulary."""
    model.eval()
    counts = torch.zeros(3, dtype=torch.long)
    end = len(held) if rows is None else min(rows, len(held))
    with torch.no_grad():
        for s in range(0, end, 16):
            batch = collate_features([held[i] for i in range(s, min(end, s + 16))])
            hidden, nxt, mask, _, target, _, _ = inputs(batch, to_draft)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                pred = token_map[model(hidden, nxt, mask)[0].argmax(-1)]
            counts += hit_counts(pred, target, to_draft)
    model.train()
    hits, total, in_vocab = counts.tolist()
    return {
        "positions": total,
        "top1": round(hits / max(total, 1), 4),
        "top1_in_draft_vocab": round(hits / max(in_vocab, 1), 4),
        "positions_in_draft_vocab": in_vocab,
    }


def target_counts(files: list[Path], vocab_size: int) -> torch.LongTensor:
    """`CachedFeatures(files).target_counts(vocab_size)` without loading the hidden states (the draft vocabulary of
    --validation, beside a training run that holds them)."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            targets = handle.get_tensor("targets")
        counts += torch.bincount(targets[targets != IGNORE], minlength=vocab_size)
    return counts


def validation_replay(
    model, base, tok, to_draft, token_map, heads: list[Path], max_new_tokens: int, max_prompts: int | None
) -> dict:
    """
    Top-1 of `x_{t+2}` per task kind on the base's greedy answers to the SmolLM2 validation chat prompts (fp32,
    answered and featurised as `bench/replay_chain.py` does), beside the given heads folders on the same answers.

    The probe reads each row without its left padding, with the real next token at every position (prompt tokens
    too: in a decode loop the drafter knows them), and is scored on the answer's positions.
    """
    from replay_chain import score_heads  # bench/ is the script's folder, on sys.path

    from hf_bpd.data import load_prompts, tokenize_prompts
    from hf_bpd_bench.analyze import greedy_features
    from hf_bpd_bench.reference import find_reference, get_stack

    first = BPDForCausalLM.from_pretrained(heads[0], base_model=base).eval()
    prompts = load_prompts(find_reference(get_stack("smollm2").prompts), tok, max_prompts)
    kinds = sorted({p.get("domain", "all") for p in prompts})
    answers, probe = {}, {}
    model.eval()
    for kind in kinds:
        depth1, depth2 = torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long)
        given = right1 = 0  # depth 2 right where depth 1 was, and depth 1 right where depth 2 has a target
        for batch in tokenize_prompts([p for p in prompts if p.get("domain", "all") == kind], tok, 10):
            with torch.no_grad():
                seq = base.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
            hidden, targets = greedy_features(
                first, seq, batch["attention_mask"], first.generation_config.eos_token_id
            )
            answers.setdefault(kind, []).append((hidden, targets, seq))  # (replay_chain.score_heads' rows)
            prompt_mask = torch.zeros_like(seq)
            prompt_mask[:, : batch["attention_mask"].shape[1]] = batch["attention_mask"]
            real = (prompt_mask == 1) | (targets != IGNORE)
            for b in range(seq.shape[0]):
                keep = real[b].nonzero().flatten()
                h, ids, tgt = hidden[b, keep][None], seq[b, keep][None], targets[b, keep][None]
                nxt, after = torch.zeros_like(ids), torch.zeros_like(ids)
                nxt[:, :-1], after[:, :-2] = ids[:, 1:], ids[:, 2:]
                target, target2 = torch.full_like(tgt, IGNORE), torch.full_like(tgt, IGNORE)
                target[:, :-2], target2[:, :-3] = tgt[:, 2:], tgt[:, 3:]
                with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                    logits1, _, logits2, _ = model.chained(h.float(), nxt, after)
                pred, pred2 = token_map[logits1.argmax(-1)], token_map[logits2.argmax(-1)]
                depth1 += hit_counts(pred, target, to_draft)
                depth2 += hit_counts(pred2, target2, to_draft)
                right, valid2 = (pred == target) & (target != IGNORE), target2 != IGNORE
                given += int(((pred2 == target2) & valid2 & right).sum())
                right1 += int((right & valid2).sum())
        (hits, total, in_vocab), (hits2, total2, in_vocab2) = depth1.tolist(), depth2.tolist()
        probe[kind] = {
            "positions": total,
            "top1": hits / max(total, 1),
            "top1_in_draft_vocab": hits / max(in_vocab, 1),
            "depth2_top1": hits2 / max(total2, 1),
            "depth2_top1_in_draft_vocab": hits2 / max(in_vocab2, 1),
            "depth2_top1_given_depth1": given / max(right1, 1),
        }
    tokens = {k: sum(int((t != IGNORE).sum()) for _, t, _ in v) for k, v in answers.items()}
    report = {
        "answer_tokens": tokens,
        "probe_head1_top1_in_draft_vocab": round(
            sum(v["top1_in_draft_vocab"] * tokens[k] for k, v in probe.items()) / sum(tokens.values()), 4
        ),
        "probe_depth2_top1_in_draft_vocab": round(
            sum(v["depth2_top1_in_draft_vocab"] * tokens[k] for k, v in probe.items()) / sum(tokens.values()), 4
        ),
        "probe_depth2_top1": round(
            sum(v["depth2_top1"] * tokens[k] for k, v in probe.items()) / sum(tokens.values()), 4
        ),
        "probe_per_kind": {k: {n: round(x, 4) for n, x in v.items()} for k, v in probe.items()},
        "heads": {},
    }
    for folder in heads:
        other = first if folder == heads[0] else BPDForCausalLM.from_pretrained(folder, base_model=base).eval()
        report["heads"][str(folder)] = score_heads(other, answers, tokens)
    return report


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, refused with a usage error (exit 2) for nonsense values before anything loads."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work-dir", type=Path, default=WORK)
    p.add_argument(
        "--train-shards",
        default="28",
        help="first N extracted chat feature shards (the 3,744 run: 28), or 'all': every extracted shard and every "
        "shard captured while answering (features/chat-gen), as the recipe's heads stage trains on",
    )
    p.add_argument("--steps", type=int, default=376, help="length of the cosine schedule, in optimizer steps")
    p.add_argument("--minutes", type=float, default=None, help="stop (checkpointed) after this many minutes")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--feature-loss-weight", type=float, default=0.0, help="EAGLE's smooth-L1 onto h_{t+1} (0: off)")
    p.add_argument("--draft-vocab-size", type=int, default=4096)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--checkpoint", type=Path, default=None, help="save model, optimizer and step here every 200 steps")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint when it exists")
    p.add_argument("--init-from", type=Path, default=None, help="start from this checkpoint's weights (new schedule)")
    p.add_argument(
        "--chain-depth",
        type=int,
        choices=(1, 2),
        default=1,
        help="2: also train depth 2 on the probe's own predicted features (EAGLE-3's training-time test, one step)",
    )
    p.add_argument("--eval-every", type=int, default=0, help="held-out top-1 on --eval-rows rows every N steps")
    p.add_argument("--eval-rows", type=int, default=256)
    p.add_argument("--heads", type=Path, nargs="*", default=[], help="heads folders to score on the same positions")
    p.add_argument(
        "--validation",
        action="store_true",
        help="score the --checkpoint's probe on the base's answers to the validation chat prompts (no training)",
    )
    p.add_argument("--max-new-tokens", type=int, default=128, help="answer length for --validation")
    p.add_argument("--max-prompts", type=int, default=None, help="--validation prompts per task kind (default: all)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps must be >= 1 (the length of the learning-rate schedule), got {args.steps}.")
    if args.validation and (args.checkpoint is None or not args.checkpoint.exists() or not args.heads):
        p.error("--validation needs a trained --checkpoint and at least one --heads folder to compare with.")
    for name in ("batch", "warmup", "layers", "threads", "eval_rows", "draft_vocab_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}.")
    if args.minutes is not None and args.minutes <= 0:
        p.error(f"--minutes must be > 0, got {args.minutes}.")
    if args.eval_every < 0 or args.feature_loss_weight < 0 or args.lr <= 0:
        p.error("--eval-every and --feature-loss-weight must be >= 0 and --lr > 0.")
    if args.init_from is not None and not args.init_from.is_file():
        p.error(f"--init-from {args.init_from} is not a checkpoint file.")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    feats = args.work_dir / "features"
    if args.train_shards == "all":
        chat = sorted((feats / "chat").glob("*.safetensors")) + sorted((feats / "chat-gen").glob("*.safetensors"))
        held_paths = sorted((feats / "eval").glob("*.safetensors")) + sorted(
            (feats / "eval-gen").glob("*.safetensors")
        )
    else:
        chat = sorted((feats / "chat").glob("*.safetensors"))[: int(args.train_shards)]
        held_paths = [feats / "eval"]
    train_files = chat + sorted((feats / "raw").glob("*.safetensors"))
    from hf_bpd.smollm2 import load_smollm2

    base, tok = load_smollm2(dtype=torch.float32)
    counts = target_counts(train_files, base.config.vocab_size)  # what CachedFeatures.target_counts gives
    token_map = draft_vocab_from_counts(counts, args.draft_vocab_size, always=[tok.eos_token_id])
    to_draft = torch.full((base.config.vocab_size,), IGNORE, dtype=torch.long)
    to_draft[token_map] = torch.arange(len(token_map))
    embed = base.get_input_embeddings().requires_grad_(False)
    projection = base.get_output_embeddings().weight.detach()[token_map].clone()
    model = ContextHead(base.config, embed, projection, args.layers)
    trainable = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("embed")]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
    schedule = lambda s: min(1.0, (s + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

    def load(path: Path) -> dict:
        state = torch.load(path, weights_only=False)
        if "token_map" in state and not torch.equal(state["token_map"], token_map):
            raise SystemExit(
                f"{path} was trained on another draft vocabulary (its shards' targets differ from these): use the "
                "--train-shards it was trained with, on the same feature shards."
            )
        return state

    if args.validation:
        model.load_state_dict(load(args.checkpoint)["model"])
        report = validation_replay(
            model, base, tok, to_draft, token_map, args.heads, args.max_new_tokens, args.max_prompts
        )
        print(json.dumps(report, indent=1))
        if args.json:
            args.json.write_text(json.dumps(report, indent=1) + "\n")
        return
    train = CachedFeatures(train_files, soft_targets=False)
    held = CachedFeatures(held_paths, soft_targets=False)
    gen = torch.Generator().manual_seed(args.seed)
    plan = []
    while len(plan) < args.steps:
        plan += batches(train, args.batch, gen)
    first, log, curve, seconds_before = 0, [], [], 0.0
    if args.init_from is not None:
        model.load_state_dict(load(args.init_from)["model"])
    if args.resume and args.checkpoint is not None and args.checkpoint.exists():
        state = load(args.checkpoint)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        first, log, curve, seconds_before = state["step"], state["log"], state["curve"], state["seconds"]
        print(f"resumed at step {first} ({seconds_before:.0f} s trained)", flush=True)

    def save(step: int) -> None:
        if args.checkpoint is None:
            return
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "step": step,
            "log": log,
            "curve": curve,
            "seconds": seconds_before + time.perf_counter() - start,
            "token_map": token_map,
        }
        torch.save(state, args.checkpoint.with_suffix(".tmp"))
        args.checkpoint.with_suffix(".tmp").replace(args.checkpoint)  # never a half-written checkpoint

    start = time.perf_counter()
    model.train()
    step = first
    for step in range(first, args.steps):
        if args.minutes is not None and time.perf_counter() - start > 60 * args.minutes:
            break
        rows = collate_features([train[i] for i in plan[step]])
        hidden, nxt, mask, target, _, next_hidden, valid = inputs(rows, to_draft)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if args.chain_depth == 2:
                after, target2, next2_hidden, valid2 = chain_inputs(rows, to_draft)
                logits, out, logits2, out2 = model.chained(hidden, nxt, after)
            else:
                logits, out = model(hidden, nxt, mask)
        loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), target.flatten(), ignore_index=IGNORE)
        feature_loss = nn.functional.smooth_l1_loss(out.float()[valid], next_hidden[valid])
        if args.chain_depth == 2:  # EAGLE-3's training-time test, one step: depth 2 from its own feature
            loss2 = nn.functional.cross_entropy(logits2.float().flatten(0, 1), target2.flatten(), ignore_index=IGNORE)
            loss = loss + loss2
            feature_loss = feature_loss + nn.functional.smooth_l1_loss(out2.float()[valid2], next2_hidden[valid2])
        total_loss = loss + args.feature_loss_weight * feature_loss if args.feature_loss_weight else loss
        optimizer.zero_grad()
        total_loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        scheduler.step()
        if (step + 1) % 25 == 0:
            with torch.no_grad():
                ok = (logits.argmax(-1) == target) & (target != IGNORE)
                top1 = float(ok.sum() / (target != IGNORE).sum())
            log.append(
                {
                    "step": step + 1,
                    "loss": round(float(loss.detach()), 4),
                    "feature_loss": round(float(feature_loss.detach()), 4),
                    "train_top1": round(top1, 4),
                }
            )
            if args.chain_depth == 2:
                with torch.no_grad():
                    ok2 = (logits2.argmax(-1) == target2) & (target2 != IGNORE)
                    log[-1]["train_top1_depth2"] = round(float(ok2.sum() / (target2 != IGNORE).sum()), 4)
            print(log[-1], f"{seconds_before + time.perf_counter() - start:.0f} s", flush=True)
        if args.eval_every and (step + 1) % args.eval_every == 0:
            curve.append({"step": step + 1, **held_out_top1(model, held, to_draft, token_map, args.eval_rows)})
            print("held out", curve[-1], flush=True)
        if (step + 1) % 200 == 0:
            save(step + 1)
    else:
        step = args.steps
    save(step)
    seconds = seconds_before + time.perf_counter() - start
    result = held_out_top1(model, held, to_draft, token_map)
    report = {
        "probe": f"{args.layers} Llama decoder layer(s) over fc([h_s; E(x_s+1)]), s <= t (EAGLE / Hydra++ style)",
        "feature_loss_weight": args.feature_loss_weight,
        "chain_depth_trained": args.chain_depth,
        "init_from": str(args.init_from) if args.init_from else None,
        "train_sequences": len(train),
        "train_target_tokens": train.num_target_tokens(),
        "steps_planned": args.steps,
        "steps": step,
        "epochs": round(step * args.batch / len(train), 3),
        "batch": args.batch,
        "seconds": round(seconds),
        "threads": args.threads,
        "held_out_sequences": len(held),
        "held_out_positions": result["positions"],
        "held_out_top1_x_t2": result["top1"],
        # what `metrics.depth_accuracy` reports for heads: targets outside the draft vocabulary are left out
        "held_out_top1_x_t2_in_draft_vocab": result["top1_in_draft_vocab"],
        "held_out_positions_in_draft_vocab": result["positions_in_draft_vocab"],
        "held_out_curve": curve,
        "log": log,
        "heads_on_the_same_features": {},
    }
    for folder in args.heads:
        heads = BPDForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():
            acc = metrics.depth_accuracy(heads, held.hidden.float(), held.targets)
        report["heads_on_the_same_features"][str(folder)] = {
            k: [round(float(x), 4) for x in v] if isinstance(v, list) else v for k, v in acc.items()
        }
    print(json.dumps({k: v for k, v in report.items() if k != "log"}, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
