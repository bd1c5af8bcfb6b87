"""
Every refusal of `generate(use_bpd=True)`, in one place, each checked once and before any model call.

Two moments, because transformers' `generate` prepares part of what BPD must check:

- [`prepare_arguments`] runs on the user's arguments, before the base model's `generate`: what only exists there
  (the tokenizer, which the `custom_generate` path drops; the drafter; the streamer) and what transformers would
  otherwise route to another decoding method (`assistant_model`, `prompt_lookup_num_tokens`, ...).
- [`validate_prepared`] runs inside the `custom_generate` callable, on what `generate` prepared (the merged generation
  config, the logits processors, the stopping criteria, the cache, the attention mask), before the prefill: the
  first forward of the base model.

No check mutates the model or its inputs. Rewrites (stop strings -> a criterion, healed prompt) are returned as new
arguments.

The contract for logits processors and stopping criteria (`docs/usage.md`): the loop calls each logits processor
at every verified node, rejected drafts included, with that node's exact prefix. The processors transformers ships
are pure functions of `(input_ids, scores)` ([`PURE_PROCESSORS`]), so this is exact. Any other processor may keep
state between calls (a grammar automaton, a step budget): at batch size 1 with greedy decoding the loop then calls
it only along the accepted path, once per generated token, exactly as plain `generate` does; otherwise it is
refused unless the caller declares it pure with `bpd_pure_processors=True`. Stopping criteria are called once per
committed token of each row, in order (at batch size 1 exactly plain `generate`'s calls).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig, StoppingCriteriaList, StopStringCriteria
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer
from transformers.generation import logits_process, stopping_criteria

from .drafters import Drafter, HeadsDrafter
from .sampling import check_sampling_mode

UNTRAINED_HEADS_WARNING = (
    "The draft heads of this BPDForCausalLM are untrained (their zero-initialised layers are still all zero): with "
    "`use_bpd=True` they reproduce the base model's next token, so block efficiency stays ~1 and decoding is slower "
    "than plain `generate`. Train them first (hf_bpd.BPDTrainer / examples/train_heads.py) or load trained heads "
    "with BPDForCausalLM.from_pretrained."
)

# The logits processors transformers ships whose output is a pure function of `(input_ids, scores)` and of their
# constructor arguments (checked by exact type: a subclass may add state). Left out on purpose: classifier-free
# guidance (runs the model with a cache of its own), SynthID watermarking (counts calls, keeps a context), and the
# audio / encoder-decoder processors (Whisper, Bark, Dia, codebooks).
_PURE_PROCESSOR_NAMES = (
    "MinLengthLogitsProcessor",
    "MinNewTokensLengthLogitsProcessor",
    "TemperatureLogitsWarper",
    "RepetitionPenaltyLogitsProcessor",
    "TopPLogitsWarper",
    "TopKLogitsWarper",
    "TopHLogitsWarper",
    "MinPLogitsWarper",
    "TypicalLogitsWarper",
    "EpsilonLogitsWarper",
    "EtaLogitsWarper",
    "NoRepeatNGramLogitsProcessor",
    "SequenceBiasLogitsProcessor",
    "NoBadWordsLogitsProcessor",
    "PrefixConstrainedLogitsProcessor",
    "ForcedBOSTokenLogitsProcessor",
    "ForcedEOSTokenLogitsProcessor",
    "InfNanRemoveLogitsProcessor",
    "ExponentialDecayLengthPenalty",
    "LogitNormalization",
    "SuppressTokensAtBeginLogitsProcessor",
    "SuppressTokensLogitsProcessor",
    "WatermarkLogitsProcessor",
)
PURE_PROCESSORS = tuple(getattr(logits_process, n) for n in _PURE_PROCESSOR_NAMES if hasattr(logits_process, n))
_REFUSED_PROCESSORS = tuple(
    getattr(logits_process, n)
    for n in ("UnbatchedClassifierFreeGuidanceLogitsProcessor", "ClassifierFreeGuidanceLogitsProcessor")
    if hasattr(logits_process, n)
)
# Stopping criteria transformers ships; called once per committed token, they are exact.
KNOWN_CRITERIA = tuple(
    getattr(stopping_criteria, n)
    for n in ("MaxLengthCriteria", "MaxTimeCriteria", "EosTokenCriteria", "StopStringCriteria", "ConfidenceCriteria")
    if hasattr(stopping_criteria, n)
)
# Generation modes transformers would pick instead of the BPD loop.
_OTHER_METHODS = (
    ("assistant_model", "assisted decoding"),
    ("prompt_lookup_num_tokens", "prompt lookup decoding"),
    ("custom_generate", "a custom generation loop"),
)
BPD_ONLY_ARGUMENTS = ("drafter", "draft_rescorer", "compare_unrefined", "bpd_sampling", "bpd_pure_processors")
_HANDLED_MODEL_KWARGS = {"cache", "attention_mask", "position_ids", "use_cache", "logits_to_keep"}


@dataclass
class BPDOptions:
    """The BPD-only arguments of one `generate(use_bpd=True)` call, checked."""

    drafter: Drafter | str | dict | None = None  # an instance or a registry spec (`build_drafter` builds it)
    compare_unrefined: bool = False
    sampling: str = "speculative"
    streamer: Any = None
    pure_processors: bool = False


def is_pure_processor(processor: Any) -> bool:
    """Whether `processor` is one of transformers' own processors known to be pure (exact type)."""
    return type(processor) in PURE_PROCESSORS


