// The NPC server's page: list, create (text or card), follow a prune, chat through a session.
"use strict";

const $ = (id) => document.getElementById(id);
// each tab keeps its own conversation with each NPC, across reloads of that tab (sessionStorage)
const state = { npcs: new Map(), selected: null, following: new Set(), card: null,
                sessions: new Map(JSON.parse(sessionStorage.getItem("npc-sessions") || "[]")) };
const keepSessions = () => sessionStorage.setItem("npc-sessions", JSON.stringify([...state.sessions]));

$("api-key").value = localStorage.getItem("npc-api-key") || "";
$("api-key").addEventListener("change", () => { localStorage.setItem("npc-api-key", $("api-key").value); refresh(); });

function headers(extra = {}) {
  const key = $("api-key").value.trim();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

async function api(path, opts = {}) {
  const r = await fetch(path, { ...opts, headers: headers(opts.headers || {}) });
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error((body.error && body.error.message) || `${r.status} ${r.statusText}`);
  return body;
}

// Server-sent events over fetch (EventSource cannot send the API key)
async function sse(path, opts, onEvent) {
  const r = await fetch(path, { ...opts, headers: headers(opts.headers || {}) });
  if (!r.ok) {
    const body = await r.json().catch(() => ({}));
    throw new Error((body.error && body.error.message) || `${r.status} ${r.statusText}`);
  }
  const reader = r.body.getReader(), dec = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += dec.decode(value, { stream: true });
    let cut;
    while ((cut = buf.search(/\r?\n\r?\n/)) >= 0) {
      const block = buf.slice(0, cut); buf = buf.slice(cut).replace(/^\r?\n\r?\n/, "");
      let event = "message"; const data = [];
      for (const line of block.split(/\r?\n/)) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) onEvent(event, data.join("\n"));
    }
  }
}

function renderList() {
  const ul = $("npc-list"); ul.replaceChildren();
  for (const n of state.npcs.values()) {
    const li = document.createElement("li");
    li.dataset.id = n.id;
    li.className = n.id === state.selected ? "sel" : "";
    const name = document.createElement("span"); name.textContent = n.name;
    const badge = document.createElement("span");
    badge.className = `badge ${n.status}`;
    badge.textContent = n.status === "running" ? `running ${Math.round(100 * n.progress)}%` : n.status;
    li.append(name, badge);
    li.addEventListener("click", () => select(n.id));
    ul.append(li);
  }
}

function follow(id) {
  // one event stream per NPC that is still being made
  if (state.following.has(id)) return;
  state.following.add(id);
  sse(`/v1/npcs/${id}/events`, {}, (event, data) => {
    if (event !== "npc") return;
    const n = JSON.parse(data); state.npcs.set(n.id, n); renderList();
    if (state.selected === n.id) renderDetail();
  }).catch(() => {}).finally(() => state.following.delete(id));
}

async function refresh() {
  try {
    const page = await api("/v1/npcs?limit=1000");
    state.npcs = new Map(page.data.map((n) => [n.id, n]));
    renderList();
    for (const n of page.data) if (n.status === "queued" || n.status === "running") follow(n.id);
    if (state.selected) renderDetail();
  } catch (e) { $("create-error").textContent = e.message; }
}

function fact(dl, k, v) {
  if (v === null || v === undefined || v === "") return;
  const dt = document.createElement("dt"), dd = document.createElement("dd");
  dt.textContent = k; dd.textContent = v; dl.append(dt, dd);
}

