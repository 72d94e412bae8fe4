// The statemesh console: reads the node's admin endpoints every 2 s. No build step, no
// dependencies; every value is put into the page as text (never as HTML).
"use strict";

const PALETTE = ["#2a6fdb", "#e8743b", "#19a979", "#945ecf", "#ed4a7b", "#13a4b4",
  "#bf399e", "#f2b705", "#6c8893", "#525df4"];
let lastFunctions = null; // {at, nodes, counts: {type: invocations}}

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const c of children) {
    e.append(c instanceof Node ? c : document.createTextNode(c == null ? "" : String(c)));
  }
  return e;
}

function fill(tbody, rows) {
  tbody.replaceChildren(...rows);
}

async function getJson(path, init) {
  const r = await fetch(path, init);
  const text = await r.text();
  let body;
  try { body = text ? JSON.parse(text) : null; } catch (_) { body = text; }
  if (!r.ok) {
    const why = body && body.error ? body.error : text;
    throw new Error(`${init && init.method || "GET"} ${path}: ${r.status} ${why}`);
  }
  return body;
}

function showError(e) {
  const box = document.getElementById("error");
  if (e) { box.textContent = String(e.message || e); box.hidden = false; }
  else { box.hidden = true; }
}

function ownerColor(owner, members) {
  if (owner == null) return "#d0d4da";
  const i = members.indexOf(owner);
  return PALETTE[(i < 0 ? owner : i) % PALETTE.length];
}

function renderCluster(c, kg) {
  document.getElementById("summary").textContent =
    `node ${c.node_id} · cluster ${c.cluster_id || "-"} · leader ${c.leader ?? "none"} · ` +
    `term ${c.term} · placement v${c.placement_version} · committed epoch ${c.committed_epoch}`;
  fill(document.querySelector("#members tbody"), c.members.map(m => el("tr", { "data-member": m.id },
    el("td", {}, m.id), el("td", {}, m.generation), el("td", {}, m.role),
    el("td", { class: m.alive ? "" : "dead" },
      !m.alive ? "dead" : m.leaving ? "leaving" : (c.suspected || []).includes(m.id) ? "suspected" : "alive"),
    el("td", {}, m.key_groups), el("td", {}, m.grpc_addr), el("td", {}, m.http_addr))));

  const ids = c.members.map(m => m.id).sort((a, b) => a - b);
  const owners = kg.owners;
  const moving = new Map();
  if (c.moving) for (const [k, from, to] of c.moving.key_groups) moving.set(k, [from, to]);
  document.getElementById("kg-count").textContent =
    `(${owners.length}, ${owners.filter(o => o == null).length} unassigned)`;
  document.getElementById("kg-legend").replaceChildren(...ids.map(id => {
    const n = owners.filter(o => o === id).length;
    return el("span", {}, el("i", { style: `background:${ownerColor(id, ids)}` }), `node ${id}: ${n}`);
  }));
  const grid = document.getElementById("kg-grid");
  if (grid.children.length !== owners.length) {
    grid.replaceChildren(...owners.map(() => el("div")));
  }
  owners.forEach((o, k) => {
    const cell = grid.children[k];
    cell.style.background = ownerColor(o, ids);
    const mv = moving.get(k);
    cell.className = mv ? "moving" : "";
    cell.title = mv ? `key group ${k}: moving ${mv[0]} → ${mv[1]}` : `key group ${k}: node ${o ?? "none"}`;
  });
  document.getElementById("kg-moving").textContent = c.moving
    ? `moving ${c.moving.key_groups.length} key groups at epoch ${c.moving.at_epoch}` : "no move under way";
  fill(document.getElementById("history"), (c.history || []).slice().reverse().map(h =>
    el("li", {}, `${new Date(h.at_ms).toLocaleTimeString()} ${h.why}` +
      (h.node != null ? ` node ${h.node}` : "") + (h.key_groups ? ` (${h.key_groups} key groups)` : "") +
      (h.detail ? ` ${h.detail}` : ""))));
}

function chart(svg, values) {
  if (values.length === 0) { svg.replaceChildren(); return; }
  const max = Math.max(...values, 1);
  const step = values.length > 1 ? 400 / (values.length - 1) : 0;
  const points = values.map((v, i) => `${(i * step).toFixed(1)},${(100 - (v / max) * 95).toFixed(1)}`);
  const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
  line.setAttribute("points", points.join(" "));
  const label = document.createElementNS("http://www.w3.org/2000/svg", "text");
  label.setAttribute("x", "4"); label.setAttribute("y", "12"); label.setAttribute("font-size", "10");
  label.textContent = `max ${Math.round(max)}`;
  svg.replaceChildren(line, label);
}

function renderCheckpoints(cp) {
  const recent = cp.recent || [];
  document.getElementById("cp-summary").textContent = !cp.enabled ? "checkpoints off" :
    `committed ${cp.committed} · started ${cp.started} · applied ${cp.applied} · ${cp.durability} · ` +
    `${cp.url}` + (cp.backpressure ? ` · back-pressure: ${cp.backpressure}` : "") +
    (cp.last_error ? ` · last error: ${cp.last_error}` : "");
  chart(document.getElementById("cp-bytes"), recent.map(e => e.bytes));
  chart(document.getElementById("cp-ms"), recent.map(e => e.duration_ms));
}

