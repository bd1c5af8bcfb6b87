"""
Draft heads that attend over the whole committed context, EAGLE style: `head_type="context"`.

EAGLE (Li et al. 2024, "Speculative Sampling Requires Rethinking Feature Uncertainty", section 4) drafts with one
transformer decoder layer over the base model's own features: at position `t` it reads

    u_t = fc([h_t ; E(x_{t+1})])                       (h_t: the base's last hidden state, E: its input embedding)
    f_t = Decoder(u_{<= t})                            (causal self-attention over every committed position)
    logits of x_{t+2} = lm_head(f_t)                   (the model's shared, draft-vocabulary projection)

and drafts further tokens by feeding its own output back: the next draft position reads `fc([f_t ; E(x̂_{t+2})])`
and attends to the committed positions and the draft positions on its own path. EAGLE-3 (Li et al. 2025, "Scaling
up Inference Acceleration of Large Language Models via Training-Time Test", section 3) trains those later depths as
they run ("training-time test"): depth `j + 1` queries sit at position `t + j`, read depth `j`'s output and attend
to the real positions `<= t` and the depth-`1..j` queries of the same `t`. [`ContextHeads.forward`] is exactly that
over a sequence, so the library's per-depth loss (`draft_head_loss`) trains output `j` against `x_{t+2+j}` like any
token-conditioned head, teacher-forced on the real tokens.

Why attention over the context, where the other head types read `h_t` alone: a probe of this architecture on
SmolLM2-135M (`bench/probe_context_head.py`, with EAGLE's feature loss besides; BENCHMARKS.md, "Attention over the
context") gave first-draft top-1 0.68 on the validation answers against 0.52-0.56 for the best `h_t`-only heads
trained on the same data.

The decoder layers are transformers' own `LlamaModel` (sized from the base: `head_num_layers` layers, inner width
`head_intermediate_size` (default `8d/3`, Llama's ratio), `head_num_attention_heads` heads of which
`head_num_key_value_heads` carry keys and values), fed `inputs_embeds`, a 4D boolean mask and position ids, with a
transformers `DynamicCache` at decode time: the layer is wrapped, never re-implemented.

Decoding keeps a [`ContextCache`] per `generate` call (the loop builds and feeds it): the layer's keys and values
over every committed pair `(h_s, x_{s+1})`, rows of a batch at their own positions (padding and the holes of rows
that committed fewer tokens are masked, as in the base model's own cache). At each step [`ContextPathStates`] scores
draft nodes depth by depth, each node one query that sees its row's committed slots and its own ancestors; the
queries are dropped again (the cache is cropped) before the next step's committed pairs are appended.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn
from transformers import DynamicCache, LlamaConfig, LlamaModel

from .heads import DraftHeads

if TYPE_CHECKING:
    from .configuration_bpd import BPDConfig


def _attention_heads(hidden_size: int) -> int:
    """The default head count: 64-wide heads (Llama's), the largest count up to `d / 64` that divides `d`."""
    count = max(1, hidden_size // 64)
    while hidden_size % count:
        count -= 1
    return count


def layer_config(config: BPDConfig, hidden_size: int) -> LlamaConfig:
    """The transformers `LlamaConfig` of the context heads' decoder layers (see the module doc)."""
    heads = config.head_num_attention_heads or _attention_heads(hidden_size)
    kv_heads = config.head_num_key_value_heads or heads
    if hidden_size % heads or heads % kv_heads:
        raise ValueError(
            f"head_type='context': head_num_attention_heads ({heads}) must divide the hidden size ({hidden_size}) and "
            f"be a multiple of head_num_key_value_heads ({kv_heads})."
        )
    inner = config.head_intermediate_size or int(round(8 * hidden_size / 3))
    return LlamaConfig(
        vocab_size=1,  # the layers are fed `inputs_embeds`; LlamaModel's own embedding (one row) is never read
        hidden_size=hidden_size,
        intermediate_size=inner,
        num_hidden_layers=config.head_num_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=1 << 20,  # rotary positions are computed, not tabled: no limit of their own
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        attn_implementation="sdpa",  # `attend` passes additive 4D masks; flash kernels would ignore them
    )


class ContextHeads(DraftHeads):
    """
    `head_type="context"`: one shared stack of decoder layers drafting `h` tokens deep (see the module doc). Needs
    the base model's input embedding.

    Attributes:
        reads_context (`bool`, class attribute): the decode loop keeps a context of the committed prefix for these
            heads: `new_context(batch, device)` at the prefill, `append(hidden, tokens, valid)` with the pairs each
            step commits, and `path_states(model, context, last_tokens)` to score draft paths (a head kind that
            reads the context implements these three; nothing in the loop names the kind).
    """

    independent: ClassVar[bool] = False
    reads_context: ClassVar[bool] = True

    def __init__(self, config: BPDConfig, hidden_size: int, input_embeddings: nn.Module | None = None):
        super().__init__(config, hidden_size, input_embeddings)
        embedding_size, self.embedding_vocab = self.token_embedding_shape(input_embeddings, "context")
        self.layer_config = layer_config(config, hidden_size)
        self.fc = nn.Linear(hidden_size + embedding_size, hidden_size, bias=False)
        self.layers = LlamaModel(self.layer_config)
        self.layers.embed_tokens.requires_grad_(False)  # never read (inputs_embeds); kept only as LlamaModel has it

    # ------------------------------------------------------------------ pieces
    def embed(self, tokens: torch.LongTensor) -> torch.Tensor:
        """`E(tokens)` over the base model's whole input vocabulary, in the heads' dtype."""
        vocab = self.embedding_vocab
        if vocab is not None and tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab):
            raise ValueError(
                f"head_type='context' heads read base-vocabulary token ids in [0, {vocab}), got ids in "
                f"[{int(tokens.min())}, {int(tokens.max())}]: pass base ids, not draft-vocabulary indices nor -100."
            )
        return super().embed(tokens).to(self.fc.weight.dtype)

    def fuse(self, features: torch.Tensor, tokens: torch.LongTensor, checked: bool = True) -> torch.Tensor:
        """`fc([features ; E(tokens)])`: `(..., d)` and `(...)` -> `(..., d)`, the layers' input. `checked=False`
        skips the token-range check (two host syncs): the decode loop's tokens are base ids already."""
        embedded = self.embed(tokens) if checked else DraftHeads.embed(self, tokens).to(self.fc.weight.dtype)
        return self.fc(torch.cat([features.to(self.fc.weight.dtype), embedded], dim=-1))

    def attend(
        self, inputs: torch.Tensor, mask: torch.BoolTensor | None, positions: torch.LongTensor, cache: DynamicCache
    ) -> torch.Tensor:
        """
        The decoder layers over new positions, appended to `cache`.

        Args:
            inputs (`torch.Tensor` of shape `(B, n, d)`): fused inputs of the new positions.
            mask (`torch.BoolTensor` of shape `(B, 1, n, S + n)`, *optional*): True where a new position attends
                (the `S` slots already cached, then the new ones), passed on as an additive mask; None: every cached
                slot and causal over the new positions (transformers' own causal mask).
            positions (`torch.LongTensor` of shape `(B, n)`): rotary position of each new position.
            cache (`DynamicCache`): the layers' keys and values; grows by `n` slots.
        Returns:
            `torch.Tensor` of shape `(B, n, d)`: the outputs (after the stack's final norm), projected to the draft
            vocabulary by the model.
        """
        if mask is not None:  # additive: sdpa and eager both read it so (eager would add a boolean mask as 0/1)
            mask = torch.zeros(mask.shape, dtype=inputs.dtype, device=inputs.device).masked_fill(
                ~mask, torch.finfo(inputs.dtype).min
            )
        out = self.layers(
            inputs_embeds=inputs, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True
        )
        return out.last_hidden_state

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.layer_config)

    # ------------------------------------------------------------------ the decode loop's side (`reads_context`)
    def new_context(self, batch_size: int, device: torch.device) -> ContextCache:
        """An empty [`ContextCache`] for one `generate` call (the loop appends the committed pairs)."""
        return ContextCache(self, batch_size, device)

    def path_states(self, model: nn.Module, context: ContextCache, last_tokens: torch.LongTensor) -> ContextPathStates:
        """What `ctx.path_logits` scores draft paths with at one step (see [`ContextPathStates`])."""
        return ContextPathStates(model, context, last_tokens)

    # ------------------------------------------------------------------ training (teacher forcing)
    def forward(self, hidden: torch.Tensor, prev_tokens: torch.LongTensor | None = None) -> torch.Tensor:
        """
        Every depth at every position of whole sequences, as they run at decode time (training-time test).

        Args:
            hidden (`torch.Tensor` of shape `(B, T, d)`): the base model's last hidden states of whole sequences
                (right padding: a position never attends to a later one).
            prev_tokens (`torch.LongTensor` of shape `(B, T, k)`): `x_{t+1..t+k}` after each position, `k <= h`
                (`hf_bpd.heads.teacher_tokens`; base ids).
        Returns:
            `torch.Tensor` of shape `(B, T, k, d)`: output `j` at position `t` scores `x_{t+2+j}` given the real
            positions `<= t` and `x_{t+1..t+1+j}` (its own outputs of depths `< j` in between, as in drafting).
        Raises:
            `ValueError` without `prev_tokens`, or for a `hidden` without a sequence dimension (these heads attend
            over the positions before each one: score paths with a [`ContextCache`] instead).
        """
        if prev_tokens is None:
            raise ValueError("head_type='context' heads need `prev_tokens` (the tokens after each position).")
        if hidden.dim() != 3 or prev_tokens.shape[:2] != hidden.shape[:2]:
            raise ValueError(
                f"head_type='context' heads attend over whole sequences: hidden must be (batch, seq_len, d) with "
                f"prev_tokens (batch, seq_len, k), got {tuple(hidden.shape)} and {tuple(prev_tokens.shape)}; at decode "
                "time they draft through the loop's ContextCache (ctx.path_logits)."
            )
        k = prev_tokens.shape[-1]
        if k > self.num_heads:
            raise ValueError(f"prev_tokens holds {k} tokens per position; these heads draft at most {self.num_heads}.")
        batch, length = hidden.shape[:2]
        device = hidden.device
        cache = self.new_cache()
        positions = torch.arange(length, device=device).expand(batch, -1)
        features = self.attend(self.fuse(hidden, prev_tokens[..., 0]), None, positions, cache)
        outputs = [features]
        real = positions[0][:, None] >= positions[0][None, :]  # (T, T) causal over the real positions
        same = torch.eye(length, dtype=torch.bool, device=device)  # a chain query sees its own chain's queries
        for j in range(1, k):  # keys: the real positions, then depths 2..j+1's queries (the cache's order)
            mask = torch.cat([real] + [same] * j, dim=1)[None, None].expand(batch, 1, -1, -1)  # (B, 1, T, (j+1) T)
            features = self.attend(self.fuse(features, prev_tokens[..., j]), mask, positions + j, cache)
            outputs.append(features)
        return torch.stack(outputs, dim=-2)