function renderDetail() {
  const n = state.npcs.get(state.selected); if (!n) return;
  $("empty").hidden = true; $("detail").hidden = false;
  $("d-name").textContent = n.name;
  $("d-status").textContent = `${n.status}${n.stage && n.stage !== n.status ? " - " + n.stage : ""}` +
    (n.serving ? ` (answers: ${n.serving === "pruned" ? "its pruned model" : "the dense base with its persona"})` : "");
  $("d-progress").value = n.progress || 0;
  const dl = $("d-facts"); dl.replaceChildren();
  fact(dl, "id", n.id); fact(dl, "method", n.method); fact(dl, "sparsity", n.sparsity);
  fact(dl, "base", n.base); fact(dl, "FFN channels kept per layer", n.kept_per_layer);
  const m = n.metrics || {};
  if (m.retention !== undefined) fact(dl, "persona retention", Number(m.retention).toFixed(3));
  if (m.kl_to_dense !== undefined) fact(dl, "KL to dense", Number(m.kl_to_dense).toFixed(4));
  for (const k of ["params", "parameters", "ffn_params"]) if (m[k] !== undefined) fact(dl, k, m[k]);
  if (n.error) fact(dl, "error", n.error);
  $("chat-send").disabled = !n.serving;
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = `msg ${role}`; div.textContent = text;
  $("chat-log").append(div); $("chat-log").scrollTop = $("chat-log").scrollHeight;
  return div;
}

async function select(id) {
  state.selected = id; renderList(); renderDetail();
  $("chat-log").replaceChildren(); $("chat-error").textContent = ""; $("chat-speed").textContent = "";
  const sid = state.sessions.get(id);
  if (sid) {
    try {
      const s = await api(`/v1/npcs/${id}/sessions/${sid}`);
      for (const m of s.messages) addMessage(m.role, m.content);
    } catch (e) { state.sessions.delete(id); keepSessions(); }
  }
}

async function session(id) {
  if (!state.sessions.has(id)) {
    const s = await api(`/v1/npcs/${id}/sessions`, { method: "POST", headers: { "Content-Type": "application/json" }, body: "{}" });
    state.sessions.set(id, s.id); keepSessions();
    for (const m of s.messages) addMessage(m.role, m.content);
  }
  return state.sessions.get(id);
}

$("chat").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const id = state.selected, text = $("chat-input").value.trim();
  if (!id || !text) return;
  $("chat-error").textContent = ""; $("chat-send").disabled = true;
  try {
    const sid = await session(id);
    addMessage("user", text); $("chat-input").value = "";
    const out = addMessage("assistant", ""); out.classList.add("pending");
    let first = null, tokens = 0;
    await sse(`/v1/npcs/${id}/sessions/${sid}/messages`, {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ content: text, stream: true, max_tokens: 96 }),
    }, (event, data) => {
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      for (const c of chunk.choices || []) {
        const piece = (c.delta && c.delta.content) || "";
        if (piece && first === null) first = performance.now();
        out.textContent += piece;
      }
      if (chunk.usage) tokens = chunk.usage.completion_tokens;
    });
    out.classList.remove("pending"); out.classList.add("done");
    const secs = first === null ? 0 : (performance.now() - first) / 1000;
    if (tokens) $("chat-speed").textContent = `${tokens} tokens` + (secs > 0 ? `, ${(tokens / secs).toFixed(1)} tokens/s` : "");
  } catch (e) { $("chat-error").textContent = e.message; }
  finally { renderDetail(); }
});

function takeCard(file) {
  state.card = file; $("card-name").textContent = file ? `card: ${file.name}` : "";
}
$("card-file").addEventListener("change", (e) => takeCard(e.target.files[0] || null));
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); takeCard(e.dataTransfer.files[0] || null); });

$("create").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  $("create-error").textContent = "";
  const name = $("npc-name").value.trim(), persona = $("npc-persona").value.trim(), sparsity = $("npc-sparsity").value;
  try {
    let n;
    if (state.card) {
      const form = new FormData();
      form.append("card", state.card); form.append("sparsity", sparsity);
      if (name) form.append("name", name);
      n = await api("/v1/npcs", { method: "POST", body: form });
    } else {
      n = await api("/v1/npcs", { method: "POST", headers: { "Content-Type": "application/json" },
                                  body: JSON.stringify({ name, persona, sparsity: Number(sparsity) }) });
    }
    state.npcs.set(n.id, n); takeCard(null); $("npc-name").value = ""; $("npc-persona").value = "";
    if (n.status === "queued" || n.status === "running") follow(n.id);
    select(n.id);
  } catch (e) { $("create-error").textContent = e.message; }
});

refresh();
