"""Tables and the chart of a benchmark matrix run, from its JSON lines (benchmarks/matrix/run.py).

Every record carries its own ``metric`` (key, value, unit, which way is better), so a results file alone is
enough: ``python benchmarks/matrix/run.py --report FILE.jsonl`` redraws the table and the PNG of its latest run.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

# Bar colours by server label; selectws first and darkest.
COLOURS = {"selectws": "#1f4e79", "websockets": "#e69f00", "picows": "#009e73"}
OTHER_COLOURS = ["#cc79a7", "#56b4e9", "#d55e00", "#999999"]
DASH, TIMES = "\u2013", "\u00d7"


def load_run(path: str, run_id: str | None = None) -> list[dict[str, Any]]:
    """The records of one run (the last one in the file unless ``run_id`` is given), in file order."""
    records = []
    with open(path) as fh:
        for line in fh:
            line = line.strip()
            if line:
                records.append(json.loads(line))
    if not records:
        return []
    want = run_id or records[-1].get("run_id")
    return [r for r in records if r.get("run_id") == want]


def ordered(records: list[dict[str, Any]]) -> tuple[list[str], list[str], dict[tuple[str, str], dict[str, Any]]]:
    """(point names, server labels, {(point, server): record}); a later record of the same pair wins."""
    points = list(dict.fromkeys(r["point"] for r in records))
    servers = list(dict.fromkeys(r["server"] for r in records))
    if "selectws" in servers:
        servers.remove("selectws")
        servers.insert(0, "selectws")
    return points, servers, {(r["point"], r["server"]): r for r in records}


def value(r: dict[str, Any] | None) -> float | None:
    """The record's charted figure, or None when the point failed."""
    if not r:
        return None
    m = r.get("metric") or {}
    v = m.get("value")
    if v is None or (isinstance(v, float) and math.isnan(v)) or not ok(r):
        return None
    return float(v)


def ok(r: dict[str, Any]) -> bool:
    st = r.get("status", "?")
    if st == "ok":
        return True
    # idle: a partial open still measures RSS; churn: failures are shown next to the figure
    return (r.get("scenario") == "idle" and bool(r.get("opened"))) or (
        r.get("scenario") == "churn" and st == "failures" and bool(r.get("completed")))


def advantage(sws: float | None, other: float | None, better: str) -> float | None:
    """How many times better selectws is than ``other`` on this metric (>1: selectws better)."""
    if not sws or not other:
        return None
    return sws / other if better == "higher" else other / sws


def human(v: float, unit: str) -> str:
    if unit in ("msg/s", "deliveries/s"):
        if v >= 1e6:
            return f"{v / 1e6:.2f}M"
        return f"{v / 1e3:.1f}k" if v >= 1e4 else f"{v / 1e3:.2f}k"
    if unit == "µs":
        return f"{v:.0f} µs"
    if unit == "MB/s":
        return f"{v:.0f} MB/s"
    if unit == "KiB/conn":
        return f"{v:.1f} KiB"
    if unit == "% CPU":
        return f"{v:.0f} %"
    return f"{v:.3g}"


def cell(r: dict[str, Any] | None) -> str:
    """One table cell: the figure and what goes with it."""
    if not r:
        return DASH
    if not ok(r):
        return f"failed ({str(r.get('status', '?'))[:40]})"
    m = r["metric"]
    sc = r.get("scenario")
    s = human(m["value"], m["unit"])
    if m["unit"] in ("msg/s", "deliveries/s"):
        s += " " + m["unit"]
    if sc == "echo" and r.get("params", {}).get("conns") == 1 and r.get("params", {}).get("window") == 1:
        s += f" ({r.get('msgs_per_s', 0) / 1e3:.1f}k msg/s, p99 {r.get('p99_us', 0):.0f} µs)"
    elif sc == "idle":
        s += f"/conn, open in {r.get('open_s', 0):.2f} s"
        if r.get("opened") != r.get("conns"):
            s += f" ({r.get('opened')}/{r.get('conns')} opened)"
    elif sc == "churn":
        mib = [r.get(k, 0) / 1024 for k in ("server_rss_before_kib", "server_rss_peak_kib", "server_rss_after_kib")]
        s += (f" CPU at {r.get('completed_per_s', 0):.0f}/s; RSS {mib[0]:.1f} / {mib[1]:.1f} / {mib[2]:.1f} MiB; "
              f"p99 {r.get('p99_us', 0) / 1000:.1f} ms; deflate {r.get('deflate_accepted', 0)}/"
              f"{r.get('deflate_offered', 0)}")
        if r.get("failed") or r.get("missed"):
            s += f"; **{r.get('failed', 0)} failed, {r.get('missed', 0)} not started**"
    return s


