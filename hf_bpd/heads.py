"""
Draft heads: the blocks, the [`DraftHeads`] module the model holds, and the registry `HEAD_TYPES`.

A head type is one [`DraftHeads`] subclass registered under its `BPDConfig.head_type` name. Its `forward(hidden,
prev_tokens=None)` returns the pre-projection states of the draft tokens; the projection to the (draft) vocabulary
stays on the model (`BPDForCausalLM.draft_logits`). The class flag `independent` says what the drafters may assume:

- `independent = True`: head `i` reads only the base model's hidden state `h_t` (Medusa, Kim et al.): the `h`
  draft distributions are fixed given the committed prefix, so the lattice searches are exact.
- `independent = False` (token-conditioned, Hydra / ReDrafter style): `prev_tokens` `(..., k)` holds the tokens
  after `h_t`, `prev_tokens[..., 0]` being `x_{t+1}` (the base model's own next token, i.e. the last committed
  token at draft time), and output `j` of `(..., k, d)` predicts `x_{t+2+j}` given `x_{t+1..t+1+j}`. Training feeds
  the targets (teacher forcing); drafting feeds each node's own path.

Token-conditioned heads that also attend over the committed context (`hf_bpd.context_heads`) set `reads_context =
True`: the decode loop then keeps their context for one `generate` call (`new_context(batch, device)`, fed the
committed pairs `(h_s, x_{s+1})` with `append`) and drafters score paths through `path_states(model, context,
last_tokens)`.

Adding a head type: subclass [`DraftHeads`], register it in `HEAD_TYPES`; nothing else in the library changes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

if TYPE_CHECKING:
    from .configuration_bpd import BPDConfig


def _tagged(linear: nn.Linear, how: str) -> nn.Linear:
    """Record how `_init_weights` initialises this layer (v5 initialises leaf modules, not their parents)."""
    linear._bpd_init = how
    return linear


class ResBlock(nn.Module):
    """Medusa's `x + SiLU(W x)`; `W` and its bias start at zero so the block starts as the identity."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = _tagged(nn.Linear(hidden_size, hidden_size), "zeros")
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.linear(x))


class FFNBlock(nn.Module):
    """Kim et al.'s one-hidden-layer FFN with a residual: `x + W_2 SiLU(W_1 x)`; `W_2` starts at zero."""

    def __init__(self, hidden_size: int, inner_size: int):
        super().__init__()
        self.up = _tagged(nn.Linear(hidden_size, inner_size), "normal")
        self.down = _tagged(nn.Linear(inner_size, hidden_size), "zeros")
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(self.act(self.up(x)))


class LoRABlock(nn.Module):
    """A low-rank residual `x + B(A x)`; `B` starts at zero. `2 * d * r` parameters."""

    def __init__(self, hidden_size: int, rank: int):
        super().__init__()
        self.lora_A = _tagged(nn.Linear(hidden_size, rank, bias=False), "kaiming")
        self.lora_B = _tagged(nn.Linear(rank, hidden_size, bias=False), "zeros")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.lora_B(self.lora_A(x))


class DraftHeads(nn.Module):
    """
    The `h` draft heads of a model. Children are the heads themselves, named `0 .. h-1` (state-dict keys
    `heads.{i}....`), so the module iterates and indexes like a `ModuleList`.

    Args:
        config ([`BPDConfig`]): `num_draft_heads` and the head type's own fields.
        hidden_size (`int`): the base model's hidden size `d`.
        input_embeddings (`nn.Module`, *optional*): the base model's (frozen) input embedding `E`, for heads that
            read tokens. Held by reference: never saved with the heads, never a child module.

    Attributes:
        independent (`bool`, class attribute): whether head `i` reads only the hidden state (see the module doc).
        reads_context (`bool`, class attribute): whether the decode loop keeps a context of the committed prefix for
            these heads (see the module doc).
    """

    independent: ClassVar[bool] = True
    reads_context: ClassVar[bool] = False

    def __init__(self, config: BPDConfig, hidden_size: int, input_embeddings: nn.Module | None = None):
        super().__init__()
        self.num_heads = int(config.num_draft_heads)
        self.hidden_size = hidden_size
        self._embeddings = (input_embeddings,)  # a tuple: not registered, so neither saved nor moved by `.to()`

    def token_embedding_shape(self, input_embeddings: nn.Module | None, head_type: str) -> tuple[int, int | None]:
        """For heads that read tokens: `(embedding width, embedding vocabulary or None)` of the base's input
        embedding; raises `ValueError` when it was not given."""
        if input_embeddings is None:
            raise ValueError(
                f"head_type={head_type!r} heads read the base model's input embedding of the tokens they condition "
                "on: build them through BPDForCausalLM (which passes `base_model.get_input_embeddings()`)."
            )
        weight = getattr(input_embeddings, "weight", None)
        if weight is None:
            return self.hidden_size, None
        return int(weight.shape[1]), int(weight.shape[0])

    def embed(self, tokens: torch.LongTensor) -> torch.Tensor:
        """`E(tokens)`: the base model's input embedding of `tokens` `(...)` -> `(..., d)` (no gradient into `E`)."""
        embeddings = self._embeddings[0]
        if embeddings is None:
            raise ValueError(f"{type(self).__name__} reads tokens but was built without the base input embedding.")
        with torch.no_grad():
            return embeddings(tokens)

    def forward(self, hidden: torch.Tensor, prev_tokens: torch.LongTensor | None = None) -> torch.Tensor:
        """
        Args:
            hidden (`torch.Tensor` of shape `(..., d)`): the base model's last hidden state `h_t`.
            prev_tokens (`torch.LongTensor` of shape `(..., k)`, *optional*): `x_{t+1..t+k}` (token-conditioned
                heads only; independent heads ignore it).
        Returns:
            `torch.Tensor` of shape `(..., h, d)` (independent) or `(..., k, d)` (token-conditioned): the states
            whose projection scores draft token `j + 1` after `x_{t+1}`.
        """
        raise NotImplementedError

    def first(self, hidden: torch.Tensor, num_heads: int, prev_tokens: torch.LongTensor | None = None) -> torch.Tensor:
        """The states of the first `num_heads` heads, `(..., num_heads, d)` (what `forward` gives, cut; kinds whose
        heads are separate modules compute only those)."""
        return self(hidden, prev_tokens)[..., :num_heads, :]

    def __iter__(self):
        return iter(self._modules.values())

    def __len__(self) -> int:
        return len(self._modules)

    def __getitem__(self, index: int) -> nn.Module:
        return list(self._modules.values())[index]


