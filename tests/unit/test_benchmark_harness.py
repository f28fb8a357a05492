"""The benchmark matrix (benchmarks/matrix/): its points, the client's command lines, the table, the chart and the
vendored C client's build, without running any load."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

MATRIX = Path(__file__).resolve().parents[2] / "benchmarks" / "matrix"


def _load() -> tuple[ModuleType, ModuleType, ModuleType]:
    if str(MATRIX) not in sys.path:
        sys.path.insert(0, str(MATRIX))
    spec = importlib.util.spec_from_file_location("selectws_bench_run", MATRIX / "run.py")
    assert spec and spec.loader
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    return run, run.measure, run.report


run, measure, report = _load()


def _args(*argv: str) -> Any:
    a = run.parser().parse_args(list(argv))
    a.duration, a.warmup = 1.0, 0.5
    a.idle_conns = a.idle_conns or 1000
    a.churn_rate = a.churn_rate or 500.0
    a.churn_duration = a.churn_duration or 3.0
    return a


def _record(point: str, server: str, value: float | None, *, better: str = "higher", unit: str = "msg/s",
            scenario: str = "echo", status: str = "ok", run_id: str = "r1", **extra: Any) -> dict[str, Any]:
    return {"run_id": run_id, "point": point, "server": server, "scenario": scenario, "status": status,
            "title": point, "params": {"conns": 100, "window": 64},
            "metric": {"key": "k", "value": value, "unit": unit, "better": better},
            "server_cpu_pct": 99.0, "client_cpu_pct": 40.0, **extra}


def test_every_point_by_default_and_a_filter() -> None:
    points = run.build_points(_args())
    assert [p.name for p in points] == run.POINT_IDS
    assert {p.better for p in points if p.name in ("echo-c1-w1", "idle", "churn")} == {"lower"}
    assert [p.name for p in run.build_points(_args("--points", "churn,idle"))] == ["idle", "churn"]
    with pytest.raises(SystemExit):
        run.build_points(_args("--points", "nope"))


def test_client_command_lines() -> None:
    a = _args("--churn-rate", "2000", "--churn-deflate", "0.5")
    pts = {p.name: p for p in run.build_points(a)}
    sws = measure.ServerSpec("selectws", ["x"], sub_path="/broadcast/bench", pub_path="/broadcast/bench")
    bc = measure.client_argv("/bin/wsload", pts["broadcast-1000"], sws, 21000, 1.0)
    assert bc[bc.index("--mode") + 1] == "broadcast"
    assert bc[bc.index("--sub-path") + 1] == bc[bc.index("--pub-path") + 1] == "/broadcast/bench"
    large = measure.client_argv("/bin/wsload", pts["echo-1mib-w4"], sws, 21000, 1.0)
    assert large[large.index("--size") + 1] == str(1 << 20) and large[large.index("--window") + 1] == "4"
    churn = measure.client_argv("/bin/wsload", pts["churn"], sws, 21000, 1.0)
    assert churn[churn.index("--mode") + 1] == "churn"
    assert float(churn[churn.index("--rate") + 1]) == 2000
    assert float(churn[churn.index("--deflate-fraction") + 1]) == 0.5
    assert churn[churn.index("--host") + 1] == "127.0.0.1"


def test_server_environment_drops_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SELECTWS_SERVER_PORT", "1")
    monkeypatch.setenv("LISTEN_FDS", "1")
    env = run._clean_env("/repo")
    assert "SELECTWS_SERVER_PORT" not in env and "LISTEN_FDS" not in env
    assert env["PYTHONPATH"].split(os.pathsep)[0] == "/repo"


def test_table_quotes_selectws_advantage_both_ways() -> None:
    records = [
        _record("tput", "websockets", 50_000.0),
        _record("tput", "selectws", 500_000.0),
        _record("lat", "selectws", 80.0, better="lower", unit="µs"),
        _record("lat", "websockets", 120.0, better="lower", unit="µs"),
        _record("bcast", "selectws", 1e6, unit="deliveries/s", scenario="broadcast"),
        _record("bcast", "websockets", None, status="client-failed", scenario="broadcast"),
    ]
    table = report.markdown(records)
    lines = table.splitlines()
    assert lines[0].startswith("| point | selectws | websockets | selectws vs websockets")
    assert f"10.00{report.TIMES}" in next(line for line in lines if line.startswith("| tput"))
    assert f"1.50{report.TIMES}" in next(line for line in lines if line.startswith("| lat"))
    bcast = next(line for line in lines if line.startswith("| bcast"))
    assert "failed (client-failed)" in bcast and bcast.rstrip(" |").endswith(report.DASH)
    assert "| tput | 99 / 40 | 99 / 40 |" in table


def test_load_run_takes_the_last_run(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    with path.open("w") as fh:
        for r in (_record("a", "selectws", 1.0, run_id="old"), _record("a", "selectws", 2.0, run_id="new")):
            fh.write(json.dumps(r) + "\n")
    assert [r["metric"]["value"] for r in report.load_run(str(path))] == [2.0]
    assert [r["metric"]["value"] for r in report.load_run(str(path), "old")] == [1.0]


def test_chart_is_drawn(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    records = [_record("tput", "selectws", 500_000.0), _record("tput", "picows", 180_000.0),
               _record("lat", "selectws", 80.0, better="lower", unit="µs")]
    png = report.chart(records, str(tmp_path / "c.png"))
    assert png and Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif(not shutil.which("cc"), reason="no C compiler")
def test_client_builds_once_and_checks_its_options(tmp_path: Path) -> None:
    binary = measure.ensure_client(cache=str(tmp_path))
    assert os.access(binary, os.X_OK)
    mtime = os.path.getmtime(binary)
    assert measure.ensure_client(cache=str(tmp_path)) == binary and os.path.getmtime(binary) == mtime
    bad = subprocess.run([binary, "--mode", "churn", "--deflate-fraction", "2"], capture_output=True, text=True,
                         timeout=10)
    assert bad.returncode == 2 and "churn" in bad.stderr
