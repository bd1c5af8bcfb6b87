"""
The bench methods: one [`MethodSpec`] per name in `METHODS`, the only place a method is defined.

A method is either a BPD drafter spec (what `hf_bpd`'s drafter registry builds: `{"type": name, **options}`, or
`CHECKPOINT` for the checkpoint's recommended drafter) or a set of transformers `generate` keyword arguments. Values
that depend on the run are written `Cfg("field")` (a [`~hf_bpd_bench.bench.BenchConfig`] field) or `Part("name")`
(a loaded part of [`~hf_bpd_bench.bench.Resources`]: `small_lm`, `ngram_path`, or the per-batch greedy `reference`).
The CLI's choices and help, the parts `hf-bpd bench` loads, the benchmark and the tests all read this table.

Adding a method: one entry below. This module imports neither torch nor transformers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Cfg:
    """A value read from the run's `BenchConfig` field `name`."""

    name: str


@dataclass(frozen=True)
class Part:
    """A value read from the loaded `Resources` (`small_lm`, `ngram_path`) or, for `reference`, the batch's greedy
    output."""

    name: str


REFERENCE_METHOD = "greedy"  # the base model's own decoding: every other method is compared with it
DEFAULT_BPD_METHOD = "bpd"  # plain `use_bpd=True`: what a user gets without choosing a drafter
GROUPS = {
    "reference": "the base model's own decoding",
    "bpd": "BPD with the checkpoint's recommended drafter",
    "single": "BPD with one simple drafter (the heads' own chain; prompt lookup through the BPD loop)",
    "refined": "BPD with refined chains (rescored or p-best lattice paths)",
    "tree": "BPD with draft trees",
    "peer": "other speculative methods transformers ships",
    "headroom": "upper bounds, not decoders",
}
CHECKPOINT = "checkpoint"  # `drafter=CHECKPOINT`: plain `use_bpd=True`, the checkpoint's recommended drafter

# What each part is, for messages and for the CLI: (what it is, the options that give it).
PARTS = {
    "small_lm": ("a small LM sharing the model's tokenizer", "--small-lm / --assistant"),
    "ngram_path": ("a KenLM n-gram over the model's token ids", "--ngram"),
    "draft_tree": ("heads with a static draft tree (BPDConfig.draft_tree)", "`hf-bpd tune --tree --save-model DIR`"),
}
_BATCH1 = "transformers' {} supports batch size 1 only"


@dataclass(frozen=True)
class MethodSpec:
    """
    How one bench method runs.

    Args:
        help (`str`): one line for `hf-bpd bench --help` and the README.
        drafter (`str` or `dict`, *optional*): a BPD method: `CHECKPOINT`, or a drafter spec `{"type": name,
            **options}` for `hf_bpd`'s drafter registry; option values may be `Cfg`/`Part` references.
        generate (`dict`): extra `generate` keyword arguments (for a base-model method: its whole decoding recipe).
        needs (`tuple[str]`): parts it needs besides the `Part`s of its spec (e.g. `"draft_tree"`).
        batch1_only (`str`, *optional*): why it cannot run at batch size > 1 (reported as unsupported there).
        timed (`bool`): False for a headroom measure with no meaningful wall clock (the oracle).
        lattice (`bool`): its drafter searches the heads' top-k lattice (Kim et al.), exact only for independent
            heads: reported as unsupported for token-conditioned heads (`head_type="recurrent"`).
        group (`str`): one of `GROUPS`, how reports gather methods (e.g. the refined variants, the peers).
    """

    help: str
    group: str
    drafter: str | Mapping[str, Any] | None = None
    generate: Mapping[str, Any] = field(default_factory=dict)
    needs: tuple[str, ...] = ()
    batch1_only: str | None = None
    timed: bool = True
    lattice: bool = False

    def __post_init__(self) -> None:
        if self.group not in GROUPS:
            raise ValueError(f"group must be one of {', '.join(GROUPS)}, got {self.group!r}.")

    @property
    def uses_bpd(self) -> bool:
        return self.drafter is not None

    @property
    def per_batch(self) -> bool:
        """Whether its drafter reads the batch's greedy reference (built per batch, not once)."""
        return "reference" in _part_names(self.drafter)

    def parts(self) -> tuple[str, ...]:
        """Every loaded part it needs (`small_lm`, `ngram_path`, `draft_tree`), in a stable order."""
        names = _part_names(self.drafter) | _part_names(self.generate) | set(self.needs)
        return tuple(name for name in PARTS if name in names)


def _part_names(value: Any) -> set[str]:
    if isinstance(value, Part):
        return {value.name}
    if isinstance(value, Mapping):
        return set().union(*(_part_names(v) for v in value.values())) if value else set()
    return set()


