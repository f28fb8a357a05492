#!/usr/bin/env bash
# What the per-connection rate limit (issue 14) costs on the hot path, side by side on ../shared/perf:
#
#   base  the code before the change (a pristine copy, BASE), no limit
#   none  the code with the change (TREE, default this work tree), no limit (max_messages_per_second = 0)
#   high  the same, a limit on every connection that never triggers (10,000,000/s, burst 10,000,000)
#
# on echo-small (64 B) c100 w64 and c100 w1, ROUNDS rounds, the three variants alternated and their order rotated
# each round (so that drift in machine load hits all three), then a table: the median msg/s of each variant, the
# spread (min-max), CPU (medians; the last column: other processes on the server's CPU, min-max), and the
# ratios none/base and high/none.
#
#   git -C . worktree add --detach /tmp/rl-base HEAD    # the baseline, before applying the change (or any copy)
#   benchmarks/rate_limit_cost.sh [BASE [ROUNDS [DURATION [TREE]]]]     defaults: /tmp/rl-base 3 5 <this repo>
#
# TREE is the source tree measured as "none" and "high": this work tree by default; pass a copy of BASE with
# only this change applied when the work tree holds other unfinished work.
#
# Needs the perf harness's venv (PERF_PYTHON, see ../shared/perf/README.md) and a python with selectws's
# dependencies (SELECTWS_PYTHON, default /tmp/venv/bin/python); each source tree is put first on PYTHONPATH.
# Every point is bounded by the harness (DURATION s + 2 s warm-up); loopback only, on PORT (default 28917).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
base="${1:-/tmp/rl-base}"
rounds="${2:-3}"
duration="${3:-5}"
tree="${4:-$repo}"
py="${SELECTWS_PYTHON:-/tmp/venv/bin/python}"
port="${PORT:-28917}"
perf="$repo/../shared/perf"
export PERF_PYTHON="${PERF_PYTHON:-/tmp/perf-venv/bin/python}" PERF_WORK="${PERF_WORK:-/tmp/selectws-perf}"
for t in "$base" "$tree"; do [ -d "$t/selectws" ] || { echo "no selectws source tree at $t" >&2; exit 2; }; done
out=$(mktemp -d /tmp/rate-limit-cost.XXXXXX)
cat > "$out/none.toml" <<'EOF'
[logging]
level = "warning"
EOF
cat > "$out/high.toml" <<'EOF'
[logging]
level = "warning"
[limits]
max_messages_per_second = 10000000
burst = 10000000
EOF

point() {  # variant tree config conns window round
    local label="$1-c$3-w$4"
    timeout 120 "$perf/bench.sh" echo-small \
        "env PYTHONPATH=$2 $py -m selectws serve -c $5 --host 127.0.0.1 --port {port}" \
        --conns "$3" --window "$4" --duration "$duration" --warmup 2 --port "$port" --label "$label" \
        --point "round $6" --json-out "$out/results.jsonl" > "$out/$label-r$6.log" 2>&1 \
        || echo "point $label round $6 failed: see $out/$label-r$6.log" >&2
}

variants=(base none high)
for round in $(seq 1 "$rounds"); do
    for cw in "100 64" "100 1"; do
        set -- $cw
        for k in 0 1 2; do
            v=${variants[$(( (k + round - 1) % 3 ))]}
            case $v in
                base) point base "$base" "$1" "$2" "$out/none.toml" "$round" ;;
                none) point none "$tree" "$1" "$2" "$out/none.toml" "$round" ;;
                high) point high "$tree" "$1" "$2" "$out/high.toml" "$round" ;;
            esac
        done
    done
done

"$PERF_PYTHON" - "$out/results.jsonl" <<'EOF'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
by = {}
for r in rows:
    by.setdefault(r["label"], []).append(r)
print("| point | variant | runs | median msg/s | min - max | server CPU % | client CPU % | others on server CPU % |")
print("|---|---|---|---|---|---|---|---|")
med = {}
for point in ("c100-w64", "c100-w1"):
    for v in ("base", "none", "high"):
        rs = by.get(f"{v}-{point}", [])
        ok = [r["msgs_per_s"] for r in rs if r.get("status") == "ok" and r.get("msgs_per_s")]
        if not ok:
            print(f"| {point} | {v} | 0 | - | - | - | - | - |")
            continue
        med[point, v] = statistics.median(ok)
        cpu = round(statistics.median(r.get("server_cpu_pct", 0) for r in rs), 1)
        ccpu = round(statistics.median(r.get("client_cpu_pct", 0) for r in rs), 1)
        other = [r.get("other_on_server_cpu_pct", 0) for r in rs]  # other processes stealing the server's CPU
        print(f"| {point} | {v} | {len(ok)} | {med[point, v]:,.0f} | {min(ok):,.0f} - {max(ok):,.0f} | {cpu} | {ccpu} "
              f"| {min(other)} - {max(other)} |")
print()
for point in ("c100-w64", "c100-w1"):
    parts = []
    for a, b in (("none", "base"), ("high", "none")):
        if (point, a) in med and (point, b) in med:
            parts.append(f"{a}/{b} = {med[point, a] / med[point, b]:.3f}")
    print(f"{point}: " + ", ".join(parts))
EOF
echo "results: $out/results.jsonl"
