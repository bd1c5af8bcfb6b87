"""Build the project's small reference stack from the local corpora in ../shared/corpora.

Full build (about 90 minutes on this 2-core CPU; `bash scripts/build_kenlm.sh` first for the ngram stage):

    python examples/build_reference.py --stages split,tokenizer,base,small,heads,ngram \
        --base-max-minutes 55 --small-max-minutes 10 --heads-max-minutes 28 --threads 2

Stages (run in the order given by --stages):
  split      deterministic train/validation split of each domain; training/validation texts go to
             --work-dir/data/*.jsonl (outside the repo), validation prompts to --out/prompts/validation.jsonl
  tokenizer  byte-level BPE (vocab 8192, <|endoftext|> as bos/eos/pad) -> --out/tokenizer
  base       ~10M-parameter Llama trained from scratch -> --out/base (bf16 safetensors + tokenizer + training_log.json)
  small      ~2M-parameter Llama (draft / assistant model) -> --out/small
  heads      `--heads-max-h` ResBlock draft heads on the frozen base (BPDTrainer, hard self-distillation); the
             first h are kept, h chosen by measured speed on validation prompts -> --out/heads
  ngram      KenLM 4-gram over token ids of the training split (pruned, 8-bit trie) -> --out/ngram
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CORPORA = REPO.parent / "shared" / "corpora"

logger = logging.getLogger("build_reference")

EOS = "<|endoftext|>"
DOMAINS = ("austen", "shakespeare", "kjv", "python")
MODEL_SPECS = {
    "base": dict(
        hidden_size=288, intermediate_size=768, num_hidden_layers=8, num_attention_heads=6, num_key_value_heads=6
    ),
    "small": dict(
        hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4
    ),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--stages", default="split,tokenizer,base,small", help="comma-separated stages to run, in order")
    p.add_argument("--corpora", type=Path, default=DEFAULT_CORPORA, help="folder of the training corpora")
    p.add_argument("--out", type=Path, default=REPO / "reference", help="output folder (in the repo)")
    p.add_argument(
        "--work-dir", type=Path, default=Path("/tmp/hf_bpd_reference"), help="cache/scratch folder outside the repo"
    )
    p.add_argument("--val-fraction", type=float, default=0.02)
    p.add_argument("--prompts-per-domain", type=int, default=25)
    p.add_argument("--prompt-chars", type=int, default=200)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--warmup-ratio", type=float, default=0.05)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--base-max-minutes", type=float, default=60.0)
    p.add_argument("--small-max-minutes", type=float, default=12.0)
    p.add_argument(
        "--base-max-steps",
        type=int,
        default=None,
        help="LR-schedule length; default: estimate from --base-tokens-per-s",
    )
    p.add_argument(
        "--small-max-steps",
        type=int,
        default=None,
        help="LR-schedule length; default: estimate from --small-tokens-per-s",
    )
    p.add_argument(
        "--base-tokens-per-s", type=float, default=620.0, help="throughput estimate used for --base-max-steps"
    )
    p.add_argument(
        "--small-tokens-per-s", type=float, default=3100.0, help="throughput estimate used for --small-max-steps"
    )
    p.add_argument("--eval-blocks", type=int, default=64, help="validation blocks per domain")
    p.add_argument("--logging-steps", type=int, default=50)
    p.add_argument(
        "--heads-max-h",
        type=int,
        default=6,
        help="draft heads trained (the first h are kept, h chosen by measurement)",
    )
    p.add_argument("--heads-max-minutes", type=float, default=28.0)
    p.add_argument("--heads-tokens-per-s", type=float, default=500.0, help="throughput estimate for the LR schedule")
    p.add_argument(
        "--heads-batch-size",
        type=int,
        default=4,
        help="small batches train faster per token on CPU (h vocabulary-sized logits per position)",
    )
    p.add_argument("--heads-lr", type=float, default=2e-3)
    p.add_argument("--heads-select-prompts", type=int, default=4, help="validation prompts per domain for choosing h")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- split
def training_data_names() -> list[str]:
    """What the model cards record as training data (the files themselves live in the scratch --work-dir)."""
    files = {
        "austen": "austen_*.txt",
        "shakespeare": "shakespeare/*_gut.txt",
        "kjv": "kjv.jsonl",
        "python": "python_stdlib.jsonl",
    }  # what hf_bpd.data.split_reference_corpora reads
    return [
        f"{d}: training split of ../shared/corpora/{files[d]} (see reference/prompts/split_info.json)" for d in DOMAINS
    ]


def data_file(args, domain: str, split: str) -> Path:
    return args.work_dir / "data" / f"{domain}_{split}.jsonl"


def make_prompts(texts, n: int, chars: int, rng: random.Random):
    """Cut ~`chars`-character windows that start and end at word boundaries from validation texts."""
    pool = [t for t in texts if len(t) > 2 * chars]
    prompts = []
    for _ in range(n * 20):
        if len(prompts) >= n or not pool:
            break
        text = rng.choice(pool)
        end = rng.randrange(chars + 1, len(text))
        end = max(text.rfind(" ", 0, end), text.rfind("\n", 0, end))
        start = end - chars
        if start <= 0:
            continue
        while start < end and not text[start - 1].isspace():
            start += 1
        window = text[start:end].strip()
        if len(window) >= chars // 2 and window not in prompts:
            prompts.append(window)
    return prompts


def stage_split(args):
    from hf_bpd_bench.reference import split_reference_corpora

    splits = split_reference_corpora(args.corpora, val_fraction=args.val_fraction)
    (args.work_dir / "data").mkdir(parents=True, exist_ok=True)
    (args.out / "prompts").mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    info, rows = {}, []
    for domain in DOMAINS:
        for split, texts in splits[domain].items():
            with open(data_file(args, domain, split), "w", encoding="utf-8") as f:
                for t in texts:
                    f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
        prompts = make_prompts(splits[domain]["validation"], args.prompts_per_domain, args.prompt_chars, rng)
        rows += [{"prompt": p, "domain": domain} for p in prompts]
        info[domain] = {s: {"texts": len(t), "chars": sum(map(len, t))} for s, t in splits[domain].items()}
        info[domain]["prompts"] = len(prompts)
    with open(args.out / "prompts" / "validation.jsonl", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    with open(args.out / "prompts" / "split_info.json", "w") as f:
        json.dump({"val_fraction": args.val_fraction, "seed": args.seed, "domains": info}, f, indent=2)
    logger.info("Wrote %d prompts to %s", len(rows), args.out / "prompts" / "validation.jsonl")


def ensure_split(args):
    if not all(data_file(args, d, s).exists() for d in DOMAINS for s in ("train", "validation")):
        stage_split(args)


# ----------------------------------------------------------------------------- tokenizer
def stage_tokenizer(args):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    ensure_split(args)

    def texts():
        for d in DOMAINS:
            with open(data_file(args, d, "train"), encoding="utf-8") as f:
                for line in f:
                    yield json.loads(line)["text"]

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=args.vocab_size,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    t0 = time.time()
    tok.train_from_iterator(texts(), trainer=trainer)
    logger.info("Trained BPE tokenizer (vocab %d) in %.1fs", tok.get_vocab_size(), time.time() - t0)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=EOS, model_max_length=512
    )
    fast.save_pretrained(args.out / "tokenizer")
    # Byte-level round trip on held-out text.
    for d in DOMAINS:
        with open(data_file(args, d, "validation"), encoding="utf-8") as f:
            sample = json.loads(f.readline())["text"][:5000]
        ids = fast(sample, add_special_tokens=False)["input_ids"]
        if fast.decode(ids) != sample:
            raise RuntimeError(f"Tokenizer does not round-trip {d} text exactly.")
        logger.info("%s: %.2f chars/token, round trip OK", d, len(sample) / len(ids))


# ----------------------------------------------------------------------------- LM training
class TimeBudgetCallback:
    """Stop training once `max_minutes` of wall-clock time have been spent."""

    def __new__(cls, max_minutes: float):
        from transformers import TrainerCallback

        class _CB(TrainerCallback):
            def __init__(self):
                self.budget, self.start, self.stopped_on_time = max_minutes * 60.0, None, False

            def on_train_begin(self, args, state, control, **kw):
                self.start = time.time()

            def on_step_end(self, args, state, control, **kw):
                if time.time() - self.start >= self.budget:
                    self.stopped_on_time = True
                    control.should_training_stop = True
                    logger.info(
                        "Time budget of %.1f min spent at step %d; stopping.", self.budget / 60, state.global_step
                    )
                return control

        return _CB()


def collate(features):
    import torch

    ids = torch.tensor([f["input_ids"] for f in features], dtype=torch.long)
    return {"input_ids": ids, "labels": ids.clone()}


def load_packed(args, tokenizer, split: str):
    from hf_bpd.data import load_text_files, pack_dataset

    out = {}
    for d in DOMAINS:
        ds = load_text_files(data_file(args, d, split), cache_dir=args.work_dir / "hf_cache")
        out[d] = pack_dataset(ds, tokenizer, args.seq_len)
    return out


def evaluate(model, blocks, batch_size: int):
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(blocks), batch_size):
            batch = collate(blocks[i : i + batch_size])
            loss = model(**batch).loss
            n = batch["input_ids"].numel() - batch["input_ids"].shape[0]
            total, count = total + loss.item() * n, count + n
    return math.exp(total / max(count, 1))


def stage_lm(args, name: str):
    import datasets
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments, set_seed

    ensure_split(args)
    tok_dir = args.out / "tokenizer"
    if not tok_dir.exists():
        stage_tokenizer(args)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    set_seed(args.seed)

    train_parts = load_packed(args, tokenizer, "train")
    train = datasets.concatenate_datasets(list(train_parts.values())).shuffle(seed=args.seed)
    val_parts = load_packed(args, tokenizer, "validation")
    val = {d: [ds[i] for i in range(min(args.eval_blocks, len(ds)))] for d, ds in val_parts.items()}
    logger.info("Train blocks: %s (total %d)", {d: len(v) for d, v in train_parts.items()}, len(train))

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **MODEL_SPECS[name],
    )
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    minutes = getattr(args, f"{name}_max_minutes")
    max_steps = getattr(args, f"{name}_max_steps")
    if max_steps is None:
        tps = getattr(args, f"{name}_tokens_per_s")
        max_steps = max(10, int(minutes * 60 * tps / (args.batch_size * args.seq_len)))
    logger.info(
        "%s: %d params (%.2fM), max_steps %d, budget %.1f min", name, n_params, n_params / 1e6, max_steps, minutes
    )

    targs = TrainingArguments(
        output_dir=str(args.work_dir / f"trainer_{name}"),
        max_steps=max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, int(args.warmup_ratio * max_steps)),
        weight_decay=args.weight_decay,
        adam_beta2=0.95,
        max_grad_norm=1.0,
        logging_steps=args.logging_steps,
        save_strategy="no",
        report_to="none",
        bf16=False,
        fp16=False,
        use_cpu=True,
        dataloader_num_workers=0,
        seed=args.seed,
        disable_tqdm=False,
    )
    budget = TimeBudgetCallback(minutes)
    trainer = Trainer(model=model, args=targs, train_dataset=train, data_collator=collate, callbacks=[budget])
    t0 = time.time()
    result = trainer.train()
    wall = time.time() - t0
    steps = trainer.state.global_step
    logger.info(
        "%s: %d steps in %.1fs (%.3f steps/s, %.0f tokens/s)",
        name,
        steps,
        wall,
        steps / wall,
        steps * args.batch_size * args.seq_len / wall,
    )

    t1 = time.time()
    ppl = {d: evaluate(model, blocks, args.batch_size) for d, blocks in val.items()}
    logger.info(
        "%s validation perplexity: %s (%.1fs)", name, {d: round(v, 2) for d, v in ppl.items()}, time.time() - t1
    )

    out_dir = args.out / name
    model.to(torch.bfloat16).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    log = {
        "model": name,
        "config": MODEL_SPECS[name],
        "num_parameters": n_params,
        "data_files": {d: str(data_file(args, d, "train")) for d in DOMAINS},
        "corpora": str(args.corpora),
        "val_fraction": args.val_fraction,
        "train_blocks": {d: len(v) for d, v in train_parts.items()},
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "learning_rate": args.lr,
        "max_steps_planned": max_steps,
        "steps": steps,
        "tokens_seen": steps * args.batch_size * args.seq_len,
        "epochs": steps * args.batch_size / len(train),
        "stopped_on_time_budget": budget.stopped_on_time,
        "max_minutes": minutes,
        "wall_time_s": round(wall, 1),
        "threads": args.threads,
        "final_train_loss": result.training_loss,
        "validation_blocks": {d: len(v) for d, v in val.items()},
        "validation_perplexity": ppl,
        "loss_curve": [
            {"step": h["step"], "loss": h["loss"], "lr": h.get("learning_rate")}
            for h in trainer.state.log_history
            if "loss" in h
        ],
        "saved_dtype": "bfloat16",
        "torch": torch.__version__,
    }
    with open(out_dir / "training_log.json", "w") as f:
        json.dump(log, f, indent=2)
    logger.info("Saved %s to %s", name, out_dir)


# ----------------------------------------------------------------------------- draft heads
def bpd_with_first_heads(model, h: int):
    """A BPDForCausalLM on the same base that keeps the first `h` heads of `model` (same weights)."""
    from hf_bpd import BPDConfig, BPDForCausalLM

    fields = {
        k: getattr(model.config, k)
        for k in (
            "head_type",
            "head_num_layers",
            "head_hidden_size",
            "head_rank",
            "share_lm_head",
            "base_model_name_or_path",
        )
    }
    small = BPDForCausalLM(BPDConfig(num_draft_heads=h, **fields), base_model=model.base)
    small.heads.load_state_dict({k: v for k, v in model.heads.state_dict().items() if int(k.split(".")[0]) < h})
    return small.eval()


def measure_heads(model, tokenizer, prompts, max_new_tokens: int):
    """Block efficiency and greedy/BPD wall-clock ratio of `model` on `prompts` (batch 1, one pass each)."""
    import torch

    tokens = calls = 0
    t_greedy = t_bpd = 0.0
    for p in prompts:
        ids = tokenizer(p["prompt"], return_tensors="pt")
        t0 = time.perf_counter()
        ref = model.base.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
        t1 = time.perf_counter()
        out = model.generate(
            **ids, max_new_tokens=max_new_tokens, do_sample=False, use_bpd=True, return_dict_in_generate=True
        )
        t_bpd += time.perf_counter() - t1
        t_greedy += t1 - t0
        assert torch.equal(out.sequences, ref), "BPD output differs from greedy"
        tokens, calls = tokens + out.num_generated_tokens, calls + out.num_serial_calls
    return {"block_efficiency": round(tokens / calls, 3), "speedup_vs_greedy": round(t_greedy / t_bpd, 3)}


def stage_heads(args):
    """Train `--heads-max-h` draft heads on the frozen base by hard self-distillation, then keep the first h."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    from hf_bpd import BPDForCausalLM
    from hf_bpd.data import BlockCollator
    from hf_bpd.trainer import BPDTrainer, BPDTrainingArguments

    set_seed(args.seed)
    base_dir = args.out / "base"
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    # The base is referenced relative to the heads folder (resolved by BPDForCausalLM.from_pretrained).
    model = BPDForCausalLM.from_base(
        base,
        num_draft_heads=args.heads_max_h,
        head_type="resblock",
        head_num_layers=1,
        base_model_name_or_path="../base",
    )
    train_parts = load_packed(args, tokenizer, "train")
    train = datasets.concatenate_datasets(list(train_parts.values())).shuffle(seed=args.seed + 1)
    val_parts = load_packed(args, tokenizer, "validation")
    val = datasets.concatenate_datasets([ds.select(range(min(16, len(ds)))) for ds in val_parts.values()])
    max_steps = max(
        10, int(args.heads_max_minutes * 60 * args.heads_tokens_per_s / (args.heads_batch_size * args.seq_len))
    )
    targs = BPDTrainingArguments(
        output_dir=str(args.work_dir / "trainer_heads"),
        max_steps=max_steps,
        per_device_train_batch_size=args.heads_batch_size,
        per_device_eval_batch_size=args.heads_batch_size,
        learning_rate=args.heads_lr,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, max_steps // 20),
        weight_decay=0.0,
        logging_steps=args.logging_steps,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=args.seed,
        distillation="hard",
        head_loss_weighting="uniform",
    )
    budget = TimeBudgetCallback(args.heads_max_minutes)
    trainer = BPDTrainer(
        model=model,
        args=targs,
        train_dataset=train,
        eval_dataset=val,
        data_collator=BlockCollator(tokenizer.pad_token_id),
        callbacks=[budget],
    )
    t0 = time.time()
    trainer.train()
    wall = time.time() - t0
    metrics = trainer.evaluate()
    logger.info("heads: %d steps in %.0fs; validation %s", trainer.state.global_step, wall, metrics)

    # Pick h by measurement: block efficiency and wall-clock ratio of the first h heads on validation prompts.
    prompts = [json.loads(line) for line in (args.out / "prompts" / "validation.jsonl").read_text().splitlines()]
    per_domain = {}
    for p in prompts:
        per_domain.setdefault(p["domain"], [])
        if len(per_domain[p["domain"]]) < args.heads_select_prompts:
            per_domain[p["domain"]].append(p)
    chosen = [p for ps in per_domain.values() for p in ps]
    model.eval()
    selection = {}
    for h in sorted({2, 4, 6, args.heads_max_h}):
        if h <= args.heads_max_h:
            selection[h] = measure_heads(bpd_with_first_heads(model, h), tokenizer, chosen, 48)
            logger.info("h=%d: %s", h, selection[h])
    best = max(selection, key=lambda h: selection[h]["speedup_vs_greedy"])
    final = bpd_with_first_heads(model, best)
    info = trainer.training_info() | {
        "training_data": training_data_names(),
        "mode": "frozen base, heads only",
        "distillation": "hard (base model's greedy tokens)",
        "head_loss_weighting": "uniform",
        "global_step": trainer.state.global_step,
        "trained_heads": args.heads_max_h,
        "wall_time_s": round(wall, 1),
        "validation_metrics": metrics,
        "h_selection": {str(k): v for k, v in selection.items()},
        "h_selection_rule": f"largest measured greedy/BPD wall-clock ratio on {len(chosen)} validation prompts, "
        "48 new tokens, batch 1",
        "chosen_h": best,
        "threads": args.threads,
    }
    final.save_pretrained(args.out / "heads", training_info=info)
    tokenizer.save_pretrained(args.out / "heads")
    logger.info("Saved heads (h=%d) to %s", best, args.out / "heads")


