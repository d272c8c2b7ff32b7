"use strict";
// The rbee dashboard. The cluster's state comes from the queen's live stream
// (GET /v1/heartbeats/stream): a `summary` with the whole cluster at once and every few seconds,
// `worker` and `hive` events as they happen, and `stats` (live figures) while the page watches.
// The charts of the last hour come from the queen's own history (GET /v1/dashboard/history),
// so a reload keeps them. Actions go through the queen's jobs (POST /v1/jobs), the playground
// through its OpenAI API (POST /v1/chat/completions, streamed).
//
// EventSource cannot send an Authorization header, so the stream is read with fetch() and a
// ReadableStream reader: the cluster token travels in the header, never in the URL. It is kept
// in sessionStorage (this tab, this session) and never in a cookie another site could ride on.

const TOKEN_KEY = "rbee.token";
const HISTORY = 90; // samples per chart
const STALL_MS = 20000; // the queen sends something at least every 15 s (keep-alive pings)
const KEEP_STOPPED_MS = 30000; // a worker that left stays on the page, as stopped, this long
const STATS = ["requests_per_s", "ttft_s", "tokens_per_s", "queue"];

const cluster = {
  workers: new Map(), // id -> {view, at, gone}
  hives: new Map(), // id -> {view, at}
  models: [],
  workerTps: {},
  series: Object.fromEntries(STATS.map((name) => [name, []])),
  history: null, // the queen's last hour
  workerMemory: {},
  openLogs: new Set(), // workers whose log tail is shown
  logs: new Map(), // worker id -> text
};

const $ = (id) => document.getElementById(id);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else if (key.startsWith("data-")) node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of children) {
    if (child !== null && child !== undefined) {
      node.append(child instanceof Node ? child : String(child));
    }
  }
  return node;
}

// ---- connection ---------------------------------------------------------------------------

function authHeaders(accept = "text/event-stream") {
  const headers = { Accept: accept };
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = `Bearer ${token}`;
  return headers;
}

function setConnection(text, kind) {
  const pill = $("connection");
  pill.textContent = text;
  pill.className = `pill pill-${kind}`;
}

function unreachable(detail) {
  $("unreachable").hidden = false;
  $("unreachable-detail").textContent = detail ? `(${detail})` : "";
  setConnection("unreachable", "bad");
  document.body.dataset.queen = "unreachable";
}

function reachable() {
  $("unreachable").hidden = true;
  setConnection("live", "ok");
  document.body.dataset.queen = "live";
}

function showLogin(message) {
  $("board").hidden = true;
  $("login").hidden = false;
  $("login-error").hidden = !message;
  $("login-error").textContent = message || "";
  setConnection("token needed", "wait");
  $("token").focus();
}

async function connect() {
  let delay = 500;
  for (;;) {
    const controller = new AbortController();
    let response;
    try {
      response = await fetch("/v1/heartbeats/stream", {
        headers: authHeaders(),
        cache: "no-store",
        signal: controller.signal,
      });
    } catch (error) {
      unreachable("no answer");
      await sleep(delay);
      delay = Math.min(delay * 2, 5000);
      continue;
    }
    if (response.status === 401) {
      const hadToken = sessionStorage.getItem(TOKEN_KEY) !== null;
      sessionStorage.removeItem(TOKEN_KEY);
      showLogin(hadToken ? "The queen refused that token." : null);
      return;
    }
    if (!response.ok || !response.body) {
      unreachable(`HTTP ${response.status}`);
      await sleep(delay);
      delay = Math.min(delay * 2, 5000);
      continue;
    }
    delay = 500;
    $("login").hidden = true;
    $("board").hidden = false;
    reachable();
    loadHistory();
    try {
      await readEvents(response.body, controller);
    } catch (error) {
      // A broken connection: reported below like a closed one.
    }
    unreachable("the connection was lost");
    await sleep(delay);
  }
}

async function readEvents(body, controller) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let watchdog = setTimeout(() => controller.abort(), STALL_MS);
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      clearTimeout(watchdog);
      watchdog = setTimeout(() => controller.abort(), STALL_MS);
      buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        dispatch(block);
      }
    }
  } finally {
    clearTimeout(watchdog);
  }
}

