"""`BPDForCausalLM`: any Hugging Face causal LM plus `h` draft heads, saved and loaded heads-only."""

from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import GenerationConfig, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .configuration_bpd import BPDConfig
from .generation import BPDGenerationMixin
from .losses import draft_head_loss
from .smollm2 import OFFLINE_HUB_IDS, resolve_base_model
from .model_card import adapter_config_of, write_model_card

logger = logging.getLogger(__name__)

HEADS_WEIGHTS_NAME = "bpd_heads.safetensors"
BASE_SUBFOLDER = "base"
ADAPTER_SUBFOLDER = "adapter"
GENERATION_CONFIG_NAME = "generation_config.json"


# --------------------------------------------------------------------------------------------- heads
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


def build_head(config: BPDConfig, hidden_size: int) -> nn.Sequential:
    """One draft head: `config.head_num_layers` fresh blocks (a comprehension, never `[block] * n`)."""
    if config.head_type == "resblock":
        blocks = [ResBlock(hidden_size) for _ in range(config.head_num_layers)]
    elif config.head_type == "ffn":
        inner = config.head_hidden_size or hidden_size
        blocks = [FFNBlock(hidden_size, inner) for _ in range(config.head_num_layers)]
    else:
        blocks = [LoRABlock(hidden_size, config.head_rank) for _ in range(config.head_num_layers)]
    return nn.Sequential(*blocks)


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
class BPDForCausalLM(PreTrainedModel, BPDGenerationMixin):
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
            base_model = resolve_base_model(config.base_model_name_or_path)
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
        self.heads = nn.ModuleList([build_head(config, hidden_size) for _ in range(config.num_draft_heads)])
        if not config.share_lm_head:
            self.draft_lm_heads = nn.ModuleList(
                [nn.Linear(hidden_size, out_size, bias=False) for _ in range(config.num_draft_heads)]
            )
        # Initialise the heads *before* the base is attached: v5's post_init walks every child module and must
        # never touch the (pretrained) base weights.
        self.post_init()
        # The draft vocabulary: head output j is base token `draft_token_map[j]` (saved with the heads; set it with
        # `set_draft_vocab`). Without one, the heads score the full vocabulary and no map exists.
        self.draft_token_map: torch.LongTensor | None
        if config.draft_vocab_size is None:
            self.draft_token_map = None
        else:
            self.register_buffer("draft_token_map", torch.arange(out_size, device=base_model.device), persistent=True)
        self._projection_cache: tuple[Any, ...] | None = None
        self._inverse_cache: tuple[Any, ...] | None = None
        self.base = base_model
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
    def from_base(cls, base: PreTrainedModel | str | os.PathLike, **config_kwargs: Any) -> "BPDForCausalLM":
        """
        Wrap a base model with fresh draft heads.

        Args:
            base (`PreTrainedModel` or `str`): a causal LM instance, or a name/path for `AutoModelForCausalLM`.
            config_kwargs: fields of [`BPDConfig`] (`num_draft_heads`, `head_type`, ...).
        """
        if isinstance(base, (str, os.PathLike)):
            config_kwargs.setdefault("base_model_name_or_path", str(base))
            local = Path(base).expanduser()  # a local folder is loaded by its absolute path (see `_base_reference`)
            base = resolve_base_model(str(local.resolve()) if local.is_dir() else str(base))
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
    def draft_logits(self, hidden: torch.Tensor, full_vocab: bool = True) -> torch.Tensor:
        """
        Draft-head logits from the base model's last hidden states.

        Args:
            hidden (`torch.Tensor` of shape `(..., hidden)`): last hidden states of the base model.
            full_vocab (`bool`, defaults to `True`): with a draft vocabulary (`config.draft_vocab_size = K`), `True`
                returns logits over the whole base vocabulary (tokens outside the draft vocabulary get the dtype's
                lowest finite value, so softmax gives them 0 and log-probabilities stay finite); `False` returns the
                compact `(..., h, K)` logits, column `j` scoring token `draft_token_map[j]`.
        Returns:
            `torch.Tensor` of shape `(..., num_draft_heads, vocab)` (or `(..., num_draft_heads, K)`); index `i`
            predicts the token `i + 2` positions after the position of `hidden`.
        """
        states = torch.stack([head(hidden) for head in self.heads], dim=-2)  # (..., h, d)
        if self.config.share_lm_head:  # one matmul for all heads
            weight, bias = self._draft_projection()
            logits = nn.functional.linear(states, weight, bias)  # (..., h, K or V)
        else:
            logits = torch.stack([proj(states[..., i, :]) for i, proj in enumerate(self.draft_lm_heads)], dim=-2)
        return self._to_full_vocab(logits) if full_vocab else logits

    def _to_full_vocab(self, compact: torch.Tensor) -> torch.Tensor:
        """Compact `(..., K)` draft logits -> `(..., V)`; tokens outside the draft vocabulary get the lowest value."""
        if self.draft_token_map is None:
            return compact
        full = compact.new_full((*compact.shape[:-1], self.config.base_vocab_size), torch.finfo(compact.dtype).min)
        return full.scatter_(-1, self.draft_token_map.expand(compact.shape), compact)

    def draft_argmax(self, hidden: torch.Tensor) -> torch.LongTensor:
        """The heads' greedy drafts `(..., h)` as base-vocabulary token ids (no full-vocabulary tensor is built)."""
        best = self.draft_logits(hidden, full_vocab=False).argmax(dim=-1)
        return best if self.draft_token_map is None else self.draft_token_map[best]

    def first_heads(self, num_heads: int) -> "BPDForCausalLM":
        """
        A model on the same base (shared, not copied) that keeps the first `num_heads` heads of this one, with the
        same weights and draft vocabulary: choose `h` by measurement after training more heads than needed.
        """
        if not 1 <= num_heads <= self.config.num_draft_heads:
            raise ValueError(f"num_heads must be in [1, {self.config.num_draft_heads}], got {num_heads}.")
        config = BPDConfig.from_dict({**self.config.to_dict(), "num_draft_heads": num_heads})
        smaller = type(self)(config, base_model=self.base)
        keep = {k: v for k, v in self.heads_state_dict().items()
                if k.split(".")[0] not in ("heads", "draft_lm_heads") or int(k.split(".")[1]) < num_heads}  # fmt: skip
        smaller.load_state_dict(keep, strict=False)
        smaller.generation_config = self.generation_config
        return smaller.train(self.training)

    def _draft_projection(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """
        The shared projection for the heads: the base `lm_head`'s weight (and bias), restricted to the draft
        vocabulary's rows when there is one. The restricted copy is cached while the weight and the map are unchanged
        (checked through their tensor versions), unless gradients must flow into the weight.
        """
        emb = self.base.get_output_embeddings()
        weight, bias = emb.weight, getattr(emb, "bias", None)
        token_map = self.draft_token_map
        if token_map is None:
            return weight, bias
        if weight.requires_grad and torch.is_grad_enabled():
            return weight.index_select(0, token_map), None if bias is None else bias.index_select(0, token_map)
        key = (weight.data_ptr(), weight._version, weight.dtype, token_map.data_ptr(), token_map._version)
        if self._projection_cache is None or self._projection_cache[0] != key:
            rows = weight.detach().index_select(0, token_map)
            self._projection_cache = (key, rows, None if bias is None else bias.detach().index_select(0, token_map))
        return self._projection_cache[1], self._projection_cache[2]

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
            raise ValueError(f"set_draft_vocab needs {size} distinct token ids, got {ids.numel()} ({ids.unique().numel()} distinct).")
        if int(ids.min()) < 0 or int(ids.max()) >= vocab:
            raise ValueError(f"set_draft_vocab: token ids must lie in [0, {vocab}), got [{int(ids.min())}, {int(ids.max())}].")
        self.draft_token_map.copy_(ids.to(self.draft_token_map.device))
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
        token_map = self.draft_token_map
        key = (token_map.data_ptr(), token_map._version, token_ids.device, ignore_index)
        if self._inverse_cache is None or self._inverse_cache[0] != key:
            inverse = torch.full((self.config.base_vocab_size,), ignore_index, dtype=torch.long, device=token_ids.device)
            inverse[token_map.to(token_ids.device)] = torch.arange(token_map.numel(), device=token_ids.device)
            self._inverse_cache = (key, inverse)
        inverse = self._inverse_cache[1]
        valid = (token_ids >= 0) & (token_ids < inverse.numel())
        return torch.where(valid, inverse[token_ids.clamp(0, inverse.numel() - 1)], ignore_index)

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
        **kwargs: Any,
    ) -> BPDCausalLMOutput:
        r"""
        Run the base model and the draft heads.

        Args:
            input_ids (`torch.LongTensor` of shape `(batch, seq_len)`): input tokens.
            labels (`torch.LongTensor` of shape `(batch, seq_len)`, *optional*): the usual causal-LM labels
                (`-100` is ignored); head `i` is trained against `labels[:, t + 1 + i]`.
            return_draft_logits (`bool`, defaults to `True`): compute the `(batch, seq_len, h, vocab)` draft logits.
            base_hidden_states (`torch.Tensor` of shape `(batch, seq_len, hidden)`, *optional*): the frozen base
                model's last hidden states, computed earlier (cached features, [`~hf_bpd.features`]); the base is
                not run and `logits` is `None`.
            draft_full_vocab (`bool`, defaults to `True`): with a draft vocabulary, `False` returns compact
                `(..., h, K)` draft logits (see [`draft_logits`]); the loss is always computed in the compact space.
        Returns:
            [`BPDCausalLMOutput`].
        """
        if base_hidden_states is not None:
            return self._heads_forward(base_hidden_states, labels, return_draft_logits, draft_full_vocab)
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
        result = self._heads_forward(hidden, labels, return_draft_logits, draft_full_vocab)
        if labels is not None:
            result.base_loss = nn.functional.cross_entropy(
                out.logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        result.logits, result.cache = out.logits, getattr(out, "cache", None)
        return result

    def _heads_forward(
        self, hidden: torch.Tensor, labels: torch.LongTensor | None, return_draft_logits: bool, full_vocab: bool
    ) -> BPDCausalLMOutput:
        """Draft logits (and with `labels` the heads' loss, in the compact draft space) from last hidden states."""
        hidden = hidden.to(next(self.heads.parameters()).dtype)  # cached features may be stored in another dtype
        loss = head_losses = None
        compact = self.draft_logits(hidden, full_vocab=False) if (return_draft_logits or labels is not None) else None
        if labels is not None:
            loss, head_losses = draft_head_loss(compact, self.to_draft_ids(labels))
        draft = self._to_full_vocab(compact) if (return_draft_logits and full_vocab) else compact
        return BPDCausalLMOutput(
            loss=loss, head_losses=head_losses, draft_logits=draft if return_draft_logits else None,
            hidden_states=hidden,
        )  # fmt: skip

    # ------------------------------------------------------------------ save / load
    def heads_state_dict(self) -> dict[str, torch.Tensor]:
        """The draft heads' (and own projections') tensors, without any base weight."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(f"{self.base_model_prefix}.")}

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        save_base: bool = False,
        is_main_process: bool = True,
        push_to_hub: bool = False,
        state_dict: dict[str, torch.Tensor] | None = None,
        training_info: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """
        Write `config.json`, `generation_config.json`, heads-only `bpd_heads.safetensors`, LoRA adapters (if any) in
        `adapter/`, and a model card `README.md`.

        Args:
            save_directory: target folder.
            save_base (`bool`, defaults to `False`): also write the full base model to `save_directory/base`.
                By default the base is referenced through `config.base_model_name_or_path`, not copied.
            is_main_process (`bool`): only the main process writes (distributed training).
            push_to_hub (`bool`): upload the folder afterwards (keyword arguments as in `push_to_hub`).
            state_dict (`dict`, *optional*): the model's full state dict gathered by the caller (the Trainer passes
                one under FSDP / DeepSpeed ZeRO-3, where the parameters themselves are sharded); heads and adapter
                tensors are taken from it instead of from the parameters.
            training_info (`dict`, *optional*): training record for the model card, also written to
                `bpd_training.json`; by default a `bpd_training.json` already in `save_directory` is used.
            kwargs: `max_shard_size` and `safe_serialization` are accepted for compatibility with
                `push_to_hub`; the heads are always one safetensors file (never pickle).
        """
        if kwargs.pop("safe_serialization", True) is False:
            raise ValueError("BPDForCausalLM saves safetensors only; `safe_serialization=False` is not supported.")
        kwargs.pop("max_shard_size", None)
        if not is_main_process:
            return
        save_directory = Path(save_directory)
        save_directory.mkdir(parents=True, exist_ok=True)
        config = copy.deepcopy(self.config)  # the base reference is rewritten for the new folder, never in place
        config.base_model_name_or_path = self._base_reference(save_directory)
        config.save_pretrained(save_directory)
        if self.generation_config is not None:
            self.generation_config.save_pretrained(save_directory)
        prefix = f"{self.base_model_prefix}."
        if state_dict is None:
            heads, base_state = self.heads_state_dict(), None
        else:
            heads = {k: v for k, v in state_dict.items() if not k.startswith(prefix)}
            base_state = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        tensors = {k: v.detach().contiguous().cpu() for k, v in heads.items()}
        save_file(tensors, str(save_directory / HEADS_WEIGHTS_NAME), metadata={"format": "pt"})
        base, adapter_config = self.base, None
        if hasattr(base, "peft_config"):  # peft adapters: saved alone, base referenced
            base.save_pretrained(save_directory / ADAPTER_SUBFOLDER, state_dict=base_state)
            adapter_config = adapter_config_of(base)
            base = base.get_base_model()
        if save_base:
            base.save_pretrained(save_directory / BASE_SUBFOLDER)
        write_model_card(save_directory, config, training_info, adapter_config)
        if push_to_hub:
            self.push_to_hub(kwargs.pop("repo_id", save_directory.name), training_info=training_info, **kwargs)

    def _base_reference(self, save_directory: Path) -> str | None:
        """
        `base_model_name_or_path` as written into `save_directory`. When the attached base was loaded from a local
        folder, that folder is written relative to `save_directory` (so a relative reference such as the shipped
        `../base` survives saving elsewhere, and a heads + base pair moved together keeps working), or as an
        absolute path when the reference already was one. A Hub id (or a base of unknown origin) is kept unchanged.
        """
        ref = self.config.base_model_name_or_path
        if ref in OFFLINE_HUB_IDS:  # a Hub id that loaded from its offline copy (hf_bpd.smollm2): keep the id
            return ref
        base = self.base.get_base_model() if hasattr(self.base, "peft_config") else self.base
        loaded_from = getattr(base, "name_or_path", None) or ""
        if not loaded_from or not Path(loaded_from).expanduser().is_dir():
            return ref
        local = Path(loaded_from).expanduser().resolve()
        if ref and Path(ref).expanduser().is_absolute():
            return str(local)
        return os.path.relpath(local, save_directory.resolve())

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        private: bool | None = None,
        token: bool | str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        training_info: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        """
        Upload what [`save_pretrained`] writes (heads, adapters, config, model card; never the base weights) to a Hub
        repo. Unlike transformers' mixin, the BPD model card is kept instead of a generic one.

        Args:
            repo_id (`str`): the Hub repo, created if missing.
            training_info (`dict`, *optional*): training record for the model card (see [`save_pretrained`]).
            kwargs: `max_shard_size`, `tags` and the like are accepted and ignored.
        Returns:
            The commit info of `huggingface_hub.HfApi.upload_folder`.
        """
        import tempfile

        from huggingface_hub import HfApi

        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp, training_info=training_info)
            return api.upload_folder(
                repo_id=repo_id, folder_path=tmp, commit_message=commit_message or "Upload BPD draft heads",
                revision=revision, create_pr=create_pr,
            )  # fmt: skip

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *model_args: Any,
        base_model: PreTrainedModel | str | None = None,
        **kwargs: Any,
    ) -> "BPDForCausalLM":
        """
        Load heads saved by [`save_pretrained`] (strictly) onto their base model.

        Args:
            pretrained_model_name_or_path: a local folder or a Hub repo id (downloaded with `huggingface_hub`;
                `revision` / `subfolder` apply to it). `AutoModelForCausalLM.from_pretrained(folder)` ends here too.
            base_model (`PreTrainedModel` or `str`, *optional*): the base to attach the heads to. Defaults to the
                folder's `base/` copy, else `config.base_model_name_or_path` (a relative path is looked up next to the
                checkpoint folder first, then from the working directory).
            kwargs: passed to `AutoModelForCausalLM.from_pretrained` when the base is loaded (e.g. `dtype`).
        The checkpoint's `generation_config.json` (with e.g. `use_bpd` or `max_new_tokens`) replaces the base model's
        generation config, for both `generate` paths.
        Raises:
            `ValueError` when the heads were trained for a base of another hidden size or vocabulary, when the heads
            file does not hold exactly the expected tensors, or is corrupt; `FileNotFoundError` when the folder (or a
            local base path it names) does not exist; `OSError` when a repo id is neither a folder nor reachable.
        """
        if model_args:
            raise ValueError("BPDForCausalLM.from_pretrained takes no positional model arguments.")
        config = kwargs.pop("config", None)  # `AutoModelForCausalLM.from_pretrained` passes the BPDConfig it read
        for key in ("_from_auto", "adapter_kwargs", "code_revision", "_commit_hash"):
            kwargs.pop(key, None)  # AutoModel bookkeeping; the base is loaded by its own from_pretrained
        heads_hub = {k: kwargs.pop(k) for k in ("revision", "subfolder") if k in kwargs}  # the heads repo only
        shared_hub = {k: kwargs[k] for k in ("cache_dir", "token", "local_files_only", "force_download") if k in kwargs}
        folder = _resolve_folder(pretrained_model_name_or_path, **heads_hub, **shared_hub)
        if not isinstance(config, BPDConfig):
            config = BPDConfig.from_pretrained(folder)
        if base_model is None:
            if (folder / BASE_SUBFOLDER).is_dir():
                base_model = str((folder / BASE_SUBFOLDER).resolve())
            elif config.base_model_name_or_path:
                base_model = _locate_base(config.base_model_name_or_path, folder)
            else:
                raise ValueError(f"{folder} has no `base/` folder and no `base_model_name_or_path`: pass `base_model=`.")
        if isinstance(base_model, (str, os.PathLike)):  # a known Hub id resolves offline (see hf_bpd.smollm2)
            base_model = resolve_base_model(base_model, **kwargs)
        if (folder / ADAPTER_SUBFOLDER).is_dir() and not hasattr(base_model, "peft_config"):
            from peft import PeftModel

            base_model = PeftModel.from_pretrained(base_model, str(folder / ADAPTER_SUBFOLDER))
        model = cls(config, base_model=base_model)
        model.load_heads(folder / HEADS_WEIGHTS_NAME)
        if (folder / GENERATION_CONFIG_NAME).is_file():  # the checkpoint's generation config (e.g. `use_bpd`) wins
            generation_config = _load_generation_config(folder)
            unwrapped = base_model.get_base_model() if hasattr(base_model, "peft_config") else base_model
            model.generation_config = unwrapped.generation_config = generation_config
        return model

    def load_heads(self, path: str | os.PathLike) -> None:
        """
        Load a heads-only safetensors file strictly (same names, same shapes); tensors saved in another dtype are cast
        to the model's (the base's) dtype and device.
        """
        if not Path(path).is_file():
            raise FileNotFoundError(f"Draft heads file {path} does not exist.")
        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise ValueError(
                f"{path} is corrupt or truncated: it cannot be read as a safetensors file ({err}). Save the heads "
                "again with `save_pretrained`, or download the checkpoint again."
            ) from err
        expected = self.heads_state_dict()
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"{path} does not match this model's heads (num_draft_heads={self.config.num_draft_heads}, "
                f"head_type={self.config.head_type!r}): missing {missing[:5]}, unexpected {unexpected[:5]}."
            )
        for name, tensor in state.items():
            if tensor.shape != expected[name].shape:
                raise ValueError(
                    f"{path}: tensor {name} has shape {tuple(tensor.shape)}, the model expects "
                    f"{tuple(expected[name].shape)} (heads trained for another base model?)."
                )
        self.load_state_dict(state, strict=False)


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


def tokenizer_source(checkpoint: str | os.PathLike, model: BPDForCausalLM, tokenizer: str | None = None,
                     base: str | None = None) -> str:  # fmt: skip
    """
    Where to load the tokenizer of a BPD checkpoint from: `tokenizer`, else `base`, else the checkpoint folder when
    it holds a tokenizer, else the folder/name the base model was loaded from (relative base paths resolved).
    """
    if tokenizer or base:
        return str(tokenizer or base)
    if (Path(checkpoint) / "tokenizer_config.json").exists():
        return str(checkpoint)
    return model.base.name_or_path


def _load_generation_config(folder: Path) -> GenerationConfig:
    """
    `generation_config.json` with its custom entries (`use_bpd`): transformers drops entries it does not know when
    the file is marked `_from_model_config` (as a base model's default generation config is), so they are set back.
    """
    generation_config = GenerationConfig.from_pretrained(folder)
    saved = json.loads((folder / GENERATION_CONFIG_NAME).read_text())
    for key, value in saved.items():
        if not key.startswith("_") and key != "transformers_version" and not hasattr(generation_config, key):
            setattr(generation_config, key, value)
    return generation_config


def _is_repo_id(name: str) -> bool:
    """Whether `name` could name a Hub repo (`name` or `namespace/name`); paths such as `../x` or `/a/b/c` cannot."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return not name.startswith((".", "~"))


def _locate_base(ref: str, checkpoint: Path) -> str:
    """
    The base model a checkpoint names: a relative path is read next to the checkpoint folder first, then from the
    working directory; an absolute path must exist; anything else is a Hub id.
    """
    path = Path(ref).expanduser()
    candidates = [path] if path.is_absolute() else [checkpoint / path, path]
    for candidate in candidates:
        if candidate.is_dir():
            return str(candidate.resolve())
    if path.is_absolute() or not _is_repo_id(ref):
        looked = " nor ".join(str(c.resolve()) for c in candidates)
        raise FileNotFoundError(
            f"The base model of {checkpoint} ({ref!r}) is not there: neither {looked} exists. Pass "
            "`base_model=` (a model or its folder / Hub id), or fix `base_model_name_or_path` in its config.json."
        )
    return ref


def _resolve_folder(name_or_path: str | os.PathLike, *, subfolder: str | None = None, **hub_kwargs: Any) -> Path:
    """A local checkpoint folder, or the Hub snapshot of a repo id (downloaded with `huggingface_hub`)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        folder = path / subfolder if subfolder else path
        if not (folder / HEADS_WEIGHTS_NAME).is_file():
            raise ValueError(f"{folder} has no {HEADS_WEIGHTS_NAME}: not a BPDForCausalLM checkpoint.")
        return folder
    name = str(name_or_path)
    if path.exists():
        raise ValueError(f"{name} is a file: pass the folder `save_pretrained` wrote (with {HEADS_WEIGHTS_NAME}).")
    if not _is_repo_id(name):
        raise FileNotFoundError(f"{name} does not exist (no such folder, and it is not a Hub repo id).")
    from huggingface_hub import snapshot_download

    try:
        snapshot = Path(snapshot_download(name, **hub_kwargs))
    except Exception as err:  # offline, unknown repo, gated, ...: say that the local folder was tried first
        raise OSError(f"{name!r} is not a local folder, and getting it from the Hub failed: {err}") from err
    return _resolve_folder(snapshot, subfolder=subfolder)
