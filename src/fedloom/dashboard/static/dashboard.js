// fedloom dashboard: renders the snapshots that /events pushes (server-sent events).
// No framework, nothing fetched from elsewhere: the charts are SVG drawn here. Every text
// that comes from a run (client names, errors, tracebacks) is set as textContent, never
// parsed as HTML.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2",
  "#be185d", "#4d7c0f", "#7c3aed", "#b45309"];

function el(tag, attrs, children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "text") node.textContent = String(v);
    else node.setAttribute(k, String(v));
  }
  for (const c of children || []) if (c) node.appendChild(c);
  return node;
}

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = String(text);
  return node;
}

function fmt(v, digits) {
  if (v === null || v === undefined) return "—";
  if (typeof v !== "number") return String(v);
  if (digits !== undefined) return v.toFixed(digits);
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(2);
  return String(Math.round(v * 1e4) / 1e4);
}

function duration(s) {
  if (s === null || s === undefined) return "—";
  if (s < 90) return `${Math.round(s)} s`;
  if (s < 5400) return `${Math.round(s / 60)} min`;
  return `${(s / 3600).toFixed(1)} h`;
}

function bytes(n) {
  if (n === null || n === undefined) return "—";
  const units = ["B", "kB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function niceTicks(lo, hi, count) {
  if (!(hi > lo)) { hi = lo + 1; }
  const step0 = (hi - lo) / count;
  const mag = Math.pow(10, Math.floor(Math.log10(step0)));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= step0) || step0;
  const ticks = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(t);
  return ticks;
}