def markdown(records: list[dict[str, Any]]) -> str:
    """The figures table (point x server, with selectws's advantage over each peer) and a CPU table."""
    points, servers, by = ordered(records)
    peers = [s for s in servers if s != "selectws"]
    head = ["point", *servers] + ([f"selectws vs {p}" for p in peers] if "selectws" in servers else [])
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in points:
        any_r = next(by[(p, s)] for s in servers if (p, s) in by)
        m = any_r.get("metric", {})
        title = f"{any_r.get('title') or p} ({m.get('unit', '')}, {m.get('better', 'higher')} is better)"
        row = [title] + [cell(by.get((p, s))) for s in servers]
        if "selectws" in servers:
            sws = value(by.get((p, "selectws")))
            for peer in peers:
                a = advantage(sws, value(by.get((p, peer))), m.get("better", "higher"))
                row.append(f"{a:.2f}{TIMES}" if a else DASH)
        out.append("| " + " | ".join(row) + " |")
    out += ["", "Server / load-client CPU, % of one core, over the measured window (client near 100 %: the figure is a "
            "lower bound for the server):", ""]
    out += ["| point | " + " | ".join(servers) + " |", "|" + "---|" * (len(servers) + 1)]
    for p in points:
        row = []
        for s in servers:
            r = by.get((p, s))
            if r and "server_cpu_pct" in r:
                row.append(f"{r['server_cpu_pct']:.0f} / {r['client_cpu_pct']:.0f}")
            else:
                row.append(DASH)
        title = next(by[(p, s)].get("title") or p for s in servers if (p, s) in by)
        out.append(f"| {title} | " + " | ".join(row) + " |")
    return "\n".join(out) + "\n"


def _axis_label(v: float, _pos: object = None) -> str:
    if abs(v) >= 1e6:
        return f"{v / 1e6:g}M"
    if abs(v) >= 1e3:
        return f"{v / 1e3:g}k"
    return f"{v:g}"


def chart(records: list[dict[str, Any]], png: str) -> str | None:
    """Draw one panel per point, one bar per server (absolute figures with units); return the path, or None and
    say why when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        print("chart skipped: matplotlib is not installed (pip install -e '.[bench]' or pip install matplotlib)")
        return None
    points, servers, by = ordered(records)
    if not points:
        return None
    ncols = min(4, len(points))
    nrows = math.ceil(len(points) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.3 * ncols, 3.9 * nrows), squeeze=False)
    colours = dict(COLOURS)
    for i, s in enumerate(x for x in servers if x not in colours):
        colours[s] = OTHER_COLOURS[i % len(OTHER_COLOURS)]
    for ax, p in zip(axes.flat, points, strict=False):
        any_r = next(by[(p, s)] for s in servers if (p, s) in by)
        m = any_r.get("metric", {})
        better = m.get("better", "higher")
        sws = value(by.get((p, "selectws")))
        vals = [value(by.get((p, s))) for s in servers]
        top = max([v for v in vals if v] or [1.0])
        for x, (s, v) in enumerate(zip(servers, vals, strict=True)):
            r = by.get((p, s))
            if v is None:
                ax.text(x, top * 0.02, "n/a" if not r else "failed", ha="center", va="bottom", fontsize=8)
                continue
            ax.bar(x, v, color=colours[s], width=0.65)
            label = human(v, m.get("unit", ""))
            if s != "selectws":
                a = advantage(sws, v, better)
                if a:
                    label += f"\nsws {TIMES}{a:.2f}"
            ax.text(x, v, label, ha="center", va="bottom", fontsize=8)
        ticks = []
        for s in servers:
            r = by.get((p, s))
            cl = f"\nclient {r['client_cpu_pct']:.0f} %" if r and "client_cpu_pct" in r else ""
            ticks.append(s + cl)
        ax.set_xticks(range(len(servers)), ticks, fontsize=8)
        ax.set_ylim(0, top * 1.28)
        ax.set_title(f"{any_r.get('title') or p}\n{m.get('unit', '')}, {better} is better", fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
        ax.yaxis.set_major_formatter(FuncFormatter(_axis_label))
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(points):]:
        ax.axis("off")
    r0 = records[0]
    v = r0.get("versions", {})
    fig.suptitle(
        f"selectws {v.get('selectws', '?')} ({v.get('selectws_commit', '?')}) vs peers, {r0.get('date', '')[:10]}; "
        f"{r0.get('cpu_model') or '?'}, {r0.get('ncpu')} CPUs; server pinned to CPU {r0.get('server_cpu')}, "
        f"client to CPU {r0.get('client_cpu')}", fontsize=9)
    fig.text(0.5, 0.005, f"sws {TIMES}N: selectws's advantage over that server on this point (>1: selectws better). "
             "client N %: the load client's share of its own core (near 100 %: a lower bound).",
             ha="center", fontsize=7.5)
    fig.tight_layout(rect=(0, 0.02, 1, 0.96))
    os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png