# ------------------------------------------------------------------------------------------------ before generate
def refuse_bpd_only_arguments(kwargs: dict[str, Any]) -> None:
    """Without `use_bpd`, BPD-only arguments are an error (they would silently do nothing)."""
    for key in BPD_ONLY_ARGUMENTS:
        if kwargs.pop(key, None) not in (None, False):
            raise ValueError(f"`{key}` only applies with `use_bpd=True`.")


def check_prompt(inputs: torch.Tensor | None, kwargs: dict[str, Any]) -> None:
    """An empty prompt is an error for both `use_bpd=True` and plain `generate` (which fails deep in the model)."""
    prompt = inputs if inputs is not None else kwargs.get("input_ids")
    if isinstance(prompt, torch.Tensor) and prompt.dim() >= 1 and (prompt.shape[0] == 0 or prompt.shape[-1] == 0):
        raise ValueError(
            f"`input_ids` is empty (shape {tuple(prompt.shape)}): give every row at least one token, e.g. the "
            "tokenizer's BOS token (`tokenizer(text, return_tensors='pt')` adds it for most models)."
        )


def prepare_arguments(
    model: Any, inputs: torch.Tensor | None, generation_config: GenerationConfig | None, kwargs: dict[str, Any]
) -> tuple[torch.Tensor | None, dict[str, Any], BPDOptions]:
    """
    Check and take out the BPD-only arguments; rewrite what needs the tokenizer. Runs before the base's `generate`.

    Args:
        model: the model whose `generate(..., use_bpd=True)` was called.
        inputs, generation_config, kwargs: the arguments of that call (`kwargs` without `use_bpd`; not modified).
    Returns:
        `(inputs, kwargs, options)`: the arguments to pass on to the base's `generate`, and the BPD options.
    Raises:
        `ValueError` for other decoding methods, a drafter that is neither a `Drafter` nor a registry name or spec,
        `compare_unrefined` without a drafter, a streamer with batch size > 1, and `stop_strings` / `token_healing` without a `tokenizer`.
    """
    kwargs = dict(kwargs)
    check_prompt(inputs, kwargs)
    drafter = kwargs.pop("drafter", None)
    alias = kwargs.pop("draft_rescorer", None)
    if drafter is not None and alias is not None:
        raise ValueError("Pass the drafter once: `drafter=` (`draft_rescorer=` is its older name).")
    drafter = drafter if drafter is not None else alias
    options = BPDOptions(
        drafter=drafter,
        compare_unrefined=bool(kwargs.pop("compare_unrefined", False)),
        sampling=check_sampling_mode(kwargs.pop("bpd_sampling", "speculative")),
        streamer=kwargs.pop("streamer", None),
        pure_processors=bool(kwargs.pop("bpd_pure_processors", False)),
    )
    for key, what in _OTHER_METHODS:
        if _setting(key, generation_config, kwargs, model.generation_config):
            raise ValueError(f"`use_bpd=True` cannot be combined with {what} (`{key}`): pick one decoding method.")
    if drafter is not None and not isinstance(drafter, (Drafter, str, dict)):
        raise ValueError(
            f"`drafter` must be a hf_bpd Drafter (e.g. HeadsDrafter, a lattice rescorer, a tree drafter, an "
            f"OracleDrafter, or a DraftRescorer subclass wrapping a function), a registered drafter name (e.g. "
            f"'heads', 'tree', 'auto') or a spec dict {{'type': name, **options}}; got {type(drafter).__name__}."
        )
    if options.compare_unrefined and drafter is None:
        raise ValueError("`compare_unrefined=True` compares a drafter's drafts with the heads' own: pass `drafter=`.")
    prompt = inputs if inputs is not None else kwargs.get("input_ids")
    if options.streamer is not None and isinstance(prompt, torch.Tensor) and prompt.dim() == 2 and prompt.shape[0] > 1:
        raise ValueError("A `streamer` with `use_bpd=True` supports batch size 1 (rows advance at different speeds).")
    inputs, kwargs = _tokenizer_arguments(model, inputs, kwargs, generation_config)
    uses_heads_chain = (
        drafter is None or drafter == "heads" or (isinstance(drafter, dict) and drafter.get("type") == "heads")
    )
    if uses_heads_chain and heads_are_untrained(model):
        warnings.warn(UNTRAINED_HEADS_WARNING, UserWarning, stacklevel=4)
    return inputs, kwargs, options