function dispatch(block) {
  let name = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith(":")) continue; // keep-alive comment
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "event") name = value;
    else if (field === "data") data.push(value);
  }
  if (!data.length) return;
  let payload;
  try {
    payload = JSON.parse(data.join("\n"));
  } catch (error) {
    return;
  }
  const handler = handlers[name];
  if (handler) {
    handler(payload);
    render();
  }
}

// ---- events -------------------------------------------------------------------------------

const handlers = {
  summary(data) {
    const now = performance.now();
    const seen = new Set();
    for (const view of data.workers || []) {
      cluster.workers.set(view.id, { view, at: now, gone: null });
      seen.add(view.id);
    }
    for (const [id, entry] of cluster.workers) {
      if (!seen.has(id) && !entry.gone) entry.gone = now;
    }
    cluster.hives = new Map((data.hives || []).map((view) => [view.id, { view, at: now }]));
    cluster.models = data.models || [];
  },
  worker(data) {
    const now = performance.now();
    if (data.state === "removed") {
      const entry = cluster.workers.get(data.worker_id);
      const view = entry ? entry.view : data.worker;
      if (view) cluster.workers.set(data.worker_id, { view, at: now, gone: now });
      return;
    }
    if (data.worker) cluster.workers.set(data.worker_id, { view: data.worker, at: now, gone: null });
  },
  hive(data) {
    if (data.hive) cluster.hives.set(data.hive_id, { view: data.hive, at: performance.now() });
  },
  stats(data) {
    for (const name of STATS) {
      const series = cluster.series[name];
      series.push(data[name]);
      if (series.length > HISTORY) series.shift();
    }
    cluster.workerTps = data.worker_tokens_per_s || {};
    $("stat-requests_per_s").textContent = data.requests_per_s.toFixed(2);
    // No streamed request in this interval: keep showing the last time measured.
    if (data.ttft_s !== null) $("stat-ttft_s").textContent = formatSeconds(data.ttft_s);
    $("stat-tokens_per_s").textContent = data.tokens_per_s.toFixed(1);
    $("stat-queue").textContent = `${data.queue} (${data.in_flight})`;
    for (const name of STATS) drawChart($(`chart-${name}`), cluster.series[name]);
  },
};

// ---- rendering ----------------------------------------------------------------------------

function formatSeconds(s) {
  return s < 1 ? `${Math.round(s * 1000)} ms` : `${s.toFixed(2)} s`;
}

