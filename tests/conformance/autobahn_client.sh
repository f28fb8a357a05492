#!/usr/bin/env bash
# Autobahn|Testsuite against selectws's CLIENT role: wstest -m fuzzingserver on a free loopback port, and
# tests/conformance/autobahn_client.py (the sans-I/O core as a client) as the testee.
#
#   tests/conformance/autobahn_client.sh [options] [CASE-PATTERN ...]     (default: '*' = all 517 cases)
#
# Options:
#   --no-perf             exclude 9.*
#   --no-compression      exclude 12.* and 13.*
#   -x, --exclude PATS    extra comma-separated patterns to exclude, e.g. '6.4.*,7.9.*'
#   -o, --outdir DIR      work directory (default: a new /tmp/selectws-autobahn-client.XXXXXX)
#   -a, --agent NAME      agent name (default: selectws-client)
#   -t, --timeout SECS    hard limit for the driver (default: 3600)
#   --case-timeout SECS   per-case limit in the driver (default: 60)
#
# Prints counts for behavior / behaviorClose of <outdir>/reports/index.json for the agent, the ids of the
# cases that are not OK, and a last line
#   autobahn-client: 517 cases, 0 failed, 0 non-strict, 0 unimplemented, 3 informational, 514 ok, 0 missing
# Exit status 1 on any FAILED, UNIMPLEMENTED or missing case (or when no report was written), else 0.
# The suite is installed by ../shared/autobahn/run.sh --install-only (AUTOBAHN_PREFIX, default /opt/autobahn).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
WSTEST="${AUTOBAHN_PREFIX:-/opt/autobahn}/bin/wstest"
PY="${PYTHON:-python3}"

CASES=() EXCLUDES=() OUTDIR="" AGENT="selectws-client" TIMEOUT=3600 CASE_TIMEOUT=60
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        --no-perf) EXCLUDES+=("9.*") ;;
        --no-compression) EXCLUDES+=("12.*" "13.*") ;;
        -x|--exclude) IFS=, read -r -a _x <<<"${2:?}"; EXCLUDES+=("${_x[@]}"); shift ;;
        -o|--outdir) OUTDIR="${2:?}"; shift ;;
        -a|--agent) AGENT="${2:?}"; shift ;;
        -t|--timeout) TIMEOUT="${2:?}"; shift ;;
        --case-timeout) CASE_TIMEOUT="${2:?}"; shift ;;
        -*) echo "autobahn-client: unknown option $1" >&2; exit 2 ;;
        *) CASES+=("$1") ;;
    esac
    shift
