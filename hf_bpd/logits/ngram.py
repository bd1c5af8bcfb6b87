"""
Global n-gram rescoring (Kim et al., section 7): the `p` best lattice paths under a KenLM n-gram over token ids,
interpolated with the heads' scores.

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

from .base import Drafts, DraftState
from .lattice import LN10, LatticeRescorer, TopKLattice, lattice_proposal, leading_pads, pbest_paths

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


class NgramRescorer(LatticeRescorer):
    """
    Global n-gram rescoring: returns the `p` best paths of the top-k lattice under
    `(1 - alpha) * head_logprob + alpha * ngram_logprob` (both natural log), searching the whole lattice exactly
    with the n-gram's state (see [`ngram_pbest`]). The n-gram's context is the last `n - 1` committed tokens of each
    row.

    With speculative sampling (`do_sample=True`, the default `bpd_sampling`) it draws `p` independent chains token
    by token from the same interpolated score on the lattice, warped like the base model's distribution, with the
    n-gram following each chain's own sampled tokens, and returns those distributions as the proposals `q`
    ([`_sample`]); the loop verifies them by multi-draft rejection sampling.

    The n-gram is a KenLM model (ARPA or binary) whose words are the base model's token ids written in decimal
    (`"17"`): build one with `hf-bpd build-ngram` ([`~hf_bpd.tools.build_ngram.build_ngram`]).

    Args:
        model (`str`, `os.PathLike` or `kenlm.Model`): path to the KenLM model, or a loaded model.
        top_k (`int`): `k`, tokens kept per head.
        alpha (`float`, defaults to 0.5): n-gram weight in `[0, 1]`; 0 gives the p-best 0-gram paths.
        num_drafts (`int`, defaults to 1): `p`, drafts returned per row, at most `top_k ** h`.
        vocab_size (`int`, *optional*): the model's vocabulary size, checked against the n-gram's words at once;
            without it the check runs at the first call with the draft logits' vocabulary.
        pad_token_id (`int`, *optional*): left-padding id of the prompts; leading pads are not fed to the n-gram.
        beam_size (`int`, *optional*): cap on hypotheses per position (approximate, faster); None is exact.

    Example:

    ```python
    >>> from hf_bpd.logits import NgramRescorer
    >>> rescorer = NgramRescorer("ngram4.bin", top_k=16, alpha=0.3, num_drafts=16)
    >>> out = model.generate(ids, use_bpd=True, draft_rescorer=rescorer, return_dict_in_generate=True)
    >>> rescorer.ms_per_call
    ```
    """

    def __init__(
        self,
        model: Any,
        top_k: int,
        alpha: float = 0.5,
        num_drafts: int = 1,
        vocab_size: int | None = None,
        pad_token_id: int | None = None,
        beam_size: int | None = None,
    ):
        super().__init__(top_k=top_k, alpha=alpha, num_drafts=num_drafts)
        if beam_size is not None and (not isinstance(beam_size, int) or beam_size < num_drafts):
            raise ValueError(f"beam_size must be None (exact search) or an integer >= num_drafts, got {beam_size!r}.")
        self.model, self.path = load_kenlm(model)
        self.order = int(self.model.order)
        self.pad_token_id = pad_token_id
        self.beam_size = beam_size
        self._checked_vocab: int | None = None
        if vocab_size is not None:
            self._check_vocab(vocab_size)
        elif self.path is not None and _arpa_unigrams(self.path) is not None:
            check_ngram_vocab(self.model, self.path, None)  # cheap for ARPA: words must be integers

    def _check_vocab(self, vocab_size: int) -> None:
        check_ngram_vocab(self.model, self.path, vocab_size)
        self._checked_vocab = vocab_size

    def context_state(self, tokens: list[int]) -> Any:
        """The KenLM state after `tokens` (only the last `n - 1` matter), starting from the null context."""
        import kenlm

        state, out = kenlm.State(), kenlm.State()
        self.model.NullContextWrite(state)
        for token in tokens[-(self.order - 1) :] if self.order > 1 else []:
            self.model.BaseScore(state, str(token), out)
            state, out = out, state
        return state

    def _contexts(self, input_ids: torch.LongTensor, lengths: torch.LongTensor) -> list[list[int]]:
        """The last `n - 1` committed tokens of each row (leading pads left out)."""
        starts = leading_pads(input_ids, lengths, self.pad_token_id).tolist()
        ends = lengths.tolist()
        width = self.order - 1
        if width <= 0:
            return [[] for _ in ends]
        return [input_ids[b, max(starts[b], ends[b] - width) : ends[b]].tolist() for b in range(len(ends))]

    def _sample(self, state: DraftState, lattice: TopKLattice, vocab_size: int) -> Drafts:
        """
        Speculative sampling: `p` *independent* chains per row, each drawn token by token from
        [`~hf_bpd.logits.lattice.lattice_proposal`] with the n-gram scored after the row's committed context and the
        chain's own sampled tokens (its KenLM state). A chain never looks at another chain, so each token is
        distributed as its `q` given its own path, which is what multi-draft rejection sampling needs
        (`hf_bpd.sampling`). Queries are shared between chains of a row that reach the same KenLM state.
        """
        import kenlm  # a model is loaded, so kenlm is there

        if self._checked_vocab is None:
            self._check_vocab(vocab_size)
        batch, h, k = lattice.tokens.shape
        p = self.num_drafts
        device = lattice.tokens.device
        rows = torch.arange(batch, device=device).repeat_interleave(p)  # chain n belongs to row n // p
        tokens = lattice.tokens[rows]  # (B * p, h, k)
        head = lattice.logprobs[rows]
        use_lm = self.alpha > 0.0
        if use_lm:
            starts = [self.context_state(context) for context in self._contexts(state.input_ids, state.lengths)]
            chain_states = [starts[n // p] for n in range(batch * p)]
            words = [[[str(t) for t in position] for position in row] for row in lattice.tokens.cpu().tolist()]
            base_score = self.model.BaseScore
        drafted, proposals = [], []
        for i in range(h):
            lm = None
            if use_lm:
                lm_rows, nexts, seen = [], [], {}
                for n, chain_state in enumerate(chain_states):
                    key = (n // p, chain_state)
                    if key not in seen:  # chains of a row at the same state share the k queries
                        outs = [kenlm.State() for _ in range(k)]
                        scores = [base_score(chain_state, word, out) for word, out in zip(words[n // p][i], outs)]
                        seen[key] = (scores, outs)
                    lm_rows.append(seen[key][0])
                    nexts.append(seen[key][1])
                lm = torch.tensor(lm_rows, dtype=torch.float64).mul_(LN10).float()
            token, q = lattice_proposal(state, tokens[:, i], head[:, i], lm, self.alpha, vocab_size)
            drafted.append(token)
            proposals.append(q)
            if use_lm and i < h - 1:
                where = (tokens[:, i] == token.to(device)[:, None]).long()
                found = where.any(-1).tolist()
                index = where.argmax(-1).tolist()
                sampled = token.tolist()
                for n in range(batch * p):
                    if found[n]:
                        chain_states[n] = nexts[n][index[n]]
                    else:  # only a warper that adds tokens could draw outside the lattice
                        out = kenlm.State()
                        base_score(chain_states[n], str(sampled[n]), out)
                        chain_states[n] = out
        drafts = torch.stack(drafted, dim=1).view(batch, p, h).to(device)
        return Drafts(tokens=drafts, proposals=torch.stack(proposals, dim=1).view(batch, p, h, vocab_size))

    def _rescore(
        self, input_ids: torch.LongTensor, lengths: torch.LongTensor, lattice: TopKLattice, vocab_size: int
    ) -> torch.LongTensor:
        if self._checked_vocab is None:
            self._check_vocab(vocab_size)
        if self.alpha == 0.0:  # no n-gram term: the exact p-best of the head scores
            return pbest_paths(lattice.logprobs, self.num_drafts)[0]
        starts = leading_pads(input_ids, lengths, self.pad_token_id).tolist()
        ends = lengths.tolist()
        width = self.order - 1
        tokens = lattice.tokens.cpu().tolist()  # (B, h, k)
        head = lattice.logprobs.cpu().double().numpy()
        rows = []
        for b in range(lattice.batch_size):
            begin = max(starts[b], ends[b] - width)
            context = input_ids[b, begin : ends[b]].tolist() if width > 0 else []
            words = [[str(t) for t in position] for position in tokens[b]]
            paths, _ = ngram_pbest(
                self.model, self.context_state(context), words, head[b], self.alpha, self.num_drafts, self.beam_size
            )
            rows.append(torch.from_numpy(paths))
        return torch.stack(rows).to(lattice.tokens.device)