def _setting(name: str, generation_config: Any, kwargs: dict[str, Any], default_config: Any) -> Any:
    """The value `generate` will use for `name`: a keyword argument, else the passed config, else the model's."""
    if name in kwargs:
        return kwargs[name]
    for config in (generation_config, default_config):
        value = getattr(config, name, None) if config is not None else None
        if value is not None:
            return value
    return None


def _tokenizer_arguments(model: Any, inputs: Any, kwargs: dict[str, Any], generation_config: Any) -> tuple[Any, dict]:
    """`stop_strings` -> a `StopStringCriteria`; `token_healing` -> a healed prompt (both need the tokenizer)."""

    def get(name: str) -> Any:
        return _setting(name, generation_config, kwargs, model.generation_config)

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
        prompt = inputs if inputs is not None else kwargs.get("input_ids")
        # plain `generate` infers the attention mask from the prompt *before* healing it: keep that mask
        if kwargs.get("attention_mask") is None:
            mask = inferred_attention_mask(prompt, get("pad_token_id"), get("eos_token_id"))
            if mask is not None:
                kwargs["attention_mask"] = mask
        healed = model.base.heal_tokens(prompt, tokenizer)
        if inputs is not None:
            inputs = healed
        else:
            kwargs["input_ids"] = healed
        kwargs["token_healing"] = False
    return inputs, kwargs


def inferred_attention_mask(prompt: torch.Tensor, pad: Any, eos: Any) -> torch.Tensor | None:
    """
    The attention mask transformers infers when none is given: from the pad token, unless there is none, it is also
    EOS, or the prompt holds no pad at all (then `None`: no mask is inferred).
    """
    eos_ids = eos if isinstance(eos, (list, tuple)) else [eos]
    if pad is None or pad in eos_ids or not bool((prompt == pad).any()):
        return None
    return prompt.ne(pad).long()


def heads_are_untrained(model: Any) -> bool:
    """Whether every zero-initialised layer of the heads is still exactly zero (fresh from `from_base`)."""
    zero_init = [m for m in model.heads.modules() if getattr(m, "_bpd_init", None) == "zeros"]
    if not zero_init:
        return False
    with torch.no_grad():
        return all(not bool(p.any()) for m in zero_init for p in m.parameters(recurse=False))


# ------------------------------------------------------------------------------------------------ inside generate
@dataclass
class Plan:
    """What [`validate_prepared`] found: the cache and how to score the verified nodes."""

    cache: Any
    sequential_scoring: bool


def validate_prepared(
    model: Any,
    input_ids: torch.LongTensor,
    generation_config: Any,
    logits_processor: Any,
    stopping: Any,
    model_kwargs: dict[str, Any],
    drafter: Drafter,
    options: BPDOptions,
    num_heads: int,
) -> Plan:
    """
    Everything BPD cannot honour exactly, on what transformers' `generate` prepared; runs before the first forward.

    Args:
        model: the base model; input_ids `(B, T)`; the rest as `generate` passes them to a `custom_generate`.
    Returns:
        A [`Plan`].
    Raises:
        `ValueError` naming what was wrong and what to use instead.
    """
    _check_generation_config(model, generation_config)
    unknown = sorted(k for k, v in model_kwargs.items() if v is not None and k not in _HANDLED_MODEL_KWARGS)
    if unknown:
        raise ValueError(f"`use_bpd=True` does not support these model inputs: {unknown}.")
    mask = model_kwargs.get("attention_mask")
    if mask is not None and bool((mask[:, -1] == 0).any()):
        raise ValueError(
            "Right padding detected (the attention mask ends in 0 for some rows): `use_bpd=True` appends drafts after "
            "the last position, so right-padded rows would not decode as plain `generate` does. Pad on the left: "
            "`tokenizer.padding_side = 'left'`."
        )
    cache = model_kwargs.get("cache")
    check_cache(cache, input_ids, mask, generation_config.max_length, max_block_width(drafter, num_heads, options))
    sequential = _check_processors(logits_processor, input_ids.shape[0], generation_config.do_sample, options)
    _check_criteria(stopping, input_ids.shape[0])
    return Plan(cache=cache, sequential_scoring=sequential)


