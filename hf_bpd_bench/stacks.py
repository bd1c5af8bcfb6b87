"""
Which shipped stack (small LM, n-gram, prompts, tuned settings) goes with a model, decided from files before anything
is loaded.

Two models share a vocabulary when their `tokenizer.json` map the same tokens to the same ids ([`vocab_fingerprint`]).
A stack's parts (heads, small LM, n-gram) are built on one tokenizer, the one in its heads folder. `hf-bpd bench
--model M` without `--stack` takes the stack whose tokenizer is M's; an explicit `--stack`, `--small-lm` or `--ngram`
that belongs to another vocabulary is refused with what to pass instead, before any model is loaded (transformers
would otherwise load both models and stop with "different tokenizers", and a foreign n-gram would silently score
the wrong tokens).

No torch or transformers here: JSON files and, for a Hub id, the local Hugging Face cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path

from .reference import STACKS, find_reference

TOKENIZER_FILE = "tokenizer.json"


@lru_cache(maxsize=32)
def _fingerprint_file(path: str, mtime_ns: int) -> str | None:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        vocab = data["model"]["vocab"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if isinstance(vocab, list):  # Unigram: [[piece, score], ...], the id is the position
        vocab = {piece[0]: i for i, piece in enumerate(vocab)}
    tokens = {**vocab, **{t["content"]: t["id"] for t in data.get("added_tokens", [])}}
    items = sorted(tokens.items(), key=lambda kv: (kv[1], kv[0]))
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


def vocab_fingerprint(source: str | os.PathLike | None) -> str | None:
    """
    A short hash of the token -> id map of the tokenizer in `source` (a folder, a `tokenizer.json`, or a Hub id found
    in the local Hugging Face cache); None when there is no `tokenizer.json` to read.
    """
    path = _tokenizer_file(source)
    return _fingerprint_file(str(path), path.stat().st_mtime_ns) if path is not None else None


def _tokenizer_file(source: str | os.PathLike | None) -> Path | None:
    if not source:
        return None
    path = Path(source)
    if path.is_file():
        return path
    if path.is_dir():
        return path / TOKENIZER_FILE if (path / TOKENIZER_FILE).is_file() else None
    if str(source).count("/") == 1 and not str(source).startswith((".", "/")):  # a Hub id: the local cache only
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            return None
        found = try_to_load_from_cache(str(source), TOKENIZER_FILE)
        return Path(found) if isinstance(found, str) else None
    return None


def _config(folder: str | os.PathLike) -> dict:
    try:
        return json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def model_tokenizer(model: str, tokenizer: str | None = None, base: str | None = None) -> str | None:
    """
    Where the tokenizer of the BPD checkpoint `model` comes from (as `hf_bpd.modeling_bpd.tokenizer_source` decides
    after loading): `tokenizer`, else `base`, else the checkpoint folder when it holds one, else its saved base.
    """
    if tokenizer or base:
        return tokenizer or base
    if any((Path(model) / name).is_file() for name in (TOKENIZER_FILE, "tokenizer_config.json")):
        return model
    ref = _config(model).get("base_model_name_or_path")
    if ref and not Path(ref).is_absolute() and (Path(model) / ref).is_dir():
        ref = str(Path(model) / ref)
    return ref


def stack_fingerprint(name: str) -> str | None:
    """The vocabulary of a shipped stack (its heads' tokenizer, else its small LM's), or None when not present."""
    stack = STACKS[name]
    for part in (stack.heads, stack.small):
        found = find_reference(part)
        fingerprint = vocab_fingerprint(found) if found else None
        if fingerprint:
            return fingerprint
    return None


def infer_stack(fingerprint: str | None) -> str | None:
    """The first shipped stack present here whose vocabulary is `fingerprint`, else None."""
    if fingerprint is None:
        return None
    return next((name for name in STACKS if stack_fingerprint(name) == fingerprint), None)


def ngram_stack(path: str | os.PathLike) -> str | None:
    """The shipped stack whose n-gram folder holds `path`, else None."""
    resolved = Path(path).resolve()
    for name, stack in STACKS.items():
        folder = find_reference(stack.ngram)
        if folder is not None and folder.resolve() in resolved.parents:
            return name
    return None


def small_lm_mismatch(small_lm: str, fingerprint: str | None, vocab_size: int | None) -> str | None:
    """Why the small LM at `small_lm` cannot draft for a model of this vocabulary, or None when it can (or when
    nothing tells: no tokenizer and no `config.json` to compare)."""
    theirs = vocab_fingerprint(small_lm)
    if fingerprint and theirs:
        return None if theirs == fingerprint else "its tokenizer maps tokens to other ids"
    size = _config(small_lm).get("vocab_size")
    if vocab_size and size and size != vocab_size:
        return f"its vocabulary has {size} tokens, the model's {vocab_size}"
    return None


def base_vocab_size(model: str) -> int | None:
    """The base vocabulary size a BPD checkpoint records (`base_vocab_size`), else None."""
    return _config(model).get("base_vocab_size")


def model_base(model: str) -> str | None:
    """The base model a BPD checkpoint names (`base_model_name_or_path`), else None."""
    return _config(model).get("base_model_name_or_path")