// A line chart: series [{name, xs, ys}] (ys may hold nulls: gaps are skipped), dashed
// horizontal lines [{y, name, color}]. Each polyline carries data-key and data-points.
function lineChart(id, title, series, hlines, opts) {
  opts = opts || {};
  const W = 460, H = 230, L = 48, R = 10, T = 20, B = 28;
  const pts = series.map((s) => s.xs.map((x, i) => [x, s.ys[i]]).filter((p) => p[1] !== null));
  const allX = pts.flat().map((p) => p[0]);
  const allY = pts.flat().map((p) => p[1]).concat((hlines || []).map((h) => h.y));
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", "data-chart": id,
    role: "img", "aria-label": title });
  root.appendChild(svg("text", { x: L, y: 13, class: "title" }, title));
  if (!allX.length) {
    root.appendChild(svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, "no data yet"));
    return wrapChart(root, series, hlines);
  }
  let x0 = Math.min(...allX), x1 = Math.max(...allX);
  if (x1 === x0) { x0 -= 1; x1 += 1; }
  let y0 = Math.min(...allY), y1 = Math.max(...allY);
  if (opts.zero) y0 = Math.min(0, y0);
  if (opts.unit) { y0 = Math.max(0, Math.min(y0, 1)); y1 = Math.min(1, Math.max(y1, y0 + 0.05)); }
  if (y1 === y0) { y0 -= 0.5; y1 += 0.5; }
  const pad = (y1 - y0) * 0.05;
  y0 -= opts.unit ? 0 : pad; y1 += opts.unit ? 0 : pad;
  const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const sy = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  for (const t of niceTicks(y0, y1, 4)) {
    root.appendChild(svg("line", { x1: L, x2: W - R, y1: sy(t), y2: sy(t), class: "grid" }));
    root.appendChild(svg("text", { x: L - 4, y: sy(t) + 3, "text-anchor": "end" },
      opts.format ? opts.format(t) : fmt(t)));
  }
  for (const t of niceTicks(x0, x1, 5).filter((t) => Number.isInteger(t))) {
    root.appendChild(svg("text", { x: sx(t), y: H - B + 14, "text-anchor": "middle" }, t));
  }
  root.appendChild(svg("line", { x1: L, x2: L, y1: T, y2: H - B, class: "axis" }));
  root.appendChild(svg("line", { x1: L, x2: W - R, y1: H - B, y2: H - B, class: "axis" }));
  root.appendChild(svg("text", { x: W - R, y: H - 2, "text-anchor": "end" }, opts.xLabel || "round"));
  for (const h of hlines || []) {
    root.appendChild(svg("line", { x1: L, x2: W - R, y1: sy(h.y), y2: sy(h.y), class: "hline",
      stroke: h.color, "data-key": h.key || h.name }));
  }
  series.forEach((s, i) => {
    const p = pts[i];
    const line = svg("polyline", {
      points: p.map(([x, y]) => `${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join(" "),
      stroke: s.color || COLORS[i % COLORS.length], "data-key": s.key || s.name,
      "data-points": p.length,
    });
    root.appendChild(line);
    if (p.length === 1) {
      root.appendChild(svg("circle", { cx: sx(p[0][0]), cy: sy(p[0][1]), r: 2.5,
        fill: s.color || COLORS[i % COLORS.length] }));
    }
  });
  return wrapChart(root, series, hlines);
}

function wrapChart(root, series, hlines) {
  const legend = el("div", { class: "legend" });
  series.forEach((s, i) => {
    const swatch = el("i");
    swatch.style.background = s.color || COLORS[i % COLORS.length];
    legend.appendChild(el("span", {}, [swatch, document.createTextNode(s.name)]));
  });
  for (const h of hlines || []) {
    const swatch = el("i");
    swatch.style.background = h.color;
    legend.appendChild(el("span", {}, [swatch, document.createTextNode(`${h.name} ${fmt(h.y)}`)]));
  }
  return el("div", {}, [root, legend]);
}

// Bars: [{label, value}] as a vertical histogram or ranking.
function barChart(id, title, bars, xLabel) {
  const W = 460, H = 200, L = 40, R = 10, T = 20, B = 30;
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", "data-chart": id,
    role: "img", "aria-label": title, "data-bars": bars.length });
  root.appendChild(svg("text", { x: L, y: 13, class: "title" }, title));
  const values = bars.map((b) => b.value);
  let y0 = Math.min(0, ...values), y1 = Math.max(0, ...values);
  if (y1 === y0) y1 = y0 + 1;
  const sy = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  const w = (W - L - R) / Math.max(1, bars.length);
  for (const t of niceTicks(y0, y1, 4)) {
    root.appendChild(svg("line", { x1: L, x2: W - R, y1: sy(t), y2: sy(t), class: "grid" }));
    root.appendChild(svg("text", { x: L - 4, y: sy(t) + 3, "text-anchor": "end" }, fmt(t)));
  }
  bars.forEach((b, i) => {
    const top = sy(Math.max(0, b.value)), bottom = sy(Math.min(0, b.value));
    const rect = svg("rect", { x: L + i * w + 1, y: top, width: Math.max(1, w - 2),
      height: Math.max(0.5, bottom - top), class: b.value < 0 ? "bar neg" : "bar" });
    rect.appendChild(svg("title", {}, `${b.label}: ${fmt(b.value)}`));
    root.appendChild(rect);
    if (bars.length <= 24) {
      root.appendChild(svg("text", { x: L + i * w + w / 2, y: H - B + 12, "text-anchor": "middle" },
        b.label));
    }
  });
  root.appendChild(svg("line", { x1: L, x2: W - R, y1: sy(0), y2: sy(0), class: "axis" }));
  root.appendChild(svg("text", { x: W - R, y: H - 2, "text-anchor": "end" }, xLabel || ""));
  return el("div", {}, [root]);
}

function cumulative(ys) {
  let total = 0;
  return ys.map((y) => (y === null ? null : (total += y)));
}

function runFacts(run) {
  const facts = el("div", { class: "facts" });
  const add = (label, value, attrs) => {
    facts.appendChild(el("span", {}, [document.createTextNode(`${label} `),
      el("b", Object.assign({ text: value }, attrs || {}))]));
  };
  add("round", `${run.round}${run.rounds ? " of " + run.rounds : ""}`,
    { class: "round", "data-round": run.round });
  if (run.state === "running") {
    add("ETA", duration(run.eta_s));
    add("per round", run.round_s === null || run.round_s === undefined ? "—" : `${fmt(run.round_s, 2)} s`);
    add("last record", `${duration(run.since_last_s)} ago`);
  }
  if (run.strategy) add("strategy", run.strategy);
  const s = run.series || {};
  const last = (k) => { const v = (s[k] || []).filter((x) => x !== null); return v.length ? v[v.length - 1] : null; };
  if (last("accuracy") !== null) add("accuracy", fmt(last("accuracy"), 4));
  if (s.epsilon) add("ε", `${fmt(last("epsilon"), 3)}${run.epsilon_budget ? " of " + fmt(run.epsilon_budget) : ""}`);
  const sum = (k) => (s[k] || []).reduce((a, b) => a + (b || 0), 0);
  if (s.bytes_up || s.bytes_down) add("traffic", `↑ ${bytes(sum("bytes_up"))} ↓ ${bytes(sum("bytes_down"))}`);
  return facts;
}

function runCharts(run) {
  const xs = run.rounds_x || [];
  const s = run.series || {};
  const keys = Object.keys(s);
  const charts = el("div", { class: "charts" });
  const acc = keys.filter((k) => /accuracy/.test(k));
  const loss = keys.filter((k) => /loss$/.test(k));
  const hl = [];
  if (run.baseline !== null && run.baseline !== undefined) {
    hl.push({ y: run.baseline, name: "centralized baseline", color: "#6b7280", key: "baseline" });
  }
  if (run.target !== null && run.target !== undefined) {
    hl.push({ y: run.target, name: "target", color: "#f97316", key: "target" });
  }
  charts.appendChild(lineChart("accuracy", "Accuracy",
    acc.map((k) => ({ name: k, key: k, xs, ys: s[k] })), hl, { unit: true }));
  if (loss.length) {
    charts.appendChild(lineChart("loss", "Loss", loss.map((k) => ({ name: k, key: k, xs, ys: s[k] })), []));
  }
  const eps = keys.filter((k) => /epsilon$/.test(k));
  if (eps.length) {
    const budget = run.epsilon_budget ? [{ y: run.epsilon_budget, name: "budget", color: "#dc2626", key: "budget" }] : [];
    charts.appendChild(lineChart("epsilon", `Privacy spent (ε${run.delta ? ", δ = " + fmt(run.delta) : ""})`,
      eps.map((k) => ({ name: k, key: k, xs, ys: s[k] })), budget, { zero: true }));
  }
  const traffic = ["bytes_up", "bytes_down"].filter((k) => s[k]);
  if (traffic.length) {
    charts.appendChild(lineChart("bytes", "Traffic (cumulative)",
      traffic.map((k) => ({ name: k, key: k, xs, ys: cumulative(s[k]) })), [],
      { zero: true, format: bytes }));
  }
  if (run.client_accuracies) {
    const values = Object.values(run.client_accuracies.values);
    const bins = new Array(10).fill(0);
    for (const v of values) bins[Math.min(9, Math.max(0, Math.floor(v * 10)))] += 1;
    charts.appendChild(barChart("client-accuracy",
      `Per-client accuracy, round ${run.client_accuracies.round} (${values.length} clients)`,
      bins.map((n, i) => ({ label: (i / 10).toFixed(1), value: n })), "accuracy (bins of 0.1)"));
  }
  if (run.contribution) {
    const ranked = Object.entries(run.contribution.total).sort((a, b) => b[1] - a[1]);
    const shown = ranked.slice(0, 40);
    charts.appendChild(barChart("contribution",
      `Contribution, summed over ${run.contribution.rounds} rounds` +
        (ranked.length > shown.length ? ` (top ${shown.length} of ${ranked.length})` : ""),
      shown.map(([c, v]) => ({ label: c, value: v })), "client"));
  }
  return charts;
}

function clientTable(run) {
  const c = run.clients;
  const box = el("div", {});
  if (!c) return box;
  const counts = el("div", { class: "counts" });
  for (const [state, n] of Object.entries(c.counts)) {
    counts.appendChild(el("span", { class: `badge st-${state}`, text: `${state} ${n}`,
      "data-count": state }));
  }
  box.appendChild(counts);
  const hasLive = c.live;
  const head = ["client", "status", "participation", "flagged", "excluded", "accuracy"];
  if (hasLive) head.splice(2, 0, "name", "tasks", "late", "refused");
  const table = el("table", { class: "clients" }, [el("tr", {}, head.map((h) => el("th", { text: h })))]);
  for (const r of c.rows) {
    const status = el("td", {}, [el("span", { class: `badge st-${r.state}`, text: r.state }),
      ...r.flags.map((f) => el("span", { class: `badge st-${f}`, text: f }))]);
    if (r.detail) status.setAttribute("title", r.detail);
    const cells = [el("td", { text: r.id }), status];
    if (hasLive) {
      cells.push(el("td", { text: r.name || "" }), el("td", { text: fmt(r.tasks_done) }),
        el("td", { text: fmt(r.deadlines_missed) }), el("td", { text: fmt(r.rejected) }));
    }
    cells.push(el("td", { text: fmt(r.participation) }), el("td", { text: r.flagged_rounds || "" }),
      el("td", { text: r.excluded_rounds || "" }), el("td", { text: fmt(r.accuracy, 3) }));
    table.appendChild(el("tr", { "data-client": r.id, "data-state": r.state }, cells));
  }
  box.appendChild(el("div", { class: "clients-wrap" }, [table]));
  const notes = [`${c.total} clients`];
  if (c.hidden) notes.push(`${c.hidden} more not listed`);
  if (c.participation_round) notes.push(`participation as of round ${c.participation_round}'s checkpoint`);
  box.appendChild(el("div", { class: "muted", text: notes.join("; ") }));
  return box;
}

function eventsTable(run) {
  const rows = (run.events || []).slice().reverse();
  if (!rows.length) return null;
  const table = el("table", { class: "events" }, [el("tr", {}, ["round", "excluded by the aggregator",
    "flagged as anomalous", "discarded"].map((h) => el("th", { text: h })))]);
  for (const e of rows) {
    table.appendChild(el("tr", {}, [el("td", { text: e.round }), el("td", { text: e.excluded.join(", ") }),
      el("td", { text: e.flagged.join(", ") }), el("td", { text: e.discarded || "" })]));
  }
  return el("div", { class: "clients-wrap" }, [table]);
}

function failuresList(run, openKeys) {
  const list = el("div", { class: "failures" });
  for (const f of (run.failures || []).slice().reverse()) {
    const key = `${run.key}:${f.round}:${f.client_id}:${f.recorded_at}`;
    const d = el("details", { "data-key": key, open: openKeys.has(key) ? "" : null }, [
      el("summary", { text: `round ${f.round}, client ${f.client_id}: ${f.error}` }),
      el("pre", { text: f.traceback || "(no traceback)" }),
    ]);
    list.appendChild(d);
  }
  if (run.failures_total > (run.failures || []).length) {
    list.appendChild(el("div", { class: "muted", text: `newest ${run.failures.length} of ${run.failures_total}` }));
  }
  return list;
}

function renderRun(run, openKeys) {
  const card = el("section", { class: "run", "data-run": run.key });
  card.appendChild(el("h2", {}, [document.createTextNode(`${run.name} `),
    el("span", { class: `state state-${run.state}`, text: run.state, "data-state": run.state })]));
  card.appendChild(el("div", { class: "muted", text: run.path }));
  if (run.state === "waiting") {
    card.appendChild(el("p", { class: "muted", text: "waiting for the run to record its first round…" }));
  } else {
    card.appendChild(runFacts(run));
    if (run.stopped_reason) card.appendChild(el("p", { text: `stopped: ${run.stopped_reason}` }));
    card.appendChild(runCharts(run));
  }
  card.appendChild(el("h3", { text: "Clients" }));
  card.appendChild(clientTable(run));
  const events = eventsTable(run);
  if (events) {
    card.appendChild(el("h3", { text: "Exclusions and anomaly flags" }));
    card.appendChild(events);
  }
  if ((run.failures || []).length) {
    card.appendChild(el("h3", { text: `Failures (${run.failures_total})` }));
    card.appendChild(failuresList(run, openKeys));
  }
  return card;
}

function renderCompare(runs) {
  const section = document.getElementById("compare");
  const active = runs.filter((r) => r.state !== "waiting");
  section.hidden = runs.length < 2;
  if (runs.length < 2) return;
  const chart = document.getElementById("compare-chart");
  chart.replaceChildren(lineChart("compare-accuracy", "Accuracy of each run",
    active.map((r) => ({ name: r.name, key: r.key, xs: r.rounds_x, ys: (r.series || {}).accuracy || [] })), []));
  const table = document.getElementById("compare-table");
  const head = ["run", "state", "round", "final accuracy", "best accuracy", "ε", "bytes ↑", "bytes ↓", "failures"];
  const rows = [el("tr", {}, head.map((h) => el("th", { text: h })))];
  for (const r of runs) {
    const s = r.series || {};
    const acc = (s.accuracy || []).filter((v) => v !== null);
    const eps = (s.epsilon || []).filter((v) => v !== null);
    const sum = (k) => (s[k] ? s[k].reduce((a, b) => a + (b || 0), 0) : null);
    rows.push(el("tr", { "data-run": r.key }, [r.name, r.state, r.round,
      fmt(acc.length ? acc[acc.length - 1] : null, 4), fmt(acc.length ? Math.max(...acc) : null, 4),
      fmt(eps.length ? eps[eps.length - 1] : null, 3), bytes(sum("bytes_up")), bytes(sum("bytes_down")),
      r.failures_total === undefined ? "—" : r.failures_total].map((v) => el("td", { text: v }))));
  }
  table.replaceChildren(...rows);
}

function render(snapshot) {
  const main = document.getElementById("runs");
  const openKeys = new Set(Array.from(main.querySelectorAll("details[open]")).map((d) => d.dataset.key));
  const scrolls = new Map(Array.from(main.querySelectorAll(".run")).map((c) => [c.dataset.run,
    Array.from(c.querySelectorAll(".clients-wrap")).map((w) => w.scrollTop)]));
  main.replaceChildren(...snapshot.runs.map((run) => renderRun(run, openKeys)));
  for (const card of main.querySelectorAll(".run")) {
    const saved = scrolls.get(card.dataset.run) || [];
    card.querySelectorAll(".clients-wrap").forEach((w, i) => { if (saved[i]) w.scrollTop = saved[i]; });
  }
  renderCompare(snapshot.runs);
  document.body.dataset.updates = String(Number(document.body.dataset.updates || 0) + 1);
}

function connect() {
  const status = document.getElementById("connection");
  const source = new EventSource("events");
  source.onopen = () => { status.textContent = "live"; status.dataset.state = "live"; };
  source.onmessage = (event) => {
    render(JSON.parse(event.data));
    status.textContent = `live · updated ${new Date().toLocaleTimeString()}`;
    status.dataset.state = "live";
  };
  source.onerror = () => {
    // The browser reconnects by itself (the stream's retry interval).
    status.textContent = "connection lost; reconnecting…";
    status.dataset.state = "lost";
  };
}

connect();
