"""
`hf_bpd._compat`: a version outside the tested range warns once (never fails at import), and the private transformers
APIs hf_bpd relies on still have the shape it expects in the installed release.
"""

from __future__ import annotations

import inspect
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import batch_prompts, tiny_base
from transformers import DynamicCache, GenerationMixin, Trainer
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer

from hf_bpd import _compat


def params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


# ------------------------------------------------------------------------------------------------ versions
def test_tested_versions_pass_silently(monkeypatch):
    monkeypatch.delenv("HF_BPD_SKIP_VERSION_CHECK", raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _compat.check_transformers()
        assert _compat.check_version("transformers", "5.24.3")  # a patch release of the tested minor


def test_untested_version_warns_once_naming_both(monkeypatch):
    monkeypatch.delenv("HF_BPD_SKIP_VERSION_CHECK", raising=False)
    monkeypatch.setattr(_compat, "_warned", set())
    with pytest.warns(UserWarning, match=r"tested with transformers >=5\.24\.0,<5\.25, but transformers 9\.9\.0"):
        assert not _compat.check_version("transformers", "9.9.0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: the second call is silent
        assert not _compat.check_version("transformers", "9.9.0")


def test_skip_variable_silences_the_warning(monkeypatch):
    monkeypatch.setattr(_compat, "_warned", set())
    monkeypatch.setenv("HF_BPD_SKIP_VERSION_CHECK", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not _compat.check_version("transformers", "9.9.0")


def test_import_does_not_fail_on_an_untested_version():
    code = (
        "import transformers; transformers.__version__ = '9.9.0'\n"
        "import warnings; warnings.simplefilter('always')\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    import hf_bpd\n"
        "print(sum('tested with transformers' in str(x.message) for x in w))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "1"


# ------------------------------------------------------------------------------------------------ private APIs
def test_generate_hands_a_custom_generate_callable_what_the_loop_reads():
    """`custom_generate=callable` gets (model, input_ids, logits_processor, stopping_criteria, generation_config,
    **model_kwargs) with a ready cache and `_pad_token_tensor` set on the generation config."""
    assert "custom_generate" in params(GenerationMixin.generate)
    base = tiny_base()
    ids, _ = batch_prompts(1)
    seen = {}

    def probe(model, input_ids, logits_processor, stopping_criteria, generation_config, **model_kwargs):
        seen.update(pad=_compat.pad_token_tensor(generation_config), cache=model_kwargs.get("cache"))
        return input_ids

    base.generate(ids, max_new_tokens=2, custom_generate=probe)
    assert isinstance(seen["pad"], torch.Tensor) and isinstance(seen["cache"], Cache)


def test_prefill_slicing_of_a_user_cache():
    """`_prefill` slices the prompt by the cache length when the mask is as long as the prompt (uncached_start)."""
    assert params(GenerationMixin._prefill)[:4] == ["self", "input_ids", "generation_config", "model_kwargs"]
    source = inspect.getsource(GenerationMixin._prefill)
    assert "get_seq_length()" in source and "mask_length == input_ids.shape[1]" in source


def test_logits_to_keep_probe():
    assert callable(getattr(GenerationMixin, "_supports_logits_to_keep", None))
    assert _compat.supports_logits_to_keep(tiny_base()) is True


def test_cache_layers_the_loop_writes_into():
    assert params(Cache.crop) == ["self", "tokens_to_remove"]
    assert DynamicLayer.is_croppable and params(DynamicSlidingWindowLayer.__init__)[:2] == ["self", "sliding_window"]
    cache = DynamicCache(config=tiny_base().config)
    keys = torch.randn(2, 2, 5, 8)
    cache.update(keys, keys.clone(), 0)
    layer = cache.layers[0]
    assert layer.is_initialized and layer.keys.shape == (2, 2, 5, 8) and layer.values.shape == (2, 2, 5, 8)
    order = torch.tensor([[2, 1, 0], [0, 1, 2]])
    expected = keys.clone()
    expected[0, :, -3:] = keys[0, :, [4, 3, 2]]
    _compat.reorder_cache_tail(cache, 3, order)  # writes into layer.keys in place
    torch.testing.assert_close(cache.layers[0].keys, expected)


def test_heal_tokens_and_merge_criteria_signatures():
    assert params(GenerationMixin.heal_tokens)[:3] == ["self", "input_ids", "tokenizer"]
    assert params(GenerationMixin._merge_criteria_processor_list) == ["self", "default_list", "custom_list"]


def test_trainer_private_methods_are_there():
    _compat.check_trainer_private_api(Trainer)


def test_trainer_private_api_check_names_the_method():
    class Moved:
        def _save(self, output_dir=None, state_dict=None): ...

    with pytest.raises(ImportError, match="Trainer._load_from_checkpoint is missing"):
        _compat.check_trainer_private_api(Moved)