class ContextCache:
    """
    The context heads' keys and values over one generation's committed pairs `(h_s, x_{s+1})`, for `B` rows at their
    own positions; built and fed by the decode loop ([`ContextHeads`] declare `reads_context`).

    Slots are shared by the batch (one `DynamicCache` length), so a row that committed fewer pairs in a step leaves
    masked holes, and left padding is masked too; positions count each row's own valid pairs, so a row attends
    exactly to its own prefix at its true positions whatever the others did.

    Args:
        heads ([`ContextHeads`]): the heads.
        batch_size (`int`): `B`.
        device (`torch.device`): where the cache lives.
    """

    def __init__(self, heads: ContextHeads, batch_size: int, device: torch.device):
        self.heads = heads
        self.cache = heads.new_cache()
        self.valid = torch.zeros(batch_size, 0, dtype=torch.bool, device=device)  # (B, S) committed slots
        self.count = torch.zeros(batch_size, dtype=torch.long, device=device)  # valid pairs per row
        self.root: torch.Tensor | None = None  # (B, d) output at each row's last pair: scores its next draft
        self.committed = 0  # slots of committed pairs (draft queries after them are cropped at the next append)

    def append(self, hidden: torch.Tensor, tokens: torch.LongTensor, valid: torch.BoolTensor) -> None:
        """
        Add committed pairs: `hidden[b, i]` is the base's last hidden state at the position before
        `tokens[b, i]` (the state that predicted it). Draft queries of the previous step are dropped first.

        Args:
            hidden (`torch.Tensor` of shape `(B, n, d)`), tokens (`torch.LongTensor` of shape `(B, n)`).
            valid (`torch.BoolTensor` of shape `(B, n)`): which entries are pairs of the row (left-aligned or not).
        """
        self.crop()
        if hidden.shape[1] == 0:
            return
        n = hidden.shape[1]
        tokens = torch.where(valid, tokens, 0)
        positions = self.count[:, None] + valid.long().cumsum(1) - 1  # each row's own positions
        new = torch.arange(n, device=valid.device)
        causal = (new[None, :, None] >= new[None, None, :]) & valid[:, None, :]  # (B, n, n)
        causal |= torch.eye(n, dtype=torch.bool, device=valid.device)  # a masked slot sees itself (no empty row)
        mask = torch.cat([self.valid[:, None, :].expand(-1, n, -1), causal], dim=2)[:, None]
        if self.valid.shape[1] == 0 and bool(valid.all()):
            mask = None  # a prompt without padding: plain causal attention (the fast kernel)
        inputs = self.heads.fuse(hidden, tokens, checked=False)
        out = self.heads.attend(inputs, mask, positions.clamp(min=0), self.cache)
        self.valid = torch.cat([self.valid, valid], dim=1)
        self.committed = self.valid.shape[1]
        self.count = self.count + valid.long().sum(1)
        has = valid.any(1)
        last = (valid.long() * (new + 1)).argmax(1)  # index of each row's last valid entry
        newest = out[torch.arange(out.shape[0], device=out.device), last]
        self.root = newest if self.root is None else torch.where(has[:, None], newest, self.root)

    def crop(self) -> None:
        """Drop the draft queries cached after the committed slots."""
        extra = self.cache.get_seq_length() - self.committed
        if extra > 0:
            self.cache.crop(-extra)  # transformers 5: a negative count removes that many trailing slots


