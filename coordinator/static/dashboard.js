// StudioFleet dashboard: polls /api/snapshot every 2 s and redraws. No libraries, no
// network beyond this coordinator, and all text is inserted with textContent.
// A poll is background work: it does not keep the session alive (automatic logoff), unless
// the user has clicked, typed or scrolled since the last one.
"use strict";

const POLL_MS = 2000;
const POLL_TIMEOUT_MS = 10000;
const BACKGROUND_HEADER = "X-StudioFleet-Background";
let userActive = false;
for (const kind of ["pointerdown", "keydown", "wheel", "touchstart"]) {
  document.addEventListener(kind, () => { userActive = true; }, { passive: true, capture: true });
}
const SVG = "http://www.w3.org/2000/svg";

function el(tag, attrs, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = String(text);
  return node;
}

function svgEl(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  return node;
}

function bytes(n) {
  if (!n) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return n.toFixed(n >= 10 || i === 0 ? 0 : 1) + " " + units[i];
}

function clock(unix) {
  return new Date(unix * 1000).toLocaleTimeString();
}

function setText(id, value) {
  document.getElementById(id).textContent = String(value);
}

function renderNodes(nodes) {
  const body = document.querySelector("#nodes tbody");
  const rows = [];
  for (const n of nodes) {
    const tr = el("tr", { "data-node-id": n.id, "data-state": n.state, "data-cordoned": String(n.cordoned) });
    tr.appendChild(el("td", {}, n.id));
    const state = el("td", { class: "state " + n.state }, n.state);
    if (n.cordoned) state.appendChild(el("span", { class: "badge cordoned" }, "cordoned"));
    tr.appendChild(state);
    tr.appendChild(el("td", { class: "health-" + n.health }, n.health + (n.routable ? "" : " · not routable")));
    tr.appendChild(el("td", { title: n.digest ? "weights " + n.digest : "" }, n.model));
    tr.appendChild(el("td", {}, n.engine));
    // the coordinator's own count (exact now); a node's running/queued is as of its last poll
    tr.appendChild(el("td", { class: "num", title: "node reported " + n.running + " running, " + n.queued
      + " queued at its last poll" }, String(n.in_flight)));
    tr.appendChild(el("td", { class: "num" }, Math.round(n.tokens_per_s)));
    const mem = el("td");
    const bar = el("span", { class: "bar" });
    const fill = el("span");
    const share = n.memory_total ? Math.min(1, n.memory_used / n.memory_total) : 0;
    fill.style.width = (share * 100).toFixed(1) + "%";
    bar.appendChild(fill);
    mem.appendChild(bar);
    mem.appendChild(document.createTextNode(bytes(n.memory_used) + " / " + bytes(n.memory_total)));
    tr.appendChild(mem);
    tr.appendChild(el("td", { class: "note" }, n.reason || ""));
    rows.push(tr);
  }
  if (!rows.length) {
    const tr = el("tr");
    tr.appendChild(el("td", { colspan: "9", class: "muted" }, "no nodes found yet"));
    rows.push(tr);
  }
  body.replaceChildren(...rows);
}

// A chart: series of [x, y] over the last hour, drawn as lines or bars.
function chart(id, buckets, series, bars) {
  const svg = document.getElementById(id);
  const W = 600, H = 160, L = 40, B = 18, T = 8;
  const n = buckets.length || 1;
  let max = 1;
  for (const s of series) for (const b of buckets) max = Math.max(max, b[s.key] || 0);
  if (bars) for (const b of buckets) max = Math.max(max, b.requests || 0);
  const x = (i) => L + (i + 0.5) * (W - L) / n;
  const y = (v) => T + (H - B - T) * (1 - v / max);
  const parts = [svgEl("line", { class: "axis", x1: L, y1: H - B, x2: W, y2: H - B }),
    svgEl("line", { class: "axis", x1: L, y1: T, x2: L, y2: H - B })];
  for (const v of [0, max / 2, max]) {
    const t = svgEl("text", { x: L - 4, y: y(v) + 3, "text-anchor": "end" });
    t.textContent = v >= 100 ? Math.round(v) : v.toFixed(1);
    parts.push(t);
  }
  if (buckets.length) {
    for (const [i, label] of [[0, "-60 min"], [n - 1, "now"]]) {
      const t = svgEl("text", { x: x(i), y: H - 4, "text-anchor": i ? "end" : "start" });
      t.textContent = label;
      parts.push(t);
    }
  }
  if (bars) {
    const w = Math.max(1, (W - L) / n - 1);
    buckets.forEach((b, i) => {
      parts.push(svgEl("rect", { class: "okbar", x: x(i) - w / 2, y: y(b.requests), width: w, height: y(0) - y(b.requests) }));
      // stacked from the bottom: failures (the fleet's), then rejections (the caller's own)
      if (b.errors) parts.push(svgEl("rect", { class: "errbar", x: x(i) - w / 2, y: y(b.errors), width: w, height: y(0) - y(b.errors) }));
      const rej = b.rejected || 0;
      if (rej) parts.push(svgEl("rect", { class: "rejbar", x: x(i) - w / 2, y: y(b.errors + rej), width: w, height: y(b.errors) - y(b.errors + rej) }));
    });
  }
  for (const s of series) {
    const points = buckets.map((b, i) => x(i).toFixed(1) + "," + y(b[s.key] || 0).toFixed(1));
    parts.push(svgEl("polyline", { class: s.cls, points: points.join(" ") }));
  }
  svg.replaceChildren(...parts);
}

