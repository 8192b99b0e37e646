// serrano's console: everything it shows comes from the admin API and /metrics, fetched with the
// admin key the operator types in (kept in this tab's sessionStorage only). Text from the server
// is always set as text, never parsed as HTML.
"use strict";

// Every request the page makes is an admin request, and every admin request leaves a durable
// audit record: the live charts poll every 5 s, the tables every 15 s (about one record every two
// seconds per open console), and nothing is polled while the tab is hidden.
const POLL_MS = 5000;
const TABLES_EVERY = 3;
const MAX_POINTS = 300;
const KEY = "serrano-admin-key";

let key = sessionStorage.getItem(KEY) || "";
let timer = null;
let tick = 0;

async function api(path, options = {}) {
  const headers = Object.assign({ Authorization: "Bearer " + key }, options.headers || {});
  const r = await fetch(path, Object.assign({}, options, { headers }));
  if (!r.ok) {
    let message = r.status + " " + r.statusText;
    try { message = (await r.json()).error.message; } catch (_) { /* not JSON */ }
    throw new Error(path + ": " + message);
  }
  const type = r.headers.get("content-type") || "";
  return type.includes("json") ? r.json() : r.text();
}

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "onclick") e.addEventListener("click", v);
    else if (k === "class") e.className = v;
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(c == null ? "" : String(c)));
  return e;
}

function table(id, head, rows) {
  const t = document.getElementById(id);
  t.replaceChildren(el("tr", {}, ...head.map(h => el("th", {}, h))));
  for (const r of rows) {
    t.append(el("tr", {}, ...r.map(c => (c instanceof Node && c.tagName === "TD") ? c : el("td", {}, c))));
  }
  if (rows.length === 0) t.append(el("tr", {}, el("td", { colspan: head.length }, "none")));
}

function num(v, digits = 2) {
  return el("td", { class: "num" }, v == null || Number.isNaN(v) ? "–" : Number(v).toFixed(digits));
}

function bar(fraction) {
  const f = Math.max(0, Math.min(1, fraction));
  const b = el("div", { class: "bar" + (fraction >= 1 ? " over" : fraction >= 0.8 ? " warn" : "") }, el("span"));
  b.firstChild.style.width = (f * 100).toFixed(1) + "%";
  return b;
}

function setStatus(text, bad) {
  const s = document.getElementById("status");
  s.textContent = text;
  s.className = bad ? "bad" : "";
}

// ---- /metrics: Prometheus text, summed over label sets ----

function parseMetrics(text) {
  const sums = new Map();
  for (const line of text.split("\n")) {
    if (line === "" || line.startsWith("#")) continue;
    const brace = line.indexOf("{");
    const space = line.lastIndexOf(" ");
    const name = brace >= 0 && brace < space ? line.slice(0, brace) : line.slice(0, space);
    let le = "";
    if (name.endsWith("_bucket")) {
      const m = line.match(/le="([^"]*)"/);
      if (m) le = m[1];
    }
    const value = parseFloat(line.slice(space + 1));
    if (Number.isNaN(value)) continue;
    const k = name + (le ? "|" + le : "");
    sums.set(k, (sums.get(k) || 0) + value);
  }
  return sums;
}

function byLabel(text, metric, label) {
  const out = new Map();
  for (const line of text.split("\n")) {
    if (!line.startsWith(metric + "{")) continue;
    const m = line.match(new RegExp(label + '="([^"]*)"'));
    if (!m) continue;
    const v = parseFloat(line.slice(line.lastIndexOf(" ") + 1));
    out.set(m[1], (out.get(m[1]) || 0) + v);
  }
  return out;
}

// The q-quantile of a histogram's observations between two scrapes (cumulative buckets),
// interpolated linearly within its bucket; null when nothing was observed.
function quantile(now, before, metric, q) {
  const buckets = [];
  for (const [k, v] of now) {
    if (!k.startsWith(metric + "_bucket|")) continue;
    const le = k.slice(metric.length + 8);
    buckets.push([le === "+Inf" ? Infinity : parseFloat(le), v - (before.get(k) || 0)]);
  }
  buckets.sort((a, b) => a[0] - b[0]);
  const total = buckets.length ? buckets[buckets.length - 1][1] : 0;
  if (total <= 0) return null;
  const rank = q * total;
  let lower = 0, below = 0;
  for (const [le, count] of buckets) {
    if (count >= rank) {
      if (le === Infinity) return lower;
      const inBucket = count - below;
      return inBucket > 0 ? lower + (le - lower) * (rank - below) / inBucket : le;
    }
    lower = le; below = count;
  }
  return lower;
}

