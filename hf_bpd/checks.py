"""
Arguments of `BPDForCausalLM.generate`: checked before any work, so that whatever BPD cannot honour exactly is a clear
error and never a silently different output.

`prepare_bpd_arguments` also does what transformers' `custom_generate` path cannot: that path drops the `tokenizer`
argument, so `stop_strings` are turned into a `StopStringCriteria` and `token_healing` heals the prompt here, with the
same functions plain `generate` uses, before the base model's `generate` runs the decode loop.
"""

from __future__ import annotations

import logging
import warnings
from typing import TYPE_CHECKING, Any

import torch
from transformers import GenerationConfig, StoppingCriteriaList, StopStringCriteria

if TYPE_CHECKING:
    from .modeling_bpd import BPDForCausalLM

logger = logging.getLogger(__name__)

UNTRAINED_HEADS_WARNING = (
    "The draft heads of this BPDForCausalLM are untrained (their zero-initialised layers are still all zero): with "
    "`use_bpd=True` they reproduce the base model's next token, so block efficiency stays ~1 and decoding is slower "
    "than plain `generate`. Train them first (hf_bpd.BPDTrainer / examples/train_heads.py) or load trained heads "
    "with BPDForCausalLM.from_pretrained."
)


def setting(name: str, generation_config: GenerationConfig | None, kwargs: dict[str, Any], default_config: Any) -> Any:
    """The value `generate` will use for `name`: a keyword argument, else the passed config, else the model's."""
    if name in kwargs:
        return kwargs[name]
    for config in (generation_config, default_config):
        value = getattr(config, name, None) if config is not None else None
        if value is not None:
            return value
    return None


def prompt_of(inputs: torch.Tensor | None, kwargs: dict[str, Any]) -> torch.Tensor | None:
    return inputs if inputs is not None else kwargs.get("input_ids")


def check_prompt(inputs: torch.Tensor | None, kwargs: dict[str, Any]) -> None:
    """An empty prompt is an error for both `use_bpd=True` and plain `generate` (which fails deep in the model)."""
    prompt = prompt_of(inputs, kwargs)
    if isinstance(prompt, torch.Tensor) and prompt.dim() >= 1 and (prompt.shape[0] == 0 or prompt.shape[-1] == 0):
        raise ValueError(
            f"`input_ids` is empty (shape {tuple(prompt.shape)}): give every row at least one token, e.g. the "
            "tokenizer's BOS token (`tokenizer(text, return_tensors='pt')` adds it for most models)."
        )


def prepare_bpd_arguments(
    bpd: "BPDForCausalLM", inputs: torch.Tensor | None, generation_config: GenerationConfig | None,
    kwargs: dict[str, Any],
) -> tuple[torch.Tensor | None, dict[str, Any]]:  # fmt: skip
    """
    Refuse what `use_bpd=True` cannot do exactly; rewrite what needs the tokenizer. Runs before any model call.

    Args:
        bpd: the model whose `generate(..., use_bpd=True)` was called.
        inputs, generation_config, kwargs: the arguments of that call (`kwargs` without `use_bpd`).
    Returns:
        `(inputs, kwargs)` to pass on to the decode loop.
    Raises:
        `ValueError` for classifier-free guidance (`guidance_scale`), contrastive search (`penalty_alpha`), DoLa
        (`dola_layers`), right-padded prompts, and `stop_strings` / `token_healing` without a `tokenizer`.
    """
    kwargs = dict(kwargs)
    model_config = bpd.generation_config

    def get(name: str) -> Any:
        return setting(name, generation_config, kwargs, model_config)

    guidance = get("guidance_scale")
    if guidance is not None and guidance != 1:
        raise ValueError(
            f"`guidance_scale={guidance}` (classifier-free guidance) cannot be combined with `use_bpd=True`: its "
            "processor runs the model on the unconditional prompt with a cache of its own, one token at a time, so "
            "blockwise verification would change the output. Use plain `generate` (use_bpd=False) for guidance."
        )
    if get("penalty_alpha") and not get("do_sample"):
        raise ValueError(
            "`penalty_alpha` (contrastive search) cannot be combined with `use_bpd=True`: pick one method."
        )
    if get("dola_layers") is not None:
        raise ValueError("`dola_layers` (DoLa decoding) cannot be combined with `use_bpd=True`: pick one method.")
    _check_right_padding(prompt_of(inputs, kwargs), kwargs.get("attention_mask"), get("pad_token_id"),
                         get("eos_token_id"))  # fmt: skip
    inputs, kwargs = _tokenizer_arguments(bpd, inputs, kwargs, get)
    _match_heads_to_base(bpd)
    if kwargs.get("draft_rescorer") is None and heads_are_untrained(bpd):
        warnings.warn(UNTRAINED_HEADS_WARNING, UserWarning, stacklevel=3)
    return inputs, kwargs