class BlockHeads(DraftHeads):
    """Independent heads, each a stack of `config.head_num_layers` blocks on `h_t` (subclasses give `block`)."""

    independent: ClassVar[bool] = True

    def __init__(self, config: BPDConfig, hidden_size: int, input_embeddings: nn.Module | None = None):
        super().__init__(config, hidden_size, input_embeddings)
        for i in range(self.num_heads):  # a comprehension of fresh blocks, never `[block] * n`
            self.add_module(
                str(i), nn.Sequential(*[self.block(config, hidden_size) for _ in range(config.head_num_layers)])
            )

    @staticmethod
    def block(config: BPDConfig, hidden_size: int) -> nn.Module:
        raise NotImplementedError

    def forward(self, hidden: torch.Tensor, prev_tokens: torch.LongTensor | None = None) -> torch.Tensor:
        return torch.stack([head(hidden) for head in self], dim=-2)

    def first(self, hidden: torch.Tensor, num_heads: int, prev_tokens: torch.LongTensor | None = None) -> torch.Tensor:
        return torch.stack([head(hidden) for head in list(self)[:num_heads]], dim=-2)


class ResBlockHeads(BlockHeads):
    """`head_type="resblock"`: Medusa's heads."""

    block = staticmethod(lambda config, d: ResBlock(d))


class FFNHeads(BlockHeads):
    """`head_type="ffn"`: Kim et al.'s heads (inner width `config.head_hidden_size`, default `d`)."""

    block = staticmethod(lambda config, d: FFNBlock(d, config.head_hidden_size or d))


class LoRAHeads(BlockHeads):
    """`head_type="lora"`: low-rank residual heads of rank `config.head_rank`."""

    block = staticmethod(lambda config, d: LoRABlock(d, config.head_rank))


HEAD_TYPES: dict[str, type[DraftHeads]] = {"resblock": ResBlockHeads, "ffn": FFNHeads, "lora": LoRAHeads}

from .recurrent_heads import RecurrentHeads  # noqa: E402  (token-conditioned heads; the module imports this one)

HEAD_TYPES["recurrent"] = RecurrentHeads

from .context_heads import ContextHeads  # noqa: E402  (attention over the committed context, EAGLE style)

HEAD_TYPES["context"] = ContextHeads


def build_heads(config: BPDConfig, hidden_size: int, input_embeddings: nn.Module | None = None) -> DraftHeads:
    """The registered [`DraftHeads`] of `config.head_type`."""
    if config.head_type not in HEAD_TYPES:
        raise ValueError(f"BPDConfig.head_type must be one of {sorted(HEAD_TYPES)}, got {config.head_type!r}.")
    return HEAD_TYPES[config.head_type](config, hidden_size, input_embeddings)


def build_head(config: BPDConfig, hidden_size: int) -> nn.Sequential:
    """One block head (`config.head_num_layers` fresh blocks) of a registered [`BlockHeads`] type."""
    cls = HEAD_TYPES[config.head_type]
    return nn.Sequential(*[cls.block(config, hidden_size) for _ in range(config.head_num_layers)])