const charts = {};
const series = {};
let previous = new Map();
let previousTime = null;

function chart(id, labels) {
  const host = document.getElementById(id);
  series[id] = [[], ...labels.map(() => [])];
  const opts = {
    title: host.dataset.title, width: 440, height: 220,
    series: [{}, ...labels.map((label, i) => ({
      label, stroke: ["#3a7bd5", "#d2593c", "#1f8a4c"][i % 3], width: 1.5, spanGaps: true,
    }))],
    axes: [{}, { size: 60 }],
  };
  charts[id] = new uPlot(opts, series[id], host);
}

function push(id, values) {
  const s = series[id];
  s[0].push(Date.now() / 1000);
  values.forEach((v, i) => s[i + 1].push(v));
  if (s[0].length > MAX_POINTS) s.forEach(a => a.shift());
  charts[id].setData(s);
  const points = s.slice(1).reduce((n, a) => n + a.filter(v => v != null).length, 0);
  document.getElementById(id).dataset.points = String(points);
}

async function pollMetrics() {
  const text = await api("/metrics");
  const now = parseMetrics(text);
  const t = Date.now() / 1000;
  for (const [id, metric] of [
    ["chart-ttft", "serrano:time_to_first_token_seconds"],
    ["chart-itl", "serrano:inter_token_latency_seconds"],
    ["chart-e2e", "serrano:e2e_request_latency_seconds"],
  ]) {
    push(id, [quantile(now, previous, metric, 0.5), quantile(now, previous, metric, 0.99)]);
  }
  // Percentiles of the first scrape cover everything since the server started; rates need two.
  const rate = m => previousTime == null
    ? null
    : ((now.get(m) || 0) - (previous.get(m) || 0)) / Math.max(t - previousTime, 1e-3);
  push("chart-throughput", [rate("serrano:generation_tokens_total"), rate("serrano:prompt_tokens_total")]);
  push("chart-load", [
    now.get("serrano:num_requests_waiting") || 0,
    now.get("serrano:num_requests_running") || 0,
    100 * (now.get("serrano:kv_cache_usage_perc") || 0),
  ]);
  const spend = byLabel(text, "serrano_backend_spend_nano_usd_total", "backend");
  const attempts = byLabel(text, "serrano_backend_requests_total", "backend");
  table("backend-spend", ["backend", "attempts", "spend ($)"],
    [...new Set([...spend.keys(), ...attempts.keys()])].sort().map(b => [
      b, num(attempts.get(b) || 0, 0), num((spend.get(b) || 0) / 1e9, 6)]));
  previous = now;
  previousTime = t;
}

// ---- governance, routing, audit ----

async function pollBudgets() {
  const budgets = (await api("/admin/v1/budgets")).data;
  table("budgets", ["tenant", "key", "budget", "used", "", "limit"], budgets.map(b => {
    const scale = b.unit === "usd" ? 1e9 : 1;
    const used = (b.spent + b.reserved) / scale;
    const limit = b.limit / scale;
    return [b.tenant, b.key_id || "all", b.unit + " / " + b.period, num(used, b.unit === "usd" ? 4 : 0),
      el("td", {}, bar(limit > 0 ? used / limit : 1)), num(limit, b.unit === "usd" ? 4 : 0)];
  }));
  for (const by of ["tenant", "backend"]) {
    const usage = (await api("/admin/v1/usage?group_by=" + by)).data;
    table(by + "-cost", [by, "requests", "prompt", "completion", "cost ($)", "$ / 1M tokens"],
      usage.map(u => {
        const tokens = u.prompt_tokens + u.completion_tokens;
        return [u[by], num(u.requests, 0), num(u.prompt_tokens, 0), num(u.completion_tokens, 0),
          num(u.cost_usd, 6), num(tokens ? u.cost_usd / tokens * 1e6 : null, 4)];
      }));
  }
}

async function pollBackends() {
  const b = await api("/admin/v1/backends");
  table("backends", ["backend", "kind", "region", "healthy", "breaker", "in flight", "TTFT p95 (ms)", "ITL p95 (ms)", "served", "failed"], b.data.map(x => [
    x.name, x.kind, x.region,
    el("td", { class: x.healthy === false ? "bad" : "ok" }, String(x.healthy)),
    el("td", { class: x.breaker === "open" ? "bad" : "" }, String(x.breaker)),
    num(x.in_flight, 0), num(x.ttft_p95_ms, 1), num(x.itl_p95_ms, 1), num(x.succeeded, 0), num(x.failed, 0),
  ]));
}

