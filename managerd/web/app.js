// managerd's status page: renders /status.json, polls it, never reloads.
// Every value goes in with textContent (object names are anyone's strings).
"use strict";

const PAGE_ROWS = 100;
const POLL_MS = 1000;

const fmtHolders = (hs) =>
  hs.map((h) => (h.host == null ? String(h.peer) : `${h.host}:${h.pid}` + (h.thread ? `:${h.thread}` : ""))).join(", ");

// Each table: the document's key, a title, and columns [header, value(row), numeric?].
const SECTIONS = [
  ["queues", "Queues", [
    ["name", (r) => r.name], ["type", (r) => r.type], ["depth", (r) => r.depth, 1],
    ["reserved", (r) => r.reserved, 1], ["waiters", (r) => r.waiters, 1],
    ["put/s", (r) => r.puts_per_s, 1], ["get/s", (r) => r.gets_per_s, 1]]],
  ["locks", "Locks, RLocks and semaphores", [
    ["name", (r) => r.name], ["type", (r) => r.type],
    ["holders (host:pid:thread)", (r) => fmtHolders(r.holders)],
    ["held for s", (r) => r.held_for_s, 1], ["available", (r) => r.available, 1],
    ["waiters", (r) => r.waiters, 1], ["waiting (host:pid:thread)", (r) => fmtHolders(r.waiting || [])],
    ["token", (r) => r.token, 1]]],
  ["sync", "Events, conditions and barriers", [
    ["name", (r) => r.name], ["type", (r) => r.type], ["state", (r) => r.state],
    ["waiters", (r) => r.waiters, 1]]],
  ["data", "Dicts, lists, namespaces, values and arrays", [
    ["name", (r) => r.name], ["type", (r) => r.type], ["size", (r) => r.size, 1],
    ["value", (r) => r.value]]],
  ["pipes", "Pipes", [
    ["name", (r) => r.name], ["buffered", (r) => r.buffered, 1],
    ["closed ends", (r) => r.closed.filter(Boolean).length, 1], ["waiters", (r) => r.waiters, 1]]],
  ["sessions", "Sessions", [
    ["id", (r) => r.id], ["kind", (r) => r.kind], ["peer", (r) => r.peer],
    ["host:pid", (r) => (r.host == null ? null : `${r.host}:${r.pid}`)], ["age s", (r) => r.age_s, 1],
    ["holds", (r) => r.holds.join(", ")], ["waits for", (r) => r.waits_for.join(", ")]]],
  ["penalized", "Refused peers (failed handshakes)", [
    ["address", (r) => r.address], ["refused for s", (r) => r.refused_for_s, 1]]],
];

const state = { doc: null, filter: "", sort: {}, page: {}, token: sessionStorage.getItem("managerd-token") || "" };
const $ = (id) => document.getElementById(id);

function el(tag, props, ...children) {
  const e = document.createElement(tag);
  Object.assign(e, props || {});
  for (const c of children) e.append(c);
  return e;
}

function cellText(v) {
  return v == null || v === "" ? "-" : String(v);
}

function compare(a, b) {
  if (a == null) return b == null ? 0 : 1;
  if (b == null) return -1;
  if (typeof a === "number" && typeof b === "number") return a - b;
  return String(a).localeCompare(String(b), undefined, { numeric: true });
}

function buildSkeleton() {
  const main = $("sections");
  for (const [key, title, cols] of SECTIONS) {
    state.sort[key] = { col: 0, desc: false };
    state.page[key] = 0;
    const head = el("tr");
    cols.forEach(([h, , num], i) => {
      const th = el("th", { textContent: h, className: num ? "num" : "" });
      th.addEventListener("click", () => {
        const s = state.sort[key];
        state.sort[key] = { col: i, desc: s.col === i ? !s.desc : false };
        render();
      });
      head.append(th);
    });
    const prev = el("button", { type: "button", textContent: "\u2190 previous" });
    const next = el("button", { type: "button", textContent: "next \u2192" });
    prev.addEventListener("click", () => { state.page[key] = Math.max(0, state.page[key] - 1); render(); });
    next.addEventListener("click", () => { state.page[key] += 1; render(); });
    const section = el("section", { id: `s-${key}` },
      el("h2", {}, title + " ", el("span", { className: "count", id: `c-${key}` })),
      el("table", { id: `t-${key}` }, el("thead", {}, head), el("tbody")),
      el("div", { className: "pager", id: `p-${key}` }, prev, el("span", { className: "where" }), next));
    main.append(section);
  }
}

