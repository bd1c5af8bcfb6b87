"""Configuration of a blockwise parallel decoding (BPD) model: a base causal LM plus `h` draft heads."""

from __future__ import annotations

import json
from typing import Any

from transformers import PretrainedConfig


class BPDConfig(PretrainedConfig):
    r"""
    Configuration for [`BPDForCausalLM`]: which base model is wrapped and the shape of its draft heads.

    Draft head `i` (1-based) reads the base model's last hidden state `z_t` at position `t` and predicts token
    `t + 1 + i`; the base model's own `lm_head` keeps predicting token `t + 1` (Medusa's convention), so the base
    model stays exactly intact.

    Args:
        num_draft_heads (`int`, *optional*, defaults to 4):
            `h`, the number of draft heads. A block proposes `h` tokens after the base model's next token, so at most
            `h + 1` tokens are produced per serial call of the base model.
        head_type (`str`, *optional*, defaults to `"resblock"`):
            - `"resblock"`: Medusa-style `x + SiLU(W x)` blocks (`W` zero-initialised: an untrained head reproduces
              the base model's path).
            - `"ffn"`: Kim et al.'s one-hidden-layer FFN, `x + W_2 act(W_1 x)` with hidden size
              `head_hidden_size` (`W_2` zero-initialised).
            - `"lora"`: a low-rank residual `x + B(A x)` of rank `head_rank` (`B` zero-initialised). A few hundred
              thousand parameters per head even on a 4096-wide model.
            - `"recurrent"`: token-conditioned heads (ReDrafter / IBM MLP speculator): head `k` also reads the base
              model's own next token and the `k` draft tokens before its own, through a recurrent state over the
              base model's (frozen) input embedding (`hf_bpd.recurrent_heads`); `head_num_layers` ResBlocks each
              (FFN blocks of inner width `head_intermediate_size` when set), state width `head_hidden_size`
              (default the base hidden size). Zero-initialised like `"resblock"`.
              Drafted token by token (chains, beams, trees); the lattice drafters refuse them.
            - `"context"`: EAGLE-style heads (`hf_bpd.context_heads`): one shared stack of `head_num_layers`
              transformer decoder layers over `fc([h_t; E(x_{t+1})])` at every committed position, drafting `h`
              tokens deep by feeding their own output back (trained as they draft: EAGLE-3's training-time test).
              Inner width `head_intermediate_size` (default `8d/3`), `head_num_attention_heads` /
              `head_num_key_value_heads` attention heads. Drafted token by token, like `"recurrent"`.
        head_num_layers (`int`, *optional*, defaults to 1):
            How many of those blocks each head stacks.
        head_hidden_size (`int`, *optional*):
            Hidden width of an `"ffn"` head; defaults to the base model's hidden size.
        head_rank (`int`, *optional*, defaults to 16):
            Rank of a `"lora"` head.
        head_intermediate_size (`int`, *optional*):
            `"recurrent"` heads: each head's blocks are FFN blocks `x + W_2 SiLU(W_1 x)` of this inner width
            (`W_2` zero-initialised) instead of ResBlocks, more capacity for the joint function of `h_t` and the
            drafted tokens (EAGLE's draft layer has a `4d` MLP). `None` (default): ResBlocks. `"context"` heads:
            the decoder layers' MLP width (default `8d/3`).
        head_num_attention_heads (`int`, *optional*):
            `"context"` heads only: attention heads of their decoder layers (default: 64-wide heads, `d / 64`
            rounded down to a divisor of `d`).
        head_num_key_value_heads (`int`, *optional*):
            `"context"` heads only: key/value heads (grouped-query attention; default `head_num_attention_heads`).
        share_lm_head (`bool`, *optional*, defaults to `True`):
            Whether heads project to the vocabulary with the base model's (frozen) `lm_head`. When `False` each head
            owns a projection, initialised as a copy of the base `lm_head`.
        base_model_name_or_path (`str`, *optional*):
            Hub id or local path of the base model, used by `from_pretrained` when no `base_model` is passed.
        base_hidden_size (`int`, *optional*):
            Hidden size of the base model (recorded so a checkpoint for a different base is a clear error).
        base_vocab_size (`int`, *optional*):
            Vocabulary size of the base model (recorded for the same reason).
        base_model_type (`str`, *optional*):
            `model_type` of the base model's config (informational, shown in errors and model cards).
        freeze_base (`bool`, *optional*, defaults to `True`):
            Whether the base model's parameters get `requires_grad=False`.
        draft_vocab_size (`int`, *optional*):
            `K`: the heads predict only `K` tokens of the base vocabulary (the most frequent targets of the training
            data, stored in the checkpoint as `draft_token_map`); other tokens are never drafted. The projections then
            cost `h x d x K` instead of `h x d x V` per position (training and every decode step). vLLM's Medusa
            format calls this `truncated_vocab_size` + `token_map`. `None` (default): the full vocabulary. Lossless
            either way: only the verifier decides what is output.
        draft_tree (`list[list[int]]`, *optional*):
            A static draft tree saved with the heads (Medusa's `medusa_choices`): index paths like
            `[[0], [1], [0, 0]]`, where path `(r_1, .., r_d)` is the node whose token at depth `j` is head `j`'s
            rank-`r_j` token. Every prefix of a path must be a path too; depth at most `num_draft_heads`.
            `hf_bpd.drafters.StaticTreeDrafter()` verifies it; `hf-bpd tune --tree` calibrates it from the heads'
            measured top-k accuracies. `None` (default): no static tree.
        drafter (`dict`, *optional*):
            The checkpoint's recommended drafter, a small JSON spec `{"type": name, **options}` naming an entry of
            `hf_bpd.drafters.DRAFTERS` (e.g. `{"type": "tree", "num_nodes": 16, "top_k": 8}`); paths inside it
            (a KenLM file, a small LM folder) are relative to the checkpoint folder. `generate(use_bpd=True)` builds
            it unless `drafter=` is passed. `None` (default): the heads' own chain (`"heads"`). An optional
            `"by_dtype"` entry, `{dtype name: overrides}` (e.g. `{"float32": {"tree": {"num_nodes": 16}}}`, written
            by `hf-bpd tune --auto --dtype-override`), is merged into the spec (nested dicts key by key, any other
            value replaced) when the base model runs in that dtype: what drafts fastest differs between dtypes and
            machines ([`drafter_spec_for_dtype`]).
    """

    model_type = "bpd"

    def __init__(
        self,
        num_draft_heads: int = 4,
        head_type: str = "resblock",
        head_num_layers: int = 1,
        head_hidden_size: int | None = None,
        head_rank: int = 16,
        head_intermediate_size: int | None = None,
        head_num_attention_heads: int | None = None,
        head_num_key_value_heads: int | None = None,
        share_lm_head: bool = True,
        base_model_name_or_path: str | None = None,
        base_hidden_size: int | None = None,
        base_vocab_size: int | None = None,
        base_model_type: str | None = None,
        freeze_base: bool = True,
        draft_vocab_size: int | None = None,
        draft_tree: list[list[int]] | None = None,
        drafter: dict[str, Any] | None = None,
        **kwargs: Any,
    ):
        self.num_draft_heads = num_draft_heads
        self.head_type = head_type
        self.head_num_layers = head_num_layers
        self.head_hidden_size = head_hidden_size
        self.head_rank = head_rank
        self.head_intermediate_size = head_intermediate_size
        self.head_num_attention_heads = head_num_attention_heads
        self.head_num_key_value_heads = head_num_key_value_heads
        self.share_lm_head = share_lm_head
        self.base_model_name_or_path = base_model_name_or_path
        self.base_hidden_size = base_hidden_size
        self.base_vocab_size = base_vocab_size
        self.base_model_type = base_model_type
        self.freeze_base = freeze_base
        self.draft_vocab_size = draft_vocab_size
        self.draft_tree = [list(path) for path in draft_tree] if draft_tree is not None else None
        self.drafter = dict(drafter) if isinstance(drafter, dict) else drafter
        super().__init__(**kwargs)
        self.validate_bpd()

    def validate_bpd(self) -> None:
        """Raise a `ValueError` naming the field for any invalid value."""

        def positive_int(name: str, value: Any, allow_none: bool = False) -> None:
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"BPDConfig.{name} must be an integer >= 1, got {value!r}.")

        positive_int("num_draft_heads", self.num_draft_heads)
        positive_int("head_num_layers", self.head_num_layers)
        positive_int("head_rank", self.head_rank)
        positive_int("head_hidden_size", self.head_hidden_size, allow_none=True)
        positive_int("head_intermediate_size", self.head_intermediate_size, allow_none=True)
        if self.head_intermediate_size is not None and self.head_type not in ("recurrent", "context"):
            raise ValueError(
                f"BPDConfig.head_intermediate_size applies to head_type='recurrent' or 'context' only (got head_type="
                f"{self.head_type!r}); an 'ffn' head's inner width is head_hidden_size."
            )
        for name in ("head_num_attention_heads", "head_num_key_value_heads"):
            positive_int(name, getattr(self, name), allow_none=True)
            if getattr(self, name) is not None and self.head_type != "context":
                raise ValueError(f"BPDConfig.{name} applies to head_type='context' only (got {self.head_type!r}).")
        positive_int("base_hidden_size", self.base_hidden_size, allow_none=True)
        positive_int("base_vocab_size", self.base_vocab_size, allow_none=True)
        positive_int("draft_vocab_size", self.draft_vocab_size, allow_none=True)
        if self.draft_vocab_size and self.base_vocab_size and self.draft_vocab_size > self.base_vocab_size:
            raise ValueError(
                f"BPDConfig.draft_vocab_size ({self.draft_vocab_size}) cannot exceed the base vocabulary "
                f"({self.base_vocab_size})."
            )
        if self.draft_tree is not None:
            from .tree import check_tree_choices

            try:
                check_tree_choices(
                    self.draft_tree, self.num_draft_heads, self.draft_vocab_size or self.base_vocab_size
                )
            except ValueError as err:
                raise ValueError(f"BPDConfig.draft_tree: {err}") from None
        from .heads import HEAD_TYPES  # the live registry: a head type registered later is valid too

        if self.head_type not in HEAD_TYPES:
            raise ValueError(
                f"BPDConfig.head_type must be one of {sorted(HEAD_TYPES)}, got {self.head_type!r}: a checkpoint "
                "written by a newer hf_bpd (or a head type registered by code not imported here); upgrade hf_bpd "
                "or import the module that registers it in hf_bpd.heads.HEAD_TYPES."
            )
        self._validate_drafter()
        for name in ("share_lm_head", "freeze_base"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"BPDConfig.{name} must be a bool, got {getattr(self, name)!r}.")

    def _validate_drafter(self) -> None:
        """`drafter` is None or a JSON-serialisable dict with a string `"type"` (the registry checks the name)."""
        spec = self.drafter
        if spec is None:
            return
        if not isinstance(spec, dict) or not isinstance(spec.get("type"), str):
            raise ValueError(
                f"BPDConfig.drafter must be None or a dict like {{'type': 'tree', 'num_nodes': 16}}, got {spec!r}."
            )
        drafter_spec_for_dtype(spec, None)  # checks `by_dtype`
        try:
            json.dumps(spec)
        except TypeError as err:
            raise ValueError(
                f"BPDConfig.drafter must hold JSON values only (it is saved in config.json): {err}"
            ) from None


