#!/bin/bash
# Broadcast to 1000 subscribers with history off and on, side by side (issue 15: history may cost at most 30 %).
# Runs ../shared/perf's broadcast point (1 publisher, 1000 subscribers on /broadcast/bench, window 16, 5 s after a
# 2 s warm-up) against the daemon with three configurations, alternated ROUNDS times so that machine drift hits all:
#   off     the broadcast route without history
#   memory  history_size = 100 on the route, memory broker
#   redis   history_size = 100, [broker] url = a redis-server this script starts on a free port (skipped without one)
#
#   benchmarks/history_cost.sh [ROUNDS]
#
# Needs the perf harness's venv (PERF_PYTHON, see ../shared/perf/README.md) and a python with selectws's
# dependencies (SELECTWS_PYTHON, default /tmp/venv/bin/python).
rounds="${1:-3}"
tree="$(cd "$(dirname "$0")/.." && pwd)"
py="${SELECTWS_PYTHON:-/tmp/venv/bin/python}"
work="$(mktemp -d)"
trap 'kill $redis_pid 2>/dev/null; rm -rf "$work"' EXIT
cat > "$work/off.toml" <<'TOML'
[[routes]]
path = "/broadcast/{channel}"
plugin = "broadcast"
TOML
cp "$work/off.toml" "$work/memory.toml"
echo 'history_size = 100' >> "$work/memory.toml"
modes="off memory"
if command -v redis-server >/dev/null; then
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no >/dev/null 2>&1 &
  redis_pid=$!
  sleep 0.5
  { cat "$work/memory.toml"; printf '\n[broker]\nurl = "redis://127.0.0.1:%s/0"\n' "$port"; } > "$work/redis.toml"
  { cat "$work/off.toml"; printf '\n[broker]\nurl = "redis://127.0.0.1:%s/0"\n' "$port"; } > "$work/redis-off.toml"
  modes="off memory redis-off redis"
fi
cd "$tree/../shared/perf" || exit 1
export PERF_PYTHON="${PERF_PYTHON:-/tmp/perf-venv/bin/python}" PERF_WORK="${PERF_WORK:-/tmp/selectws-perf}"
for round in $(seq 1 "$rounds"); do
  for mode in $modes; do
    r=$(timeout 120 ./bench.sh broadcast \
        "env PYTHONPATH=$tree $py -m selectws serve --host 127.0.0.1 --port {port} -c $work/$mode.toml" \
        --subs 1000 --window 16 --sub-path /broadcast/bench --pub-path /broadcast/bench --duration 5 --warmup 2 \
        2>&1 | grep '^JSON' | python3 -c "import sys,json
d=json.loads(sys.stdin.read()[5:])
print(d.get('deliveries_per_s'), 'deliveries/s', 'p50', d.get('p50_us'), 'us', 'client_cpu', d.get('client_cpu_pct'))")
    echo "$round $mode | $r"
  done
done
