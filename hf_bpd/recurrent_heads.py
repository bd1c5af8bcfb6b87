"""
Token-conditioned draft heads, ReDrafter / IBM-MLP-speculator style: `head_type="recurrent"`.

Head `k` (0-based) predicts `x_{t+2+k}` from the base model's last hidden state `h_t` and the tokens after it,
`x_{t+1}` (the base model's own next token) to `x_{t+1+k}`, through a small recurrent state over the base model's own
(frozen) input embedding `E`:

    s_k = SiLU(W_k norm(E(x_{t+1+k})) + U_k s_{k-1}),    s_{-1} = 0   (norm: RMS, no weight)
    z_k = Blocks_k(h_t + P_k s_k)                  -> the model's shared (draft-vocabulary) projection

Why a sum and not ReDrafter's `concat(h_t, s_k)`: the concatenation meets a projection to the `d`-wide shared
vocabulary projection anyway, `A h_t + B s_k`; the ResBlocks after it learn any map of `h_t` that `A` could, so `A`
is kept at the identity and only `P_k = B` is learnt (`d x d` instead of `2d x d` per step, and the identity start
below for free). `s_{-1} = 0` because `h_t` reaches every output directly. `E(x)` is RMS-normalised so that a
`W_k` initialised at the usual fan-in scale gives a state of order one on any base (embedding scales vary by model).

Why one cell per depth (IBM's MLP speculator) rather than ReDrafter's one shared cell: the children of the heads
module stay the `h` heads (`heads.{k}.*`, so `first_heads` and the per-head learning-rate and loss machinery are
unchanged), and depth `k` gets its own weights at the same cost per drafted token.

Initialisation: `P_k` and the ResBlocks' weights (an FFN block's `W_2`) are zero, so an untrained head computes
`Blocks_k(h_t) = h_t` exactly like an untrained `"resblock"` head (whatever the tokens); `W_k` is random at fan-in
scale (a zero `W_k` with a zero `P_k` would get no gradient) and `U_k` is zero.

Drafting carries the state along a path: [`RecurrentHeads.step`] costs one embedding row and four `d x d` products
per token, whatever the depth, so an `h`-token chain never recomputes its prefix.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from .heads import DraftHeads, FFNBlock, ResBlock, _tagged

if TYPE_CHECKING:
    from .configuration_bpd import BPDConfig


class RecurrentHead(nn.Module):
    """
    One depth of [`RecurrentHeads`]: the cell `s_k = SiLU(W E(x) + U s_{k-1})` and `Blocks(h_t + P s_k)`.

    Args:
        hidden_size (`int`): the base model's hidden size `d`.
        embedding_size (`int`): width of the base model's input embedding.
        state_size (`int`): width of the recurrent state `s`.
        num_layers (`int`): blocks after the sum.
        first (`bool`): depth 0, whose previous state is zero, has no `U` (an unused parameter would stall DDP).
        intermediate_size (`int`, *optional*): FFN blocks of this inner width instead of ResBlocks.
    """

    def __init__(
        self,
        hidden_size: int,
        embedding_size: int,
        state_size: int,
        num_layers: int,
        first: bool = False,
        intermediate_size: int | None = None,
    ):
        super().__init__()
        self.token_proj = _tagged(nn.Linear(embedding_size, state_size), "kaiming")  # W (and the cell's bias)
        self.state_proj = None if first else _tagged(nn.Linear(state_size, state_size, bias=False), "zeros")  # U
        self.out_proj = _tagged(nn.Linear(state_size, hidden_size, bias=False), "zeros")  # P
        self.act = nn.SiLU()
        self.blocks = nn.Sequential(
            *[
                FFNBlock(hidden_size, intermediate_size) if intermediate_size else ResBlock(hidden_size)
                for _ in range(num_layers)
            ]
        )

    def forward(
        self, hidden: torch.Tensor, token_embedding: torch.Tensor, state: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            hidden (`torch.Tensor` of shape `(..., d)`): `h_t`.
            token_embedding (`torch.Tensor` of shape `(..., e)`): `E(x_{t+1+k})`.
            state (`torch.Tensor` of shape `(..., s)`, *optional*): `s_{k-1}` (`None` for `k = 0`: zero).
        Returns:
            `(output, state)`: the pre-projection state `(..., d)` of draft token `k + 2` and `s_k` `(..., s)`.
        """
        # E(x) at unit RMS: the cell starts in SiLU's non-linear range whatever the embedding's scale
        pre = self.token_proj(nn.functional.rms_norm(token_embedding, token_embedding.shape[-1:]))
        if state is not None and self.state_proj is not None:
            pre = pre + self.state_proj(state)
        state = self.act(pre)
        return self.blocks(hidden + self.out_proj(state)), state


