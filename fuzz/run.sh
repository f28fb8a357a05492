#!/usr/bin/env bash
# Run every atheris target of fuzz/fuzz_protocol.py for SECONDS each (default 60), one after the other,
# with a persistent corpus under $FUZZ_DIR (default /tmp/selectws-fuzz), and print a summary:
#   target  inputs-executed  crashes  exit-status
# Usage: fuzz/run.sh [SECONDS] [TARGET...]     (targets: frames frames_deflate frames_client http extensions)
# Extra libFuzzer flags may be passed in $FUZZ_FLAGS. Set FUZZ_PARALLEL=1 to run the targets at the same time.
set -u
SECONDS_EACH=${1:-60}
shift || true
TARGETS=("$@")
[ ${#TARGETS[@]} -eq 0 ] && TARGETS=(frames frames_deflate frames_client http extensions)
HERE=$(cd "$(dirname "$0")" && pwd)
PY=${PYTHON:-python}
FUZZ_DIR=${FUZZ_DIR:-/tmp/selectws-fuzz}

run_one() {
    local t=$1 dir=$FUZZ_DIR/$1
    mkdir -p "$dir/corpus" "$dir/artifacts"
    "$PY" "$HERE/fuzz_protocol.py" --seed "$t" "$dir/seeds" 2>/dev/null
    touch "$dir/.start"
    local maxlen=4096
    [ "$t" = http ] && maxlen=2048
    # -max_total_time stops the run; -timeout catches hangs (a slow input is a bug too); the corpus grows
    # across runs, the seeds are read-only.
    "$PY" "$HERE/fuzz_protocol.py" "$t" -max_total_time="$SECONDS_EACH" -timeout=10 -rss_limit_mb=2048 \
        -max_len=$maxlen -print_final_stats=1 -artifact_prefix="$dir/artifacts/" ${FUZZ_FLAGS:-} \
        "$dir/corpus" "$dir/seeds" >"$dir/log.txt" 2>&1
    echo $? >"$dir/status"
}

if [ "${FUZZ_PARALLEL:-0}" = 1 ]; then
    for t in "${TARGETS[@]}"; do run_one "$t" & done
    wait
else
    for t in "${TARGETS[@]}"; do run_one "$t"; done
fi

total_crashes=0
printf '%-16s %14s %8s %6s\n' target inputs crashes status
for t in "${TARGETS[@]}"; do
    dir=$FUZZ_DIR/$t
    # libFuzzer ends a clean run with "#N DONE cov: ..."; after a crash the last "#N ..." status line counts.
    inputs=$(grep -aoE '^#[0-9]+[[:space:]]+DONE' "$dir/log.txt" | tail -1 | grep -oE '[0-9]+')
    [ -z "$inputs" ] && inputs=$(grep -aoE 'stat::number_of_executed_units: [0-9]+' "$dir/log.txt" | tail -1 | grep -oE '[0-9]+$')
    [ -z "$inputs" ] && inputs=$(grep -aoE '^#[0-9]+' "$dir/log.txt" | tail -1 | tr -d '#')
    crashes=$(find "$dir/artifacts" -maxdepth 1 -type f \( -name 'crash-*' -o -name 'timeout-*' -o -name 'oom-*' \
        -o -name 'leak-*' \) -newer "$dir/.start" | wc -l)
    total_crashes=$((total_crashes + crashes))
    printf '%-16s %14s %8s %6s\n' "$t" "${inputs:-?}" "$crashes" "$(cat "$dir/status")"
    [ "$crashes" -gt 0 ] && ls "$dir/artifacts" | sed 's/^/    /'
done
echo "logs and artifacts: $FUZZ_DIR/<target>/"
[ "$total_crashes" -eq 0 ]
