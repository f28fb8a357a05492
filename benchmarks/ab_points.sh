#!/bin/bash
# A quick side-by-side of four ../shared/perf points: the daemon from one source tree ("new") against another
# ("old", e.g. a `git worktree add --detach /tmp/old-main REV`), alternated ROUNDS times so that drift in
# machine load hits both. Each point is bounded (--duration 5 --warmup 2), loopback only.
#
#   benchmarks/ab_points.sh OLD_TREE [ROUNDS] [NEW_TREE]      e.g. benchmarks/ab_points.sh /tmp/old-main 2
#
# Needs the perf harness's venv (PERF_PYTHON, see ../shared/perf/README.md) and a python with selectws's
# dependencies (SELECTWS_PYTHON, default /tmp/venv/bin/python).
old="${1:?usage: $0 OLD_TREE [ROUNDS] [NEW_TREE]}"
rounds="${2:-2}"
new="${3:-$(cd "$(dirname "$0")/.." && pwd)}"
py="${SELECTWS_PYTHON:-/tmp/venv/bin/python}"
cd "$(dirname "$0")/../../shared/perf" || exit 1
export PERF_PYTHON="${PERF_PYTHON:-/tmp/perf-venv/bin/python}" PERF_WORK="${PERF_WORK:-/tmp/selectws-perf}"
for round in $(seq 1 "$rounds"); do
  for rev in new old; do
    tree=$new; [ "$rev" = old ] && tree=$old
    while read -r name opts; do
      r=$(timeout 120 ./bench.sh "$name" "env PYTHONPATH=$tree $py -m selectws serve --host 127.0.0.1 --port {port}" \
          $opts --duration 5 --warmup 2 2>&1 | grep '^JSON' | python3 -c "import sys,json
d=json.loads(sys.stdin.read()[5:])
print(d.get('msgs_per_s'), 'msg/s', d.get('MB_per_s'), 'MB/s', d.get('deliveries_per_s'), 'deliveries/s',
      'p50', d.get('p50_us'), 'client_cpu', d.get('client_cpu_pct'))")
      echo "$round $rev | $name $opts | $r"
    done <<'LIST'
echo-small --conns 100 --window 64
echo-small --conns 100 --window 1
echo-large --window 4
broadcast --subs 1000 --window 16 --sub-path /broadcast/bench --pub-path /broadcast/bench
LIST
  done
done
