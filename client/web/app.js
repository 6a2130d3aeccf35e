// The page of `swarm serve`: a streaming chat over /v1/chat/completions and the live swarm map
// from /swarm/events (server-sent events, read with fetch so the same parser serves both).
// No framework, no build step: the DOM is built with createElement and textContent only
// (nothing a peer reports is ever parsed as HTML).
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "layerswarm-api-key";
const state = { history: [], model: null, abort: null, keyRequired: false };

// --- server-sent events over fetch ----------------------------------------------------------

async function readEvents(response, onEvent) {
  // Calls onEvent(name, data) for every event of an SSE body until it ends.
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let name = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length && onEvent(name, data.join("\n")) === false) return;
    }
  }
}

function authHeaders() {
  const key = sessionStorage.getItem(KEY_STORE);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function askForKey(message) {
  $("api-key-box").hidden = false;
  if (message) addMessage("error", message);
  $("api-key").focus();
}

$("api-key-save").addEventListener("click", () => {
  const key = $("api-key").value.trim();
  if (key) sessionStorage.setItem(KEY_STORE, key);
  else sessionStorage.removeItem(KEY_STORE);
  $("api-key-box").hidden = true;
  state.model = null; // ask /v1/models again with the key
});

// --- chat --------------------------------------------------------------------------------

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  div.textContent = text;
  $("messages").append(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

async function modelId() {
  if (state.model) return state.model;
  try {
    const response = await fetch("/v1/models", { headers: authHeaders() });
    if (response.ok) {
      const body = await response.json();
      if (body.data && body.data.length) state.model = body.data[0].id;
    }
  } catch (err) { /* the map's name is the fallback */ }
  return state.model || $("model-name").dataset.model || "default";
}

function errorText(status, body) {
  const error = body && body.error;
  return error ? `${status} ${error.type || ""}${error.code ? " (" + error.code + ")" : ""}: ${error.message}` : `HTTP ${status}`;
}

async function send() {
  const text = $("prompt").value.trim();
  if (!text || state.abort) return;
  if (state.keyRequired && !sessionStorage.getItem(KEY_STORE)) {
    askForKey("Enter the API key first.");
    return;
  }
  $("prompt").value = "";
  state.history.push({ role: "user", content: text });
  addMessage("user", text);
  const bubble = addMessage("assistant", "");
  bubble.dataset.done = "false";
  const controller = new AbortController();
  state.abort = controller;
  $("stop").disabled = false;
  $("send").disabled = true;
  let reply = "";
  try {
    const body = {
      model: await modelId(),
      messages: state.history,
      stream: true,
      max_tokens: Number($("max-tokens").value) || 256,
      temperature: Number($("temperature").value) || 0,
    };
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json", ...authHeaders() },
      body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (!response.ok) {
      let detail = null;
      try { detail = await response.json(); } catch (err) { /* not JSON */ }
      if (response.status === 401) askForKey();
      throw new Error(errorText(response.status, detail));
    }
    await readEvents(response, (name, data) => {
      if (data === "[DONE]") return false;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(errorText("stream", chunk));
      for (const choice of chunk.choices || []) {
        const piece = choice.delta && choice.delta.content;
        if (piece) {
          reply += piece;
          bubble.textContent = reply;
          bubble.scrollIntoView({ block: "end" });
        }
        if (choice.finish_reason) bubble.dataset.finish = choice.finish_reason;
      }
    });
  } catch (err) {
    if (err.name === "AbortError") {
      bubble.dataset.finish = "stopped";
    } else {
      const note = addMessage("error", String(err.message || err));
      note.dataset.error = "true";
    }
  } finally {
    if (reply) state.history.push({ role: "assistant", content: reply });
    else {
      state.history.pop(); // nothing came back: the question is not part of the conversation
      bubble.textContent = "…";
    }
    bubble.dataset.done = "true";
    state.abort = null;
    $("stop").disabled = true;
    $("send").disabled = false;
  }
}

$("chat-form").addEventListener("submit", (event) => {
  event.preventDefault();
  send();
});
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    send();
  }
});
$("stop").addEventListener("click", () => state.abort && state.abort.abort());
$("clear").addEventListener("click", () => {
  if (state.abort) state.abort.abort();
  state.history = [];
  $("messages").replaceChildren();
});

// --- the map -----------------------------------------------------------------------------

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function place(node, start, end, total) {
  // Position a segment over blocks [start, end) of a track `total` blocks wide.
  node.style.left = `${(100 * start) / total}%`;
  node.style.width = `${(100 * (end - start)) / total}%`;
  return node;
}

function fmt(value, digits = 1) {
  return value === null || value === undefined ? "–" : Number(value).toFixed(digits);
}

