"""`BPDForCausalLM`: any Hugging Face causal LM plus `h` draft heads, saved and loaded heads-only."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .configuration_bpd import BPDConfig
from .generation import BPDGenerationMixin
from .heads import HEAD_TYPES, DraftHeads, FFNBlock, LoRABlock, ResBlock, build_head, build_heads, teacher_tokens
from .losses import draft_head_loss, greedy_targets
from .saving import (
    ADAPTER_SUBFOLDER,
    BASE_SUBFOLDER,
    GENERATION_CONFIG_NAME,
    HEADS_WEIGHTS_NAME,
    HeadsSavingMixin,
    load_base_model,
    tokenizer_source,
)

logger = logging.getLogger(__name__)

__all__ = [  # the head blocks and the saving names keep importing from here
    "ADAPTER_SUBFOLDER",
    "BASE_SUBFOLDER",
    "BPDCausalLMOutput",
    "BPDForCausalLM",
    "DraftHeads",
    "FFNBlock",
    "GENERATION_CONFIG_NAME",
    "HEADS_WEIGHTS_NAME",
    "HEAD_TYPES",
    "LoRABlock",
    "ResBlock",
    "build_head",
    "tokenizer_source",
]


@dataclass
class BPDCausalLMOutput(ModelOutput):
    """
    Output of [`BPDForCausalLM.forward`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*): mean draft-head cross-entropy (when `labels` given).
        head_losses (`torch.FloatTensor` of shape `(num_draft_heads,)`, *optional*): per-head cross-entropy.
        base_loss (`torch.FloatTensor` of shape `()`, *optional*): the base model's own LM loss (when `labels` given).
        logits (`torch.FloatTensor` of shape `(batch, seq_len, vocab)`): the base model's next-token logits.
        draft_logits (`torch.FloatTensor` of shape `(batch, seq_len, num_draft_heads, vocab)`, *optional*):
            `draft_logits[:, t, i]` predicts token `t + 2 + i` (head `i + 1`), i.e. the token after the base
            model's next token and `i` further.
        hidden_states (`torch.FloatTensor` of shape `(batch, seq_len, hidden)`): the base model's last hidden state.
        cache: the KV cache returned by the base model.
    """

    loss: torch.FloatTensor | None = None
    head_losses: torch.FloatTensor | None = None
    base_loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    draft_logits: torch.FloatTensor | None = None
    hidden_states: torch.FloatTensor | None = None
    cache: Any = None


# --------------------------------------------------------------------------------------------- model
class BPDForCausalLM(HeadsSavingMixin, PreTrainedModel, BPDGenerationMixin):
    """
    Wraps any `AutoModelForCausalLM` (kept unchanged, no copied modeling code) and adds `h` draft heads.

    `generate(..., use_bpd=True)` decodes blockwise (draft -> verify -> accept) and returns exactly what the base
    model's own `generate` returns; without `use_bpd` it *is* the base model's `generate`.
    """

    config_class = BPDConfig
    base_model_prefix = "base"
    supports_gradient_checkpointing = True
    _supports_cache_class = True

    def __init__(self, config: BPDConfig, base_model: PreTrainedModel | None = None):
        super().__init__(config)
        if base_model is None:
            if not config.base_model_name_or_path:
                raise ValueError(
                    "BPDForCausalLM needs a base model: pass `base_model=` or set `config.base_model_name_or_path`."
                )
            base_model = load_base_model(config.base_model_name_or_path)
        base_cfg = base_model.config
        hidden_size = _base_hidden_size(base_cfg)
        vocab_size = base_model.get_output_embeddings().weight.shape[0]
        _check_base_matches(config, hidden_size, vocab_size)
        config.base_hidden_size, config.base_vocab_size = hidden_size, vocab_size
        config.base_model_type = getattr(base_cfg, "model_type", None)

        if config.draft_vocab_size is not None and config.draft_vocab_size > vocab_size:
            raise ValueError(
                f"draft_vocab_size={config.draft_vocab_size} exceeds the base model's vocabulary ({vocab_size})."
            )
        out_size = config.draft_vocab_size or vocab_size
        self.heads: DraftHeads = build_heads(config, hidden_size, base_model.get_input_embeddings())
        if not config.share_lm_head:
            self.draft_lm_heads = nn.ModuleList(
                [nn.Linear(hidden_size, out_size, bias=False) for _ in range(config.num_draft_heads)]
            )
        # Initialise the heads *before* the base is attached: v5's post_init walks every child module and must
        # never touch the (pretrained) base weights.
        self.post_init()
        # The draft vocabulary: head output j is base token `draft_token_map[j]` (saved with the heads; set it with
        # `set_draft_vocab`). Without one, the heads score the full vocabulary and no map exists. Two derived,
        # unsaved buffers follow the map (refreshed by `set_draft_vocab` and after `load_state_dict`): the inverse
        # map and, for a frozen shared `lm_head`, its rows of the draft vocabulary.
        self.draft_token_map: torch.LongTensor | None
        self.draft_inverse_map: torch.LongTensor | None
        self.draft_projection_rows: torch.Tensor | None
        self.draft_projection_bias: torch.Tensor | None
        if config.draft_vocab_size is None:
            self.draft_token_map = self.draft_inverse_map = None
            self.draft_projection_rows = self.draft_projection_bias = None
        else:
            device = base_model.device
            self.register_buffer("draft_token_map", torch.arange(out_size, device=device), persistent=True)
            self.register_buffer(
                "draft_inverse_map", torch.empty(vocab_size, dtype=torch.long, device=device), persistent=False
            )
            self.register_buffer("draft_projection_rows", None, persistent=False)
            self.register_buffer("draft_projection_bias", None, persistent=False)
            self.register_load_state_dict_post_hook(lambda module, keys: module._refresh_draft_vocab())
        self.base = base_model
        self._refresh_draft_vocab()
        if not config.share_lm_head:
            self._copy_output_rows_into_draft_projections()
        self.heads.to(device=base_model.device, dtype=base_model.dtype)
        if not config.share_lm_head:
            self.draft_lm_heads.to(device=base_model.device, dtype=base_model.dtype)
        # One generation config, shared with the base: `generate` without `use_bpd` is the base's own.
        self.generation_config = base_model.generation_config
        if config.freeze_base:
            self.freeze_base()

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_base(cls, base: PreTrainedModel | str | os.PathLike, **config_kwargs: Any) -> BPDForCausalLM:
        """
        Wrap a base model with fresh draft heads.

        Args:
            base (`PreTrainedModel` or `str`): a causal LM instance, or a name/path for `AutoModelForCausalLM`.
            config_kwargs: fields of [`BPDConfig`] (`num_draft_heads`, `head_type`, ...).
        """
        if isinstance(base, (str, os.PathLike)):
            config_kwargs.setdefault("base_model_name_or_path", str(base))
            local = Path(base).expanduser()  # a local folder is loaded by its absolute path (see `_base_reference`)
            base = load_base_model(str(local.resolve()) if local.is_dir() else str(base))
        elif not isinstance(base, PreTrainedModel) and not hasattr(base, "get_output_embeddings"):
            raise ValueError(f"`base` must be a causal LM or a name/path, got {type(base).__name__}.")
        config_kwargs.setdefault("base_model_name_or_path", getattr(base.config, "_name_or_path", None) or None)
        return cls(BPDConfig(**config_kwargs), base_model=base)

    def _init_weights(self, module: nn.Module) -> None:
        if not isinstance(module, nn.Linear):
            return
        how = getattr(module, "_bpd_init", "normal")  # own draft projections: replaced by a copy of the lm_head
        if how == "zeros":
            init.zeros_(module.weight)
        elif how == "kaiming":
            init.kaiming_uniform_(module.weight, a=5**0.5)
        else:
            init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            init.zeros_(module.bias)

    def freeze_base(self) -> None:
        """Set `requires_grad=False` on every base parameter (adapters added later by peft are unaffected)."""
        for p in self.base.parameters():
            p.requires_grad_(False)

    def get_input_embeddings(self) -> nn.Module:
        return self.base.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.base.get_output_embeddings()

    @property
    def num_draft_heads(self) -> int:
        return self.config.num_draft_heads

    # ------------------------------------------------------------------ forward
    @property
    def independent_heads(self) -> bool:
        """Whether head `i` reads only the hidden state (`DraftHeads.independent`), not the drafted tokens."""
        return self.heads.independent

    def draft_logits(
        self,
        hidden: torch.Tensor,
        prev_tokens: torch.LongTensor | None = None,
        full_vocab: bool = True,
        num_heads: int | None = None,
    ) -> torch.Tensor:
        """
        Draft-head logits from the base model's last hidden states.

        Args:
            hidden (`torch.Tensor` of shape `(..., hidden)`): last hidden states of the base model.
            prev_tokens (`torch.LongTensor` of shape `(..., k)`, *optional*): for token-conditioned heads
                (`independent_heads` False, required there): `x_{t+1..t+k}`, the last committed token first, then
                the drafted path; independent heads ignore it.
            full_vocab (`bool`, defaults to `True`): with a draft vocabulary (`config.draft_vocab_size = K`), `True`
                returns logits over the whole base vocabulary (tokens outside the draft vocabulary get the dtype's
                lowest finite value, so softmax gives them 0 and log-probabilities stay finite); `False` returns the
                compact `(..., h, K)` logits, column `j` scoring token `draft_token_map[j]`.
            num_heads (`int`, *optional*): independent heads: only the first `num_heads` heads (the others are not
                run; a shallow draft tree needs only its depth's heads).
        Returns:
            `torch.Tensor` of shape `(..., num_draft_heads, vocab)` (`(..., k, vocab)` for token-conditioned heads;
            or `K` columns); index `i` predicts the token `i + 2` positions after the position of `hidden`.
        """
        if prev_tokens is None and not self.heads.independent:
            raise ValueError(
                f"head_type={self.config.head_type!r} heads read the drafted tokens: pass `prev_tokens` (the last "
                "committed token, then the draft path) to `draft_logits`."
            )
        if num_heads is not None and not 1 <= num_heads <= self.config.num_draft_heads:
            raise ValueError(f"num_heads must be in [1, {self.config.num_draft_heads}], got {num_heads}.")
        if num_heads is not None and self.heads.independent:
            states = self.heads.first(hidden, num_heads)  # (..., num_heads, d)
        else:
            states = self.heads(hidden, prev_tokens)  # (..., h or k, d)
        if self.config.share_lm_head:  # one matmul for all heads
            weight, bias = self._draft_projection()
            logits = nn.functional.linear(states, weight, bias)  # (..., h, K or V)
        else:
            logits = torch.stack(
                [proj(states[..., i, :]) for i, proj in zip(range(states.shape[-2]), self.draft_lm_heads)], dim=-2
            )
        return self._to_full_vocab(logits) if full_vocab else logits

    def _to_full_vocab(self, compact: torch.Tensor) -> torch.Tensor:
        """Compact `(..., K)` draft logits -> `(..., V)`; tokens outside the draft vocabulary get the lowest value."""
        if self.draft_token_map is None:
            return compact
        full = compact.new_full((*compact.shape[:-1], self.config.base_vocab_size), torch.finfo(compact.dtype).min)
        return full.scatter_(-1, self.draft_token_map.expand(compact.shape), compact)

    def draft_argmax(self, hidden: torch.Tensor, prev_tokens: torch.LongTensor | None = None) -> torch.LongTensor:
        """The heads' greedy drafts `(..., h)` as base-vocabulary token ids (no full-vocabulary tensor is built)."""
        best = self.draft_logits(hidden, prev_tokens, full_vocab=False).argmax(dim=-1)
        return best if self.draft_token_map is None else self.draft_token_map[best]

    def first_heads(self, num_heads: int) -> BPDForCausalLM:
        """
        A model on the same base (shared, not copied) that keeps the first `num_heads` heads of this one, with the
        same weights and draft vocabulary: choose `h` by measurement after training more heads than needed.
        """
        if not 1 <= num_heads <= self.config.num_draft_heads:
            raise ValueError(f"num_heads must be in [1, {self.config.num_draft_heads}], got {num_heads}.")
        config = BPDConfig.from_dict({**self.config.to_dict(), "num_draft_heads": num_heads})
        smaller = type(self)(config, base_model=self.base)
        keep = {
            k: v
            for k, v in self.heads_state_dict().items()
            if k.split(".")[0] not in ("heads", "draft_lm_heads")
            or not k.split(".")[1].isdigit()  # shared by every depth (context heads' layers)
            or int(k.split(".")[1]) < num_heads
        }
        smaller.load_state_dict(keep, strict=False)
        smaller.generation_config = self.generation_config
        return smaller.train(self.training)

    def _draft_projection(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """
        The shared projection for the heads: the base `lm_head`'s weight (and bias), restricted to the draft
        vocabulary's rows when there is one: the `draft_projection_rows` buffer for a frozen `lm_head`, else
        gathered at each call (so gradients flow and a trained `lm_head` is never read stale).
        """
        emb = self.base.get_output_embeddings()
        weight, bias = emb.weight, getattr(emb, "bias", None)
        token_map = self.draft_token_map
        if token_map is None:
            return weight, bias
        if self.draft_projection_rows is not None and not weight.requires_grad:
            return self.draft_projection_rows, self.draft_projection_bias
        return weight.index_select(0, token_map), None if bias is None else bias.index_select(0, token_map)

    def _refresh_draft_vocab(self) -> None:
        """Recompute the buffers derived from `draft_token_map` (the inverse map, the frozen projection rows)."""
        token_map = self.draft_token_map
        if token_map is None:
            return
        inverse = torch.full_like(self.draft_inverse_map, -1)
        inverse[token_map] = torch.arange(token_map.numel(), device=token_map.device)
        self.draft_inverse_map = inverse
        emb = self.base.get_output_embeddings()
        bias = getattr(emb, "bias", None)
        with torch.no_grad():
            self.draft_projection_rows = emb.weight.index_select(0, token_map.to(emb.weight.device))
            self.draft_projection_bias = None if bias is None else bias.index_select(0, token_map.to(bias.device))

    def set_draft_vocab(self, token_ids: torch.LongTensor | list[int]) -> None:
        """
        Set the draft vocabulary: the `config.draft_vocab_size` base-vocabulary ids the heads predict (e.g. the most
        frequent target tokens of the training data, see [`~hf_bpd.features.draft_vocab_from_counts`]). Own
        projections (`share_lm_head=False`) are re-initialised from the matching `lm_head` rows: call before training.
        """
        if self.draft_token_map is None:
            raise ValueError("This model has no draft vocabulary: create it with `draft_vocab_size=K`.")
        ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
        size, vocab = self.config.draft_vocab_size, self.config.base_vocab_size
        if ids.numel() != size or ids.unique().numel() != size:
            raise ValueError(
                f"set_draft_vocab needs {size} distinct token ids, got {ids.numel()} ({ids.unique().numel()} distinct)."
            )
        if int(ids.min()) < 0 or int(ids.max()) >= vocab:
            raise ValueError(
                f"set_draft_vocab: token ids must lie in [0, {vocab}), got [{int(ids.min())}, {int(ids.max())}]."
            )
        self.draft_token_map.copy_(ids.to(self.draft_token_map.device))
        self._refresh_draft_vocab()
        if not self.config.share_lm_head:
            self._copy_output_rows_into_draft_projections()

    def _copy_output_rows_into_draft_projections(self) -> None:
        weight = self.base.get_output_embeddings().weight
        if self.draft_token_map is not None:
            weight = weight.index_select(0, self.draft_token_map.to(weight.device))
        with torch.no_grad():
            for proj in self.draft_lm_heads:
                proj.weight.copy_(weight)

    def to_draft_ids(self, token_ids: torch.LongTensor, ignore_index: int = -100) -> torch.LongTensor:
        """Base-vocabulary ids -> draft-vocabulary indices; `ignore_index` where a token (or label) is outside it."""
        if self.draft_token_map is None:
            return token_ids
        inverse = self.draft_inverse_map.to(token_ids.device)
        valid = (token_ids >= 0) & (token_ids < inverse.numel())
        mapped = inverse[token_ids.clamp(0, inverse.numel() - 1)]
        return torch.where(valid & (mapped >= 0), mapped, ignore_index)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        return_draft_logits: bool = True,
        base_hidden_states: torch.Tensor | None = None,
        draft_full_vocab: bool = True,
        draft_input_ids: torch.LongTensor | str | None = None,
        **kwargs: Any,
    ) -> BPDCausalLMOutput:
        r"""
        Run the base model and the draft heads.

        Args:
            input_ids (`torch.LongTensor` of shape `(batch, seq_len)`): input tokens.
            labels (`torch.LongTensor` of shape `(batch, seq_len)`, *optional*): the usual causal-LM labels
                (`-100` is ignored); head `i` (0-based) is trained against `labels[:, t + 2 + i]`.
            return_draft_logits (`bool`, defaults to `True`): compute the `(batch, seq_len, h, vocab)` draft logits.
            base_hidden_states (`torch.Tensor` of shape `(batch, seq_len, hidden)`, *optional*): the frozen base
                model's last hidden states, computed earlier (cached features, [`~hf_bpd.features`]); the base is
                not run and `logits` is `None`.
            draft_full_vocab (`bool`, defaults to `True`): with a draft vocabulary, `False` returns compact
                `(..., h, K)` draft logits (see [`draft_logits`]); the loss is always computed in the compact space.
            draft_input_ids (`torch.LongTensor` of shape `(batch, seq_len)` or `"greedy"`, *optional*): token-
                conditioned heads only (teacher forcing): the sequence they read, output `j` at position `t` reading
                entries `t + 1 .. t + 1 + j`; `"greedy"` takes the base model's own greedy next tokens (self-
                distillation, needs the base run). Default: `labels` where set, else `input_ids`.
        Returns:
            [`BPDCausalLMOutput`].
        """
        if base_hidden_states is not None:
            if isinstance(draft_input_ids, str):
                raise ValueError("draft_input_ids='greedy' needs the base model run: pass the greedy tokens instead.")
            return self._heads_forward(
                base_hidden_states, labels, return_draft_logits, draft_full_vocab, input_ids, draft_input_ids
            )
        kwargs.pop("output_hidden_states", None)
        kwargs.pop("return_dict", None)
        out = self.base(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=True,
            return_dict=True,
            **kwargs,
        )
        hidden = out.hidden_states[-1]  # (B, T, d)
        if isinstance(draft_input_ids, str):
            if draft_input_ids != "greedy":
                raise ValueError(f"draft_input_ids must be a tensor or 'greedy', got {draft_input_ids!r}.")
            draft_input_ids = greedy_targets(out.logits.detach(), labels)
        result = self._heads_forward(hidden, labels, return_draft_logits, draft_full_vocab, input_ids, draft_input_ids)
        if labels is not None:
            result.base_loss = nn.functional.cross_entropy(
                out.logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        result.logits, result.cache = out.logits, getattr(out, "cache", None)
        return result

    def _heads_forward(
        self,
        hidden: torch.Tensor,
        labels: torch.LongTensor | None,
        return_draft_logits: bool,
        full_vocab: bool,
        input_ids: torch.LongTensor | None = None,
        draft_input_ids: torch.LongTensor | None = None,
    ) -> BPDCausalLMOutput:
        """Draft logits (and with `labels` the heads' loss, in the compact draft space) from last hidden states."""
        hidden = hidden.to(next(self.heads.parameters()).dtype)  # cached features may be stored in another dtype
        loss = head_losses = None
        compact = None
        if return_draft_logits or labels is not None:
            prev = None if self.heads.independent else self._teacher_tokens(labels, input_ids, draft_input_ids)
            compact = self.draft_logits(hidden, prev, full_vocab=False)
        if labels is not None:
            loss, head_losses = draft_head_loss(compact, self.to_draft_ids(labels))
        draft = self._to_full_vocab(compact) if (return_draft_logits and full_vocab) else compact
        return BPDCausalLMOutput(
            loss=loss,
            head_losses=head_losses,
            draft_logits=draft if return_draft_logits else None,
            hidden_states=hidden,
        )

    def _teacher_tokens(
        self,
        labels: torch.LongTensor | None,
        input_ids: torch.LongTensor | None,
        draft_input_ids: torch.LongTensor | None = None,
    ) -> torch.LongTensor:
        """Teacher forcing for token-conditioned heads: `(B, T, h)` tokens after each position (see `teacher_tokens`):
        `draft_input_ids`, else the labels, with the input ids where a label is masked (`-100`)."""
        if draft_input_ids is not None:
            if input_ids is not None and input_ids.shape == draft_input_ids.shape:
                draft_input_ids = torch.where(draft_input_ids >= 0, draft_input_ids, input_ids)
            return teacher_tokens(draft_input_ids, self.config.num_draft_heads)
        if labels is None and input_ids is None:
            raise ValueError(
                f"head_type={self.config.head_type!r} heads read the tokens after each position: pass `labels` (or "
                "`input_ids`) with `base_hidden_states`."
            )
        tokens = labels if labels is not None else input_ids
        if labels is not None and input_ids is not None and input_ids.shape == labels.shape:
            tokens = torch.where(labels >= 0, labels, input_ids)
        return teacher_tokens(tokens, self.config.num_draft_heads)


# --------------------------------------------------------------------------------------------- helpers
def _base_hidden_size(config: Any) -> int:
    for name in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    text_config = getattr(config, "get_text_config", lambda: None)()
    if text_config is not None and text_config is not config:
        return _base_hidden_size(text_config)
    raise ValueError(f"Cannot find the hidden size of base model config {type(config).__name__}.")


def _check_base_matches(config: BPDConfig, hidden_size: int, vocab_size: int) -> None:
    for field, value in (("base_hidden_size", hidden_size), ("base_vocab_size", vocab_size)):
        recorded = getattr(config, field)
        if recorded is not None and recorded != value:
            raise ValueError(
                f"These draft heads were made for a base model with {field}={recorded}, but the base model has "
                f"{value}. Load them onto the base model they were trained for (config.base_model_name_or_path="
                f"{config.base_model_name_or_path!r})."
            )