def teacher_tokens(tokens: torch.LongTensor, num_heads: int, fill: int = 0) -> torch.LongTensor:
    """
    The conditioning tokens of token-conditioned heads at training (teacher forcing): `prev[:, t, j] =
    tokens[:, t + 1 + j]`, so output `j` at position `t` sees `x_{t+1..t+1+j}` and predicts `x_{t+2+j}` (the same
    target as [`~hf_bpd.losses.draft_head_loss`]). Negative ids (`-100`) and positions past the end read `fill`.

    Args:
        tokens (`torch.LongTensor` of shape `(batch, seq_len)`): the sequence (labels or input ids).
    Returns:
        `torch.LongTensor` of shape `(batch, seq_len, num_heads)`.
    """
    padded = nn.functional.pad(tokens, (0, num_heads + 1), value=fill)
    padded = torch.where(padded < 0, fill, padded)
    positions = torch.arange(tokens.shape[1], device=tokens.device)[:, None]
    return padded[:, positions + 1 + torch.arange(num_heads, device=tokens.device)]


def load_grown_heads(heads: DraftHeads, state_dict: dict[str, torch.Tensor]) -> list[str]:
    """
    Start `heads` from trained heads of the same kind with narrower blocks, computing exactly what they computed
    (Net2Net's function-preserving widening: Chen, Goodfellow and Shlens, 2016, section 2.1).

    A trained [`ResBlock`] `x + SiLU(W x + b)` becomes the first `d` inner units of an [`FFNBlock`]
    `x + W_2 SiLU(W_1 x + b_1) + b_2`: `W_1[:d] = W`, `b_1[:d] = b`, `W_2[:, :d] = I`, `b_2 = 0`. The FFN's other
    inner units keep their fresh initialisation in `W_1` and their zero columns of `W_2`, so they add nothing until
    trained. A trained FFN block of inner width `m` fills the first `m` units the same way. Every other tensor must
    match in name and shape and is copied.

    Args:
        heads ([`DraftHeads`]): freshly built heads (e.g. `head_type="recurrent"` with `head_intermediate_size`).
        state_dict (`dict[str, torch.Tensor]`): the trained heads' tensors, keys relative to the heads module
            (`"0.blocks.0.linear.weight"`, ...), as `heads.state_dict()` names them.
    Returns:
        `list[str]`: the keys of `heads` that were widened (from a ResBlock, or from fewer inner units) rather than
            copied.
    Raises:
        `ValueError`: a tensor of `heads` has no source, a source tensor has no place in `heads`, or a source block
            is wider than its target or reads another hidden size.
    """
    own = heads.state_dict()
    new: dict[str, torch.Tensor] = {}
    grown: list[str] = []
    used: set[str] = set()
    for name, module in heads.named_modules():
        if not isinstance(module, FFNBlock):
            continue
        prefix = f"{name}."
        up, down = module.up.weight, module.down.weight
        d, inner = up.shape[1], up.shape[0]
        if f"{prefix}linear.weight" in state_dict:  # a ResBlock: W, b and an identity W_2 of width d
            w, b = state_dict[f"{prefix}linear.weight"], state_dict[f"{prefix}linear.bias"]
            w2, b2 = torch.eye(d, dtype=w.dtype, device=w.device), torch.zeros(d, dtype=w.dtype, device=w.device)
            used |= {f"{prefix}linear.weight", f"{prefix}linear.bias"}
        elif f"{prefix}up.weight" in state_dict:
            w, b = state_dict[f"{prefix}up.weight"], state_dict[f"{prefix}up.bias"]
            w2, b2 = state_dict[f"{prefix}down.weight"], state_dict[f"{prefix}down.bias"]
            used |= {f"{prefix}{k}" for k in ("up.weight", "up.bias", "down.weight", "down.bias")}
        else:
            continue  # left to the name-and-shape check below
        m = w.shape[0]
        if w.shape[1] != d:
            raise ValueError(f"{prefix[:-1]}: the trained block reads width {w.shape[1]}, these heads {d}.")
        if m > inner:
            raise ValueError(f"{prefix[:-1]}: the trained block ({m} inner units) is wider than {inner} x {d}.")
        new[f"{prefix}up.weight"] = torch.cat([w.to(up), up.detach()[m:]])
        new[f"{prefix}up.bias"] = torch.cat([b.to(up), module.up.bias.detach()[m:]])
        new[f"{prefix}down.weight"] = torch.cat([w2.to(down), torch.zeros_like(down)[:, m:]], dim=1)
        new[f"{prefix}down.bias"] = b2.to(down)
        if m < inner or f"{prefix}linear.weight" in state_dict:
            grown += [f"{prefix}up.weight", f"{prefix}up.bias", f"{prefix}down.weight", f"{prefix}down.bias"]
    for key, tensor in own.items():
        if key in new:
            continue
        if key not in state_dict or state_dict[key].shape != tensor.shape:
            have = tuple(state_dict[key].shape) if key in state_dict else "nothing"
            raise ValueError(f"heads tensor {key} {tuple(tensor.shape)} has no source of that shape (got {have}).")
        new[key] = state_dict[key]
        used.add(key)
    extra = sorted(set(state_dict) - used)
    if extra:
        raise ValueError(f"trained tensors with no place in these heads: {extra[:4]} ({len(extra)} in all).")
    heads.load_state_dict(new)
    return grown
