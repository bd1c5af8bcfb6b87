"""`bench/make_benchmarks.py --reference-table-only`: the reference-stack table counts every shipped part."""

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _module(repo: Path):
    spec = importlib.util.spec_from_file_location("make_benchmarks", REPO / "bench" / "make_benchmarks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.REPO = repo  # the table and the files it rewrites are read from here
    return module


def _heads_log(head_type: str, **extra) -> dict:
    return {
        "head_type": head_type,
        "num_draft_heads": 2,
        "train_target_tokens": 1_500_000,
        "global_step": 300,
        "seconds_this_session": 600,
        "head_metrics": {"top1": [0.5, 0.25]},
        **extra,
    }


def test_reference_table_counts_the_smollm2_parts_and_rewrites_both_files(tmp_path):
    ref = tmp_path / "reference"
    for name, log in {
        "smollm2-heads": _heads_log("recurrent", resumed_from_step=100, epochs=2.5),
        "smollm2-medusa-heads": _heads_log("resblock"),
    }.items():
        (ref / name).mkdir(parents=True)
        (ref / name / "bpd_training.json").write_text(json.dumps(log))
        (ref / name / "bpd_heads.safetensors").write_bytes(b"\0" * 2_000_000)
    (ref / "smollm2-ngram").mkdir()
    ngram = {"order": 4, "prune": [0, 1], "quantize_bits": 8, "binary_type": "trie", "build_time_s": 12.0}
    (ref / "smollm2-ngram" / "ngram_info.json").write_text(json.dumps({**ngram, "size_bytes": 3_000_000}))
    (ref / "smollm2-ngram" / "ngram4.binary").write_bytes(b"\0" * 3_000_000)
    (tmp_path / "README.md").write_text("intro\n<!-- REF:START -->\nold table\n<!-- REF:END -->\nafter\n")
    (tmp_path / "BENCHMARKS.md").write_text("# B\n\n## Reference stack\n\n| old |\n|---|\n\n## Batch size 1\nkept\n")

    module = _module(tmp_path)
    module.write_reference_table()
    readme = (tmp_path / "README.md").read_text()
    bench = (tmp_path / "BENCHMARKS.md").read_text()
    assert "old table" not in readme and "| old |" not in bench
    assert readme.startswith("intro\n") and readme.endswith("after\n") and bench.endswith("## Batch size 1\nkept\n")
    for text in (readme, bench):
        rows = {
            line.split(" | ")[0]: line for line in text.splitlines() if line.startswith(("| `reference", "| all of"))
        }
        heads = rows["| `reference/smollm2-heads`"]
        assert "token-conditioned" in heads and "1.50M target tokens, 300 steps, 2.5 epochs" in heads
        assert "10 min from step 100 on" in heads and "0.50, 0.25" in heads and "2.0 MB" in heads
        assert "ResBlock" in rows["| `reference/smollm2-medusa-heads`"]
        assert "from step" not in rows["| `reference/smollm2-medusa-heads`"]
        assert "KenLM 4-gram over SmolLM2 token ids" in rows["| `reference/smollm2-ngram`"]
        # the total is every file under reference/, the SmolLM2 parts included
        total = sum(f.stat().st_size for f in ref.rglob("*") if f.is_file())
        assert rows["| all of `reference/`"].endswith(f"| {total / 1e6:.1f} MB |")
    module.write_reference_table()  # idempotent: a second rewrite changes nothing
    assert (tmp_path / "README.md").read_text() == readme and (tmp_path / "BENCHMARKS.md").read_text() == bench
