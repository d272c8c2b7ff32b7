"use strict";
// The rbee dashboard. Everything on the page comes from the queen's live stream
// (GET /v1/heartbeats/stream): a `summary` with the whole cluster at once and every few seconds,
// `worker` and `hive` events as they happen, and `stats` (live figures) while the page watches.
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

function authHeaders() {
  const headers = { Accept: "text/event-stream" };
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

function render() {
  const now = performance.now();
  for (const [id, entry] of cluster.workers) {
    if (entry.gone && now - entry.gone > KEEP_STOPPED_MS) cluster.workers.delete(id);
  }
  const workers = [...cluster.workers.values()].sort((a, b) => a.view.id.localeCompare(b.view.id));
  fill(
    "workers",
    "no-workers",
    workers.map((entry) => {
      const w = entry.view;
      const tps = cluster.workerTps[w.id];
      return el(
        "tr",
        { "data-worker-id": w.id },
        el("td", {}, el("code", {}, w.id)),
        el("td", {}, w.model_id),
        statusCell(workerStatus(entry)),
        el("td", { class: "load" }, `${w.in_flight} / ${w.slots}`),
        el("td", {}, tps === undefined ? "–" : tps.toFixed(1)),
        el("td", {}, el("code", {}, `${w.host}:${w.port}`)),
        el("td", {}, w.hive_id || "–"),
        el("td", {}, formatAge(age(entry))),
      );
    }),
  );
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
  for (const id of serving.keys()) if (!models.has(id)) models.set(id, []);
  fill(
    "models",
    "no-models",
    [...models.entries()]
      .sort(([a], [b]) => a.localeCompare(b))
      .map(([id, hiveIds]) => {
        const count = serving.get(id) || 0;
        return el(
          "tr",
          { "data-model-id": id },
          el("td", {}, el("code", {}, id)),
          statusCell(count ? "loaded" : loading.has(id) ? "loading" : "available"),
          el("td", {}, String(count)),
          el("td", {}, hiveIds.join(", ") || "–"),
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