def drafter_spec_for_dtype(spec: Any, dtype: Any) -> Any:
    """
    A drafter spec with its `"by_dtype"` overrides for `dtype` merged in (see `BPDConfig.drafter`), without the
    `"by_dtype"` entry; specs without one (names, `None`, drafter objects) come back unchanged. Nested specs (a
    `"context-ngram"` drafter's `"inner"`) are checked here and resolved when they are built.

    Args:
        spec: a drafter spec.
        dtype (`torch.dtype` or `str`, *optional*): the base model's dtype (`None`: only check the overrides).
    Returns:
        The spec to build.
    Raises:
        `ValueError`: `by_dtype` is not a dict of dicts keyed by torch dtype names (`"float32"`, `"torch.bfloat16"`,
            aliases such as `"float"` included).
    """
    if not isinstance(spec, dict):
        return spec
    if "inner" in spec:
        drafter_spec_for_dtype(spec["inner"], None)
    if "by_dtype" not in spec:
        return spec
    overrides = spec["by_dtype"]
    names = {k: _dtype_name(k) for k in overrides} if isinstance(overrides, dict) else {}
    if (
        not isinstance(overrides, dict)
        or None in names.values()
        or not all(isinstance(v, dict) for v in overrides.values())
    ):
        raise ValueError(
            "The drafter spec's 'by_dtype' must map torch dtype names to overrides of the spec, e.g. "
            f"{{'float32': {{'tree': {{'num_nodes': 16}}}}}}, got {overrides!r}."
        )
    resolved = {k: v for k, v in spec.items() if k != "by_dtype"}
    if dtype is None:
        return resolved
    wanted = _dtype_name(dtype)
    for key, override in overrides.items():
        if names[key] == wanted:
            resolved = _merged(resolved, override)
    return resolved


def _dtype_name(value: Any) -> str | None:
    """`torch.float32`, `"float32"`, `"torch.float32"` or an alias (`"float"`) -> `"float32"`; `None` if no dtype."""
    import torch

    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    dtype = getattr(torch, str(value).removeprefix("torch."), None)
    return str(dtype).removeprefix("torch.") if isinstance(dtype, torch.dtype) else None


def _merged(spec: dict, overrides: dict) -> dict:
    """`spec` with `overrides` applied: nested dicts merged key by key, any other value replaced."""
    out = dict(spec)
    for key, value in overrides.items():
        both_dicts = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merged(out[key], value) if both_dicts else value
    return out
