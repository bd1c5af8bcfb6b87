"""What machine a figure comes from (CPU name, native bf16 support) and the dtype `--dtype auto` picks there."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

DTYPES = ("auto", "float32", "bfloat16")
# x86 flags of native bf16 matrix arithmetic: AMX tiles, or AVX-512 BF16 dot products (vdpbf16ps).
_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
# oneDNN's x86 ISA names ("CPU Dispatcher Controls") from which on it multiplies bf16 natively; ALL is its default.
# Limiting torch's math libraries (`hf_bpd.cost.ISA_LIMIT_ENV`) with `ONEDNN_MAX_CPU_ISA=AVX2
# MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2` runs a CPU with bf16 units as an AVX2 CPU without them
# (fp32 "on a CPU without bf16 matrix units", emulated on one that has them).
_ONEDNN_BF16_ISAS = ("ALL", "AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX10")


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_name() -> str:
    """e.g. `AMD EPYC 9B14 x2` (model name and logical cores)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} x{os.cpu_count()}"


def has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AMX-BF16 or AVX512-BF16; Arm: the bf16 feature) and
    `ONEDNN_MAX_CPU_ISA`, where set, leaves oneDNN (which runs torch's bf16 matmuls on CPU) an ISA that uses them."""
    flags = _cpu_flags()
    if not (any(f in flags for f in _BF16_FLAGS) or "bf16" in flags):
        return False
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    return not isa or isa.startswith(_ONEDNN_BF16_ISAS)


def resolve_dtype(name: str) -> Any:
    """`"auto"` -> bf16 where the CPU (or a CUDA GPU) has native bf16 matrix units, else fp32; or the named dtype."""
    import torch

    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}.")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        return torch.bfloat16 if has_native_bf16() else torch.float32
    return getattr(torch, name)


def machine_record(dtype: Any) -> dict[str, Any]:
    """What a benchmark JSON records about where it ran."""
    import torch

    from hf_bpd.cost import isa_limits

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu_name(),
        "native_bf16": has_native_bf16(),
        "dtype": str(dtype).replace("torch.", ""),
        "torch_threads": torch.get_num_threads(),
        "gpu": device,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # ATen's kernels: e.g. AVX512, AVX2
        "isa_limits": isa_limits(),  # the environment's limits (hf_bpd.cost.ISA_LIMIT_ENV)
    }


def _units(record: dict[str, Any]) -> str:
    """`yes` / `no`, and the environment's instruction-set limits where a run set any."""
    units = "yes" if record["native_bf16"] else "no"
    limits = record.get("isa_limits")
    return units + (f" (ISA limited: {', '.join(f'{k}={v}' for k, v in limits.items())})" if limits else "")


def format_machine(record: dict[str, Any]) -> str:
    """One line for people, above the bench tables: what the figures were measured on."""
    units = _units(record)
    line = (
        f"machine: {record['cpu']} | bf16 matrix units: {units} | torch threads: {record['torch_threads']} | "
        f"dtype: {record['dtype']}"
    )
    return line + (f" | gpu: {record['gpu']}" if record.get("gpu") else "")


def format_verdict(method: str, speedup: float | None, record: dict[str, Any]) -> str:
    """One line for people: how fast `method` was against greedy on this machine, and what the machine was."""
    units = _units(record)
    threads = record["torch_threads"]
    where = f"({record['dtype']}, {record['cpu']}, bf16 units: {units}, {threads} thread{'s' if threads != 1 else ''})"
    if speedup is None:
        return f"{method}: not measured here {where}"
    return f"{method}: {speedup:.2f}x greedy here {where}"