def _check_generation_config(model: Any, config: Any) -> None:
    if config.num_beams > 1:
        raise ValueError("`use_bpd=True` decodes greedily or by sampling; `num_beams > 1` is not supported.")
    if model.config.is_encoder_decoder:
        raise ValueError("`use_bpd=True` supports decoder-only models.")
    if config.guidance_scale is not None and config.guidance_scale != 1:
        raise ValueError(
            f"`guidance_scale={config.guidance_scale}` (classifier-free guidance) cannot be combined with "
            "`use_bpd=True`: its processor runs the model on the unconditional prompt with a cache of its own, one "
            "token at a time, so blockwise verification would change the output. Use plain `generate` for guidance."
        )
    if config.penalty_alpha and not config.do_sample:
        raise ValueError(
            "`penalty_alpha` (contrastive search) cannot be combined with `use_bpd=True`: pick one method."
        )
    if getattr(config, "dola_layers", None) is not None:
        raise ValueError("`dola_layers` (DoLa decoding) cannot be combined with `use_bpd=True`: pick one method.")
    if config.output_attentions or config.output_hidden_states:
        raise ValueError(
            "`output_attentions` / `output_hidden_states` are not available with `use_bpd=True` (verification runs "
            "over blocks of tokens); call the base model's forward on the output to get them."
        )
    if not config.use_cache:
        raise ValueError("`use_bpd=True` needs the KV cache: do not pass `use_cache=False`.")


def _check_processors(processors: Any, batch: int, do_sample: bool, options: BPDOptions) -> bool:
    """Whether the verified nodes must be scored one by one along the accepted path (see the module docstring)."""
    for p in processors:
        if isinstance(p, _REFUSED_PROCESSORS):
            raise ValueError(
                f"{type(p).__name__} (classifier-free guidance) runs the model with a cache of its own one token at a "
                "time: it cannot be combined with `use_bpd=True`. Use plain `generate` for guidance."
            )
    custom = [type(p).__name__ for p in processors if not is_pure_processor(p)]
    if not custom or options.pure_processors:
        return False
    if batch == 1 and not do_sample:
        return True
    raise ValueError(
        f"Logits processor(s) {custom} are not known to be pure functions of (input_ids, scores). `use_bpd=True` "
        "calls processors at every verified draft position (rejected ones included), so a processor that keeps "
        "state between calls (a grammar automaton, a step counter) would change the output. Exact ways out: batch "
        "size 1 with greedy decoding (the loop then calls them once per generated token, as plain `generate` "
        "does); or, if they are pure, say so with `bpd_pure_processors=True`; or use plain `generate`."
    )


def _check_criteria(criteria: Any, batch: int) -> None:
    custom = [type(c).__name__ for c in criteria if type(c) not in KNOWN_CRITERIA]
    if custom and batch > 1:
        warnings.warn(
            f"Stopping criteria {custom}: with `use_bpd=True` and batch size > 1 each is called once per committed "
            "token of each row (the row's tokens in its own batch position), not once per step for the whole "
            "batch; a criterion that is a function of (input_ids, scores) stops exactly as in plain `generate`.",
            UserWarning,
            stacklevel=2,
        )


# ------------------------------------------------------------------------------------------------ caches
def max_block_width(drafter: Drafter, num_heads: int, options: BPDOptions) -> int | None:
    """Most tokens a verify block of this drafter can hold (root included), or None if the drafter does not say."""
    declared = getattr(drafter, "max_block_width", None)
    if isinstance(declared, int):
        width = declared
    elif type(drafter) is HeadsDrafter:
        width = num_heads + 1
    elif isinstance(getattr(drafter, "num_nodes", None), int):
        width = drafter.num_nodes + 1
    elif getattr(drafter, "choices", None):
        width = len(drafter.choices) + 1
    elif isinstance(getattr(drafter, "num_drafts", None), int):
        width = drafter.num_drafts * num_heads + 1
    else:
        return None
    return width + (num_heads if options.compare_unrefined else 0)


