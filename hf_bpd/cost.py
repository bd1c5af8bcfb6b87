"""
What one verify forward costs on the machine at hand, as a function of its width.

A verify step feeds the base model `W` new tokens (the root and `W - 1` draft nodes) over a KV cache. On memory-bound
hardware (a GPU; a CPU with bf16 matrix units running a small model) the time is nearly flat in `W`; on a CPU without
them, in fp32, five tokens may already cost ~1.75x one (issue 19's SmolLM2 numbers). A node budget tuned on one
machine is wrong on the next, so the curve is *measured*: once per (CPU model, model fingerprint, dtype, device, torch
thread count, torch version), at first use, in a few seconds, and cached as JSON in the user cache directory
(`hf_bpd.smollm2.cache_root()`: `$HF_BPD_CACHE`, else `$XDG_CACHE_HOME/hf_bpd`, else `~/.cache/hf_bpd`).

Method: a private `DynamicCache` is filled with `context_length` random tokens (a local generator: the global RNG is
untouched); then for every width of a grid dense where trees and prompt-lookup chains live (1-6, 8, 12, 16, 24, 32,
64) one cached forward over `W` tokens (all `W` logits, as verification computes them) is timed and cropped back.
Widths are interleaved (each repeat visits every width, in a rotated order) and the *fastest* repeat of each width is
kept: another process or frequency scaling only ever adds time, so the minimum is the estimate least hurt by a busy
machine (a median measured beside another job rated SmolLM2's 3-token bf16 forward at 1.78x one, 2 threads, where
the fastest repeats on the idle machine give 1.02x; the width chooser then verified almost nothing). What decoding
really pays per width is learnt while generating ([`~hf_bpd.drafters.AutoDrafter`] corrects this curve by the step
times it observes). Between grid points the cost is interpolated linearly, beyond the last one extrapolated along the last segment.

A cache entry is used only when its whole key equals the current one (another machine, instruction-set limit
(`ISA_LIMIT_ENV`), model, dtype, device, thread count or torch version is re-measured, never trusted); an unreadable
cache file is re-measured with a warning; the file is replaced atomically (write a temporary file, then `os.replace`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

DEFAULT_WIDTHS = (1, 2, 3, 4, 5, 6, 8, 12, 16, 24, 32, 64)
CACHE_FILE = "forward_cost.json"
_SCHEMA = 2  # 2: the fastest repeat per width (1 kept medians, which a busy machine inflates)
_MAX_ENTRIES = 32  # a cache file keeps the most recent entries (threads, dtypes and models a user switches between)


def cpu_model() -> str:
    """
    The CPU: `/proc/cpuinfo`'s `model name` and a short hash of its feature flags (a virtual machine may report a
    bare "AMD EPYC" for several generations; the flags tell bf16 / AMX units apart), else `platform.processor()`.
    """
    name, flags = None, ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name") and name is None:
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = line.split(":", 1)[1].strip()
    except OSError:
        pass
    name = name or platform.processor() or platform.machine() or "unknown"
    return f"{name} (flags {hashlib.sha256(flags.encode()).hexdigest()[:8]})" if flags else name


def _base_model(model: Any) -> Any:
    """The model whose forward verifies: a `BPDForCausalLM`'s base model, else `model` itself."""
    from .modeling_bpd import (
        BPDForCausalLM,  # lazy: this module stays importable without the model classes
    )

    return model.base if isinstance(model, BPDForCausalLM) else model


def model_fingerprint(model: Any) -> dict[str, Any]:
    """
    What identifies a model's forward cost: a hash of its config (without its name or path), its parameter count and
    dtype. Weights' values do not change the cost, so they are not read.
    """
    config = model.config.to_dict()
    for key in ("_name_or_path", "transformers_version", "_commit_hash"):
        config.pop(key, None)
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return {
        "config_sha256": digest,
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "dtype": str(model.dtype).replace("torch.", ""),
    }


# Environment variables that limit the instruction sets of torch's math libraries: oneDNN (bf16 matmuls on CPU), MKL
# (fp32 GEMM) and ATen's vectorised kernels. A run under them is another machine than the CPU's flags say.
ISA_LIMIT_ENV = ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY")


def isa_limits() -> dict[str, str]:
    """The instruction-set limits set in the environment, e.g. `{"ONEDNN_MAX_CPU_ISA": "AVX2"}` (`ISA_LIMIT_ENV`)."""
    return {name: os.environ[name] for name in ISA_LIMIT_ENV if os.environ.get(name, "").strip()}