done
[ ${#CASES[@]} -eq 0 ] && CASES=("*")

if [ ! -x "$WSTEST" ]; then
    runner="${AUTOBAHN_RUNNER:-$repo/../shared/autobahn/run.sh}"
    [ -f "$runner" ] || { echo "autobahn-client: no $WSTEST and no installer at $runner" >&2; exit 2; }
    bash "$runner" --install-only >&2 || exit 2
fi

[ -n "$OUTDIR" ] || OUTDIR=$(mktemp -d /tmp/selectws-autobahn-client.XXXXXX)
mkdir -p "$OUTDIR/reports" || exit 2
PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')

"$PY" - "$OUTDIR" "$PORT" "${#CASES[@]}" "${CASES[@]}" "${EXCLUDES[@]}" <<'EOF'
import json, sys
out, port, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
cases, excl = sys.argv[4:4 + n], sys.argv[4 + n:]
spec = {"url": "ws://127.0.0.1:%s" % port, "outdir": out + "/reports",
        "cases": cases, "exclude-cases": excl, "exclude-agent-cases": {}}
json.dump(spec, open(out + "/spec.json", "w"), indent=2)
EOF

# --webport 0: no embedded HTTP server (it would take port 8080).
( cd "$OUTDIR" && PYTHONUNBUFFERED=1 exec "$WSTEST" -m fuzzingserver -s "$OUTDIR/spec.json" --webport 0 ) \
    >"$OUTDIR/wstest.log" 2>&1 &
WSPID=$!
cleanup() { kill -TERM "$WSPID" 2>/dev/null; wait "$WSPID" 2>/dev/null; }
trap cleanup EXIT

up=0
for _ in $(seq 1 200); do
    if "$PY" -c 'import socket, sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 1).close()' "$PORT" 2>/dev/null; then
        up=1; break
    fi
    kill -0 "$WSPID" 2>/dev/null || break
    sleep 0.1
done
if [ $up = 0 ]; then
    echo "autobahn-client: wstest fuzzingserver did not start; log:" >&2; tail -20 "$OUTDIR/wstest.log" >&2
    echo "autobahn-client: 0 cases, 0 failed, 0 non-strict, 0 unimplemented, 0 informational, 0 ok, 0 missing (error: no server)"
    exit 1
fi
echo "autobahn-client: fuzzingserver on 127.0.0.1:$PORT, cases ${CASES[*]}${EXCLUDES:+, excluding ${EXCLUDES[*]}}; work dir $OUTDIR" >&2

t0=$SECONDS
( cd "$repo" && timeout -k 10 "$TIMEOUT" "$PY" "$here/autobahn_client.py" "ws://127.0.0.1:$PORT" \
    --agent "$AGENT" --case-timeout "$CASE_TIMEOUT" ) 2>&1 | tee "$OUTDIR/driver.log" >&2
drc=${PIPESTATUS[0]}
[ "$drc" -ne 0 ] && echo "autobahn-client: driver exited $drc" >&2

"$PY" - "$OUTDIR" "$AGENT" "$((SECONDS - t0))" <<'EOF'
import json, os, re, sys
from collections import Counter
out, agent, secs = sys.argv[1], sys.argv[2], int(sys.argv[3])
# The fuzzing server writes <outdir>/index.json ({agent: {case id: {behavior, behaviorClose, duration,
# remoteCloseCode, reportfile}}}) and one <agent>_case_<id>.json per case, only on /updateReports.
index = os.path.join(out, "reports", "index.json")
results = json.load(open(index)).get(agent, {}) if os.path.exists(index) else {}
log = open(os.path.join(out, "wstest.log"), errors="replace").read()
m = re.search(r"will run (\d+) test cases", log)
planned = int(m.group(1)) if m else None
key = lambda c: [int(x) for x in c.split(".")]
ids = sorted(results, key=key)
beh = Counter(results[c]["behavior"] for c in ids)
clo = Counter(results[c]["behaviorClose"] for c in ids)
order = ["OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED", "FAILED"]
fmt = lambda cnt: ", ".join("%s %d" % (k, cnt[k]) for k in order + sorted(set(cnt) - set(order)))
grouped = lambda lst: " ".join(lst) if len(lst) <= 40 else " ".join(lst[:40]) + " ... (+%d)" % (len(lst) - 40)
print("autobahn-client: behavior      %s" % fmt(beh))
print("autobahn-client: behaviorClose %s" % fmt(clo))
for label in ("FAILED", "NON-STRICT", "UNIMPLEMENTED", "INFORMATIONAL"):
    lst = [c for c in ids if results[c]["behavior"] == label]
    if lst:
        print("autobahn-client: %s: %s" % (label, grouped(lst)))
lst = [c for c in ids if results[c]["behaviorClose"] not in ("OK", "INFORMATIONAL", "UNIMPLEMENTED")
       and results[c]["behavior"] != "FAILED"]
if lst:
    print("autobahn-client: behaviorClose not OK (behavior not FAILED): %s"
          % grouped(["%s=%s" % (c, results[c]["behaviorClose"]) for c in lst]))
missing = (planned - len(ids)) if planned is not None else 0
if planned is None:
    print("autobahn-client: could not read the planned case count from wstest.log")
if missing > 0:
    print("autobahn-client: %d planned cases have no result" % missing)
print("autobahn-client: index %s" % (index if os.path.exists(index) else "(none: /updateReports never ran)"))
print("autobahn-client: took %ds" % secs)
print("autobahn-client: %d cases, %d failed, %d non-strict, %d unimplemented, %d informational, %d ok, %d missing"
      % (len(ids), beh["FAILED"], beh["NON-STRICT"], beh["UNIMPLEMENTED"], beh["INFORMATIONAL"], beh["OK"], missing))
bad = beh["FAILED"] or beh["UNIMPLEMENTED"] or missing > 0 or planned is None or not os.path.exists(index)
sys.exit(1 if bad else 0)
EOF