function renderSection(key, cols, all) {
  const q = state.filter.toLowerCase();
  const nameOf = (r) => String(r.name ?? r.id ?? r.address ?? "");
  let rows = q ? all.filter((r) => nameOf(r).toLowerCase().includes(q)) : all.slice();
  const { col, desc } = state.sort[key];
  const value = cols[col][1];
  rows.sort((a, b) => compare(value(a), value(b)) * (desc ? -1 : 1));
  const pages = Math.max(1, Math.ceil(rows.length / PAGE_ROWS));
  state.page[key] = Math.min(state.page[key], pages - 1);
  const start = state.page[key] * PAGE_ROWS;
  const shown = rows.slice(start, start + PAGE_ROWS);

  const table = $(`t-${key}`);
  table.querySelectorAll("th").forEach((th, i) => {
    th.classList.toggle("sorted", i === col);
    th.classList.toggle("desc", i === col && desc);
  });
  const body = el("tbody");
  for (const r of shown) {
    const tr = el("tr");
    tr.dataset.name = nameOf(r);
    if (key === "locks" && r.waiters > 0) tr.className = "contended";
    for (const [, get, num] of cols) tr.append(el("td", { textContent: cellText(get(r)), className: num ? "num" : "" }));
    body.append(tr);
  }
  table.tBodies[0].replaceWith(body);
  $(`c-${key}`).textContent = q ? `(${rows.length} of ${all.length})` : `(${all.length})`;
  const pager = $(`p-${key}`);
  pager.hidden = rows.length <= PAGE_ROWS;
  pager.querySelector(".where").textContent =
    `rows ${rows.length ? start + 1 : 0}\u2013${start + shown.length} of ${rows.length}, page ${state.page[key] + 1} of ${pages}`;
  const [prev, next] = pager.querySelectorAll("button");
  prev.disabled = state.page[key] === 0;
  next.disabled = state.page[key] >= pages - 1;
  $(`s-${key}`).hidden = key === "penalized" && all.length === 0;
}

function render() {
  const doc = state.doc;
  if (!doc) return;
  const s = doc.settings || {};
  $("about").textContent =
    `version ${doc.version} \u00b7 up ${Math.round(doc.uptime_s)} s \u00b7 ${doc.objects} objects \u00b7 ` +
    `${doc.sessions.length} sessions \u00b7 store ${s.store} \u00b7 fsync ${s.fsync} \u00b7 TLS ${s.tls}` +
    (s.deadlock ? ` \u00b7 deadlock ${s.deadlock}` : "") +
    ` \u00b7 ${doc.handshakes_pending} handshakes pending`;
  for (const [key, , cols] of SECTIONS) renderSection(key, cols, doc[key] || []);
  const cycles = doc.deadlocks || [];
  $("deadlocks-box").hidden = cycles.length === 0;
  $("deadlocks").replaceChildren(...cycles.map((c) => el("li", { textContent: c.text })));
}

async function poll() {
  const headers = state.token ? { Authorization: `Bearer ${state.token}` } : {};
  try {
    const res = await fetch("status.json", { headers, cache: "no-store" });
    if (res.status === 401) {
      $("auth").hidden = false;
      $("error").textContent = "a token is required";
      return;
    }
    if (!res.ok) throw new Error(`${res.status} ${res.statusText}`);
    state.doc = await res.json();
    $("auth").hidden = true;
    $("error").textContent = "";
    $("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
    render();
    document.body.dataset.polls = String(Number(document.body.dataset.polls || 0) + 1);
  } catch (e) {
    $("error").textContent = `cannot read status.json: ${e.message}`;
  }
}

async function loop() {
  if ($("live").checked && !document.hidden) await poll();
  setTimeout(loop, POLL_MS);
}

buildSkeleton();
$("filter").addEventListener("input", (e) => {
  state.filter = e.target.value;
  for (const k in state.page) state.page[k] = 0;
  render();
});
$("auth").addEventListener("submit", (e) => {
  e.preventDefault();
  state.token = $("token").value.trim();
  sessionStorage.setItem("managerd-token", state.token);
  poll();
});
loop();