function drawBar(map) {
  const bar = $("blocks-bar");
  bar.replaceChildren();
  const total = map.num_layers;
  map.coverage.forEach((count, block) => {
    const cell = place(el("div", `block ${count ? "covered" : "missing"}`), block, block + 1, total);
    cell.dataset.block = block;
    cell.dataset.count = count;
    cell.title = `block ${block}: ${count} live node${count === 1 ? "" : "s"}`;
    bar.append(cell);
  });
  const step = total <= 40 ? 5 : total <= 100 ? 10 : 20;
  const ticks = [];
  for (let block = 0; block <= total; block += step) ticks.push(block);
  if (ticks[ticks.length - 1] !== total) ticks.push(total);
  $("axis").replaceChildren(...ticks.map((block) => {
    const tick = el("span", "", String(block));
    tick.style.left = `${(100 * block) / total}%`;
    return tick;
  }));
  for (const [start, end] of map.holes) {
    const hole = place(el("div", "hole", `hole ${start}–${end - 1}`), start, end, total);
    hole.dataset.hole = `${start}-${end}`;
    hole.title = `blocks ${start}–${end - 1}: no live node serves them`;
    bar.append(hole);
  }
}

function drawNodes(map) {
  const rows = [];
  for (const node of map.nodes) {
    const [start, end] = node.span;
    const label = el("div", "label");
    label.append(el("code", "", node.short), el("span", "muted", ` ${start}–${end - 1}`));
    label.title = `${node.peer_id}\n${node.url}`;
    const track = el("div", "track");
    const segment = place(el("div", `segment ${node.state}`, `${node.short} · ${start}–${end - 1}`), start, end, map.num_layers);
    segment.title = node.reason ? `${node.state}: ${node.reason}` : node.state;
    track.append(segment);
    const since = node.for_s === null ? "" : ` ${Math.round(node.for_s)} s`;
    const stats = el("div", "stats");
    stats.append(
      el("span", `state ${node.state}`, `${node.state}${since}`),
      el("span", "measured", `${fmt(node.measured_blocks_per_s)} blk/s`),
      el("span", "muted", `claims ${fmt(node.claimed_blocks_per_s, 0)}`),
      el("span", "", `load ${fmt(100 * (node.load || 0), 0)}%`),
      el("span", "", `sessions ${node.sessions ?? "–"}${node.max_sessions ? "/" + node.max_sessions : ""}`),
      el("span", "muted", `${fmt(node.rtt_ms)} ms`),
    );
    stats.querySelector(".measured").title = "blocks per second this server measured in real steps";
    const row = el("div", `node-row ${node.state}`);
    row.dataset.node = node.peer_id;
    row.dataset.state = node.state;
    row.dataset.span = `${start}-${end}`;
    if (node.live_sessions) row.classList.add("busy");
    row.append(label, track, stats);
    rows.push(row);
  }
  $("nodes").replaceChildren(...rows);
}

function drawSessions(map) {
  const rows = [];
  for (const session of map.sessions) {
    const track = el("div", "track route");
    session.hops.forEach((hop, index) => {
      const segment = place(el("div", "hop", hop.short), hop.start, hop.end, map.num_layers);
      segment.dataset.peer = hop.peer_id;
      segment.title = `hop ${index + 1}: ${hop.peer_id} blocks ${hop.start}–${hop.end - 1}`;
      track.append(segment);
    });
    if (!session.hops.length) track.append(el("span", "muted", " opening…"));
    const row = el("div", "session-row");
    row.dataset.session = session.id;
    row.append(
      el("div", "label", `${session.kind} ${session.id}`),
      track,
      el("div", "stats muted", `${session.tokens} tokens · ${fmt(session.age_s)} s`),
    );
    rows.push(row);
  }
  $("sessions").replaceChildren(...rows);
  $("session-count").textContent = String(map.sessions.length);
}

function drawMap(map) {
  $("model-name").textContent = map.model;
  $("model-name").dataset.model = map.model;
  const coverage = $("coverage");
  coverage.textContent = `${map.covered}/${map.num_layers} blocks covered`;
  coverage.className = `badge ${map.holes.length ? "bad" : "good"}`;
  const up = map.nodes.filter((n) => n.state === "up").length;
  $("map-summary").textContent = `${up} of ${map.nodes.length} nodes up`;
  $("map").dataset.nodes = String(map.nodes.length);
  $("map").dataset.up = String(up);
  state.keyRequired = map.api_key_required;
  if (map.api_key_required && !sessionStorage.getItem(KEY_STORE)) $("api-key-box").hidden = false;
  drawBar(map);
  drawNodes(map);
  drawSessions(map);
}

async function followMap() {
  // One stream at a time; when it ends or fails, reconnect after a second.
  for (;;) {
    try {
      const response = await fetch("/swarm/events", { headers: { Accept: "text/event-stream" } });
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      $("feed-state").textContent = "live";
      await readEvents(response, (name, data) => {
        if (name === "map") drawMap(JSON.parse(data));
      });
    } catch (err) {
      $("feed-state").textContent = `map feed: ${err.message || err}; retrying`;
    }
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
}

followMap();
