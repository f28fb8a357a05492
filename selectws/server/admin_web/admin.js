// The selectws admin dashboard: one WebSocket to /admin/ws on this listener, a JSON snapshot a second, plain SVG
// charts of the last 5 minutes. No library, nothing fetched from elsewhere (works offline).
"use strict";

(function () {
  const WINDOW = 300; // seconds charted
  const W = 600;
  const H = 150;
  const history = []; // {t, inRate, outRate, conn, lag}
  let failuresBeforeOpen = 0;
  let retry = 1;

  const $ = (id) => document.getElementById(id);
  const fmt = (n, digits = 0) =>
    n === null || n === undefined ? "–" : Number(n).toLocaleString("en-US", { maximumFractionDigits: digits });
  const ms = (s) => (s === null || s === undefined ? "–" : `${(s * 1000).toFixed(s < 0.01 ? 2 : 1)} ms`);

  function setStatus(state, text) {
    const el = $("status");
    el.dataset.state = state;
    el.textContent = text;
  }

  function cell(text, cls) {
    const td = document.createElement("td");
    td.textContent = text;
    if (cls) td.className = cls;
    return td;
  }

  function fillTable(id, rows, makeRow) {
    const body = $(id).tBodies[0];
    const fresh = document.createDocumentFragment();
    for (const row of rows) fresh.appendChild(makeRow(row));
    body.replaceChildren(fresh);
  }

  function duration(seconds) {
    const s = Math.max(0, Math.floor(seconds));
    const d = Math.floor(s / 86400);
    const h = Math.floor((s % 86400) / 3600);
    const m = Math.floor((s % 3600) / 60);
    return d ? `${d}d ${h}h` : h ? `${h}h ${m}m` : `${m}m ${s % 60}s`;
  }

  // ------------------------------------------------------------------------------------------------ charts
  function niceMax(v) {
    if (!(v > 0)) return 1;
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 2.5, 5, 10]) if (v <= m * p) return m * p;
    return 10 * p;
  }

  function svgEl(name, attrs, text) {
    const el = document.createElementNS("http://www.w3.org/2000/svg", name);
    for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
    if (text !== undefined) el.textContent = text;
    return el;
  }

  function span(now) {
    // The x axis covers what the page has seen, from 30 s up to the last 5 minutes.
    const seen = history.length ? now - history[0].t : 0;
    return Math.min(WINDOW, Math.max(30, Math.ceil(seen / 30) * 30));
  }

  function drawChart(id, series, now) {
    const svg = $(id);
    const box = $(`${id}-box`);
    const width = span(now);
    let max = 0;
    for (const s of series) for (const p of history) if (p[s.key] !== null && p[s.key] > max) max = p[s.key];
    max = niceMax(max * 1.1);
    const parts = [];
    for (const f of [0.25, 0.5, 0.75]) {
      parts.push(svgEl("line", { x1: 0, x2: W, y1: H * f, y2: H * f, class: "grid" }));
    }
    for (const s of series) {
      const pts = [];
      for (const p of history) {
        const v = p[s.key];
        if (v === null || v === undefined) continue;
        const x = W - ((now - p.t) / width) * W;
        if (x < 0) continue;
        const y = H - (v / max) * (H - 4) - 2;
        pts.push(`${x.toFixed(1)},${y.toFixed(1)}`);
      }
      const line = svgEl("polyline", { points: pts.join(" "), class: s.cls });
      line.dataset.points = String(pts.length);
      parts.push(line);
    }
    svg.replaceChildren(...parts);
    svg.dataset.max = String(max);
    box.querySelector(".ymax").textContent = fmt(max, max < 10 ? 2 : 0);
    box.querySelector(".xmin").textContent = width >= 120 ? `−${width / 60} min` : `−${width} s`;
  }

  // ------------------------------------------------------------------------------------------------ one snapshot
  function render(snap) {
    const t = snap.totals;
    $("connections").textContent = fmt(t.connections);
    $("in-rate").textContent = fmt(t.in_rate, 1);
    $("out-rate").textContent = fmt(t.out_rate, 1);
    $("lag").textContent = ms(t.lag);
    $("lag-max").textContent = ms(t.lag_max);
    $("slow").textContent = fmt(t.slow_consumers_dropped);
    $("budget").textContent = fmt(t.budget_dropped);
    const broker = $("broker");
    broker.textContent = `${snap.broker.kind}: ${snap.broker.up ? "up" : "down"}`;
    broker.dataset.state = snap.broker.up ? "up" : "down";
    $("broker-status").textContent =
      (snap.broker.status || "") + ` (dropped ${fmt(snap.broker.dropped)}, reconnects ${fmt(snap.broker.reconnects)})`;
    const ready = $("ready");
    ready.textContent = snap.ready ? "ready" : snap.why;
    ready.dataset.state = snap.ready ? "ready" : "not-ready";
    $("uptime").textContent = `up ${duration(snap.t - snap.started_at)}`;
    const by = snap.served_by;
    $("served-by").textContent =
      by.worker === null ? `pid ${by.pid}` : `page served by worker ${by.worker} (pid ${by.pid})`;

    const routes = Object.entries(snap.routes).sort((a, b) => b[1] - a[1] || a[0].localeCompare(b[0]));
    fillTable("routes", routes, ([path, n]) => {
      const tr = document.createElement("tr");
      tr.dataset.route = path;
      tr.append(cell(path, "name"), cell(fmt(n), "num count"));
      return tr;
    });
    fillTable("groups", snap.top_groups, ([name, n]) => {
      const tr = document.createElement("tr");
      tr.dataset.group = name;
      tr.append(cell(name, "name"), cell(fmt(n), "num count"));
      return tr;
    });
    $("groups-count").textContent =
      `${snap.groups_exact ? "" : "at most "}${fmt(t.groups)} group${t.groups === 1 ? "" : "s"} in all`;
    $("hooks-none").hidden = snap.hooks.length > 0;
    fillTable("hooks", snap.hooks, (h) => {
      const tr = document.createElement("tr");
      tr.append(cell(h.url, "name"), cell(fmt(h.queued), "num"), cell(fmt(h.sent), "num"),
        cell(fmt(h.failed), "num"), cell(fmt(h.dropped), "num"),
        cell(h.failing ? "failing" : "ok", h.failing ? "bad" : "ok"));
      return tr;
    });
    $("workers-card").hidden = snap.workers.length === 0;
    fillTable("workers", snap.workers, (w) => {
      const tr = document.createElement("tr");
      tr.dataset.worker = String(w.worker);
      tr.append(cell(String(w.worker)), cell(String(w.pid), "num"),
        cell(w.why, w.why === "ready" ? "ok" : "bad"), cell(fmt(w.connections), "num count"),
        cell(fmt(w.in_rate, 1), "num"), cell(fmt(w.out_rate, 1), "num"),
        cell(w.lag === null ? "–" : (w.lag * 1000).toFixed(1), "num"),
        cell(w.broker_up ? "up" : "down", w.broker_up ? "ok" : "bad"), cell(`${w.age.toFixed(1)} s`, "num"));
      return tr;
    });

    history.push({ t: snap.t, inRate: t.in_rate, outRate: t.out_rate, conn: t.connections, lag: t.lag * 1000 });
    while (history.length && history[0].t < snap.t - WINDOW) history.shift();
    drawChart("chart-rates", [{ key: "inRate", cls: "in" }, { key: "outRate", cls: "out" }], snap.t);
    drawChart("chart-connections", [{ key: "conn", cls: "conn" }], snap.t);
    drawChart("chart-lag", [{ key: "lag", cls: "lag" }], snap.t);
    document.body.dataset.snapshots = String((Number(document.body.dataset.snapshots) || 0) + 1);
  }

  // ------------------------------------------------------------------------------------------------ the feed
  function connect() {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const ws = new WebSocket(`${scheme}://${location.host}/admin/ws`);
    let opened = false;
    ws.onopen = () => {
      opened = true;
      failuresBeforeOpen = 0;
      retry = 1;
      setStatus("live", "live");
    };
    ws.onmessage = (event) => {
      try {
        render(JSON.parse(event.data));
      } catch (err) {
        console.error("bad snapshot", err);
      }
    };
    ws.onclose = () => {
      if (!opened && ++failuresBeforeOpen >= 3) {
        location.reload(); // the session may be over: the page then asks for the key again
        return;
      }
      setStatus("offline", `offline, retrying in ${retry} s`);
      setTimeout(connect, retry * 1000);
      retry = Math.min(retry * 2, 30);
    };
  }

  connect();
})();