class ContextPathStates:
    """
    The drafting side of a [`ContextCache`] at one step (what `DraftHeadsView.path_states` gives for context heads):
    each draft node is one query at its row's next positions, attending to the row's committed slots and to the
    nodes on its own path, so scoring a node's children costs one query per child whatever its depth. Searches expand
    depth by depth; a path whose parent was not scored this step has its ancestors scored first.

    Args:
        model ([`BPDForCausalLM`]): with [`ContextHeads`].
        context ([`ContextCache`]): the generation's cache, up to date with the committed tokens.
        last_tokens (`torch.LongTensor` of shape `(B,)`): each row's last committed token (the interface's; the
            cache already holds it, in each row's last pair).
    """

    def __init__(self, model: nn.Module, context: ContextCache, last_tokens: torch.LongTensor):
        if context.root is None:
            raise ValueError("The context cache holds no committed pair yet: feed it the prompt first.")
        context.crop()
        self.model, self.context, self.last_tokens = model, context, last_tokens
        # depth -> (rows (N,), paths (N, depth), slots (N,) in the cache, visible draft slots (N, S_draft), f (N, d))
        self.levels: dict[int, tuple[torch.Tensor, ...]] = {}

    def logits(self, paths: torch.LongTensor, rows: torch.LongTensor, full_vocab: bool = True) -> torch.Tensor:
        """
        Args:
            paths (`torch.LongTensor` of shape `(N, depth)`): draft tokens after each row's last committed token.
            rows (`torch.LongTensor` of shape `(N,)`): the row of each path.
            full_vocab (`bool`): `(N, V)` base-vocabulary scores, or `(N, K)` over the draft vocabulary.
        Returns:
            `(N, V)` (or `(N, K)`): the scores of the token after each path.
        """
        return project(self.model, self.features(paths, rows), full_vocab, paths.shape[1])

    def features(self, paths: torch.LongTensor, rows: torch.LongTensor) -> torch.Tensor:
        """The heads' output `(N, d)` after each path (depth 0: the root's, computed when the pairs were added)."""
        context = self.context
        device = context.valid.device
        rows, paths = rows.to(device), paths.to(device)
        depth = paths.shape[1]
        if depth == 0:
            return context.root[rows]
        parent_features, parent_slots, parent_seen = self._parents(paths, rows)
        heads, cache = self.model.heads, context.cache
        batch, start = context.valid.shape[0], cache.get_seq_length()
        # one query per node, grouped by row: (B, m) with m the most nodes of one row (the rest masked dummies)
        order = torch.argsort(rows, stable=True)
        per_row = torch.bincount(rows, minlength=batch)
        width = int(per_row.max())
        offset = torch.cumsum(per_row, 0) - per_row
        column = torch.empty_like(rows)
        column[order] = torch.arange(rows.numel(), device=device) - offset[rows[order]]
        inputs = heads.fuse(parent_features, paths[:, -1], checked=False)
        grid = inputs.new_zeros(batch, width, inputs.shape[-1])
        grid[rows, column] = inputs
        draft = start - context.committed  # draft slots already cached this step
        seen = torch.zeros(batch, width, draft + width, dtype=torch.bool, device=device)
        seen[rows, column, :draft] = parent_seen
        if parent_slots is not None:
            seen[rows, column, parent_slots] = True
        seen[:, torch.arange(width, device=device), draft + torch.arange(width, device=device)] = True  # itself
        mask = torch.cat([context.valid[:, None, :].expand(-1, width, -1), seen], dim=2)[:, None]
        positions = (context.count - 1 + depth)[:, None].expand(-1, width)
        out = heads.attend(grid, mask, positions, cache)[rows, column]  # (N, d)
        slots = draft + column  # each node's slot among this step's draft slots
        visible = seen[rows, column]  # (N, draft + width): its ancestors' slots and its own
        level = (rows, paths, slots, visible, out)
        previous = self.levels.get(depth)
        if previous is not None:
            level = _concat_levels(previous, level)
        self.levels[depth] = level
        return out

    def _parents(
        self, paths: torch.LongTensor, rows: torch.LongTensor
    ) -> tuple[torch.Tensor, torch.LongTensor | None, torch.BoolTensor]:
        """Each path's parent: its output `(N, d)`, its draft slot `(N,)` (None at depth 1: the root is committed)
        and the draft slots it sees `(N, S_draft)`, scored first when the search skipped it."""
        depth = paths.shape[1]
        draft = self.context.cache.get_seq_length() - self.context.committed
        if depth == 1:
            empty = torch.zeros(rows.numel(), draft, dtype=torch.bool, device=rows.device)
            return self.context.root[rows], None, empty
        index = self._lookup(paths, rows)
        if index is None:  # not scored yet at this step: score the parents (which registers them), then look again
            self.features(paths[:, :-1], rows)
            index = self._lookup(paths, rows)
            draft = self.context.cache.get_seq_length() - self.context.committed
        _, _, slots, visible, out = self.levels[depth - 1]
        seen = nn.functional.pad(visible[index], (0, draft - visible.shape[1]))
        return out[index], slots[index], seen

    def _lookup(self, paths: torch.LongTensor, rows: torch.LongTensor) -> torch.LongTensor | None:
        level = self.levels.get(paths.shape[1] - 1)
        if level is None:
            return None
        level_rows, level_paths = level[0], level[1]
        same = (rows[:, None] == level_rows[None]) & (paths[:, None, :-1] == level_paths[None]).all(-1)
        if not bool(same.any(1).all()):
            return None
        return same.float().argmax(1)


def _concat_levels(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Two batches of nodes of one depth; their visibility rows padded to the same number of draft slots."""
    width = max(a[3].shape[1], b[3].shape[1])
    va = nn.functional.pad(a[3], (0, width - a[3].shape[1]))
    vb = nn.functional.pad(b[3], (0, width - b[3].shape[1]))
    return (
        torch.cat([a[0], b[0]]),
        torch.cat([a[1], b[1]]),
        torch.cat([a[2], b[2]]),
        torch.cat([va, vb]),
        torch.cat([a[4], b[4]]),
    )


def project(model: nn.Module, features: torch.Tensor, full_vocab: bool, depth: int) -> torch.Tensor:
    """Head outputs `(..., d)` to draft logits, as `BPDForCausalLM.draft_logits` projects (shared or own)."""
    if model.config.share_lm_head:
        weight, bias = model._draft_projection()
        logits = nn.functional.linear(features, weight, bias)
    else:
        logits = model.draft_lm_heads[depth](features)
    return model._to_full_vocab(logits) if full_vocab else logits
