#!/usr/bin/env bash
# Runs the Autobahn|Testsuite fuzzing client against selectws's echo route and fails on any FAILED,
# UNIMPLEMENTED or missing case.
#
#   tests/conformance/run_autobahn.sh            all cases but 9.* (what CI runs)
#   tests/conformance/run_autobahn.sh --all      every case, 9.* included (~10 min more)
#   tests/conformance/run_autobahn.sh --perf     only 9.* (large and many messages)
#   tests/conformance/run_autobahn.sh --fast     no 9.*, 12.*, 13.* (~15 s; CI runs it on the pure-Python path)
#
# The suite itself is installed by ../shared/autobahn/run.sh (set AUTOBAHN_RUNNER to use another copy).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
runner="${AUTOBAHN_RUNNER:-$repo/../shared/autobahn/run.sh}"
[ -f "$runner" ] || { echo "run_autobahn: no Autobahn runner at $runner" >&2; exit 2; }

mode="${1:-default}"
case "$mode" in
    default) cases=(-x '9.*') ;;
    --all) cases=() ;;
    --perf) cases=('9.*') ;;
    --fast) cases=(--fast) ;;
    *) echo "usage: $0 [--all|--perf|--fast]" >&2; exit 2 ;;
esac

bash "$runner" --install-only >&2

work=$(mktemp -d /tmp/selectws-autobahn.XXXXXX)
python3 -m selectws serve --config "$here/autobahn.toml" --port 0 --host 127.0.0.1 --log-format json \
    >"$work/server.log" 2>&1 &
pid=$!
trap 'kill -TERM $pid 2>/dev/null; wait $pid 2>/dev/null || true' EXIT
port=""
for _ in $(seq 1 100); do
    port=$(python3 -c '
import json, sys
for line in open(sys.argv[1]):
    try:
        rec = json.loads(line)
    except ValueError:
        continue
    if rec.get("event") == "listening":
        print(rec["addresses"][0].rsplit(":", 1)[1]); break
' "$work/server.log" 2>/dev/null || true)
    [ -n "$port" ] && break
    sleep 0.1
done
[ -n "$port" ] || { echo "run_autobahn: the daemon did not start:" >&2; cat "$work/server.log" >&2; exit 1; }

start=$SECONDS
if [ "${#cases[@]}" -gt 0 ] && [[ "${cases[0]}" == -* ]]; then  # runner options go before the URL
    bash "$runner" -o "$work/report" "${cases[@]}" "ws://127.0.0.1:$port/echo" | tee "$work/summary.txt"
else
    bash "$runner" -o "$work/report" "ws://127.0.0.1:$port/echo" "${cases[@]}" | tee "$work/summary.txt"
fi
echo "run_autobahn: $((SECONDS - start)) s; report in $work/report"
kill -0 $pid 2>/dev/null || { echo "run_autobahn: the daemon died during the run" >&2; exit 1; }

line=$(grep -E '^autobahn: [0-9]+ cases' "$work/summary.txt" | tail -1)
python3 - "$line" <<'PY'
import re, sys
line = sys.argv[1]
m = re.match(r"autobahn: (\d+) cases, (\d+) failed, (\d+) non-strict, (\d+) unimplemented, (\d+) informational, "
             r"(\d+) ok, (\d+) missing", line)
if not m:
    sys.exit(f"run_autobahn: no summary line ({line!r})")
total, failed, _, unimpl, _, _, missing = map(int, m.groups())
if total == 0 or failed or unimpl or missing:
    sys.exit(f"run_autobahn: FAIL: {line}")
print(f"run_autobahn: PASS: {line}")
PY
