"""Independent (`resblock`) vs token-conditioned (`recurrent`) draft heads on the 10M reference stack, same budget.

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python bench/bench_head_kinds.py --minutes 10 --max-steps 400 \
        --train-blocks 1600 --eval-blocks 64 --threads 1
    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python bench/bench_head_kinds.py --kinds recurrent --distillation soft \
        --top-k 16 --minutes 10 --max-steps 400 --train-blocks 1600 --check-generate 0 \
        --out bench/results/head_kinds_soft.json
    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python bench/bench_head_kinds.py --smollm2-cost \
        --out bench/results/head_kinds_smollm2_cost.json

1. Data: the reference training split (`split_reference_corpora`, as examples/build_reference.py's `split` stage),
   packed into 256-token blocks round robin over the four domains; cached base features (hidden states + the base's
   greedy tokens: hard self-distillation, the reference heads' recipe) for `--train-blocks` training blocks and
   `--eval-blocks` validation blocks.
2. Training: `h` heads of each kind with `BPDTrainer` on the same cached features, same batches (same seed), same
   optimizer steps and learning rate, each capped at `--minutes` of wall time; the steps run and the tokens seen are
   recorded (a kind stopped by the cap sees fewer tokens: both are printed).
3. Per-depth top-1 on the validation blocks: plain (teacher-forced for the conditioned heads) and *given a correct
   prefix* ([`hf_bpd.losses.prefix_accuracy_counts`]).
4. Greedy-chain block efficiency per domain on reference/prompts/validation.jsonl (`--max-new-tokens` greedy
   tokens): the base's greedy continuation is computed once, then the plain BPD loop is replayed on it (draft a
   chain at the committed position, accept the longest prefix equal to the greedy continuation, commit one more),
   which is what `generate(use_bpd=True)` accepts in fp32; `--check-generate N` cross-checks it against `generate`
   on N prompts per kind.
5. Draft cost: an `h`-token greedy chain (`draft_logits`/`step` + argmax per token) timed against one cached greedy
   step of the base (batch 1).

Writes `--out` (JSON). Nothing under reference/ is written.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
logger = logging.getLogger("bench_head_kinds")
DOMAINS = ("austen", "shakespeare", "kjv", "python")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reference", type=Path, default=REPO / "reference")
    p.add_argument("--corpora", type=Path, default=REPO.parent / "shared" / "corpora")
    p.add_argument("--work-dir", type=Path, default=Path.home() / ".cache" / "hf_bpd" / "bench_head_kinds")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "head_kinds.json")
    p.add_argument("--kinds", default="resblock,recurrent")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--train-blocks", type=int, default=2400)
    p.add_argument("--eval-blocks", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--max-steps", type=int, default=1200, help="optimizer steps of each kind (the LR schedule)")
    p.add_argument("--minutes", type=float, default=9.0, help="wall-time cap of each kind's training")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--prompts-per-domain", type=int, default=25)
    p.add_argument("--check-generate", type=int, default=2, help="prompts per kind cross-checked with generate")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--distillation",
        default="hard",
        choices=["hard", "soft"],
        help="'soft': KL to the base's cached top-k (--top-k) instead of its greedy tokens",
    )
    p.add_argument("--top-k", type=int, default=16, help="top-k soft targets cached with --distillation soft")
    p.add_argument(
        "--smollm2-cost",
        action="store_true",
        help="only step 5 on SmolLM2-135M (h = 5, K = 4096, fp32 and bf16), written to --out",
    )
    return p.parse_args(argv)


def blocks_of(texts, tokenizer, seq_len, limit, eos):
    ids = []
    for text in texts:
        ids += tokenizer(text)["input_ids"] + [eos]
        if len(ids) >= seq_len * limit:
            break
    return [ids[i : i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)][:limit]


def make_features(args, base, tokenizer):
    from hf_bpd.features import CachedFeatures, extract_features
    from hf_bpd.tools.reference import split_reference_corpora

    suffix = f"_top{args.top_k}" if args.distillation == "soft" else ""
    folders = {s: args.work_dir / f"features_{s}{suffix}" for s in ("train", "validation")}
    if all((f / "done").exists() for f in folders.values()):
        return {k: CachedFeatures(v) for k, v in folders.items()}
    splits = split_reference_corpora(args.corpora)
    rng = random.Random(args.seed)
    for split, count in (("train", args.train_blocks), ("validation", args.eval_blocks)):
        per_domain = []
        for d in DOMAINS:
            texts = list(splits[d][split])
            rng.shuffle(texts)
            per_domain.append(
                blocks_of(texts, tokenizer, args.seq_len, count // len(DOMAINS) + 1, tokenizer.eos_token_id)
            )
        rows = [blk for group in zip(*per_domain) for blk in group][:count]  # round robin over domains
        top_k = args.top_k if args.distillation == "soft" else 0
        extract_features(base, rows, folders[split], args.seq_len, 8, storage_dtype=base.dtype, top_k=top_k)
        (folders[split] / "done").write_text(str(len(rows)))
    return {k: CachedFeatures(v) for k, v in folders.items()}


def train_kind(args, kind, base, features):
    from transformers import TrainerCallback, set_seed

    from hf_bpd import BPDForCausalLM
    from hf_bpd.trainer import BPDTrainer, BPDTrainingArguments

    set_seed(args.seed)
    model = BPDForCausalLM.from_base(
        base, num_draft_heads=args.heads, head_type=kind, base_model_name_or_path=str(args.reference / "base")
    )
    cap = args.minutes * 60

    class Budget(TrainerCallback):
        def on_train_begin(self, *a, **k):
            self.start = time.time()

        def on_step_end(self, a, state, control, **k):
            control.should_training_stop = time.time() - self.start > cap

    targs = BPDTrainingArguments(
        output_dir=str(args.work_dir / f"trainer_{kind}"),
        max_steps=args.max_steps,
        learning_rate=args.lr,
        per_device_train_batch_size=args.batch_size,
        lr_scheduler_type="cosine",
        warmup_steps=args.max_steps // 20,
        weight_decay=0.0,
        logging_steps=50,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=args.seed,
        distillation=args.distillation,
        head_loss_weighting="uniform",
        dataloader_num_workers=0,
    )
    trainer = BPDTrainer(model=model, args=targs, train_dataset=features["train"], callbacks=[Budget()])
    start = time.time()
    trainer.train()
    wall = time.time() - start
    steps = trainer.state.global_step
    return model.eval(), {
        "steps": steps,
        "wall_s": round(wall, 1),
        "train_tokens": steps * args.batch_size * args.seq_len,
    }


def depth_accuracy(model, features, batch_size=8):
    import torch

    from hf_bpd.losses import head_accuracy_counts, prefix_accuracy_counts

    h = model.config.num_draft_heads
    sums = torch.zeros(4, h)
    with torch.no_grad():
        for i in range(0, len(features), batch_size):
            rows = [features[j] for j in range(i, min(i + batch_size, len(features)))]
            hidden = torch.stack([r["base_hidden_states"] for r in rows]).float()
            labels = torch.stack([r["labels"] for r in rows])
            out = model(base_hidden_states=hidden, draft_input_ids=labels, draft_full_vocab=False)
            top1, _, total = head_accuracy_counts(out.draft_logits, labels, top_k=1)
            hits, given = prefix_accuracy_counts(out.draft_logits, labels)
            sums += torch.stack([top1, total, hits, given]).float()
    return {"top1": (sums[0] / sums[1]).tolist(), "top1_given_prefix": (sums[2] / sums[3]).tolist()}


def greedy_runs(base, tokenizer, prompts, max_new_tokens):
    """Each prompt's greedy continuation and the base's last hidden states over prompt + continuation."""
    import torch

    runs = []
    for p in prompts:
        ids = tokenizer(p["prompt"], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            seq = base.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False
            )
            hidden = base(seq, output_hidden_states=True).hidden_states[-1][0]
        runs.append({"domain": p["domain"], "seq": seq[0], "prompt_len": ids.shape[1], "hidden": hidden})
    return runs


def greedy_chain(model, hidden, first_token):
    """The heads' greedy chain `(h,)` after `first_token` (the committed token), token by token."""
    import torch

    h = model.config.num_draft_heads
    if model.independent_heads:
        return model.draft_argmax(hidden)
    heads, state, token, out = model.heads, None, first_token.view(1), []
    weight, bias = model._draft_projection()
    for k in range(h):
        z, state = heads.step(hidden[None], token, state, k)
        best = torch.nn.functional.linear(z, weight, bias).argmax(-1)
        token = best if model.draft_token_map is None else model.draft_token_map[best]
        out.append(token)
    return torch.cat(out)