async function pollConfig() {
  const h = await api("/admin/v1/config/history");
  document.getElementById("config-active").textContent = "active version: " + h.active;
  table("config-versions", ["version", "created", "author", ""], h.versions.slice().reverse().map(v => [
    v.version, new Date(v.created_ms).toISOString(), v.author,
    el("td", {},
      el("button", { class: "small", "data-diff": v.version, onclick: () => showConfigDiff(v.version, h.active) }, "diff to active"),
      " ",
      v.version === h.active ? "active" :
        el("button", { class: "small", "data-rollback": v.version, onclick: () => rollbackConfig(v.version) }, "roll back to this")),
  ]));
}

async function showConfigDiff(version, active) {
  document.getElementById("config-diff").textContent =
    await api("/admin/v1/config/diff?from=" + active + "&to=" + version);
}

async function rollbackConfig(version) {
  await act(() => api("/admin/v1/config/rollback", {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ version }),
  }), "rolled back to config version " + version);
}

async function pollChanges() {
  const changes = (await api("/admin/v1/changes?limit=50")).data;
  const versioned = ["policy", "budget", "limits", "price"];
  table("changes", ["id", "time", "actor", "kind", "action", "target", "before", "after", ""], changes.map(c => [
    c.id, new Date(c.time_ms).toISOString(), c.actor, c.kind, c.action, JSON.stringify(c.target),
    JSON.stringify(c.before), JSON.stringify(c.after),
    el("td", {}, ...(versioned.includes(c.kind) ? [
      el("button", { class: "small", "data-change-rollback": c.id, onclick: () => changeAction(c.id, "rollback") }, "roll back to"),
      " ",
      el("button", { class: "small", "data-change-undo": c.id, onclick: () => changeAction(c.id, "undo") }, "undo"),
    ] : [])),
  ]));
}

async function changeAction(id, what) {
  await act(() => api("/admin/v1/changes/" + id + "/" + what, { method: "POST" }), what + " of change " + id);
}

async function pollAudit() {
  const v = await api("/admin/v1/audit/verify");
  const p = document.getElementById("audit-verify");
  p.textContent = (v.ok ? "chain verified: " : "CHAIN BROKEN at " + v.first_bad_seq + ": ") + v.records + " records, head " + String(v.head_hash).slice(0, 16);
  p.className = v.ok ? "ok" : "bad";
  const records = (await api("/admin/v1/audit?limit=1000")).data.slice(-30).reverse();
  table("audit", ["seq", "time", "request", "key", "tenant", "endpoint", "model", "status", "tokens", "cost ($)"], records.map(r => [
    r.seq, new Date(r.time_ms).toISOString(), r.request_id, r.key, r.tenant, r.method + " " + r.endpoint, r.model,
    el("td", { class: r.status >= 400 ? "bad" : "" }, String(r.status)),
    num(r.prompt_tokens + r.completion_tokens, 0), num(r.cost_nusd / 1e9, 6),
  ]));
}

// An action the operator clicked, then everything refreshed.
async function act(f, done) {
  try {
    await f();
    setStatus(done);
  } catch (e) {
    setStatus(e.message, true);
  }
  await refresh();
}

async function refresh(everything = true) {
  const parts = everything
    ? [pollMetrics, pollBudgets, pollBackends, pollConfig, pollChanges, pollAudit]
    : [pollMetrics];
  const results = await Promise.allSettled(parts.map(p => p()));
  const failed = results.find(r => r.status === "rejected");
  if (failed) setStatus(failed.reason.message, true);
  document.body.dataset.refreshed = String(Number(document.body.dataset.refreshed || 0) + 1);
}

function start() {
  for (const [id, labels] of [
    ["chart-ttft", ["p50", "p99"]], ["chart-itl", ["p50", "p99"]], ["chart-e2e", ["p50", "p99"]],
    ["chart-throughput", ["output", "prompt"]], ["chart-load", ["waiting", "running", "KV %"]],
  ]) chart(id, labels);
  document.getElementById("login").addEventListener("submit", async ev => {
    ev.preventDefault();
    key = document.getElementById("key").value;
    sessionStorage.setItem(KEY, key);
    await connect();
  });
  if (key) connect();
}

async function connect() {
  if (timer) clearInterval(timer);
  try {
    await api("/admin/v1/config");
  } catch (e) {
    setStatus("cannot connect: " + e.message, true);
    return;
  }
  setStatus("connected");
  await refresh();
  timer = setInterval(() => {
    if (document.visibilityState === "hidden") return;
    tick += 1;
    refresh(tick % TABLES_EVERY === 0);
  }, POLL_MS);
}

start();
