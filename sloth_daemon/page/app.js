// sloth-daemon's status page: reads the public JSON API every few seconds and draws it. No build step, no
// libraries, nothing fetched from elsewhere. The API key (when the daemon has one) is typed into the page, kept in
// localStorage and sent as `Authorization: Bearer <key>` with every call.
"use strict";

const REFRESH_MS = 2000;
const SERIES = [  // the gate's measurements plotted per update: [metrics.eval key, parent|candidate]
  ["new", "parent"], ["new", "candidate"], ["anchor", "candidate"], ["recall", "candidate"],
];
const COLORS = {"new-parent": "#999", "new-candidate": "#1f77b4", "anchor-candidate": "#d62728",
                "recall-candidate": "#2ca02c"};
const SVG = "http://www.w3.org/2000/svg";
const $ = (sel) => document.querySelector(sel);

function apiKey() { return localStorage.getItem("sloth-api-key") || ""; }

async function api(method, path, body) {
  const headers = {};
  if (apiKey()) headers["Authorization"] = "Bearer " + apiKey();
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const r = await fetch(path, {method, headers, body: body === undefined ? undefined : JSON.stringify(body)});
  const data = await r.json().catch(() => ({}));
  if (!r.ok) {
    const msg = (data.error && data.error.message) || r.statusText;
    throw new Error(`${method} ${path}: ${r.status} ${msg}`);
  }
  return data;
}

function showError(e) {
  const el = $("#error");
  el.hidden = !e;
  el.textContent = e ? String(e.message || e) : "";
}

function cell(tr, text, cls) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "" : String(text);
  if (cls) td.className = cls;
  tr.appendChild(td);
  return td;
}

function el(name, attrs, parent) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (parent) parent.appendChild(node);
  return node;
}

