#!/usr/bin/env bash
# Decode-loop overhead of two checkouts side by side (the restructuring's "no speed regression" check, issue 16):
# bench/bench_core.py (oracle drafts, 10M-reference shape, h = 4) in checkout A, then B, alternated ROUNDS times, then
# the median of each batch size's draft_loop_share (draft + loop per BPD step as a share of one greedy step).
#
#   git worktree add --detach ../wt-before e951d7e
#   bash bench/bench_core_ab.sh ../wt-before . 3 > bench/results/core_ab.json
set -euo pipefail
A=$(cd "$1" && pwd); B=$(cd "$2" && pwd); ROUNDS=${3:-3}
OUT=$(mktemp -d)
for i in $(seq "$ROUNDS"); do
  for side in A B; do
    dir=$A; [ "$side" = B ] && dir=$B
    (cd "$dir" && OMP_NUM_THREADS=1 PYTHONPATH="$dir" python bench/bench_core.py --batch-sizes 1 4 --repeats 3 \
      --threads 1 --json "$OUT/$side-$i.json" > /dev/null 2>&1)
  done
done
python - "$OUT" "$A" "$B" <<'PY'
import glob, json, statistics, sys
out, a, b = sys.argv[1:]
report = {"A": a, "B": b, "median_draft_loop_share": {}, "runs": {}}
for side in ("A", "B"):
    by_batch = {}
    for f in sorted(glob.glob(f"{out}/{side}-*.json")):
        for row in json.load(open(f))["results"]:
            by_batch.setdefault(row["batch_size"], []).append(row["draft_loop_share"])
    report["runs"][side] = by_batch
    report["median_draft_loop_share"][side] = {k: statistics.median(v) for k, v in by_batch.items()}
print(json.dumps(report, indent=1))
PY