METHODS: dict[str, MethodSpec] = {
    REFERENCE_METHOD: MethodSpec(
        "the base model's own generate (the reference for identity and speedup)", "reference"
    ),
    DEFAULT_BPD_METHOD: MethodSpec(
        "blockwise parallel decoding with the checkpoint's recommended drafter", "bpd", drafter=CHECKPOINT
    ),
    "bpd-heads": MethodSpec(
        "the heads' own argmax chain (plain blockwise parallel decoding; what `bpd` meant before the default drafter)",
        "single",
        drafter={"type": "heads"},
    ),
    "bpd-context": MethodSpec(
        "prompt lookup (the row's context n-gram match, up to 10 tokens) verified by the BPD loop, no heads",
        "single",
        drafter={"type": "context-ngram"},
    ),
    "bpd-ngram": MethodSpec(
        "global KenLM n-gram rescoring of the heads' top-k lattice, best path (needs --ngram)",
        "refined",
        lattice=True,
        drafter={
            "type": "ngram",
            "model": Part("ngram_path"),
            "top_k": Cfg("top_k"),
            "alpha": Cfg("alpha_ngram"),
            "num_drafts": 1,
        },
    ),
    "bpd-neural": MethodSpec(
        "local rescoring with the small LM (needs --small-lm)",
        "refined",
        lattice=True,
        drafter={"type": "neural", "lm": Part("small_lm"), "top_k": Cfg("top_k"), "alpha": Cfg("alpha_neural")},
    ),
    "bpd-pbest": MethodSpec(
        "the p best n-gram paths verified together (needs --ngram)",
        "refined",
        lattice=True,
        drafter={
            "type": "ngram",
            "model": Part("ngram_path"),
            "top_k": Cfg("top_k"),
            "alpha": Cfg("alpha_ngram"),
            "num_drafts": Cfg("num_drafts"),
        },
    ),
    "bpd-pbest0": MethodSpec(
        "the p best lattice paths by head scores alone",
        "refined",
        lattice=True,
        drafter={"type": "pbest", "top_k": Cfg("top_k"), "num_drafts": Cfg("num_drafts")},
    ),
    "bpd-tree": MethodSpec(
        "a dynamic draft tree: the --tree-nodes lattice paths of highest head confidence, verified as one trie",
        "tree",
        drafter={
            "type": "tree",
            "num_nodes": Cfg("tree_nodes"),
            "top_k": Cfg("top_k"),
            "min_confidence": Cfg("tree_min_confidence"),
        },
    ),
    "bpd-tree-ngram": MethodSpec(
        "a dynamic draft tree ranked by heads and n-gram together (needs --ngram)",
        "tree",
        drafter={
            "type": "tree",
            "num_nodes": Cfg("tree_nodes"),
            "top_k": Cfg("top_k"),
            "min_confidence": Cfg("tree_min_confidence"),
            "ngram": Part("ngram_path"),
            "alpha": Cfg("alpha_ngram"),
        },
    ),
    "bpd-tree-static": MethodSpec(
        "the static draft tree saved with the heads (BPDConfig.draft_tree; `hf-bpd tune --tree`)",
        "tree",
        drafter={"type": "tree-static"},
        needs=("draft_tree",),
    ),
    "pld": MethodSpec(
        "transformers' prompt lookup decoding (batch size 1)",
        "peer",
        generate={"prompt_lookup_num_tokens": Cfg("pld_tokens")},
        batch1_only=_BATCH1.format("prompt lookup decoding"),
    ),
    "assisted": MethodSpec(
        "transformers' assisted decoding with the small LM as draft model (batch size 1; needs --small-lm)",
        "peer",
        generate={"assistant_model": Part("small_lm")},
        batch1_only=_BATCH1.format("assisted decoding"),
    ),
    "oracle": MethodSpec(
        "oracle top-k: the heads' top-k lattice with a perfect chooser (headroom; no wall clock)",
        "headroom",
        drafter={"type": "oracle", "reference": Part("reference"), "top_k": Cfg("oracle_top_k")},
        timed=False,
        lattice=True,
    ),
}


def methods_in(group: str) -> tuple[str, ...]:
    """The names of a group's methods, in `METHODS` order."""
    if group not in GROUPS:
        raise ValueError(f"Unknown group {group!r}; choose from {', '.join(GROUPS)}.")
    return tuple(name for name, spec in METHODS.items() if spec.group == group)


def parse_methods(methods: str | Iterable[str] | None) -> list[str]:
    """
    Method names from a comma- or space-separated list (None: all), checked before anything is loaded.

    Raises:
        ValueError: naming the unknown methods and listing the valid ones.
    """
    if methods is None:
        return list(METHODS)
    items = [methods] if isinstance(methods, str) else list(methods)
    names = [name.strip() for item in items for name in item.replace(" ", ",").split(",") if name.strip()]
    unknown = [name for name in names if name not in METHODS]
    if unknown:
        raise ValueError(f"Unknown methods {unknown}; choose from {', '.join(METHODS)}.")
    if not names:
        raise ValueError(f"No method given; choose from {', '.join(METHODS)}.")
    return list(dict.fromkeys(names))


def parts_needed(methods: Iterable[str]) -> set[str]:
    """The loaded parts (`small_lm`, `ngram_path`, `draft_tree`) the named methods need together."""
    return {part for name in methods for part in METHODS[name].parts()}


def resolve(value: Any, cfg: Any, res: Any, reference: Any = None) -> Any:
    """
    `value` with every `Cfg` / `Part` reference replaced by its value for this run (recursively through dicts).

    Raises:
        ValueError: a needed part is missing, naming it and the option that gives it.
    """
    if isinstance(value, Cfg):
        return getattr(cfg, value.name)
    if isinstance(value, Part):
        found = reference if value.name == "reference" else getattr(res, value.name, None)
        if found is None:
            what, option = PARTS.get(value.name, (value.name, "the matching option"))
            raise ValueError(f"needs {what} ({option}); pass it or leave the method out (--methods).")
        return found
    if isinstance(value, Mapping):
        return {key: resolve(item, cfg, res, reference) for key, item in value.items()}
    return value