def stage_ngram(args):
    """A pruned, quantised KenLM 4-gram over the reference tokenizer's ids, from the training split only."""
    from hf_bpd.logits.ngram_build import build_ngram

    ensure_split(args)
    out = args.out / "ngram" / "ngram4.binary"
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    build_ngram(
        [data_file(args, d, "train") for d in DOMAINS],
        str(args.out / "tokenizer"),
        out,
        order=4,
        prune=[0, 1, 1, 1],
        quantize_bits=8,
    )
    info = {
        "order": 4,
        "prune": [0, 1, 1, 1],
        "quantize_bits": 8,
        "binary_type": "trie",
        "training_data": training_data_names(),
        "size_bytes": out.stat().st_size,
        "build_time_s": round(time.time() - t0, 1),
    }
    (out.parent / "ngram_info.json").write_text(json.dumps(info, indent=2))
    logger.info("Saved %s (%.1f MB)", out, out.stat().st_size / 1e6)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("RAYON_NUM_THREADS", str(args.threads))
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    args.out, args.work_dir = args.out.resolve(), args.work_dir.resolve()
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    known = {
        "split": stage_split,
        "tokenizer": stage_tokenizer,
        "base": lambda a: stage_lm(a, "base"),
        "small": lambda a: stage_lm(a, "small"),
        "heads": stage_heads,
        "ngram": stage_ngram,
    }
    unknown = [s for s in stages if s not in known]
    if unknown:
        raise SystemExit(f"Unknown stage(s) {unknown}; known: {sorted(known)}")
    for stage in stages:
        t0 = time.time()
        logger.info("=== stage %s ===", stage)
        known[stage](args)
        logger.info("=== stage %s done in %.1fs ===", stage, time.time() - t0)


if __name__ == "__main__":
    main()