def cost_key(model: Any, widths: tuple[int, ...], context_length: int) -> dict[str, Any]:
    """The full key a measured curve is valid for: machine, model, device, threads, torch and the measuring grid."""
    device = torch.device(model.device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return {
        "schema": _SCHEMA,
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "isa_limits": isa_limits(),
        "model": model_fingerprint(model),
        "device": device_name,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "widths": list(widths),
        "context_length": int(context_length),
    }


@dataclass(frozen=True)
class ForwardCost:
    """
    The measured cost of one cached forward of the base model over `W` new tokens.

    Args:
        widths (`tuple[int, ...]`): the measured widths, ascending, the first one 1.
        seconds (`tuple[float, ...]`): wall-clock seconds of one forward at each width (the fastest repeat).
        key (`dict`): what the curve was measured for ([`cost_key`]); empty for a hand-made curve.
    """

    widths: tuple[int, ...]
    seconds: tuple[float, ...]
    key: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        _check_curve(self.widths, self.seconds)

    def cost(self, width: float) -> float:
        """
        Seconds of one forward over `width` tokens: linear between measured widths, along the last segment beyond
        the last one, `cost(1)` below 1.
        """
        w, s = self.widths, self.seconds
        if width <= w[0] or len(w) == 1:
            return s[0]
        for i in range(1, len(w)):
            if width <= w[i] or i == len(w) - 1:
                slope = (s[i] - s[i - 1]) / (w[i] - w[i - 1])
                return max(s[i - 1] + slope * (width - w[i - 1]), 0.0)
        raise AssertionError("unreachable")

    def relative(self, width: float) -> float:
        """`cost(width) / cost(1)`: how many greedy steps a verify step of `width` tokens costs."""
        return self.cost(width) / self.cost(1)

    def curve(self, max_width: int) -> torch.DoubleTensor:
        """`(max_width,)` seconds for widths `1 .. max_width` (the input of `hf_bpd.verify_width.choose_num_nodes`)."""
        return torch.tensor([self.cost(w) for w in range(1, max_width + 1)], dtype=torch.float64)

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "widths": list(self.widths), "seconds": list(self.seconds)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ForwardCost:
        """Raises `ValueError` (or `KeyError` / `TypeError`) when `data` is not a valid curve."""
        return cls(
            widths=tuple(int(w) for w in data["widths"]),
            seconds=tuple(float(s) for s in data["seconds"]),
            key=dict(data["key"]),
        )

    @classmethod
    def measure(
        cls,
        model: Any,
        widths: tuple[int, ...] = DEFAULT_WIDTHS,
        context_length: int | None = None,
        repeats: int = 21,
        budget_s: float = 4.0,
    ) -> ForwardCost:
        """
        Time the model's cached forward at each width (see the module docstring), in its own cache.

        Args:
            model: a causal LM (or a `BPDForCausalLM`, whose base model is measured).
            widths (`tuple[int, ...]`): ascending widths to time, the first one 1.
            context_length (`int`, *optional*): tokens in the cache before each timed forward; defaults to 256, less
                when the model's `max_position_embeddings` is smaller.
            repeats (`int`): timed passes over all widths (after one untimed warm-up pass).
            budget_s (`float`): stop after the pass that exceeds this many seconds (at least 5 passes).
        Returns:
            [`ForwardCost`] with the fastest repeat's seconds per width, made non-decreasing in the width (a dip is
            noise).
        """
        model = _base_model(model)
        widths = tuple(int(w) for w in widths)
        context_length = _context_length(model, widths, context_length)
        timings = _time_widths(model, widths, context_length, repeats, budget_s)
        seconds = tuple(_non_decreasing([min(t) for t in timings]))
        return cls(widths=widths, seconds=seconds, key=cost_key(model, widths, context_length))

    @classmethod
    def for_model(
        cls,
        model: Any,
        cache_dir: str | os.PathLike | None = None,
        widths: tuple[int, ...] = DEFAULT_WIDTHS,
        context_length: int | None = None,
        **measure_kwargs: Any,
    ) -> ForwardCost:
        """
        The model's cost curve on this machine: read from the cache when an entry has exactly this key, else
        measured (a few seconds) and cached.

        Args:
            model: a causal LM (or a `BPDForCausalLM`).
            cache_dir (`str` or `os.PathLike`, *optional*): folder of the cache file; defaults to
                `hf_bpd.smollm2.cache_root()`.
            widths, context_length, measure_kwargs: see [`~ForwardCost.measure`].
        """
        from .smollm2 import (
            cache_root,  # the project's one definition of the user cache folder
        )

        base = _base_model(model)
        widths = tuple(int(w) for w in widths)
        context_length = _context_length(base, widths, context_length)
        path = Path(cache_dir if cache_dir is not None else cache_root()) / CACHE_FILE
        key = cost_key(base, widths, context_length)
        entries = _read_entries(path)
        for entry in entries:
            if entry.get("key") == key:
                try:
                    return cls.from_dict(entry)
                except (KeyError, TypeError, ValueError) as err:
                    logger.warning("Ignoring an invalid forward-cost entry in %s (%s); measuring again.", path, err)
        measured = cls.measure(base, widths, context_length, **measure_kwargs)
        kept = [e for e in entries if e.get("key") != key][-(_MAX_ENTRIES - 1) :]
        _write_entries(path, kept + [measured.to_dict()])
        return measured


def _check_curve(widths: tuple[int, ...], seconds: tuple[float, ...]) -> None:
    if not widths or len(widths) != len(seconds) or widths[0] != 1:
        raise ValueError(
            f"A cost curve needs as many seconds as widths, starting at width 1; got {widths}, {seconds}."
        )
    if any(b <= a for a, b in itertools.pairwise(widths)):
        raise ValueError(f"The widths of a cost curve must be strictly ascending, got {widths}.")
    if any(not (s > 0 and s < float("inf")) for s in seconds):
        raise ValueError(f"The seconds of a cost curve must be positive and finite, got {seconds}.")


def _non_decreasing(values: list[float]) -> list[float]:
    """
    The closest non-decreasing sequence in least squares (pool adjacent violators): a wider forward never costs less,
    so a measured dip is noise, spread over its neighbours instead of trusted.
    """
    blocks: list[list[float]] = []  # [mean, count]
    for value in values:
        blocks.append([value, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m2, n2), (m1, n1) = blocks.pop(), blocks.pop()
            blocks.append([(m1 * n1 + m2 * n2) / (n1 + n2), n1 + n2])
    return [mean for mean, count in blocks for _ in range(int(count))]


def _context_length(model: Any, widths: tuple[int, ...], context_length: int | None) -> int:
    limit = getattr(model.config, "max_position_embeddings", None) or 4096
    if context_length is None:
        context_length = min(256, limit - max(widths) - 1)
    if context_length < 1 or context_length + max(widths) > limit:
        raise ValueError(
            f"Cannot time widths up to {max(widths)} after {context_length} context tokens: the model takes "
            f"{limit} positions. Pass a smaller `context_length` or smaller `widths`."
        )
    return int(context_length)


@torch.no_grad()
def _time_widths(
    model: Any, widths: tuple[int, ...], context_length: int, repeats: int, budget_s: float
) -> list[list[float]]:
    """`timings[i]`: the seconds of each timed forward at `widths[i]`, in a private cache."""
    from transformers import DynamicCache

    device = torch.device(model.device)
    generator = torch.Generator().manual_seed(0)  # a local stream: the caller's RNG is untouched
    vocab = int(model.config.vocab_size)
    context = torch.randint(vocab, (1, context_length), generator=generator).to(device)
    block = torch.randint(vocab, (1, max(widths)), generator=generator).to(device)
    cache = DynamicCache(config=model.config)
    model(input_ids=context, cache=cache, use_cache=True, logits_to_keep=1)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def forward(width: int) -> float:
        positions = torch.arange(context_length, context_length + width, device=device)[None]
        sync()
        start = time.perf_counter()
        model(input_ids=block[:, :width], position_ids=positions, cache=cache, use_cache=True)
        sync()
        elapsed = time.perf_counter() - start
        cache.crop(-width)  # back to the context alone
        return elapsed

    for width in widths:  # warm-up: allocations, kernels' first calls
        forward(width)
    timings: list[list[float]] = [[] for _ in widths]
    started = time.perf_counter()
    for r in range(max(repeats, 1)):
        for i in [(r + j) % len(widths) for j in range(len(widths))]:  # a rotated order each pass
            timings[i].append(forward(widths[i]))
        if r + 1 >= 5 and time.perf_counter() - started > budget_s:
            break
    return timings


def _read_entries(path: Path) -> list[dict[str, Any]]:
    """The entries of a cache file; none (with a warning) when it is unreadable or not in the expected shape."""
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and isinstance(data.get("schema"), int) and data["schema"] < _SCHEMA:
            logger.info("The forward-cost cache %s is from an older version: measuring again.", path)
            return []
        entries = data["entries"]
        well_formed = isinstance(entries, list) and all(isinstance(e, dict) for e in entries)
        if data.get("schema") != _SCHEMA or not well_formed:
            raise ValueError(f"schema {data.get('schema')!r}, expected {_SCHEMA} with a list of entries")
        return entries
    except (OSError, ValueError, KeyError, TypeError) as err:
        logger.warning("The forward-cost cache %s is unreadable (%s): measuring again and rewriting it.", path, err)
        return []


def _write_entries(path: Path, entries: list[dict[str, Any]]) -> None:
    """Replace the cache file atomically; a read-only cache folder only costs a warning (the curve stays in use)."""
    temporary = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(
            "w", dir=path.parent, prefix=".forward_cost.", suffix=".tmp", delete=False, encoding="utf-8"
        ) as handle:
            temporary = handle.name
            json.dump({"schema": _SCHEMA, "entries": entries}, handle, indent=1)
        os.replace(temporary, path)
    except OSError as err:
        if temporary is not None and os.path.exists(temporary):
            os.unlink(temporary)
        logger.warning("Could not write the forward-cost cache %s (%s); it is measured again next time.", path, err)
