"""
KenLM n-grams over token ids: loading and checks, the context of a row, and Kim et al.'s global n-gram rescoring
search over the top-k lattice (`ngram_pbest`; the drafter is `hf_bpd.drafters.NgramRescorer`).

The paper composes the lattice with the n-gram as weighted automata. Here a dynamic program over lattice positions
keyed by the KenLM state does the same exactly: the n-gram's score of everything that follows depends on a path
only through its state (KenLM minimises states to the context that can still matter), so keeping the `p` best
hypotheses per distinct state at each position loses none of the `p` best complete paths.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .lattice import LN10

logger = logging.getLogger(__name__)

_INSTALL_HINT = "pip install kenlm  (or: pip install hf_bpd[ngram])"
_SPECIAL_WORDS = ("<s>", "</s>", "<unk>")


def is_kenlm_available() -> bool:
    """Whether the `kenlm` Python module (the query side of KenLM) can be imported."""
    return importlib.util.find_spec("kenlm") is not None


def require_kenlm() -> Any:
    """Import and return the `kenlm` module, or raise an `ImportError` that says what to install."""
    if not is_kenlm_available():
        raise ImportError(f"n-gram rescoring needs the `kenlm` Python module, which is not installed: {_INSTALL_HINT}")
    import kenlm

    return kenlm


def load_kenlm(model_or_path: Any) -> tuple[Any, Path | None]:
    """
    Load a KenLM model (ARPA text or KenLM binary), with errors that name the file.

    Args:
        model_or_path (`str`, `os.PathLike` or `kenlm.Model`): a path, or an already loaded model.
    Returns:
        `(model, path)`; `path` is None when a loaded model was passed.
    """
    if not isinstance(model_or_path, (str, Path)):
        if not hasattr(model_or_path, "BaseScore"):
            raise ValueError(
                f"Expected a path to a KenLM model or a `kenlm.Model`, got {type(model_or_path).__name__}."
            )
        return model_or_path, None
    kenlm = require_kenlm()
    path = Path(model_or_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"n-gram model not found: {path}. Build one with `hf-bpd build-ngram` (see docs/refinement.md)."
        )
    logger.info("Loading the KenLM model %s", path)
    try:
        model = kenlm.Model(str(path))
    except Exception as err:  # kenlm raises OSError, and UnicodeDecodeError on binary garbage
        raise ValueError(
            f"Could not load the n-gram model {path}: it is not a valid ARPA file or KenLM binary "
            f"({type(err).__name__}: {str(err)[:200]})."
        ) from err
    return model, path


def _arpa_unigrams(path: Path) -> list[str] | None:
    """The words of the `\\1-grams:` section of an ARPA file; None if `path` is not ARPA text."""
    with open(path, "rb") as handle:
        head = handle.read(64).lstrip()
    if not head.startswith(b"\\data\\"):
        return None
    words: list[str] = []
    with open(path, encoding="utf-8", errors="replace") as handle:
        in_unigrams = False
        for line in handle:
            line = line.strip()
            if line == "\\1-grams:":
                in_unigrams = True
            elif in_unigrams and line.startswith("\\"):
                break
            elif in_unigrams and line:
                fields = line.split("\t") if "\t" in line else line.split()
                if len(fields) >= 2:
                    words.append(fields[1].strip())
    return words


def check_ngram_vocab(model: Any, path: Path | None, vocab_size: int | None) -> None:
    """
    Check that the n-gram's words are token ids (`"17"`) and, with `vocab_size`, that they are all `< vocab_size`.

    ARPA files are checked word by word. For KenLM binaries (whose vocabulary cannot be listed from Python) the
    ids `0 .. 2 * vocab_size - 1` are probed: none of `0 .. vocab_size - 1` known means the words are not token ids
    of this vocabulary; any known id `>= vocab_size` means another tokenizer.

    Raises:
        ValueError: with what is wrong and how to rebuild the n-gram.
    """
    rebuild = "build it over the model's token ids with `hf-bpd build-ngram --tokenizer <the model's tokenizer>`"
    name = str(path) if path is not None else "the n-gram model"
    words = _arpa_unigrams(path) if path is not None else None
    if words is not None:
        ids = []
        for word in words:
            if word in _SPECIAL_WORDS:
                continue
            if not word.isdigit():
                raise ValueError(f"The words of {name} are not token ids (found {word!r}): {rebuild}.")
            ids.append(int(word))
        if vocab_size is not None and ids and max(ids) >= vocab_size:
            raise ValueError(
                f"{name} has token id {max(ids)} but the model's vocabulary has {vocab_size} tokens: the n-gram was "
                f"built with another tokenizer; {rebuild}."
            )
        return
    if vocab_size is None:
        return
    if not any(str(i) in model for i in range(vocab_size)):
        raise ValueError(
            f"None of the token ids 0..{vocab_size - 1} is a word of {name}: its words are not token ids; {rebuild}."
        )
    outside = next((i for i in range(vocab_size, 2 * vocab_size) if str(i) in model), None)
    if outside is not None:
        raise ValueError(
            f"{name} has token id {outside} but the model's vocabulary has {vocab_size} tokens: the n-gram was built "
            f"with another tokenizer; {rebuild}."
        )


def ngram_pbest(
    model: Any,
    start_state: Any,
    words: list[list[str]],
    head_scores: np.ndarray,
    alpha: float,
    num_paths: int,
    beam_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """
    The `num_paths` best paths of one row's lattice under `(1 - alpha) * head + alpha * ln(10) * log10 P_ngram`.

    Dynamic program over positions: hypotheses are grouped by their KenLM state and each group keeps its
    `num_paths` best (exact); the n-gram is queried once per (distinct state, lattice token), and the hypotheses are
    extended with numpy. The last position needs no states, only scores.

    Args:
        model (`kenlm.Model`): the n-gram.
        start_state (`kenlm.State`): state after the row's committed context.
        words (`list[list[str]]`): `h` lists of `k` words (token ids as strings), the lattice tokens.
        head_scores (`np.ndarray` of shape `(h, k)`): head log-probabilities (natural log).
        alpha (`float`): n-gram weight in `[0, 1]`.
        num_paths (`int`): `p`, at most `k ** h`.
        beam_size (`int`, *optional*): keep at most this many hypotheses per position (approximate search);
            None (default) is exact.
    Returns:
        `(paths, scores)`: lattice indices `(p, h)` and interpolated scores `(p,)` (natural log), best first.
    """
    import kenlm  # only reached with a loaded model

    h, k = head_scores.shape
    w_head, w_ngram = 1.0 - alpha, alpha * LN10
    base_score = model.BaseScore
    states = [start_state]
    hyp_state = np.zeros(1, dtype=np.int64)
    hyp_score = np.zeros(1)
    hyp_paths = np.zeros((1, 0), dtype=np.int64)
    scratch = kenlm.State()
    for i in range(h):
        last = i == h - 1
        trans = np.empty((len(states), k))
        nxt = np.empty((len(states), k), dtype=np.int64)
        index: dict[Any, int] = {}
        new_states: list[Any] = []
        row_words = words[i]
        for s, state in enumerate(states):
            if last:
                trans[s] = [base_score(state, word, scratch) for word in row_words]
                continue
            row_trans, row_next = trans[s], nxt[s]
            for j, word in enumerate(row_words):
                out = kenlm.State()
                row_trans[j] = base_score(state, word, out)
                sid = index.setdefault(out, len(new_states))
                if sid == len(new_states):
                    new_states.append(out)
                row_next[j] = sid
        cand = (hyp_score[:, None] + w_head * head_scores[i][None, :] + w_ngram * trans[hyp_state]).ravel()  # (N*k,)
        if last:
            best = np.argsort(-cand, kind="stable")[:num_paths]
            paths = np.concatenate([hyp_paths[best // k], (best % k)[:, None]], axis=1)
            return paths, cand[best]
        cand_state = nxt[hyp_state].ravel()
        order = np.lexsort((-cand, cand_state))  # by state, then score descending
        grouped = cand_state[order]
        starts = np.ones(len(order), dtype=bool)
        starts[1:] = grouped[1:] != grouped[:-1]
        first = np.maximum.accumulate(np.where(starts, np.arange(len(order)), 0))
        kept = order[np.arange(len(order)) - first < num_paths]  # the p best of each state
        if beam_size is not None and len(kept) > beam_size:
            kept = kept[np.argsort(-cand[kept], kind="stable")[:beam_size]]
        hyp_paths = np.concatenate([hyp_paths[kept // k], (kept % k)[:, None]], axis=1)
        hyp_score, hyp_state = cand[kept], cand_state[kept]
        states = new_states
    raise ValueError("The lattice has no positions (h = 0).")


def kenlm_context_state(model: Any, order: int, tokens: list[int]) -> Any:
    """The KenLM state after `tokens` (only the last `order - 1` matter), starting from the null context."""
    import kenlm

    state, out = kenlm.State(), kenlm.State()
    model.NullContextWrite(state)
    for token in tokens[-(order - 1) :] if order > 1 else []:
        model.BaseScore(state, str(token), out)
        state, out = out, state
    return state


def committed_contexts(
    tokens: torch.LongTensor, lengths: torch.LongTensor, prompt_start: torch.LongTensor, width: int
) -> list[list[int]]:
    """
    The n-gram context of each row: its last `width` (`n - 1`) real committed tokens.

    Args:
        tokens (`torch.LongTensor` of shape `(batch, buffer_len)`): committed tokens.
        lengths, prompt_start (`torch.LongTensor` of shape `(batch,)`): row `b` is `tokens[b, prompt_start[b] :
            lengths[b]]` (the prompt start comes from the attention mask, never from pad-token values).
    """
    ends = lengths.tolist()
    if width <= 0:
        return [[] for _ in ends]
    starts = prompt_start.tolist()
    return [tokens[b, max(starts[b], ends[b] - width) : ends[b]].tolist() for b in range(len(ends))]


def __getattr__(name: str) -> Any:
    if name == "NgramRescorer":  # moved to hf_bpd.drafters.ngram
        from ..drafters.ngram import NgramRescorer

        return NgramRescorer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