function fmt(v, digits = 3) {
  return v == null ? "-" : Number(v).toPrecision(digits);
}

function renderFunctions(f) {
  const now = Date.now();
  const rate = {};
  const nodes = f.nodes.join(",");
  // Sums over other members (one stopped answering or restarted) are not comparable.
  if (lastFunctions && lastFunctions.nodes === nodes) {
    const secs = (now - lastFunctions.at) / 1000;
    for (const t of f.types) {
      const before = lastFunctions.counts[t.type];
      if (before != null && secs > 0) rate[t.type] = Math.max(0, t.invocations - before) / secs;
    }
  }
  lastFunctions = { at: now, nodes, counts: Object.fromEntries(f.types.map(t => [t.type, t.invocations])) };
  document.getElementById("functions-scope").textContent =
    `(summed over members ${f.nodes.join(", ")}` +
    (f.unreachable.length ? `; not answering: ${f.unreachable.map(u => u.node).join(", ")})` : ")");
  fill(document.querySelector("#functions tbody"), f.types.map(t => el("tr", { "data-type": t.type },
    el("td", {}, t.type), el("td", { title: t.url || "" }, t.kind === "remote" ? `remote ${t.url}` : "embedded"),
    el("td", {}, t.invocations), el("td", {}, rate[t.type] == null ? "-" : rate[t.type].toFixed(1)),
    el("td", {}, fmt(t.mean_ms)), el("td", {}, fmt(t.p50_ms)), el("td", {}, fmt(t.p99_ms)),
    el("td", {}, t.dead_letters),
    el("td", {}, t.states.map(s => `${s.name}: ${s.typename}`).join(", ")))));
  fill(document.querySelector("#endpoints tbody"), f.endpoints.map(e => el("tr", {},
    el("td", {}, e.functions), el("td", {}, e.url), el("td", {}, e.max_batch), el("td", {}, e.call_timeout_ms))));
}

function renderDeadLetters(d) {
  document.getElementById("dl-count").textContent = `(${d.letters.length})` +
    (d.unreachable.length ? ` — not answering: ${d.unreachable.map(u => u.node).join(", ")}` : "");
  fill(document.querySelector("#dead-letters tbody"), d.letters.map(l => el("tr", { "data-id": l.id },
    el("td", {}, l.id), el("td", {}, l.node), el("td", {}, l.address || (l.egress ? `egress ${l.egress}` : "-")),
    el("td", {}, l.typename), el("td", {}, l.attempts), el("td", { class: "reason" }, l.error),
    el("td", {}, el("button", {
      onclick: async (ev) => {
        ev.target.disabled = true;
        try {
          await getJson(`/v1/dead-letters/${encodeURIComponent(l.id)}/replay`, { method: "POST" });
          showError(null);
        } catch (e) { showError(e); }
        refresh();
      },
    }, "Replay")))));
}

async function lookUp(address) {
  const out = document.getElementById("state-result");
  try {
    const s = await getJson(`/v1/state/${address}`);
    const rows = Object.entries(s.states).map(([name, v]) =>
      el("tr", { "data-state": name }, el("td", {}, name), el("td", {}, v.typename || ""),
        el("td", {}, typeof v.value === "string" ? v.value : JSON.stringify(v.value)),
        el("td", {}, v.expires_at_ms ? new Date(v.expires_at_ms).toISOString() : "")));
    out.replaceChildren(el("p", {}, `${s.address}: ${rows.length} state value(s)`),
      el("table", {}, el("thead", {}, el("tr", {}, el("th", {}, "name"), el("th", {}, "typename"),
        el("th", {}, "value"), el("th", {}, "expires"))), el("tbody", {}, ...rows)));
    document.getElementById("state-edit").hidden = false;
    showError(null);
  } catch (e) {
    out.replaceChildren(el("p", { class: "dead" }, String(e.message)));
  }
}

async function editState(del) {
  const address = document.getElementById("state-address").value.trim();
  const name = document.getElementById("edit-name").value.trim();
  const value = document.getElementById("edit-value").value;
  try {
    await getJson(`/v1/state/${address}?name=${encodeURIComponent(name)}`, del
      ? { method: "DELETE" } : { method: "PUT", headers: { "Content-Type": "text/plain" }, body: value });
    showError(null);
  } catch (e) { showError(e); }
  lookUp(address);
}

async function refresh() {
  try {
    const [c, kg, cp, f, d] = await Promise.all([
      getJson("/v1/cluster"), getJson("/v1/cluster/key-groups"), getJson("/v1/checkpoints"),
      getJson("/v1/functions"), getJson("/v1/dead-letters"),
    ]);
    renderCluster(c, kg);
    renderCheckpoints(cp);
    renderFunctions(f);
    renderDeadLetters(d);
    document.body.dataset.loaded = "true";
    showError(null);
  } catch (e) {
    showError(e);
  }
}

document.getElementById("state-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  lookUp(document.getElementById("state-address").value.trim());
});
document.getElementById("state-edit").addEventListener("submit", (ev) => {
  ev.preventDefault();
  editState(false);
});
document.getElementById("edit-delete").addEventListener("click", () => editState(true));
// The next refresh 2 s after this one ends (a member slow to answer does not pile them up).
async function loop() {
  await refresh();
  setTimeout(loop, 2000);
}
loop();
