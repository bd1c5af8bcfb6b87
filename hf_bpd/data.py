"""Data utilities: the one reader of local text corpora (training data and n-gram corpora), the one reader of prompt
files (benchmark, analysis, tuning), packing into fixed-length blocks, and the training collator."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import datasets
from datasets import Dataset, IterableDataset

logger = logging.getLogger(__name__)

PathLike = str | Path
AnyDataset = Dataset | IterableDataset


def _column_names(dataset: AnyDataset) -> list[str]:
    names = dataset.column_names
    if names is None:  # streaming dataset with unresolved features: peek at one example
        first = next(iter(dataset), None)
        names = list(first.keys()) if first is not None else []
    return list(names)


def load_text_files(
    paths: PathLike | Sequence[PathLike],
    text_column: str = "text",
    one_example_per_file: bool = True,
    streaming: bool = False,
    cache_dir: PathLike | None = None,
) -> AnyDataset:
    """Load local `.txt` and `.jsonl`/`.json` files into a single dataset with one text column.

    Args:
        paths: A file path or a sequence of file paths. `.txt` files go through the `text` builder,
            `.jsonl`/`.json` files through the `json` builder of `datasets.load_dataset`.
        text_column: Name of the column holding the text in JSON files. `.txt` files are exposed
            under the same column name.
        one_example_per_file: For `.txt` files, make one example of each whole file (`True`) or one
            example of each line (`False`).
        streaming: Return an `IterableDataset` instead of a `Dataset`.
        cache_dir: Optional `datasets` cache directory.

    Returns:
        A `Dataset` (or `IterableDataset` when `streaming=True`) with the single column `text_column`.

    Raises:
        ValueError: If no paths are given, a file type is unsupported, the text column is missing, or
            (non-streaming only) every text is empty.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    paths = [str(p) for p in paths]
    if not paths:
        raise ValueError("load_text_files needs at least one path.")
    txt = [p for p in paths if p.endswith(".txt")]
    jsn = [p for p in paths if p.endswith((".jsonl", ".json"))]
    other = sorted(set(paths) - set(txt) - set(jsn))
    if other:
        raise ValueError(f"Unsupported file type(s) (expected .txt, .jsonl or .json): {other}")
    cache = str(cache_dir) if cache_dir is not None else None

    parts: list[AnyDataset] = []
    if txt:
        sample_by = "document" if one_example_per_file else "line"
        ds = datasets.load_dataset(
            "text", data_files=txt, sample_by=sample_by, split="train", streaming=streaming, cache_dir=cache
        )
        if text_column != "text":
            ds = ds.rename_column("text", text_column)
        parts.append(ds)
    if jsn:
        ds = datasets.load_dataset("json", data_files=jsn, split="train", streaming=streaming, cache_dir=cache)
        found = _column_names(ds)
        if text_column not in found:
            raise ValueError(f"Text column {text_column!r} not found in {jsn}; columns found: {found}.")
        parts.append(ds.select_columns([text_column]))
    dataset = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)

    if not streaming:
        if len(dataset) == 0 or not any(t and t.strip() for t in dataset[text_column]):
            raise ValueError(f"All {len(dataset)} texts in column {text_column!r} of {paths} are empty.")
        logger.info("Loaded %d examples from %d file(s).", len(dataset), len(paths))
    return dataset