def _layer_classes(cache: Any) -> list[type]:
    classes = [type(layer) for layer in getattr(cache, "layers", [])]
    replicate = getattr(cache, "layer_class_to_replicate", None)
    return classes + ([replicate] if replicate is not None else [])


def check_cache(
    cache: Any, input_ids: torch.LongTensor, mask: torch.Tensor | None, max_length: int, width: int | None
) -> None:
    """
    Refuse a cache the loop cannot roll back exactly. Supported: the dynamic cache's full-attention layers (default,
    `cache_implementation="dynamic"` / `"offloaded"`, a `DynamicCache` passed as `cache=`, prefilled or not), and
    sliding-window layers at batch size 1 while the whole generation fits the window.
    """
    if cache is None:
        raise ValueError("`use_bpd=True` needs a KV cache; none was prepared by `generate`.")
    use_instead = (
        "Use the default dynamic cache (do not set `cache_implementation`, or pass a `transformers.DynamicCache`)."
    )
    for cls in _layer_classes(cache):
        if cls is DynamicLayer:
            continue
        if cls is DynamicSlidingWindowLayer:
            _check_sliding(cache, input_ids, max_length, width)
            continue
        croppable = getattr(cls, "is_croppable", False) is True
        why = (
            "a fixed capacity and layout that per-row holes and tree blocks overflow"
            if croppable
            else ("state that cannot be cropped, so rejected drafts cannot be rolled back")
        )
        raise ValueError(
            f"`use_bpd=True` does not support a {type(cache).__name__} with {cls.__name__} layers: they have {why} "
            "(static, quantized and recurrent / linear-attention caches). " + use_instead
        )
    _check_prefilled(cache, input_ids, mask)


def _check_sliding(cache: Any, input_ids: torch.LongTensor, max_length: int, width: int | None) -> None:
    window = min(layer.sliding_window for layer in cache.layers if isinstance(layer, DynamicSlidingWindowLayer))
    if input_ids.shape[0] > 1:
        raise ValueError(
            f"`use_bpd=True` with a sliding-window cache (window {window}) supports batch size 1: rows that accept "
            "different numbers of drafts leave masked slots that would push the cache past its window. Generate the "
            "rows one at a time, or use a model configuration without a sliding window."
        )
    if width is None:
        raise ValueError(
            "`use_bpd=True` with a sliding-window cache needs to know the drafter's largest verify block: give the "
            "drafter a `max_block_width` attribute, or use the default heads drafter."
        )
    if max_length - 1 + width >= window:
        raise ValueError(
            f"`use_bpd=True` supports sliding-window caches only while the cache, verify block included, stays "
            f"inside the window ({window} tokens); max_length {max_length} plus a block of {width} does not. Lower "
            f"max_new_tokens to at most {window - width - input_ids.shape[1]}, or use plain `generate`."
        )


def _check_prefilled(cache: Any, input_ids: torch.LongTensor, mask: torch.Tensor | None) -> None:
    """A cache that already holds part of the prompt: it must match the prompt as plain `generate` reads it."""
    past = cache.get_seq_length() if _is_filled(cache) else 0
    if past == 0:
        return
    batch, length = input_ids.shape
    cached_batch = next(layer.keys.shape[0] for layer in cache.layers if getattr(layer, "is_initialized", False))
    if cached_batch != batch:
        raise ValueError(
            f"The cache holds {cached_batch} rows but `input_ids` has {batch}: pass one row per cache row."
        )
    mask_length = mask.shape[1] if mask is not None else length
    if mask_length == length and past >= length:
        raise ValueError(
            f"The cache already holds {past} tokens but the prompt has only {length}: pass the cached tokens followed "
            "by at least one new token as `input_ids`."
        )
    if mask_length not in (length, past + length):
        raise ValueError(
            f"The attention mask covers {mask_length} positions, the cache {past} and `input_ids` {length}: pass the "
            "whole prompt (cached tokens included) with its mask, or only the new tokens with a mask over cache + new."
        )


def _is_filled(cache: Any) -> bool:
    return any(getattr(layer, "is_initialized", False) for layer in getattr(cache, "layers", []))


def uncached_start(cache: Any, input_ids: torch.LongTensor, mask: torch.Tensor | None) -> int:
    """Index of the first prompt token the cache does not hold (as plain `generate`'s prefill slices it)."""
    past = cache.get_seq_length() if _is_filled(cache) else 0
    mask_length = mask.shape[1] if mask is not None else input_ids.shape[1]
    return past if mask_length == input_ids.shape[1] else 0
