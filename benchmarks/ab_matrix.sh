#!/usr/bin/env bash
# Side by side: ../shared/perf/matrix.py against selectws at a git revision ("before") and at the work tree
# ("after"), each installed with `pip install .` into a venv of its own (no test extras), alternated
# after, before, after, before so that drift in machine load hits both. Then prints the table.
#
#   benchmarks/ab_matrix.sh REV [OUT_DIR]        e.g. benchmarks/ab_matrix.sh 8affeb8
#
# Needs the perf harness's venv (PERF_PYTHON, see ../shared/perf/README.md). About 12 minutes; every point is
# bounded by the harness (--duration 6 --warmup 2), loopback only.
set -euo pipefail
rev="${1:?usage: $0 REV [OUT_DIR]}"
repo=$(cd "$(dirname "$0")/.." && pwd)
out="${2:-/tmp/selectws-ab}"
perf="$repo/../shared/perf"
export PERF_PYTHON="${PERF_PYTHON:-/tmp/perf-venv/bin/python}" PERF_WORK="${PERF_WORK:-/tmp/selectws-perf}"
mkdir -p "$out"
src=$(mktemp -d /tmp/selectws-ab-src.XXXXXX)
git -C "$repo" archive "$rev" | tar -x -C "$src"
python3 -m venv "$out/before-venv" && "$out/before-venv/bin/pip" install -q "$src"
python3 -m venv "$out/after-venv" && "$out/after-venv/bin/pip" install -q "$repo"
rm -rf "$src"
run() { (cd "$perf" && PATH="$2/bin:$PATH" timeout 1200 python3 matrix.py --only "$3" --duration 6 --warmup 2 \
    --out "$out/$1.jsonl" > "$out/$1.log" 2>&1); }
run after-r1 "$out/after-venv" selectws,websockets-asyncio
run before-r1 "$out/before-venv" selectws
run after-r2 "$out/after-venv" selectws
run before-r2 "$out/before-venv" selectws
python3 "$repo/benchmarks/ab_table.py" "$out"/before-r1.jsonl "$out"/before-r2.jsonl \
    --after "$out"/after-r1.jsonl "$out"/after-r2.jsonl