def _check_right_padding(prompt: Any, mask: Any, pad: Any, eos: Any) -> None:
    """Refuse prompts whose last position is padding (the mask plain `generate` would use, inferred the same way)."""
    if not isinstance(prompt, torch.Tensor) or prompt.dim() != 2:
        return
    if mask is None:
        mask = _inferred_attention_mask(prompt, pad, eos)
        if mask is None:
            return
    if bool((mask[:, -1] == 0).any()):
        raise ValueError(
            "Right padding detected (the attention mask ends in 0 for some rows): `use_bpd=True` appends drafts after "
            "the last position, so right-padded rows would not decode as plain `generate` does. Pad on the left: "
            "`tokenizer.padding_side = 'left'`."
        )


def _inferred_attention_mask(prompt: torch.Tensor, pad: Any, eos: Any) -> torch.Tensor | None:
    """
    The attention mask transformers infers when none is given: from the pad token, unless there is none, it is also
    EOS, or the prompt holds no pad at all (then `None`: no mask is inferred).
    """
    eos_ids = eos if isinstance(eos, (list, tuple)) else [eos]
    if pad is None or pad in eos_ids or not bool((prompt == pad).any()):
        return None
    return prompt.ne(pad).long()


def _tokenizer_arguments(bpd: "BPDForCausalLM", inputs: Any, kwargs: dict[str, Any], get: Any) -> tuple[Any, dict]:
    """`stop_strings` -> a `StopStringCriteria`; `token_healing` -> a healed prompt (both need the tokenizer)."""
    tokenizer = kwargs.pop("tokenizer", None)
    stop_strings, healing = get("stop_strings"), get("token_healing")
    if (stop_strings or healing) and tokenizer is None:
        what = "`stop_strings`" if stop_strings else "`token_healing`"
        raise ValueError(f"{what} needs the model's tokenizer: pass `tokenizer=` to `generate`.")
    if stop_strings:
        user = kwargs.get("stopping_criteria") or []
        if any(isinstance(c, StopStringCriteria) for c in user):
            raise ValueError("Pass stop strings either as `stop_strings` or as a StopStringCriteria, not both.")
        kwargs["stopping_criteria"] = StoppingCriteriaList([*user, StopStringCriteria(tokenizer, stop_strings)])
        kwargs["stop_strings"] = None
    if healing:
        key = "input_ids" if inputs is None else None
        prompt = prompt_of(inputs, kwargs)
        # plain `generate` infers the attention mask from the prompt *before* healing it: keep that mask
        if kwargs.get("attention_mask") is None:
            mask = _inferred_attention_mask(prompt, get("pad_token_id"), get("eos_token_id"))
            if mask is not None:
                kwargs["attention_mask"] = mask
        healed = bpd.base.heal_tokens(prompt, tokenizer)
        if key is None:
            inputs = healed
        else:
            kwargs[key] = healed
        kwargs["token_healing"] = False
    return inputs, kwargs


def heads_are_untrained(bpd: "BPDForCausalLM") -> bool:
    """Whether every zero-initialised layer of the heads is still exactly zero (fresh from `from_base`)."""
    zero_init = [m for m in bpd.heads.modules() if getattr(m, "_bpd_init", None) == "zeros"]
    if not zero_init:
        return False
    with torch.no_grad():
        return all(not bool(p.any()) for m in zero_init for p in m.parameters(recurse=False))


def _match_heads_to_base(bpd: "BPDForCausalLM") -> None:
    """Move the heads (and their own projections / buffers) to the base's dtype and device if they drifted apart."""
    target = bpd.get_output_embeddings().weight
    own = [p for name, p in bpd.named_parameters() if not name.startswith(f"{bpd.base_model_prefix}.")]
    if all(p.dtype == target.dtype and p.device == target.device for p in own):
        return
    logger.warning(
        "The draft heads are %s on %s but the base model is %s on %s (was only `model.base` moved?): casting the heads "
        "to match. Move the whole model with `model.to(...)` to avoid this.",
        own[0].dtype, own[0].device, target.dtype, target.device,
    )  # fmt: skip
    for name, module in bpd.named_children():
        if name != bpd.base_model_prefix:
            module.to(device=target.device, dtype=target.dtype)
    for name, buffer in list(bpd.named_buffers(recurse=False)):
        setattr(bpd, name, buffer.to(device=target.device))
