"""
The drafter registry: a name -> factory table, one entry per way of drafting. `build_drafter(model, spec)` turns a
spec (None, a name, `{"type": name, **options}`, or a [`Drafter`]) into a drafter and checks it against the model's
heads; `BPDConfig.drafter` carries a checkpoint's recommended spec. Paths in a spec (a KenLM file, a small LM folder)
are read relative to the checkpoint folder the model was loaded from.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..configuration_bpd import drafter_spec_for_dtype
from .base import Drafter, DraftHeadsView, HeadsDrafter, check_drafter_heads


def _base_dtype(model: Any) -> Any:
    """The dtype the base model computes its logits in (what a spec's `by_dtype` is keyed by, and what the heads are
    aligned to): its output embedding's, else its `dtype`; `None` when it has neither."""
    base = getattr(model, "base", model)
    get = getattr(base, "get_output_embeddings", None)
    head = get() if callable(get) else None
    weight = getattr(head, "weight", None)
    return weight.dtype if weight is not None else getattr(base, "dtype", None)


def _path(model: Any, value: Any) -> Any:
    """A spec path, relative to the checkpoint folder when the model has one (objects pass through)."""
    if not isinstance(value, (str, Path)):
        return value
    path = Path(value).expanduser()
    folder = getattr(model, "checkpoint_folder", None)
    if not path.is_absolute() and folder is not None and (Path(folder) / path).exists():
        return str(Path(folder) / path)
    return str(path)


def _lm(model: Any, value: Any) -> Any:
    """A small LM: a loaded model, or a folder / Hub id loaded with `AutoModelForCausalLM` (in eval mode)."""
    if not isinstance(value, (str, Path)):
        return value
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(_path(model, value), dtype=model.dtype).to(model.device).eval()


def _ngram(model: Any, path: Any = None, **options: Any) -> Drafter:
    from .ngram import NgramRescorer

    if path is None:
        raise ValueError("The 'ngram' drafter needs `path`: a KenLM file over token ids (hf-bpd build-ngram).")
    return NgramRescorer(_path(model, path), vocab_size=model.config.base_vocab_size, **options)


def _neural(model: Any, path: Any = None, **options: Any) -> Drafter:
    from .neural import NeuralRescorer

    if path is None:
        raise ValueError(
            "The 'neural' drafter needs `path`: a small causal LM (folder or model) of the same tokenizer."
        )
    return NeuralRescorer(_lm(model, path), **options)


def _search(model: Any, ngram: Any = None, lm: Any = None, alpha: float = 0.5, **options: Any) -> Drafter:
    from ..logits.hooks import NeuralHook, NgramHook
    from .search import SearchDrafter

    hooks = []
    if ngram is not None:
        hooks.append(NgramHook(_path(model, ngram), alpha=alpha, vocab_size=model.config.base_vocab_size))
    if lm is not None:
        hooks.append(NeuralHook(_lm(model, lm), alpha=alpha))
    return SearchDrafter(hooks=hooks, **options)


def _tree(model: Any, ngram: Any = None, **options: Any) -> Drafter:
    from .tree import DynamicTreeDrafter

    return DynamicTreeDrafter(ngram=_path(model, ngram) if ngram is not None else None, **options)


def _static(model: Any, **options: Any) -> Drafter:
    from .tree import StaticTreeDrafter

    return StaticTreeDrafter(**options)


def _pbest(model: Any, **options: Any) -> Drafter:
    from .pbest import PBestRescorer

    return PBestRescorer(**options)


def _oracle(model: Any, **options: Any) -> Drafter:
    from .oracle import OracleDrafter

    return OracleDrafter(**options)


def _context(model: Any, inner: Any = None, **options: Any) -> Drafter:
    from .context_ngram import ContextNgramDrafter

    return ContextNgramDrafter(inner=build_drafter(model, inner) if inner is not None else None, **options)


def _auto(model: Any, **options: Any) -> Drafter:
    from .auto import AutoDrafter

    return AutoDrafter(model, **options)


DRAFTERS: dict[str, Callable[..., Drafter]] = {
    "heads": lambda model, **options: HeadsDrafter(**options),
    "pbest": _pbest,
    "ngram": _ngram,
    "neural": _neural,
    "search": _search,
    "tree": _tree,
    "tree-static": _static,
    "oracle": _oracle,
    "context-ngram": _context,  # prompt lookup alone, or with `inner` (a spec) by rule merge / switch / both
    "auto": _auto,  # heads tree + prompt lookup + width from cost: the shipped checkpoints' default
}


def build_drafter(model: Any, spec: Any = None) -> Drafter:
    """
    The drafter a spec names, checked against the model's heads ([`check_drafter_heads`]).

    Args:
        model ([`~hf_bpd.BPDForCausalLM`]): the model whose heads draft (and whose checkpoint folder anchors paths).
        spec: None (the heads' own chain), a registry name (`"tree"`), a dict `{"type": name, **options}` (options
            are the factory's keyword arguments, e.g. `{"type": "ngram", "path": "ngram.bin", "top_k": 8}`; a
            `"by_dtype"` entry is resolved for the base model's dtype first, see `BPDConfig.drafter`), or a
            [`Drafter`] instance (used as is).
    Raises:
        ValueError: for an unknown name or a bad spec, naming the registered drafters; or when the drafter needs
            independent heads and the model's are token-conditioned.
    """
    spec = drafter_spec_for_dtype(spec, _base_dtype(model))
    if spec is None:
        drafter: Drafter = HeadsDrafter()
    elif isinstance(spec, Drafter):
        drafter = spec
    else:
        name, options = (spec, {}) if isinstance(spec, str) else (None, {})
        if isinstance(spec, dict):
            options = dict(spec)
            name = options.pop("type", None)
        if name not in DRAFTERS:
            raise ValueError(
                f"Unknown drafter spec {spec!r}: use one of {sorted(DRAFTERS)} (a name, or a dict with 'type'), a "
                "hf_bpd.drafters.Drafter instance, or None for the heads' own chain."
            )
        try:
            drafter = DRAFTERS[name](model, **options)
        except TypeError as err:
            if "unexpected keyword argument" not in str(err):
                raise
            raise ValueError(
                f"Bad option in the drafter spec {spec!r}: {err}. See the options of the {name!r} drafter's class "
                "(hf_bpd.drafters)."
            ) from err
    check_drafter_heads(drafter, DraftHeadsView(model))
    return drafter