function renderEvents(events) {
  const items = events.map((e) => {
    const li = el("li", { class: e.kind });
    li.appendChild(el("span", { class: "muted" }, clock(e.time) + " "));
    li.appendChild(el("span", { class: "kind" }, e.kind + (e.step ? " " + e.step : "")));
    li.appendChild(document.createTextNode(" " + (e.node || "") + (e.to_node_id ? " → " + e.to_node_id : "")
      + (e.request_id ? " (" + e.request_id + ")" : "") + (e.reason ? ": " + e.reason : "")));
    return li;
  });
  if (!items.length) items.push(el("li", { class: "muted" }, "no events yet"));
  document.getElementById("events").replaceChildren(...items);
}

function renderRollout(r) {
  const box = document.getElementById("rollout");
  if (!r) { box.replaceChildren(document.createTextNode("no rollout yet")); return; }
  const parts = [el("div", {}, r.id + ": " + r.state)];
  if (r.message) parts.push(el("div", { class: "muted" }, r.message));
  const list = el("ul");
  for (const n of r.nodes) list.appendChild(el("li", {}, n.node + ": " + n.step));
  parts.push(list);
  box.replaceChildren(...parts);
}

// The live headroom (docs/capacity.md "Live headroom"): red past the SLA.
function renderCapacity(c) {
  const card = document.getElementById("capacity");
  card.title = c.line;
  if (!c.known) {
    setText("t-p95", "–");
    setText("t-headroom", "no capacity profile (--capacity-profile)");
    card.className = "card";
    return;
  }
  const p95 = c.predicted_p95_s === null ? "overloaded" : c.predicted_p95_s.toFixed(1) + " s";
  setText("t-p95", p95 + " / " + c.sla_p95_s + " s");
  const perMin = (x) => (x * 60).toFixed(1);
  const room = c.headroom_per_s * 60;
  setText("t-headroom", perMin(c.arrival_rate_per_s) + " notes/min now; SLA holds to " + perMin(c.sla_rate_per_s) +
    " (" + (room >= 0 ? "+" : "") + room.toFixed(1) + ")");
  card.className = c.sla_met ? "card" : "card over";
}

// Each node class's share of the last minute's requests, and overflow (docs/traffic.md).
function renderClasses(t) {
  const card = document.getElementById("classes");
  const used = t.classes.filter((c) => c.routed_recent > 0);
  setText("t-classes", used.length ? used.map((c) => c.node_class + " " + Math.round(c.share * 100) + "%").join(" · ") : "–");
  const on = t.overflow.filter((o) => o.active);
  setText("t-overflow", t.overflow.length === 0 ? "no overflow policy" :
    on.length ? "overflow ON: " + on.map((o) => o.model + " → " + o.to).join(", ") : "overflow off");
  card.className = on.length ? "card over" : "card";
}

// The latest shadow run (docs/shadow.md): the verdict so far, red on fail.
function renderShadow(r) {
  const card = document.getElementById("shadow");
  if (!r) {
    setText("t-shadow", "–");
    setText("t-shadow-sub", "no shadow run");
    card.className = "card";
    return;
  }
  setText("t-shadow", r.verdict + (r.active ? "" : " (stopped)"));
  setText("t-shadow-sub", r.model + " · " + Math.round(r.fraction * 1000) / 10 + "% · " + r.sent + " sent, " +
    r.dropped + " dropped");
  card.title = r.id + ": " + r.reason;
  card.className = r.verdict === "fail" ? "card over" : "card";
}

function render(s) {
  setText("coordinator", s.coordinator);
  setText("t-routable", s.totals.routable + " / " + s.totals.nodes);
  setText("t-running", s.totals.running);
  setText("t-queued", s.totals.queued);
  setText("t-tps", s.totals.request_log ? s.totals.tokens_per_s : "request log off");
  renderCapacity(s.capacity);
  renderClasses(s.traffic_classes);
  renderShadow(s.shadow);
  renderNodes(s.nodes);
  chart("c-tps", s.traffic, [{ key: "tokens_per_s", cls: "tps" }], false);
  chart("c-req", s.traffic, [], true);
  chart("c-lat", s.traffic, [{ key: "ttft_p50_ms", cls: "p50" }, { key: "ttft_p95_ms", cls: "p95" },
    { key: "latency_p95_ms", cls: "e2e" }], false);
  renderEvents(s.events);
  renderRollout(s.rollout);
  setText("updated", "Updated " + clock(s.time) + ".");
}

function status(text, cls) {
  const c = document.getElementById("conn");
  c.textContent = text;
  c.className = "conn " + cls;
}

async function poll() {
  try {
    const headers = userActive ? {} : { [BACKGROUND_HEADER]: "1" };
    userActive = false;
    // A poll that hangs (a dropped connection) must not stop the page: give up and retry.
    const reply = await fetch("/api/snapshot", {
      credentials: "same-origin", cache: "no-store", headers, signal: AbortSignal.timeout(POLL_TIMEOUT_MS),
    });
    if (reply.status === 401 || reply.status === 403) {
      status("session expired or not allowed: run `fleetctl dashboard` for a new link", "down");
      return;   // stop polling; a new link opens a new session
    }
    if (!reply.ok) throw new Error("HTTP " + reply.status);
    render(await reply.json());
    status("live", "live");
  } catch (err) {
    status("coordinator unreachable; retrying", "down");
  }
  setTimeout(poll, POLL_MS);
}

document.addEventListener("DOMContentLoaded", poll);