def replay_block_efficiency(model, runs):
    """Plain greedy BPD replayed on the known greedy continuation: tokens per base call, per domain."""
    import torch

    per = {}
    with torch.no_grad():
        for r in runs:
            seq, pos, end = r["seq"], r["prompt_len"], r["seq"].shape[0]
            committed, calls = pos + 1, 1  # the prompt's call commits the base's next token x_{t+1}
            while committed < end:
                # drafts after the last committed token, from the hidden state that predicted it
                chain = greedy_chain(model, r["hidden"][committed - 2], seq[committed - 1])
                chain = chain[: end - committed - 1]  # a call commits at most the tokens still wanted
                truth = seq[committed : committed + chain.shape[0]]
                accepted = int((chain == truth).long().cumprod(0).sum())
                committed, calls = committed + accepted + 1, calls + 1
            tokens, c = per.setdefault(r["domain"], [0, 0])
            per[r["domain"]] = [tokens + (end - pos), c + calls]
    return {d: round(t / c, 3) for d, (t, c) in per.items()}


def draft_cost(model, base, runs, repeats=30):
    import torch

    r = runs[0]
    seq = r["seq"][None]
    with torch.no_grad():
        out = base(seq[:, :-1], use_cache=True)
        cache = getattr(out, "cache", None) or out.past_key_values
        t0 = time.perf_counter()
        for _ in range(repeats):
            base(seq[:, -1:], cache=cache, use_cache=True)
            cache.crop(-1)
        step = (time.perf_counter() - t0) / repeats
        hidden = r["hidden"][-2]
        t0 = time.perf_counter()
        for _ in range(repeats):
            greedy_chain(model, hidden, seq[0, -1])
        chain = (time.perf_counter() - t0) / repeats
    return {
        "greedy_step_ms": round(step * 1e3, 3),
        "chain_ms": round(chain * 1e3, 3),
        "chain_over_step": round(chain / step, 3),
    }


