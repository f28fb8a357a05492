"""Markdown table of a before/after matrix comparison (benchmarks/ab_matrix.sh).

    python benchmarks/ab_table.py BEFORE.jsonl [BEFORE.jsonl ...] --after AFTER.jsonl [AFTER.jsonl ...]

The ratio is after / before of the means (for idle points lower is better); websockets-asyncio is taken from any
file that has it.
"""

from __future__ import annotations

import argparse
import json


def _load(path: str, label: str) -> dict[str, dict]:
    points = {}
    with open(path) as fh:
        for line in fh:
            record = json.loads(line)
            if record.get("label") == label and record.get("status", "ok") == "ok":
                points[record["point"]] = record
    return points


def _value(record: dict) -> float:
    scenario = record["scenario"]
    if scenario == "idle-conns":
        return record["rss_kib_per_conn"]
    if scenario == "echo-large":
        return record["MB_per_s"]
    if scenario == "broadcast":
        return record["deliveries_per_s"]
    return record["msgs_per_s"]


def _show(point: str, value: float) -> str:
    return f"{value:.2f}" if point.startswith(("idle", "large")) else f"{value / 1000:.1f}k"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("before", nargs="+")
    parser.add_argument("--after", nargs="+", required=True)
    args = parser.parse_args()
    before = [_load(f, "selectws") for f in args.before]
    after = [_load(f, "selectws") for f in args.after]
    peer: dict[str, dict] = {}
    for f in args.before + args.after:
        peer.update(_load(f, "websockets-asyncio"))
    print("| point | before | after | after / before | websockets-asyncio |")
    print("|---|---|---|---|---|")
    for point in before[0]:
        b = [_value(run[point]) for run in before if point in run]
        a = [_value(run[point]) for run in after if point in run]
        if not a or not b:
            continue
        ratio = (sum(a) / len(a)) / (sum(b) / len(b))
        other = _show(point, _value(peer[point])) if point in peer else "-"
        print(f"| {point} | {' · '.join(_show(point, v) for v in b)} | {' · '.join(_show(point, v) for v in a)} "
              f"| {ratio:.3f} | {other} |")


if __name__ == "__main__":
    main()