def pack_dataset(
    dataset: AnyDataset,
    tokenizer: Any,
    seq_len: int,
    text_column: str = "text",
    add_eos: bool = True,
    min_tokens: int = 0,
    batch_size: int = 1000,
) -> AnyDataset:
    """Tokenise documents, append EOS to each, concatenate them and cut fixed-length blocks.

    The remainder of each map batch that does not fill a whole block is dropped. Empty documents
    are always skipped.

    Args:
        dataset: A `Dataset` or `IterableDataset` with a text column.
        tokenizer: A `transformers` tokenizer (its `eos_token_id` is used when `add_eos=True`).
        seq_len: Length of each output block.
        text_column: Name of the text column.
        add_eos: Append `tokenizer.eos_token_id` after each document.
        min_tokens: Skip documents with fewer tokens than this (before EOS); the number skipped is
            logged as a warning.
        batch_size: Number of documents tokenised together by `dataset.map`.

    Returns:
        A dataset of the same kind with the single column `input_ids` (lists of `seq_len` ids).
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}.")
    columns = _column_names(dataset)
    if text_column not in columns:
        raise ValueError(f"Text column {text_column!r} not found; columns found: {columns}.")
    eos = tokenizer.eos_token_id
    if add_eos and eos is None:
        raise ValueError("add_eos=True but the tokenizer has no eos_token_id.")
    streaming = isinstance(dataset, IterableDataset)
    stats = {"skipped": 0}

    def _pack(batch: dict[str, list[Any]]) -> dict[str, list[list[int]]]:
        texts = [t for t in batch[text_column] if t and t.strip()]
        skipped = len(batch[text_column]) - len(texts)
        stream: list[int] = []
        if texts:
            for ids in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]:
                if len(ids) < min_tokens:
                    skipped += 1
                    continue
                stream.extend(ids)
                if add_eos:
                    stream.append(eos)
        stats["skipped"] += skipped
        if streaming and skipped:
            logger.warning(
                "Skipped %d empty or short (< %d tokens) document(s) in a batch.", skipped, max(min_tokens, 1)
            )
        n = len(stream) // seq_len
        return {"input_ids": [stream[i * seq_len : (i + 1) * seq_len] for i in range(n)]}

    kwargs: dict[str, Any] = {"batched": True, "batch_size": batch_size, "remove_columns": columns}
    if not streaming:
        kwargs.update(load_from_cache_file=False, desc=f"Packing into {seq_len}-token blocks")
    packed = dataset.map(_pack, **kwargs)
    if not streaming:
        if stats["skipped"]:
            logger.warning(
                "Skipped %d empty or short (< %d tokens) document(s).", stats["skipped"], max(min_tokens, 1)
            )
        if len(packed) == 0:
            raise ValueError(
                f"No {seq_len}-token block could be packed from {len(dataset)} document(s) of column "
                f"{text_column!r} ({stats['skipped']} empty or shorter than {max(min_tokens, 1)} tokens): the "
                "texts are empty, or too short all together; lower `seq_len` or add data."
            )
        logger.info("Packed %d blocks of %d tokens.", len(packed), seq_len)
    return packed


def load_packed_dataset(
    paths: PathLike | Sequence[PathLike],
    tokenizer: Any,
    seq_len: int,
    text_column: str = "text",
    min_tokens: int = 0,
    one_example_per_file: bool = True,
    streaming: bool = False,
    cache_dir: PathLike | None = None,
) -> AnyDataset:
    """Local `.txt` / `.jsonl` files -> packed `seq_len`-token blocks: [`load_text_files`] then [`pack_dataset`].

    Args:
        paths: File path(s), as in [`load_text_files`].
        tokenizer: A `transformers` tokenizer with an `eos_token_id` (appended after each document).
        seq_len: Length of each block.
        text_column: Text column of JSON files.
        min_tokens: Skip (and count, in a warning) documents with fewer tokens; for draft heads use
            `num_draft_heads + 2`, the shortest sequence that gives every head a target.
        one_example_per_file: One document per `.txt` file (`True`) or per line (`False`).
        streaming: Stream the files (an `IterableDataset`, nothing held in memory) for large corpora.
        cache_dir: Optional `datasets` cache directory.

    Returns:
        A `Dataset` (or `IterableDataset`) with the single column `input_ids`.
    """
    texts = load_text_files(paths, text_column, one_example_per_file, streaming, cache_dir)
    return pack_dataset(texts, tokenizer, seq_len, text_column=text_column, min_tokens=min_tokens)


def drop_short_sequences(dataset: AnyDataset, min_length: int, column: str = "input_ids") -> AnyDataset:
    """Remove tokenised sequences shorter than `min_length`, with a warning that counts them.

    Args:
        dataset: A `Dataset` or `IterableDataset` with a column of token-id lists.
        min_length: Shortest length kept (`num_draft_heads + 2` for draft heads: shorter ones train no head).
        column: The token-id column.

    Returns:
        The filtered dataset (filtered lazily when streaming; a warning then says when the first one is skipped).

    Raises:
        ValueError: If the column is missing, or (non-streaming) no sequence is long enough.
    """
    columns = _column_names(dataset)
    if column not in columns:
        raise ValueError(f"Column {column!r} not found; columns found: {columns}.")
    if isinstance(dataset, IterableDataset):
        seen = {"warned": False}

        def _keep(example: dict[str, Any]) -> bool:
            keep = len(example[column]) >= min_length
            if not keep and not seen["warned"]:
                seen["warned"] = True
                logger.warning("Skipping streamed sequences shorter than %d tokens.", min_length)
            return keep

        return dataset.filter(_keep)
    total = len(dataset)
    if total and _min_list_length(dataset, column) >= min_length:  # the common case (packed blocks): no pass
        return dataset
    kept = dataset.filter(
        lambda batch: [len(x) >= min_length for x in batch[column]], batched=True, load_from_cache_file=False
    )
    skipped = total - len(kept)
    if skipped:
        logger.warning("Skipped %d of %d sequences shorter than %d tokens.", skipped, total, min_length)
    if len(kept) == 0:
        raise ValueError(f"All {total} sequences are shorter than {min_length} tokens.")
    return kept


def _min_list_length(dataset: Dataset, column: str) -> int:
    """Length of the shortest list in `column`, computed in Arrow (no Python pass over the rows)."""
    import pyarrow.compute as pc

    lengths = pc.list_value_length(dataset.with_format("arrow")[column])
    return int(pc.min(lengths).as_py() or 0)


class BlockCollator:
    """Batches token-id lists: right-pads to the longest, and returns `input_ids`, `attention_mask` and `labels`.

    `labels` are the input ids with `-100` on padding only: unlike `DataCollatorForLanguageModeling`, an EOS token
    that doubles as the pad token stays a target inside packed blocks.

    Args:
        pad_token_id: Id written on padded positions (never a target).
    """

    def __init__(self, pad_token_id: int = 0):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        rows = [list(f["input_ids"]) for f in features]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, row in enumerate(rows):
            ids[b, : len(row)] = torch.as_tensor(row, dtype=torch.long)
            mask[b, : len(row)] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def iter_documents(
    paths: PathLike | Sequence[PathLike], text_field: str = "text", line_per_document: bool = False
) -> Iterator[str]:
    """Yield the non-empty documents of local corpora, lazily: the same files and rules as [`load_text_files`].

    Args:
        paths: `.txt` files (one document per file, or per line with `line_per_document`), `.jsonl` / `.json`
            files (text under `text_field`).
        text_field: The JSON field holding the text.
        line_per_document: One document per line of `.txt` files.

    Raises:
        FileNotFoundError: For a missing file (named).
        ValueError: See [`load_text_files`].
    """
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"corpus file not found: {path}")
    dataset = load_text_files(
        paths, text_column=text_field, one_example_per_file=not line_per_document, streaming=True
    )
    for example in dataset:
        text = example[text_field]
        if text and text.strip():
            yield text


def load_prompts(
    path: PathLike, tokenizer: Any = None, max_prompts_per_domain: int | None = None
) -> list[dict[str, Any]]:
    """Read a prompts file: the one prompt loader of `hf-bpd bench`, `analyze` and `tune`.

    A `.jsonl` file holds one JSON object a line with either `"prompt"` (raw text) or `"messages"` (a chat: a list
    of `{"role", "content"}`, rendered with the tokenizer's chat template and the generation prompt), and optionally
    `"domain"`. Any other file holds one raw-text prompt a line.

    Args:
        path: The prompts file.
        tokenizer: Renders `"messages"` (needed only when a line has them).
        max_prompts_per_domain: Keep at most this many prompts of each domain (the first ones).

    Returns:
        `[{"prompt": text, "domain": str, "chat": bool}]`; `chat` prompts already hold the template's special tokens
        (tokenize them with `add_special_tokens=False`, as [`tokenize_prompts`] does).

    Raises:
        FileNotFoundError, ValueError: naming the file and line of what is wrong.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    prompts: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            row = _prompt_row(line, f"{path}:{number}", tokenizer)
        else:
            row = {"prompt": line, "domain": "all", "chat": False}
        seen[row["domain"]] = seen.get(row["domain"], 0) + 1
        if max_prompts_per_domain is None or seen[row["domain"]] <= max_prompts_per_domain:
            prompts.append(row)
    if not prompts:
        raise ValueError(f"{path} holds no prompts.")
    return prompts


def _prompt_row(line: str, where: str, tokenizer: Any) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not a JSON object ({err}).") from err
    if not isinstance(record, dict):
        raise ValueError(f'{where}: expected a JSON object with "prompt" or "messages", got {type(record).__name__}.')
    domain = str(record.get("domain", "all"))
    if isinstance(record.get("prompt"), str) and record["prompt"]:
        return {"prompt": record["prompt"], "domain": domain, "chat": False}
    messages = record.get("messages")
    if isinstance(messages, list) and messages:
        if tokenizer is None:
            raise ValueError(f'{where}: "messages" prompts are rendered with the chat template: pass a tokenizer.')
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f'{where}: "messages" needs a chat template, but the tokenizer {type(tokenizer).__name__} '
                f'({getattr(tokenizer, "name_or_path", "")!s}) has none: use "prompt" lines with raw text, or a '
                "tokenizer with a chat template."
            )
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return {"prompt": text, "domain": domain, "chat": True}
    raise ValueError(
        f'{where}: every line needs a non-empty "prompt" (raw text) or "messages" (a chat list) field; found '
        f"{sorted(record)}."
    )


def tokenize_prompts(
    prompts: Sequence[dict[str, Any]], tokenizer: Any, batch_size: int = 1, max_prompt_tokens: int | None = None
) -> list[dict[str, Any]]:
    """Left-padded `input_ids` / `attention_mask` batches of [`load_prompts`] rows (chat prompts without extra
    special tokens), each prompt cut to its last `max_prompt_tokens` tokens."""
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batches = []
    for start in range(0, len(prompts), batch_size):
        rows = []
        for row in prompts[start : start + batch_size]:
            ids = tokenizer(row["prompt"], add_special_tokens=not row.get("chat", False))["input_ids"]
            rows.append(ids[-max_prompt_tokens:] if max_prompt_tokens else ids)
        width = max(len(ids) for ids in rows)
        input_ids = torch.full((len(rows), width), pad if pad is not None else 0, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, ids in enumerate(rows):
            if ids:
                input_ids[b, width - len(ids) :] = torch.tensor(ids)
                mask[b, width - len(ids) :] = 1
        batches.append({"input_ids": input_ids, "attention_mask": mask})
    return batches