// A line/point plot into `svg`: series = [{name, color, points: [{x, y, label, marker, data}]}].
function plot(svg, series, {xLabel, yLabel, lines}) {
  svg.replaceChildren();
  const W = 640, H = Number(svg.getAttribute("viewBox").split(" ")[3]), L = 48, R = 12, T = 22, B = 28;
  const all = series.flatMap((s) => s.points).filter((p) => p.y !== null && p.y !== undefined);
  el("line", {x1: L, y1: H - B, x2: W - R, y2: H - B, class: "axis"}, svg);
  el("line", {x1: L, y1: T, x2: L, y2: H - B, class: "axis"}, svg);
  if (!all.length) {
    el("text", {x: W / 2, y: H / 2, "text-anchor": "middle"}, svg).textContent = "no data yet";
    return;
  }
  const xs = all.map((p) => p.x), ys = all.map((p) => p.y);
  let [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  if (x0 === x1) { x0 -= 1; x1 += 1; }
  if (y0 === y1) { y0 -= 0.5; y1 += 0.5; }
  const pad = (y1 - y0) * 0.05; y0 -= pad; y1 += pad;
  const sx = (x) => L + (x - x0) / (x1 - x0) * (W - L - R);
  const sy = (y) => H - B - (y - y0) / (y1 - y0) * (H - T - B);
  for (const v of [y0 + pad, (y0 + y1) / 2, y1 - pad]) {
    el("text", {x: L - 4, y: sy(v) + 3, "text-anchor": "end"}, svg).textContent = v.toFixed(3);
  }
  el("text", {x: L, y: H - 8}, svg).textContent = `${xLabel} ${Math.min(...xs)}`;
  el("text", {x: W - R, y: H - 8, "text-anchor": "end"}, svg).textContent = `${Math.max(...xs)}`;
  el("text", {x: 4, y: 12}, svg).textContent = yLabel;  // above the plot area, clear of the top tick
  for (const s of series) {
    const pts = s.points.filter((p) => p.y !== null && p.y !== undefined);
    if (lines && pts.length > 1) {
      el("polyline", {points: pts.map((p) => `${sx(p.x)},${sy(p.y)}`).join(" "), fill: "none",
                      stroke: s.color, "stroke-width": 1.5, "data-series": s.name}, svg);
    }
    for (const p of pts) {
      const attrs = {"data-series": s.name, "data-x": p.x, "data-y": p.y, class: "point " + (p.marker || "")};
      for (const [k, v] of Object.entries(p.data || {})) attrs["data-" + k] = v;
      let node;
      if (p.marker === "rejected") {  // a cross
        node = el("path", {...attrs, d: `M${sx(p.x) - 4},${sy(p.y) - 4}l8,8m0,-8l-8,8`, stroke: s.color,
                           "stroke-width": 2}, svg);
      } else {
        node = el("circle", {...attrs, cx: sx(p.x), cy: sy(p.y), r: lines ? 1.8 : 4, fill: s.color}, svg);
      }
      el("title", {}, node).textContent = p.label;
    }
  }
}

let following = null;  // id of the update the loss plot follows: the one last seen running, or started here

function renderStatus(s) {
  $("#model").textContent = `${s.model} (${s.engine} engine)`;
  $("#adapter").textContent = s.adapter || "base model";
  $("#pending").textContent = s.pending_examples;
  $("#turns").textContent = s.interactions;
}

// The loss plot: the running update's live curve; once it is done (or when none runs) the curve its record keeps
// (`metrics.train.loss_curve`) of the update followed so far, else of the newest update. A short update can finish
// between two refreshes, so the curve must not depend on having seen it run.
function renderLoss(s, updates) {
  const u = s.update;
  let id = null, curve = [], text = "none", state = "none";
  if (u) {
    following = id = u.update_id;
    curve = u.loss_curve || [];
    state = "running";
    const parts = [`update ${u.update_id}: ${Math.round(u.progress * 100)}%`, u.message];
    if (u.tokens_per_s) parts.push(`${Math.round(u.tokens_per_s)} tokens/s`);
    if (u.eta_s !== null && u.eta_s !== undefined) parts.push(`about ${Math.ceil(u.eta_s)} s left`);
    text = parts.join(" · ");
  } else {
    const done = updates.find((x) => x.id === following) || updates[0];
    if (done) {
      const train = (done.metrics || {}).train || {};
      id = done.id;
      curve = train.loss_curve || [];
      state = done.status;
      const parts = [`update ${done.id}: ${done.status}`];
      if (done.finished_at) parts.push(`finished ${done.finished_at.slice(0, 19).replace("T", " ")}`);
      if (train.steps) parts.push(`${train.steps} steps`);
      if (done.reason) parts.push(done.reason);
      text = parts.join(" · ");
    }
  }
  $("#running-text").textContent = text;
  const svg = $("#loss-plot");
  svg.dataset.update = id === null ? "" : String(id);
  svg.dataset.state = state;
  plot(svg, [{name: "loss", color: "#1f77b4",
              points: curve.map(([step, loss]) => ({x: step, y: loss, label: `step ${step}: ${loss}`}))}],
       {xLabel: "step", yLabel: "training loss", lines: true});
}

function renderUpdates(updates) {
  const finished = updates.filter((u) => u.status === "promoted" || u.status === "rejected").reverse();
  const series = SERIES.map(([set, model]) => ({
    name: `${set}-${model}`, color: COLORS[`${set}-${model}`],
    points: finished.map((u) => {
      const sc = ((u.metrics || {}).eval || {})[set] || {};
      return {x: u.id, y: sc[model], marker: u.status, data: {update: u.id, verdict: u.status},
              label: `update ${u.id} (${u.status}) ${set} ${model === "parent" ? "before" : "after"}: ${sc[model]}`};
    }),
  }));
  plot($("#gate-plot"), series, {xLabel: "update", yLabel: "eval loss", lines: false});
  const body = $("#updates tbody");
  body.replaceChildren();
  for (const u of updates) {
    const tr = document.createElement("tr");
    tr.dataset.update = u.id;
    cell(tr, u.id);
    cell(tr, (u.started_at || "").slice(0, 19).replace("T", " "));
    cell(tr, u.trigger);
    cell(tr, u.status, u.status);
    cell(tr, u.adapter_version);
    cell(tr, u.reason, "text");
    body.appendChild(tr);
  }
}

function renderAdapters(a) {
  const body = $("#adapters tbody");
  body.replaceChildren();
  for (const v of a.data.slice().reverse()) {
    const tr = document.createElement("tr");
    tr.dataset.version = v.version;
    cell(tr, v.current ? `${v.version} (serving)` : v.version);
    cell(tr, v.status, v.status);
    cell(tr, (v.created_at || "").slice(0, 19).replace("T", " "));
    const td = cell(tr, "");
    if (v.status === "promoted" && !v.current) {
      const b = document.createElement("button");
      b.type = "button"; b.className = "rollback"; b.dataset.version = v.version; b.textContent = "serve this";
      td.appendChild(b);
    }
    body.appendChild(tr);
  }
}

function prompt_text(p) {
  if (typeof p === "string") return p;
  const last = p.filter((m) => m.role === "user").pop();
  return last ? last.content : "";
}

function renderInteractions(rows) {
  const body = $("#interactions tbody");
  body.replaceChildren();
  for (const t of rows) {
    const tr = document.createElement("tr");
    tr.dataset.interaction = t.id;
    cell(tr, (t.created_at || "").slice(0, 19).replace("T", " "));
    cell(tr, prompt_text(t.prompt), "text");
    cell(tr, t.response, "text");
    cell(tr, t.adapter_version || "base");
    const fb = (t.feedback || []).map((f) => (f.rating === "up" ? "👍" : f.rating === "down" ? "👎" : "")
                                         + (f.correction !== null && f.correction !== undefined
                                            ? ` corrected: ${f.correction}` : ""));
    cell(tr, fb.join("; "), "feedback");
    body.appendChild(tr);
  }
}

// The update list (each update's measurements: tens of kB apiece on a real model) is fetched again only when an
// update started or ended (status's `recent_updates` changed), not on every refresh.
let updatesSeen = null, updatesData = [];

async function refresh() {
  try {
    const status = await api("GET", "/sloth/status");
    const seen = JSON.stringify((status.recent_updates || []).map((u) => [u.id, u.status]));
    const [updates, adapters, turns] = await Promise.all([
      seen === updatesSeen ? null : api("GET", "/sloth/updates?limit=100"), api("GET", "/sloth/adapters"),
      api("GET", "/sloth/interactions?limit=20"),
    ]);
    if (updates) [updatesData, updatesSeen] = [updates.data, seen];
    renderStatus(status);
    renderLoss(status, updatesData);
    renderUpdates(updatesData);
    renderAdapters(adapters);
    renderInteractions(turns.data);
    document.body.dataset.loaded = String(Date.now());
    showError(null);
  } catch (e) {
    showError(e);
  }
}

async function act(what, fn) {
  $("#action-result").textContent = `${what}…`;
  try {
    $("#action-result").textContent = await fn();
    showError(null);
  } catch (e) {
    $("#action-result").textContent = "";
    showError(e);
  }
  refresh();
}

document.addEventListener("click", (ev) => {
  const b = ev.target.closest("button");
  if (!b) return;
  if (b.id === "train-now") {
    act("starting an update", async () => {
      following = (await api("POST", "/sloth/updates")).update_id;
      return `update ${following} started`;
    });
  } else if (b.classList.contains("rollback")) {
    act("switching", async () => {
      const out = await api("POST", "/sloth/adapters/rollback", {version: b.dataset.version});
      return `now serving ${out.current || "the base model"}`;
    });
  }
});

$("#key-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  localStorage.setItem("sloth-api-key", $("#api-key").value);
  refresh();
});
$("#api-key").value = apiKey();
refresh();
setInterval(refresh, REFRESH_MS);
