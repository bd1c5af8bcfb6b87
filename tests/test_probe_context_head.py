"""`bench/probe_context_head.py` refuses nonsense arguments before loading any data or model."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "probe_context_head.py"


@pytest.fixture(scope="module")
def probe():
    spec = importlib.util.spec_from_file_location("probe_context_head", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--steps", "0"], "--steps must be >= 1"),
        (["--batch", "0"], "--batch must be >= 1"),
        (["--minutes", "0"], "--minutes must be > 0"),
        (["--lr", "0"], "--lr > 0"),
        (["--eval-every", "-1"], "--eval-every"),
        (["--init-from", "/nonexistent/ckpt.pt"], "is not a checkpoint file"),
        (["--validation"], "--validation needs a trained --checkpoint"),
        (["--chain-depth", "3"], "invalid choice"),
    ],
)
def test_refuses_nonsense_arguments(probe, argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        probe.main(["--work-dir", str(tmp_path), *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