class RecurrentHeads(DraftHeads):
    """
    `head_type="recurrent"`: token-conditioned heads (see the module doc). `config.head_num_layers` ResBlocks per
    head (FFN blocks of inner width `config.head_intermediate_size` when set); `config.head_hidden_size` is the state
    width (default `d`). Needs the base model's input embedding.
    """

    independent: ClassVar[bool] = False

    def __init__(self, config: BPDConfig, hidden_size: int, input_embeddings: nn.Module | None = None):
        super().__init__(config, hidden_size, input_embeddings)
        embedding_size, self.embedding_vocab = self.token_embedding_shape(input_embeddings, "recurrent")
        state_size = config.head_hidden_size or hidden_size
        for k in range(self.num_heads):
            self.add_module(
                str(k),
                RecurrentHead(
                    hidden_size,
                    embedding_size,
                    state_size,
                    config.head_num_layers,
                    k == 0,
                    getattr(config, "head_intermediate_size", None),
                ),
            )

    def embed(self, tokens: torch.LongTensor) -> torch.Tensor:
        """`E(tokens)` over the base model's *whole* input vocabulary (a draft vocabulary restricts outputs only)."""
        vocab = self.embedding_vocab
        if vocab is not None and tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab):
            raise ValueError(
                f"head_type='recurrent' heads read base-vocabulary token ids in [0, {vocab}) (the committed token and "
                f"the draft path), got ids in [{int(tokens.min())}, {int(tokens.max())}]. Pass base ids, not "
                "draft-vocabulary indices (`model.draft_token_map[i]` maps them back) nor -100 labels."
            )
        return super().embed(tokens).to(self[0].token_proj.weight.dtype)

    def step(
        self, hidden: torch.Tensor, tokens: torch.LongTensor, state: torch.Tensor | None, depth: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        One drafting step: the state of draft token `depth + 2` given the state after the path so far.

        Args:
            hidden (`torch.Tensor` of shape `(..., d)`): `h_t`.
            tokens (`torch.LongTensor` of shape `(...)`): `x_{t+1+depth}`, the path's last token (base ids).
            state (`torch.Tensor` of shape `(..., s)`, *optional*): what the previous step returned (`None` at
                `depth = 0`).
            depth (`int`): `k`, in `[0, h)`.
        Returns:
            `(output, state)`: `(..., d)` to project to the vocabulary, and the state to pass to step `depth + 1`.
        """
        if not 0 <= depth < self.num_heads:
            raise ValueError(f"depth must be in [0, {self.num_heads}), got {depth}.")
        return self[depth](hidden, self.embed(tokens), state)

    def forward(self, hidden: torch.Tensor, prev_tokens: torch.LongTensor | None = None) -> torch.Tensor:
        """
        Args:
            hidden (`torch.Tensor` of shape `(..., d)`): `h_t`.
            prev_tokens (`torch.LongTensor` of shape `(..., k)`): `x_{t+1..t+k}`, `k <= h` (base ids).
        Returns:
            `torch.Tensor` of shape `(..., k, d)`: output `j` scores `x_{t+2+j}` given `x_{t+1..t+1+j}`.
        """
        if prev_tokens is None:
            raise ValueError("head_type='recurrent' heads need `prev_tokens` (the tokens after each position).")
        k = prev_tokens.shape[-1]
        if k > self.num_heads:
            raise ValueError(f"prev_tokens holds {k} tokens per position; these heads read at most {self.num_heads}.")
        embedded = self.embed(prev_tokens)  # (..., k, e): one lookup for the whole path
        outputs, state = [], None
        for j in range(k):
            out, state = self[j](hidden, embedded[..., j, :], state)
            outputs.append(out)
        return torch.stack(outputs, dim=-2) if outputs else hidden.new_zeros(*hidden.shape[:-1], 0, hidden.shape[-1])


def step_logits(
    model: nn.Module,
    hidden: torch.Tensor,
    tokens: torch.LongTensor,
    state: torch.Tensor | None,
    depth: int,
    full_vocab: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    [`RecurrentHeads.step`] projected like `BPDForCausalLM.draft_logits` (shared or own projection, draft vocabulary).

    Returns:
        `(logits, state)`: `(..., V)` (or `(..., K)` compact) scores of draft token `depth + 2`, and `s_depth`.
    """
    out, state = model.heads.step(hidden, tokens, state, depth)
    if model.config.share_lm_head:
        weight, bias = model._draft_projection()
        logits = nn.functional.linear(out, weight, bias)
    else:
        logits = model.draft_lm_heads[depth](out)
    return (model._to_full_vocab(logits) if full_vocab else logits), state


class PathStates:
    """
    The recurrent states of the paths a search has scored at one decode step, so that scoring a node's children
    costs one [`RecurrentHeads.step`] per path whatever its depth (a greedy chain of `h` tokens: `h` steps, never
    `h (h + 1) / 2`). Searches expand depth by depth: a path of depth `d` finds its parent (same row, same first
    `d - 1` tokens) among the paths already scored at depth `d - 1`; one that does not is recomputed from the root.

    Args:
        model ([`BPDForCausalLM`]): with [`RecurrentHeads`].
        hidden (`torch.Tensor` of shape `(batch, d)`): `h_t` of each row.
        last_tokens (`torch.LongTensor` of shape `(batch,)`): `x_{t+1}`, each row's last committed token.
    """

    def __init__(self, model: nn.Module, hidden: torch.Tensor, last_tokens: torch.LongTensor):
        self.model, self.hidden, self.last_tokens = model, hidden, last_tokens
        self.levels: dict[int, tuple[torch.LongTensor, torch.LongTensor, torch.Tensor]] = {}  # depth -> rows, paths, s

    def logits(self, paths: torch.LongTensor, rows: torch.LongTensor, full_vocab: bool = True) -> torch.Tensor:
        """
        Args:
            paths (`torch.LongTensor` of shape `(N, d)`): draft tokens after `x_{t+1}`.
            rows (`torch.LongTensor` of shape `(N,)`): the row of each path.
            full_vocab (`bool`): `(N, V)` base-vocabulary scores, or `(N, K)` over the draft vocabulary.
        Returns:
            `(N, V)` (or `(N, K)`): the scores of the token after each path.
        """
        depth = paths.shape[1]
        rows = rows.to(self.hidden.device)
        paths = paths.to(self.hidden.device)
        if depth == 0:
            state, token = None, self.last_tokens[rows]
        else:
            state, token = self._parent_states(paths, rows), paths[:, -1]
        logits, state = step_logits(self.model, self.hidden[rows], token, state, depth, full_vocab=full_vocab)
        previous = self.levels.get(depth)
        if previous is not None:
            rows, paths, state = (torch.cat([a, b]) for a, b in zip(previous, (rows, paths, state)))
        self.levels[depth] = (rows, paths, state)
        return logits

    def _parent_states(self, paths: torch.LongTensor, rows: torch.LongTensor) -> torch.Tensor:
        """`s_{d-1}` of each path's parent `(N, s)`: looked up, else recomputed from the root."""
        depth = paths.shape[1]
        level = self.levels.get(depth - 1)
        if level is not None:
            level_rows, level_paths, level_states = level
            same = (rows[:, None] == level_rows[None]) & (paths[:, None, :-1] == level_paths[None]).all(-1)
            if bool(same.any(1).all()):
                return level_states[same.float().argmax(1)]
        heads, hidden = self.model.heads, self.hidden[rows]
        state, token = None, self.last_tokens[rows]
        for j in range(depth):  # the path's states from the root (a caller that skipped a depth)
            state = heads[j](hidden, heads.embed(token), state)[1]
            token = paths[:, j]
        return state