def check_generate(model, tokenizer, prompts, replayed_runs):
    """`generate(use_bpd=True)`'s block efficiency on a few prompts equals the replay's (same prompts)."""
    import torch

    rows = []
    for p, r in zip(prompts, replayed_runs):
        ids = tokenizer(p["prompt"], return_tensors="pt")["input_ids"]
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=r["seq"].shape[0] - ids.shape[1],
            do_sample=False,
            use_bpd=True,
            return_dict_in_generate=True,
        )
        assert torch.equal(out.sequences[0], r["seq"]), "BPD output differs from greedy"
        rows.append(round(out.num_generated_tokens / out.num_serial_calls, 3))
    return rows


def smollm2_cost(args):
    """Draft cost of an h-token chain vs a greedy step on SmolLM2-135M (the shipped heads' shape: h = 5, K = 4096);
    untrained heads of each kind (the cost does not depend on the weights)."""
    import torch

    from hf_bpd import BPDForCausalLM
    from hf_bpd.smollm2 import load_smollm2

    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        base, tokenizer = load_smollm2(dtype=dtype)
        ids = tokenizer("Write a short poem about the sea and the wind, in four lines.", return_tensors="pt")[
            "input_ids"
        ]
        with torch.no_grad():
            seq = base.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=48, do_sample=False)
            hidden = base(seq, output_hidden_states=True).hidden_states[-1][0]
        runs = [{"seq": seq[0], "hidden": hidden}]
        for kind in args.kinds.split(","):
            model = BPDForCausalLM.from_base(base, num_draft_heads=5, head_type=kind, draft_vocab_size=4096).eval()
            model.set_draft_vocab(torch.arange(4096))
            out[f"{kind}_{str(dtype).split('.')[-1]}"] = draft_cost(model, base, runs)
            logger.info("SmolLM2 %s %s: %s", kind, dtype, out[f"{kind}_{str(dtype).split('.')[-1]}"])
    return out


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    if args.smollm2_cost:
        result = smollm2_cost(args)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=2))
        return
    sys.path.insert(0, str(REPO))
    args.work_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(args.reference / "base")
    base = AutoModelForCausalLM.from_pretrained(args.reference / "base", dtype=torch.float32).eval()
    features = make_features(args, base, tokenizer)
    prompts = [json.loads(x) for x in (args.reference / "prompts" / "validation.jsonl").read_text().splitlines()]
    chosen, counts = [], {d: 0 for d in DOMAINS}
    for p in prompts:  # the first --prompts-per-domain prompts of each domain
        if counts[p["domain"]] < args.prompts_per_domain:
            chosen.append(p)
            counts[p["domain"]] += 1
    runs = greedy_runs(base, tokenizer, chosen, args.max_new_tokens)
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "kinds": {}}
    for kind in args.kinds.split(","):
        model, train = train_kind(args, kind, base, features)
        entry = {"training": train, "accuracy": depth_accuracy(model, features["validation"])}
        entry["block_efficiency"] = replay_block_efficiency(model, runs)
        entry["draft_cost"] = draft_cost(model, base, runs)
        if args.check_generate:
            picked = [i for d in DOMAINS for i in [j for j, p in enumerate(chosen) if p["domain"] == d][:1]]
            picked = picked[: args.check_generate]
            entry["generate_check"] = {
                "generate": check_generate(model, tokenizer, [chosen[i] for i in picked], [runs[i] for i in picked]),
                "replay": [replay_block_efficiency(model, [runs[i]]) for i in picked],
            }
        model.save_pretrained(args.work_dir / f"heads_{kind}")
        result["kinds"][kind] = entry
        logger.info("%s: %s", kind, json.dumps(entry))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    kinds = result["kinds"]
    if {"resblock", "recurrent"} <= set(kinds):
        ind, con = kinds["resblock"], kinds["recurrent"]
        ratio = [
            c / max(i, 1e-9)
            for i, c in zip(ind["accuracy"]["top1_given_prefix"][1:], con["accuracy"]["top1_given_prefix"][1:])
        ]
        gain = {
            d: round(con["block_efficiency"][d] / ind["block_efficiency"][d] - 1, 3) for d in ind["block_efficiency"]
        }
        result["summary"] = {
            "depth2plus_given_prefix_ratio": [round(x, 3) for x in ratio],
            "target_ratio_1.3_met": all(x >= 1.3 for x in ratio),
            "block_efficiency_gain": gain,
            "target_gain_0.3_met": all(g >= 0.3 for g in gain.values()),
        }
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result.get("summary", result), indent=2))


if __name__ == "__main__":
    main()
