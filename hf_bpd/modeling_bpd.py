"""`BPDForCausalLM`: any Hugging Face causal LM plus `h` draft heads, saved and loaded heads-only."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .configuration_bpd import BPDConfig
from .losses import draft_head_loss
from .model_card import adapter_config_of, write_model_card

logger = logging.getLogger(__name__)

HEADS_WEIGHTS_NAME = "bpd_heads.safetensors"
BASE_SUBFOLDER = "base"
ADAPTER_SUBFOLDER = "adapter"


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
class BPDForCausalLM(PreTrainedModel, GenerationMixin):
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
            base_model = AutoModelForCausalLM.from_pretrained(config.base_model_name_or_path)
        base_cfg = base_model.config
        hidden_size = _base_hidden_size(base_cfg)
        vocab_size = base_model.get_output_embeddings().weight.shape[0]
        _check_base_matches(config, hidden_size, vocab_size)
        config.base_hidden_size, config.base_vocab_size = hidden_size, vocab_size
        config.base_model_type = getattr(base_cfg, "model_type", None)

        self.heads = nn.ModuleList([build_head(config, hidden_size) for _ in range(config.num_draft_heads)])
        if not config.share_lm_head:
            self.draft_lm_heads = nn.ModuleList(
                [nn.Linear(hidden_size, vocab_size, bias=False) for _ in range(config.num_draft_heads)]
            )
        # Initialise the heads *before* the base is attached: v5's post_init walks every child module and must
        # never touch the (pretrained) base weights.
        self.post_init()
        self.base = base_model
        if not config.share_lm_head:
            with torch.no_grad():
                for proj in self.draft_lm_heads:
                    proj.weight.copy_(base_model.get_output_embeddings().weight)
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
            base = AutoModelForCausalLM.from_pretrained(base)
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
    def draft_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """
        Draft-head logits from the base model's last hidden states.

        Args:
            hidden (`torch.Tensor` of shape `(..., hidden)`): last hidden states of the base model.
        Returns:
            `torch.Tensor` of shape `(..., num_draft_heads, vocab)`; index `i` predicts the token `i + 2` positions
            after the position of `hidden`.
        """
        states = torch.stack([head(hidden) for head in self.heads], dim=-2)  # (..., h, d)
        if self.config.share_lm_head:
            return self.base.get_output_embeddings()(states)  # (..., h, V)
        return torch.stack([proj(states[..., i, :]) for i, proj in enumerate(self.draft_lm_heads)], dim=-2)

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
        **kwargs: Any,
    ) -> BPDCausalLMOutput:
        r"""
        Run the base model and the draft heads.

        Args:
            input_ids (`torch.LongTensor` of shape `(batch, seq_len)`): input tokens.
            labels (`torch.LongTensor` of shape `(batch, seq_len)`, *optional*): the usual causal-LM labels
                (`-100` is ignored); head `i` is trained against `labels[:, t + 1 + i]`.
            return_draft_logits (`bool`, defaults to `True`): compute the `(batch, seq_len, h, vocab)` draft logits.
        Returns:
            [`BPDCausalLMOutput`].
        """
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
        draft = self.draft_logits(hidden) if (return_draft_logits or labels is not None) else None
        loss = head_losses = base_loss = None
        if labels is not None:
            loss, head_losses = draft_head_loss(draft, labels)
            base_loss = nn.functional.cross_entropy(
                out.logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        return BPDCausalLMOutput(
            loss=loss,
            head_losses=head_losses,
            base_loss=base_loss,
            logits=out.logits,
            draft_logits=draft if return_draft_logits else None,
            hidden_states=hidden,
            cache=getattr(out, "cache", None),
        )

    # ------------------------------------------------------------------ generation
    def generate(self, inputs: torch.Tensor | None = None, generation_config: Any = None, **kwargs: Any) -> Any:
        """
        `generate` of the base model; with `use_bpd=True`, blockwise parallel decoding with the same output.

        Args:
            use_bpd (`bool`, *optional*): decode blockwise (draft -> verify -> accept). Defaults to
                `generation_config.use_bpd` if set there, else `False` (the base model's own `generate`).
            draft_rescorer ([`~hf_bpd.logits.DraftRescorer`], *optional*): changes the drafts (never the output).
            compare_unrefined (`bool`, *optional*): with a `draft_rescorer`, also verify the heads' own argmax draft
                in the same call and report its accepted lengths (`unrefined_accepted_lengths`) beside the refined.
            kwargs: every usual `generate` argument (`max_new_tokens`, `attention_mask`, `do_sample`,
                `logits_processor`, `stopping_criteria`, `streamer`, `return_dict_in_generate`, ...).
        Returns:
            What the base model's `generate` returns; with `return_dict_in_generate=True` and `use_bpd=True` a
            [`~hf_bpd.generation.BPDGenerateOutput`] with BPD statistics.
        """
        from .generation import bpd_generate  # local import: generation imports this module

        use_bpd = kwargs.pop("use_bpd", None)
        if use_bpd is None:
            use_bpd = bool(getattr(generation_config or self.generation_config, "use_bpd", False))
        if not use_bpd:
            for key in ("draft_rescorer", "compare_unrefined"):
                if kwargs.pop(key, None) not in (None, False):
                    raise ValueError(f"`{key}` only applies with `use_bpd=True`.")
            return self.base.generate(inputs, generation_config=generation_config, **kwargs)
        return bpd_generate(self, inputs, generation_config=generation_config, **kwargs)

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
        self.config.save_pretrained(save_directory)
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
        write_model_card(save_directory, self.config, training_info, adapter_config)
        if push_to_hub:
            self.push_to_hub(kwargs.pop("repo_id", save_directory.name), training_info=training_info, **kwargs)

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
            pretrained_model_name_or_path: a local folder or a Hub repo id (downloaded with `huggingface_hub`).
            base_model (`PreTrainedModel` or `str`, *optional*): the base to attach the heads to. Defaults to the
                folder's `base/` copy, else `config.base_model_name_or_path` (a relative path is looked up next to the
                checkpoint folder first, then from the working directory).
            kwargs: passed to `AutoModelForCausalLM.from_pretrained` when the base is loaded (e.g. `dtype`).
        Raises:
            `ValueError` when the heads were trained for a base of another hidden size or vocabulary, or when the
            heads file does not hold exactly the expected tensors.
        """
        if model_args:
            raise ValueError("BPDForCausalLM.from_pretrained takes no positional model arguments.")
        folder = _resolve_folder(pretrained_model_name_or_path)
        config = BPDConfig.from_pretrained(folder)
        if base_model is None:
            if (folder / BASE_SUBFOLDER).is_dir():
                base_model = str(folder / BASE_SUBFOLDER)
            elif config.base_model_name_or_path:
                base_model = config.base_model_name_or_path
                beside = folder / base_model  # a relative path is read relative to the checkpoint first
                if not Path(base_model).is_absolute() and beside.is_dir():
                    base_model = str(beside.resolve())
            else:
                raise ValueError(f"{folder} has no `base/` folder and no `base_model_name_or_path`: pass `base_model=`.")
        if isinstance(base_model, (str, os.PathLike)):
            base_model = AutoModelForCausalLM.from_pretrained(base_model, **kwargs)
        if (folder / ADAPTER_SUBFOLDER).is_dir() and not hasattr(base_model, "peft_config"):
            from peft import PeftModel

            base_model = PeftModel.from_pretrained(base_model, str(folder / ADAPTER_SUBFOLDER))
        model = cls(config, base_model=base_model)
        model.load_heads(folder / HEADS_WEIGHTS_NAME)
        return model

    def load_heads(self, path: str | os.PathLike) -> None:
        """Load a heads-only safetensors file strictly (same names, same shapes)."""
        state = load_file(str(path))
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


def _resolve_folder(name_or_path: str | os.PathLike) -> Path:
    path = Path(name_or_path)
    if path.is_dir():
        if not (path / HEADS_WEIGHTS_NAME).is_file():
            raise ValueError(f"{path} has no {HEADS_WEIGHTS_NAME}: not a BPDForCausalLM checkpoint.")
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(name_or_path)))
