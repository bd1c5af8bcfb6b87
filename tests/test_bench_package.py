"""hf_bpd_bench apart from the library: no import from hf_bpd, one registry entry per method, argument errors before
torch loads, the stack chosen from the model's tokenizer, and the deprecated hf_bpd.tools shims."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import hf_bpd_bench.cli as cli
from hf_bpd_bench import methods as M
from hf_bpd_bench.reference import find_reference

REPO = Path(__file__).resolve().parents[1]
SHIMS = {REPO / "hf_bpd" / "cli.py", *(REPO / "hf_bpd" / "tools").glob("*.py")}  # deprecated forwards, on request


def _run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr
    return done.stdout


# ------------------------------------------------------------------------------------------------ no import circle
def test_the_library_never_imports_the_benchmark_package():
    for path in sorted((REPO / "hf_bpd").rglob("*.py")):
        if path in SHIMS:
            continue
        package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):  # relative imports made absolute
                base = package.rsplit(".", node.level - 1)[0] if node.level else ""
                module = ".".join(filter(None, [base, node.module or ""]))
                names += [module] + [f"{module}.{a.name}" for a in node.names]
            bad = [n for n in names if n.startswith(("hf_bpd_bench", "hf_bpd.tools", "hf_bpd.cli"))]
            assert not bad, f"{path} imports {bad} (the benchmark package or its deprecated forwards)"
    out = _run(
        "import importlib, pkgutil, sys, hf_bpd\n"
        "skip = ('hf_bpd.tools', 'hf_bpd.cli')\n"
        "for m in pkgutil.walk_packages(hf_bpd.__path__, 'hf_bpd.'):\n"
        "    if not m.name.startswith(skip):\n"
        "        importlib.import_module(m.name)\n"
        "print(sorted(n for n in sys.modules if n.startswith('hf_bpd_bench')))"
    )
    assert out.strip() == "[]"


def test_moved_names_warn_or_name_their_new_place():
    import hf_bpd_bench.bench
    import hf_bpd_bench.tune

    sys.modules.pop("hf_bpd.tools.bench", None)
    with pytest.warns(DeprecationWarning, match="hf_bpd.tools.bench moved to hf_bpd_bench.bench"):
        from hf_bpd.tools import bench
    assert bench is hf_bpd_bench.bench  # the module itself: monkeypatching the old name reaches the running code
    with pytest.raises(ImportError, match="from hf_bpd_bench.tune import tune_rescorer"):
        from hf_bpd.logits import tune_rescorer  # noqa: F401
    with pytest.raises(ImportError, match="hf_bpd_bench.defaults"):
        import hf_bpd.logits

        hf_bpd.logits.RESCORER_DEFAULTS  # noqa: B018
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from hf_bpd.tools import build_ngram
    from hf_bpd.logits import ngram_build

    assert build_ngram is ngram_build  # the KenLM builder stays in the library


# ------------------------------------------------------------------------------------------------ CLI speed
@pytest.mark.parametrize("argv", [["--help"], ["bench", "--help"], ["bench", "--methods", "nope"]])
def test_help_and_argument_errors_answer_before_torch_loads(argv):
    code = (
        "import sys, time\n"
        "start = time.perf_counter()\n"
        "from hf_bpd_bench.cli import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit as e:\n"
        "    code = e.code\n"
        "print('RESULT', code, 'torch' in sys.modules, 'transformers' in sys.modules, time.perf_counter() - start)"
    )
    line = _run(code).strip().splitlines()[-1].split()
    assert line[:4] == ["RESULT", "0" if "--help" in argv else "2", "False", "False"]
    assert float(line[4]) < 2.0


# ------------------------------------------------------------------------------------------------ the registry
def test_every_method_is_one_complete_registry_entry():
    assert M.REFERENCE_METHOD in M.METHODS and M.METHODS[M.DEFAULT_BPD_METHOD].drafter == M.CHECKPOINT
    assert {spec.group for spec in M.METHODS.values()} == set(M.GROUPS)
    for name, spec in M.METHODS.items():
        assert spec.help and (spec.uses_bpd or spec.generate or name == M.REFERENCE_METHOD), name
        if isinstance(spec.drafter, dict):
            assert isinstance(spec.drafter.get("type"), str), name
        assert set(spec.parts()) <= set(M.PARTS)
    assert M.parts_needed(["bpd-neural", "pld"]) == {"small_lm"}
    assert M.parts_needed(["bpd-tree-ngram", "bpd-tree-static"]) == {"ngram_path", "draft_tree"}
    assert M.METHODS["oracle"].per_batch and not M.METHODS["bpd-pbest"].per_batch
    with pytest.raises(ValueError, match="group must be one of"):
        M.MethodSpec("x", "fast")


def test_registry_values_resolve_from_the_run():
    from types import SimpleNamespace

    cfg = SimpleNamespace(top_k=5, alpha_ngram=0.25, num_drafts=3)
    spec = M.resolve(M.METHODS["bpd-pbest"].drafter, cfg, SimpleNamespace(ngram_path="lm.arpa"))
    assert spec == {"type": "ngram", "model": "lm.arpa", "top_k": 5, "alpha": 0.25, "num_drafts": 3}
    with pytest.raises(ValueError, match="KenLM n-gram.*--ngram"):
        M.resolve(M.METHODS["bpd-pbest"].drafter, cfg, SimpleNamespace(ngram_path=None))


def test_make_drafter_builds_each_registered_drafter_type(tmp_path):
    import torch
    from conftest import tiny_base
    from transformers import AutoTokenizer

    from hf_bpd import BPDForCausalLM, logits
    from hf_bpd_bench.bench import BenchConfig, Resources, make_drafter

    tok = AutoTokenizer.from_pretrained(REPO / "reference" / "tokenizer")
    small = tiny_base("llama", seed=5, vocab_size=len(tok))
    model = BPDForCausalLM.from_base(tiny_base("llama", vocab_size=len(tok)), num_draft_heads=2)
    arpa = tmp_path / "lm.arpa"
    arpa.write_text(
        "\\data\\\nngram 1=5\nngram 2=1\n\n\\1-grams:\n-1.0\t<unk>\t0\n-99\t<s>\t0\n-1.0\t</s>\t0\n"
        "-0.5\t17\t-0.1\n-0.7\t42\t0\n\n\\2-grams:\n-0.1\t17 42\n\n\\end\\\n"
    )
    res = Resources(
        model=model, tokenizer=tok, small_lm=small, ngram_path=str(arpa) if logits.is_kenlm_available() else None
    )
    built = {}
    for name, spec in M.METHODS.items():
        if not isinstance(spec.drafter, dict) or (not logits.is_kenlm_available() and "ngram_path" in spec.parts()):
            continue
        resolved = M.resolve(spec.drafter, BenchConfig(), res, reference=torch.zeros(1, 4, dtype=torch.long))
        built[name] = type(make_drafter(resolved, res)).__name__
    assert built["bpd-pbest0"] == "PBestRescorer" and built["bpd-neural"] == "NeuralRescorer"
    assert built["bpd-tree"] == "DynamicTreeDrafter" and built["bpd-tree-static"] == "StaticTreeDrafter"
    assert built["oracle"] == "OracleDrafter"
    if logits.is_kenlm_available():
        assert built["bpd-ngram"] == built["bpd-pbest"] == "NgramRescorer"


# ------------------------------------------------------------------------------------------------ stacks
needs_smollm2_stack = pytest.mark.skipif(
    find_reference("smollm2-heads") is None or find_reference("heads") is None, reason="shipped stacks not present"
)


class _Loaded(Exception):
    pass


@pytest.fixture
def stop_at_loading(monkeypatch):
    """`hf-bpd bench` up to loading models: the resolved arguments, or the refusal."""
    seen = {}

    def load(args, need_small, need_ngram):
        seen.update(vars(args), need_small=need_small, need_ngram=need_ngram)
        raise _Loaded

    monkeypatch.chdir(REPO)
    monkeypatch.delenv("HF_BPD_REFERENCE", raising=False)
    monkeypatch.setattr(cli, "_load_resources", load)
    return seen


@needs_smollm2_stack
def test_the_stack_follows_the_models_tokenizer(stop_at_loading):
    with pytest.raises(_Loaded):
        cli.main(["bench", "--model", "reference/smollm2-heads", "--methods", "greedy,bpd,assisted,bpd-ngram"])
    assert stop_at_loading["stack"] == "smollm2"
    assert Path(stop_at_loading["small_lm"]).name == "smollm2-small"
    assert Path(stop_at_loading["ngram"]).parent.name == "smollm2-ngram"
    assert Path(stop_at_loading["prompts"]).name == "smollm2_validation.jsonl"
    with pytest.raises(_Loaded):
        cli.main(["bench", "--methods", "assisted"])  # no --model: the reference stack, all of its parts
    assert stop_at_loading["stack"] == "reference" and Path(stop_at_loading["small_lm"]).name == "small"


@needs_smollm2_stack
@pytest.mark.parametrize(
    "extra, message",
    [
        (["--stack", "reference"], "--stack reference's parts use another tokenizer.*pass --stack smollm2"),
        (["--small-lm", "reference/small"], "small LM reference/small cannot draft.*--small-lm / --assistant"),
        (["--assistant", "reference/small"], "small LM reference/small cannot draft.*--small-lm / --assistant"),
        (["--ngram", "reference/ngram/ngram4.binary"], "'reference' stack's tokenizer.*--ngram"),
    ],
)
def test_parts_of_another_vocabulary_are_refused_before_loading(stop_at_loading, extra, message):
    argv = ["bench", "--model", "reference/smollm2-heads", "--methods", "greedy,bpd,assisted,bpd-ngram", *extra]
    with pytest.raises(SystemExit, match=message):
        cli.main(argv)
    assert not stop_at_loading  # nothing loaded


def test_a_model_of_no_shipped_stack_needs_its_parts_named(stop_at_loading, tmp_path):
    heads = tmp_path / "heads"
    heads.mkdir()
    tokenizer = {"model": {"type": "BPE", "vocab": {"a": 0, "b": 1}}, "added_tokens": []}
    (heads / "tokenizer.json").write_text(json.dumps(tokenizer))
    (heads / "config.json").write_text(json.dumps({"model_type": "bpd", "base_vocab_size": 2}))
    argv = ["bench", "--model", str(heads), "--methods", "greedy,assisted"]
    with pytest.raises(SystemExit, match="no --prompts given.*pass --prompts"):
        cli.main(argv)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a"}\n')
    with pytest.raises(SystemExit, match="assisted need a small LM.*pass --small-lm / --assistant"):
        cli.main([*argv, "--prompts", str(prompts)])
    small = tmp_path / "small"
    small.mkdir()
    (small / "config.json").write_text(json.dumps({"vocab_size": 3}))
    with pytest.raises(SystemExit, match="3 tokens, the model's 2"):
        cli.main([*argv, "--prompts", str(prompts), "--assistant", str(small)])
    (small / "config.json").write_text(json.dumps({"vocab_size": 2}))
    with pytest.raises(_Loaded):
        cli.main([*argv, "--prompts", str(prompts), "--assistant", str(small)])
    assert stop_at_loading["stack"] is None and stop_at_loading["small_lm"] == str(small)


def test_export_without_model_gets_the_reference_heads_from_the_cli_not_the_library(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(cli, "_delegate", lambda module, rest: seen.append((module, rest)) or 0)
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("HF_BPD_REFERENCE", raising=False)
    cli.main(["export", "out"])
    cli.main(["export", "out", "--model", "mine"])
    assert seen[0] == ("hf_bpd.export", ["out", "--model", str(find_reference("heads"))])
    assert seen[1] == ("hf_bpd.export", ["out", "--model", "mine"])
    from hf_bpd import export

    with pytest.raises(SystemExit):  # the library's own command names what to pass
        export.main([str(tmp_path / "out")])


@pytest.mark.parametrize(
    "bad", [["--repeats", "0"], ["--num-nodes", "-1"], ["--max-depth", "0"], ["--dtype", "int8"], ["--top-k", "x"]]
)
def test_tune_auto_refuses_nonsense_arguments(bad, capsys):
    from hf_bpd_bench.auto_tune import main

    with pytest.raises(SystemExit) as err:
        main(["--model", "m", "--prompts", "p", *bad])
    assert err.value.code == 2 and bad[0] in capsys.readouterr().err


def test_pld_tokens_flag_reaches_the_bench_config():
    """`--pld-tokens` sets transformers' `prompt_lookup_num_tokens` for `pld`; its default is BenchConfig's."""
    from hf_bpd_bench.bench import BenchConfig
    from hf_bpd_bench.cli import build_parser

    assert build_parser().parse_args(["bench"]).pld_tokens == BenchConfig().pld_tokens
    assert build_parser().parse_args(["bench", "--pld-tokens", "10"]).pld_tokens == 10