function formatAge(s) {
  if (s < 60) return `${Math.floor(s)} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  return `${Math.floor(s / 3600)} h ago`;
}

function formatBytes(n) {
  const gib = n / 1024 ** 3;
  return gib >= 1 ? `${gib.toFixed(1)} GiB` : `${Math.round(n / 1024 ** 2)} MiB`;
}

function age(entry) {
  return (entry.view.last_seen_s || 0) + (performance.now() - entry.at) / 1000;
}

function workerStatus(entry) {
  if (entry.gone) return "stopped";
  return entry.view.online === false ? "offline" : entry.view.status;
}

function statusCell(status) {
  return el("td", { class: `status st-${status}`, "data-status": status }, status);
}

function fill(tableId, emptyId, rows) {
  const body = $(tableId).tBodies[0];
  body.replaceChildren(...rows);
  $(tableId).hidden = rows.length === 0;
  $(emptyId).hidden = rows.length !== 0;
}

// A worker's hive; a split worker's hives (its main one first) and what each part holds.
function hiveCell(w) {
  const parts = w.parts || [];
  if (!parts.length) return el("td", { class: "hive" }, w.hive_id || "–");
  const hives = [...new Set(parts.map((p) => p.hive_id))];
  const held = parts.map((p) => `${p.hive_id} ${p.device} ${formatBytes(p.bytes)}`).join(" · ");
  return el(
    "td",
    { class: "hive split", "data-split": hives.join("+"), title: "one worker split over several hives" },
    hives.join(" + "),
    el("div", { class: "parts muted" }, held),
  );
}

function render() {
  const now = performance.now();
  for (const [id, entry] of cluster.workers) {
    if (entry.gone && now - entry.gone > KEEP_STOPPED_MS) cluster.workers.delete(id);
  }
  const workers = [...cluster.workers.values()].sort((a, b) => a.view.id.localeCompare(b.view.id));
  const rows = [];
  for (const entry of workers) {
    const w = entry.view;
    const tps = cluster.workerTps[w.id];
    const memory = cluster.workerMemory[w.id];
    const status = workerStatus(entry);
    const logButton = el("button", { type: "button", class: "small", title: "the end of its log" }, cluster.openLogs.has(w.id) ? "hide log" : "log");
    logButton.dataset.action = "log";
    logButton.addEventListener("click", () => toggleLog(w.id));
    const stopButton = el("button", { type: "button", class: "small danger", disabled: !!entry.gone }, "stop");
    stopButton.dataset.action = "stop";
    stopButton.addEventListener("click", () => {
      if (confirm(`Stop worker ${w.id} (${w.model_id})?`)) runJob({ operation: "worker_stop", worker_id: w.id });
    });
    rows.push(
      el(
        "tr",
        { "data-worker-id": w.id },
        el("td", {}, el("code", {}, w.id)),
        el("td", { class: "model" }, w.model_id),
        statusCell(status),
        el("td", { class: "ctx" }, w.ctx_size ? `${w.ctx_size.toLocaleString("en")} tokens` : "–"),
        el("td", { class: "load" }, `${w.in_flight} / ${w.slots} slots`),
        el("td", { class: "memory" }, memory === undefined ? "–" : formatBytes(memory)),
        el("td", { class: "tps" }, tps === undefined ? "–" : tps.toFixed(1)),
        el("td", {}, el("code", {}, w.device)),
        el("td", {}, el("code", {}, `${w.host}:${w.port}`)),
        hiveCell(w),
        el("td", {}, formatAge(age(entry))),
        el("td", { class: "actions" }, logButton, " ", stopButton),
      ),
    );
    if (cluster.openLogs.has(w.id)) {
      const text = cluster.logs.get(w.id);
      rows.push(
        el(
          "tr",
          { class: "log-row", "data-log-of": w.id },
          el("td", { colSpan: 12 }, el("pre", { class: "log" }, text === undefined ? "reading…" : text || "(empty)")),
        ),
      );
    }
  }
  fill("workers", "no-workers", rows);
  const online = workers.filter((e) => !e.gone && e.view.online !== false).length;
  $("workers-count").textContent = `${online} online`;

  const hives = [...cluster.hives.values()].sort((a, b) => a.view.id.localeCompare(b.view.id));
  fill(
    "hives",
    "no-hives",
    hives.map((entry) => {
      const h = entry.view;
      const devices = el("td", {});
      for (const d of h.devices || []) {
        const used = d.memory_total_bytes ? 1 - d.memory_free_bytes / d.memory_total_bytes : 0;
        const bar = el("span", { class: "bar", title: `${Math.round(used * 100)} % used` });
        const free = el("span", {});
        free.style.width = `${Math.round((1 - used) * 100)}%`; // CSSOM: allowed by the CSP
        bar.append(free);
        devices.append(
          el(
            "div",
            { class: "device" },
            el("code", {}, d.id),
            " ",
            bar,
            `${formatBytes(d.memory_free_bytes)} free of ${formatBytes(d.memory_total_bytes)}`,
          ),
        );
      }
      return el(
        "tr",
        { "data-hive-id": h.id },
        el("td", {}, el("code", {}, h.id)),
        el("td", {}, el("code", {}, h.url)),
        statusCell(h.online ? "online" : "offline"),
        devices,
        el("td", {}, String((h.models || []).length)),
        el("td", {}, formatAge(age(entry))),
      );
    }),
  );
  $("hives-count").textContent = `${hives.filter((e) => e.view.online).length} online`;

  // A model's state follows the workers the page sees, so it changes as fast as they do.
  const serving = new Map();
  // Loading: the queen says so (a request waits for a start), or a worker of it is starting.
  const loading = new Set(cluster.models.filter((m) => m.rbee.state === "loading").map((m) => m.id));
  for (const entry of workers) {
    const status = workerStatus(entry);
    if (status === "ready" || status === "busy") {
      serving.set(entry.view.model_id, (serving.get(entry.view.model_id) || 0) + 1);
    } else if (status === "starting") {
      loading.add(entry.view.model_id);
    }
  }
  const models = new Map(cluster.models.map((m) => [m.id, m.rbee.hives || []]));
  const ids = [...new Set([...models.keys(), ...serving.keys()])].sort();
  // The playground offers the models that are loaded first: they answer at once.
  const loadedFirst = [...ids.filter((id) => serving.has(id)), ...ids.filter((id) => !serving.has(id))];
  updatePickers(ids, loadedFirst, hives.map((e) => e.view.id));
  for (const id of serving.keys()) if (!models.has(id)) models.set(id, []);
  fill(
    "models",
    "no-models",
    [...models.entries()]
      .sort(([a], [b]) => a.localeCompare(b))
      .map(([id, hiveIds]) => {
        const count = serving.get(id) || 0;
        const load = el("button", { type: "button", class: "small" }, "load");
        load.dataset.action = "load";
        load.addEventListener("click", () => runJob({ operation: "model_load", model: id }));
        const unload = el("button", { type: "button", class: "small", disabled: !count }, "unload");
        unload.dataset.action = "unload";
        unload.addEventListener("click", () => runJob({ operation: "model_unload", model: id }));
        return el(
          "tr",
          { "data-model-id": id },
          el("td", {}, el("code", {}, id)),
          statusCell(count ? "loaded" : loading.has(id) ? "loading" : "available"),
          el("td", {}, String(count)),
          el("td", {}, hiveIds.join(", ") || "–"),
          el("td", { class: "actions" }, load, " ", unload),
        );
      }),
  );
}

function drawChart(svg, series) {
  const W = 200;
  const H = 48;
  const values = series.filter((v) => v !== null && v !== undefined);
  const top = Math.max(1e-9, ...values) * 1.1;
  const step = W / (HISTORY - 1);
  const offset = HISTORY - series.length;
  const runs = [];
  let run = [];
  series.forEach((v, i) => {
    if (v === null || v === undefined) {
      if (run.length) runs.push(run);
      run = [];
      return;
    }
    run.push([(offset + i) * step, H - (v / top) * (H - 2) - 1]);
  });
  if (run.length) runs.push(run);
  const ns = "http://www.w3.org/2000/svg";
  const shapes = [];
  for (const points of runs) {
    const text = points.map(([x, y]) => `${x.toFixed(1)},${y.toFixed(1)}`).join(" ");
    const area = document.createElementNS(ns, "polygon");
    const first = points[0][0].toFixed(1);
    const last = points[points.length - 1][0].toFixed(1);
    area.setAttribute("points", `${first},${H} ${text} ${last},${H}`);
    const line = document.createElementNS(ns, "polyline");
    line.setAttribute("points", points.length > 1 ? text : `${text} ${text}`);
    shapes.push(area, line);
  }
  svg.replaceChildren(...shapes);
}

// ---- the last hour ------------------------------------------------------------------------

async function loadHistory() {
  clearTimeout(loadHistory.timer);
  let next = 10000;
  try {
    const response = await fetch("/v1/dashboard/history", { headers: authHeaders("application/json"), cache: "no-store" });
    if (response.ok) {
      cluster.history = await response.json();
      cluster.workerMemory = cluster.history.worker_memory_bytes || {};
      next = Math.max(1000, cluster.history.interval_s * 1000);
      drawHistory();
      render();
    }
  } catch (error) {
    // The stream's own loop reports a lost queen; the charts try again on their schedule.
  }
  loadHistory.timer = setTimeout(loadHistory, next);
}

function drawHistory() {
  const h = cluster.history;
  if (!h) return;
  const samples = h.samples;
  const end = samples.length ? Math.max(samples[samples.length - 1].t, Date.now() / 1000) : Date.now() / 1000;
  // The whole hour once there is one; until then at least five minutes, so early samples
  // are not crammed against the right edge.
  const span = samples.length ? end - samples[0].t : 0;
  const options = { window: Math.min(h.window_s, Math.max(300, span)), end, gap: h.interval_s * 3 };
  const line = (name, key) => ({ name, points: samples.map((s) => [s.t, s[key]]) });
  const { drawTimeChart } = window.rbeeCharts;
  const rate = (v) => (v >= 100 ? v.toFixed(0) : v >= 10 ? v.toFixed(1) : v.toFixed(2));
  drawTimeChart($("hist-tokens_per_s").querySelector("svg"), [line("tokens/s", "tokens_per_s")], { ...options, format: rate });
  drawTimeChart($("hist-requests_per_s").querySelector("svg"), [line("requests/s", "requests_per_s")], { ...options, format: rate });
  drawTimeChart($("hist-queue").querySelector("svg"), [line("queued", "queue"), line("in flight", "in_flight")], { ...options, format: (v) => v.toFixed(v % 1 ? 1 : 0) });
  const devices = [...new Set(samples.flatMap((s) => Object.keys(s.memory_bytes || {})))].sort();
  drawTimeChart(
    $("hist-memory").querySelector("svg"),
    devices.map((d) => ({ name: d, points: samples.map((s) => [s.t, (s.memory_bytes || {})[d] ?? null]) })),
    { ...options, legend: true, format: (v) => (v ? formatBytes(v) : "0") },
  );
  const minutes = samples.length ? Math.round((end - samples[0].t) / 60) : 0;
  $("history-note").textContent = `(${samples.length} samples, one every ${h.interval_s} s, ${minutes} min kept by the queen)`;
}

// ---- worker logs --------------------------------------------------------------------------

async function fetchLog(id) {
  try {
    const response = await fetch(`/v1/workers/${encodeURIComponent(id)}/log?lines=40`, { headers: authHeaders("text/plain"), cache: "no-store" });
    cluster.logs.set(id, response.ok ? await response.text() : `(no log: HTTP ${response.status})`);
  } catch (error) {
    cluster.logs.set(id, "(the queen did not answer)");
  }
  render();
}

function toggleLog(id) {
  if (cluster.openLogs.has(id)) cluster.openLogs.delete(id);
  else {
    cluster.openLogs.add(id);
    fetchLog(id);
  }
  render();
}

setInterval(() => cluster.openLogs.forEach((id) => fetchLog(id)), 5000);

// ---- actions: the queen's jobs ------------------------------------------------------------

function describe(request) {
  const what = request.model || request.worker_id;
  return `${request.operation.replace("_", " ")} ${what}`;
}

async function runJob(request) {
  const item = el("li", { class: "job", "data-operation": request.operation, "data-state": "running" }, el("strong", {}, describe(request)), " ", el("span", { class: "job-message" }, "starting…"));
  $("jobs").prepend(item);
  $("no-jobs").hidden = true;
  const say = (text, state) => {
    item.querySelector(".job-message").textContent = text;
    if (state) item.dataset.state = state;
  };
  try {
    const headers = { ...authHeaders("application/json"), "Content-Type": "application/json" };
    const created = await fetch("/v1/jobs", { method: "POST", headers, body: JSON.stringify(request) });
    const body = await created.json().catch(() => ({}));
    if (!created.ok) {
      say(body.error?.message || body.detail || `HTTP ${created.status}`, "error");
      return;
    }
    const stream = await fetch(body.sse_url, { headers: authHeaders(), cache: "no-store" });
    await readSse(stream.body, (name, data) => {
      const event = JSON.parse(data);
      if (event.type === "done") say(event.message || "done", "done");
      else if (event.type === "error") say(event.message || "failed", "error");
      else if (event.message) say(event.message);
    });
    if (item.dataset.state === "running") say("the job's stream ended without a result", "error");
  } catch (error) {
    say(`failed: ${error}`, "error");
  }
}

// Reads a text/event-stream body, calling onEvent(name, data) per event.
async function readSse(body, onEvent, signal) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    if (signal && signal.aborted) return;
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let name = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) onEvent(name, data.join("\n"));
    }
  }
}

function setOptions(select, values, keep) {
  const current = select.value;
  const wanted = [...keep, ...values];
  const have = [...select.options].map((o) => o.value);
  if (have.join("\n") === wanted.join("\n")) return;
  select.replaceChildren(...wanted.map((v) => el("option", { value: v }, v || "any")));
  if (wanted.includes(current) && select.dataset.chosen) select.value = current;
}

function updatePickers(models, chatModels, hives) {
  setOptions($("chat-model"), chatModels, []);
  setOptions($("spawn-hive"), hives, [""]);
  const list = $("model-ids");
  if ([...list.options].map((o) => o.value).join("\n") !== models.join("\n")) {
    list.replaceChildren(...models.map((m) => el("option", { value: m })));
  }
}

$("spawn").addEventListener("submit", (event) => {
  event.preventDefault();
  const request = { operation: "worker_spawn", model: $("spawn-model").value.trim() };
  if ($("spawn-hive").value) request.hive_id = $("spawn-hive").value;
  if ($("spawn-ctx").value) request.ctx_size = Number($("spawn-ctx").value);
  if ($("spawn-slots").value) request.slots = Number($("spawn-slots").value);
  runJob(request);
});

// ---- the playground -----------------------------------------------------------------------

const chat = { messages: [], controller: null };

function chatBubble(role, text) {
  const bubble = el("div", { class: `msg msg-${role}` }, el("span", { class: "who" }, role), el("div", { class: "text" }, text));
  $("chat-log").append(bubble);
  return bubble.querySelector(".text");
}

$("chat").addEventListener("submit", async (event) => {
  event.preventDefault();
  const prompt = $("chat-prompt").value.trim();
  const model = $("chat-model").value;
  if (!prompt || !model || chat.controller) return;
  $("chat-prompt").value = "";
  chat.messages.push({ role: "user", content: prompt });
  chatBubble("user", prompt);
  const out = chatBubble("assistant", "");
  out.parentElement.dataset.state = "streaming";
  const system = $("chat-system").value.trim();
  const body = {
    model,
    messages: system ? [{ role: "system", content: system }, ...chat.messages] : chat.messages,
    stream: true,
    max_tokens: Number($("chat-max").value) || 256,
    temperature: Number($("chat-temp").value),
    stream_options: { include_usage: true },
  };
  chat.controller = new AbortController();
  $("chat-send").disabled = true;
  $("chat-stop").disabled = false;
  const started = performance.now();
  let first = null;
  let chunks = 0;
  let usage = null;
  let text = "";
  try {
    const headers = { ...authHeaders(), "Content-Type": "application/json" };
    const response = await fetch("/v1/chat/completions", { method: "POST", headers, body: JSON.stringify(body), signal: chat.controller.signal });
    if (!response.ok) {
      const error = await response.json().catch(() => ({}));
      throw new Error(error.error?.message || `HTTP ${response.status}`);
    }
    await readSse(response.body, (name, data) => {
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.usage) usage = chunk.usage;
      const delta = chunk.choices?.[0]?.delta?.content;
      if (delta) {
        if (first === null) first = performance.now();
        chunks += 1;
        text += delta;
        out.textContent = text;
        $("chat-stats").textContent = `${chunks} tokens…`;
      }
    }, chat.controller.signal);
    chat.messages.push({ role: "assistant", content: text });
    const tokens = usage?.completion_tokens ?? chunks;
    const seconds = (performance.now() - (first ?? started)) / 1000;
    const ttft = first === null ? "–" : formatSeconds((first - started) / 1000);
    $("chat-stats").textContent = `${tokens} tokens, ${seconds > 0 ? (tokens / seconds).toFixed(1) : "–"} tokens/s, first token after ${ttft}`;
    out.parentElement.dataset.state = "done";
  } catch (error) {
    out.parentElement.dataset.state = "error";
    if (error.name === "AbortError") {
      chat.messages.push({ role: "assistant", content: text });
      $("chat-stats").textContent = "stopped";
    } else {
      out.textContent = `${text}\n[${error.message}]`;
      chat.messages.pop();
    }
  } finally {
    chat.controller = null;
    $("chat-send").disabled = false;
    $("chat-stop").disabled = true;
  }
});

$("chat-stop").addEventListener("click", () => chat.controller && chat.controller.abort());
$("chat-clear").addEventListener("click", () => {
  chat.messages = [];
  $("chat-log").replaceChildren();
  $("chat-stats").textContent = "";
});
$("chat-prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("chat").requestSubmit();
  }
});
window.addEventListener("resize", drawHistory);

// ---- start --------------------------------------------------------------------------------

$("login").addEventListener("submit", (event) => {
  event.preventDefault();
  const token = $("token").value.trim();
  if (!token) return;
  sessionStorage.setItem(TOKEN_KEY, token);
  $("token").value = "";
  $("login").hidden = true;
  connect();
});

$("queen-url").textContent = location.origin;
setInterval(render, 1000); // ages tick on the page; nothing is fetched
connect();
for (const id of ["chat-model", "spawn-hive"]) {
  $(id).addEventListener("change", () => ($(id).dataset.chosen = "yes")); // the user's choice stays
}
