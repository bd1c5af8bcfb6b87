"""
Saving and loading a BPD checkpoint: the heads-only safetensors file (strict load), the folder or Hub snapshot, the
base model reference, and the checkpoint's generation config. [`HeadsSavingMixin`] gives `BPDForCausalLM` its
`save_pretrained` / `from_pretrained` / `push_to_hub`; a base named by a checkpoint is loaded with
`AutoModelForCausalLM.from_pretrained` (no model id is special here).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedModel

from .configuration_bpd import BPDConfig
from .model_card import adapter_config_of, write_model_card

HEADS_WEIGHTS_NAME = "bpd_heads.safetensors"
BASE_SUBFOLDER = "base"
ADAPTER_SUBFOLDER = "adapter"
GENERATION_CONFIG_NAME = "generation_config.json"


def load_base_model(ref: str | os.PathLike, **kwargs: Any) -> PreTrainedModel:
    """A base model by folder or Hub id: `AutoModelForCausalLM.from_pretrained(ref, **kwargs)`."""
    return AutoModelForCausalLM.from_pretrained(str(ref), **kwargs)


class HeadsSavingMixin:
    """`save_pretrained`, `push_to_hub`, `from_pretrained` and `load_heads` of [`~hf_bpd.BPDForCausalLM`]."""

    checkpoint_folder: Path | None = None  # the folder `from_pretrained` read (relative drafter paths start there)

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
                repo_id=repo_id,
                folder_path=tmp,
                commit_message=commit_message or "Upload BPD draft heads",
                revision=revision,
                create_pr=create_pr,
            )

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *model_args: Any,
        base_model: PreTrainedModel | str | None = None,
        **kwargs: Any,
    ) -> Any:
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
        shared_hub = {
            k: kwargs[k] for k in ("cache_dir", "token", "local_files_only", "force_download") if k in kwargs
        }
        folder = _resolve_folder(pretrained_model_name_or_path, **heads_hub, **shared_hub)
        if not isinstance(config, BPDConfig):
            config = BPDConfig.from_pretrained(folder)
        if base_model is None:
            if (folder / BASE_SUBFOLDER).is_dir():
                base_model = str((folder / BASE_SUBFOLDER).resolve())
            elif config.base_model_name_or_path:
                base_model = _locate_base(config.base_model_name_or_path, folder)
            else:
                raise ValueError(
                    f"{folder} has no `base/` folder and no `base_model_name_or_path`: pass `base_model=`."
                )
        if isinstance(base_model, (str, os.PathLike)):
            base_model = load_base_model(base_model, **kwargs)
        if (folder / ADAPTER_SUBFOLDER).is_dir() and not hasattr(base_model, "peft_config"):
            from peft import PeftModel

            base_model = PeftModel.from_pretrained(base_model, str(folder / ADAPTER_SUBFOLDER))
        model = cls(config, base_model=base_model)
        model.load_heads(folder / HEADS_WEIGHTS_NAME)
        model.checkpoint_folder = folder.resolve()
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
def tokenizer_source(
    checkpoint: str | os.PathLike, model: Any, tokenizer: str | None = None, base: str | None = None
) -> str:
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
