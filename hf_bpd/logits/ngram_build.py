"""
Build a KenLM n-gram over the token ids of a tokenizer, for [`~hf_bpd.logits.NgramRescorer`].

    hf-bpd build-ngram corpus/*.txt corpus/kjv.jsonl --tokenizer reference/tokenizer --order 4 --output ngram4.bin
    python -m hf_bpd.logits.ngram_build corpus.txt --tokenizer gpt2 --order 4 --prune 0 1 1 --output ngram4.bin

Each document becomes one line of space-separated token ids; KenLM's `lmplz` estimates the model (modified
Kneser-Ney) and `build_binary` compacts it (a quantised trie by default). `lmplz` and `build_binary` are not in the
`kenlm` pip wheel: build them with `scripts/build_kenlm.sh` and point at them with `--kenlm-bin`, `KENLM_BIN` or
PATH.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ..data import iter_documents

logger = logging.getLogger(__name__)

_BINARIES = ("lmplz", "build_binary")
_DEFAULT_BIN = Path("third_party") / "kenlm" / "bin"  # where scripts/build_kenlm.sh installs them (source checkout)


def find_kenlm_binary(name: str, kenlm_bin: str | os.PathLike | None = None) -> Path:
    """
    Locate a KenLM program (`lmplz` or `build_binary`).

    Looked up in order: the `kenlm_bin` folder, the `KENLM_BIN` environment variable, PATH, then
    `third_party/kenlm/bin` under the current directory (where `scripts/build_kenlm.sh` installs them).

    Raises:
        FileNotFoundError: with how to build the programs.
    """
    folders = [Path(p) for p in (kenlm_bin, os.environ.get("KENLM_BIN")) if p]
    for folder in folders:
        if (folder / name).is_file():
            return folder / name
    found = shutil.which(name)
    if found:
        return Path(found)
    if (_DEFAULT_BIN / name).is_file():
        return _DEFAULT_BIN / name
    where = ", ".join(str(f) for f in folders) or "no --kenlm-bin / KENLM_BIN given"
    raise FileNotFoundError(
        f"KenLM's `{name}` was not found ({where}; not on PATH; not in {_DEFAULT_BIN}). It is not part of the `kenlm` "
        "pip wheel: build it with `bash scripts/build_kenlm.sh` (add --install-deps for the apt packages) and pass "
        "--kenlm-bin third_party/kenlm/bin or set KENLM_BIN."
    )


def write_token_corpus(
    documents: Iterator[str],
    tokenizer: Any,
    output: str | os.PathLike,
    batch_size: int = 256,
    max_documents: int | None = None,
) -> tuple[int, int]:
    """
    Tokenize documents and write one line of space-separated token ids per document.

    Returns:
        `(documents, tokens)` written.
    """
    num_docs = num_tokens = 0
    batch: list[str] = []

    def flush(handle: Any) -> None:
        nonlocal num_docs, num_tokens
        for ids in tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]:
            if ids:
                handle.write(" ".join(map(str, ids)) + "\n")
                num_docs += 1
                num_tokens += len(ids)
        batch.clear()

    with open(output, "w", encoding="utf-8") as handle:
        for number, document in enumerate(documents):
            if max_documents is not None and number >= max_documents:
                break
            batch.append(document)
            if len(batch) >= batch_size:
                flush(handle)
        if batch:
            flush(handle)
    return num_docs, num_tokens


def _run(command: list[str], stdin: Any = None, stdout: Any = None) -> None:
    logger.info("Running %s", " ".join(command))
    result = subprocess.run(command, stdin=stdin, stdout=stdout, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"`{' '.join(command)}` failed (exit {result.returncode}):\n{result.stderr[-2000:]}")


def build_ngram(
    corpus_files: Sequence[str | os.PathLike],
    tokenizer: Any,
    output: str | os.PathLike,
    order: int = 4,
    prune: Sequence[int] | None = None,
    discount_fallback: bool = True,
    binary: bool | None = None,
    binary_type: str = "trie",
    quantize_bits: int | None = 8,
    kenlm_bin: str | os.PathLike | None = None,
    text_field: str = "text",
    line_per_document: bool = False,
    max_documents: int | None = None,
    memory: str = "20%",
    keep_arpa: bool = False,
) -> Path:
    """
    Build a KenLM n-gram whose words are the token ids of `tokenizer`.

    Args:
        corpus_files: text, `.jsonl` or `.json` corpora (see [`~hf_bpd.data.iter_documents`]).
        tokenizer (`str` or tokenizer): a tokenizer, or a name/path for `AutoTokenizer.from_pretrained`; must be
            the base model's.
        output (`str` or `os.PathLike`): the model to write; a `.arpa` suffix writes ARPA text, anything else a
            KenLM binary (unless `binary` says otherwise).
        order (`int`, defaults to 4): `n`.
        prune (`Sequence[int]`, *optional*): `lmplz --prune` count thresholds per order (e.g. `0 1 1`: drop
            singleton bigrams and trigrams and above).
        discount_fallback (`bool`, defaults to `True`): pass `--discount_fallback` (needed on small corpora).
        binary (`bool`, *optional*): force a binary (`True`) or ARPA (`False`) output.
        binary_type (`str`, defaults to `"trie"`): `build_binary` data structure, `"trie"` or `"probing"`.
        quantize_bits (`int`, *optional*, defaults to 8): trie quantisation bits for probabilities and backoffs
            (`-q N -b N`); None stores full floats.
        kenlm_bin: folder holding `lmplz` and `build_binary` (see [`find_kenlm_binary`]).
        text_field, line_per_document: see [`~hf_bpd.data.iter_documents`].
        max_documents (`int`, *optional*): use at most this many documents.
        memory (`str`, defaults to `"20%"`): `lmplz -S` memory budget.
        keep_arpa (`bool`, defaults to `False`): keep the intermediate ARPA next to a binary output.
    Returns:
        The path of the written model.
    """
    if order < 1:
        raise ValueError(f"order must be >= 1, got {order}.")
    if binary_type not in ("trie", "probing"):
        raise ValueError(f"binary_type must be 'trie' or 'probing', got {binary_type!r}.")
    output = Path(output)
    binary = output.suffix != ".arpa" if binary is None else binary
    lmplz = find_kenlm_binary("lmplz", kenlm_bin)
    build_binary = find_kenlm_binary("build_binary", kenlm_bin) if binary else None
    if isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="hf_bpd_ngram_") as tmp:
        ids_file = Path(tmp) / "ids.txt"
        docs, tokens = write_token_corpus(
            iter_documents(corpus_files, text_field, line_per_document),
            tokenizer,
            ids_file,
            max_documents=max_documents,
        )
        if tokens == 0:
            raise ValueError(f"The corpora {list(map(str, corpus_files))} hold no text to build an n-gram from.")
        logger.info("Tokenized %d documents, %d tokens.", docs, tokens)
        arpa = output if not binary else (output.with_suffix(".arpa") if keep_arpa else Path(tmp) / "model.arpa")
        command = [str(lmplz), "-o", str(order), "-S", memory, "-T", tmp]
        if discount_fallback:
            command.append("--discount_fallback")
        if prune:
            command += ["--prune", *map(str, prune)]
        with open(ids_file, encoding="utf-8") as stdin, open(arpa, "w", encoding="utf-8") as stdout:
            _run(command, stdin=stdin, stdout=stdout)
        if binary:
            command = [str(build_binary)]
            if binary_type == "trie" and quantize_bits:
                command += ["-q", str(quantize_bits), "-b", str(quantize_bits)]
            command += [binary_type, str(arpa), str(output)]
            _run(command)
    logger.info("Wrote %s", output)
    return output


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `build-ngram` arguments (shared with the `hf-bpd` CLI)."""
    parser.add_argument("corpus", nargs="+", help="Text, .jsonl or .json corpus files.")
    parser.add_argument("--tokenizer", required=True, help="Tokenizer name or path (the base model's).")
    parser.add_argument("--output", required=True, help="Model to write (.arpa for ARPA text, else KenLM binary).")
    parser.add_argument("--order", type=int, default=4, help="n-gram order (default 4).")
    parser.add_argument("--prune", type=int, nargs="+", default=None, help="lmplz --prune thresholds, e.g. 0 1 1.")
    parser.add_argument("--no-discount-fallback", action="store_true", help="Do not pass --discount_fallback.")
    parser.add_argument("--binary-type", choices=("trie", "probing"), default="trie", help="build_binary structure.")
    parser.add_argument("--quantize-bits", type=int, default=8, help="Trie quantisation bits (0 = none; default 8).")
    parser.add_argument("--kenlm-bin", default=None, help="Folder with lmplz/build_binary (else KENLM_BIN, PATH).")
    parser.add_argument("--text-field", default="text", help="JSON field holding the text (default 'text').")
    parser.add_argument("--line-per-document", action="store_true", help="One document per line of text files.")
    parser.add_argument("--max-documents", type=int, default=None, help="Use at most this many documents.")
    parser.add_argument("--memory", default="20%", help="lmplz -S memory budget (default 20%%).")
    parser.add_argument("--keep-arpa", action="store_true", help="Keep the ARPA file next to a binary output.")
    return parser


def run_from_args(args: argparse.Namespace) -> Path:
    return build_ngram(
        args.corpus,
        args.tokenizer,
        args.output,
        order=args.order,
        prune=args.prune,
        discount_fallback=not args.no_discount_fallback,
        binary_type=args.binary_type,
        quantize_bits=args.quantize_bits or None,
        kenlm_bin=args.kenlm_bin,
        text_field=args.text_field,
        line_per_document=args.line_per_document,
        max_documents=args.max_documents,
        memory=args.memory,
        keep_arpa=args.keep_arpa,
    )


def main(argv: Sequence[str] | None = None) -> None:
    """`hf-bpd build-ngram` / `python -m hf_bpd.logits.ngram_build`."""
    parser = argparse.ArgumentParser(description="Build a KenLM n-gram over token ids.", prog="build-ngram")
    add_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        run_from_args(parser.parse_args(argv))
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        parser.exit(1, f"build-ngram: error: {err}\n")


if __name__ == "__main__":
    main()
