// Keel dashboard: talks to the management API of the host that serves it, nothing else.
// Three views: the task hub's overview (the landing view: counts, backlog, throughput,
// SDK workers), instances (start, list, and an instance's page: timeline, structure,
// paged history, status JSON, actions) and entities (signal, list with states).
// Plain DOM code, no framework and no build step.
"use strict";

const API = "/runtime/webhooks/durabletask";
const REFRESH_MS = 2000;
const HISTORY_PAGE_SIZE = 100; // history events per page
const TIMELINE_PAGE_SIZE = 100; // timeline rows per page
const PARENT_CHAIN_LIMIT = 20; // ancestors the structure view walks up at most
const STATUSES = ["Pending", "Running", "Suspended", "Completed", "ContinuedAsNew", "Failed", "Terminated"];
const VIEWS = ["overview", "instances", "entities"];

const $ = (selector) => document.querySelector(selector);

const state = {
  pageTokens: [null], // continuation token of each page seen; the last is the current page
  nextToken: null,
  selected: null,
  tab: "timeline",
  detail: emptyDetail(),
};

const entityPages = {
  pageTokens: [null], // as for instances
  nextToken: null,
};

function emptyDetail() {
  return {
    key: null, // what the page shows: id, status and last update; a new one re-renders it
    status: null,
    exported: null, // GET …/instances/{id}/history
    historyPage: 0,
    timelinePage: 0,
    timeline: null,
    ancestors: null, // [{instanceId, name, runtimeStatus}], root first
  };
}

// ---- small DOM helpers ---------------------------------------------------------

/** An element with attributes (`class`, `text`, `dataset`, event handlers `on*`) and children. */
function el(tag, attributes = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value == null || value === false) continue;
    if (name === "text") element.textContent = String(value);
    else if (name === "class") element.className = value;
    else if (name === "dataset") {
      for (const [key, data] of Object.entries(value)) if (data != null) element.dataset[key] = String(data);
    }
    else if (name.startsWith("on")) element.addEventListener(name.slice(2), value);
    else element.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child == null || child === false) continue;
    element.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return element;
}

function cell(text) {
  return el("td", { text: text == null ? "" : String(text) });
}

function emptyRow(body, columns, text) {
  body.append(el("tr", {}, el("td", { colspan: columns, class: "empty", text })));
}

function instanceHref(instanceId) {
  return `#instance=${encodeURIComponent(instanceId)}`;
}

function instanceLink(instanceId, role) {
  return el("a", { href: instanceHref(instanceId), dataset: { instanceId, role: role || "" } }, instanceId);
}

function statusBadge(status) {
  return el("span", { class: `status status-${status}`, text: status });
}

// ---- API key -------------------------------------------------------------------

function apiKey() {
  return $("#api-key").value.trim();
}

function initApiKey() {
  const fromUrl = new URLSearchParams(location.search).get("code");
  const key = fromUrl || localStorage.getItem("keel.apiKey") || "";
  $("#api-key").value = key;
  $("#api-key").addEventListener("change", () => {
    localStorage.setItem("keel.apiKey", apiKey());
    loadOrchestrators().then(refreshAll, reportError);
  });
}

// ---- calls ---------------------------------------------------------------------

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (apiKey()) headers["x-functions-key"] = apiKey();
  const response = await fetch(API + path, Object.assign({}, options, { headers }));
  const text = await response.text();
  let body = null;
  if (text) {
    try { body = JSON.parse(text); } catch (_) { body = text; }
  }
  if (response.status >= 400 && !(response.status === 500 && body && body.runtimeStatus)) {
    const message = body && body.message ? body.message : response.statusText;
    const error = new Error(`${response.status}: ${message}`);
    error.status = response.status;
    throw error;
  }
  return { status: response.status, headers: response.headers, body };
}

function showMessage(text, isError) {
  const box = $("#message");
  box.textContent = text;
  box.className = isError ? "error" : "info";
  box.hidden = false;
  clearTimeout(showMessage.timer);
  showMessage.timer = setTimeout(() => { box.hidden = true; }, isError ? 8000 : 4000);
}

function reportError(error) {
  if (error.status === 401) {
    showMessage("This host requires an API key: enter it at the top right.", true);
  } else {
    showMessage(error.message, true);
  }
}

// ---- JSON, readable --------------------------------------------------------------

/** Payloads in exported histories are JSON text; text that is not JSON stays text. */
function parsePayload(text) {
  if (text == null) return null;
  try { return JSON.parse(text); } catch (_) { return text; }
}

async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
  } catch (_) {
    // Not a secure context (a host reached by name over http): the old way.
    const area = el("textarea", { class: "offscreen", "aria-hidden": "true" });
    area.value = text;
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  showMessage("Copied to the clipboard");
}

/** One value of a JSON tree: objects and arrays are collapsible `<details>`. */
function jsonNode(key, value, depth, openDepth) {
  const label = key == null ? null : el("span", { class: "j-key", text: `${JSON.stringify(key)}: ` });
  if (value !== null && typeof value === "object") {
    const isArray = Array.isArray(value);
    const entries = isArray ? value.map((item, index) => [null, item, index]) : Object.entries(value).map(([k, v]) => [k, v]);
    const [open, close] = isArray ? ["[", "]"] : ["{", "}"];
    if (entries.length === 0) {
      return el("div", { class: "j-line" }, label, el("span", { class: "j-brace", text: open + close }));
    }
    const count = isArray ? `${entries.length} item${entries.length === 1 ? "" : "s"}` : `${entries.length} key${entries.length === 1 ? "" : "s"}`;
    const children = el("div", { class: "j-children" });
    const opened = depth < openDepth && entries.length <= 50;
    const node = el("details", { class: "j-node", open: opened },
      el("summary", {}, label, el("span", { class: "j-brace", text: open }), el("span", { class: "j-count", text: ` ${count} ` }), el("span", { class: "j-brace j-close-inline", text: close })),
      children,
      el("span", { class: "j-brace", text: close }));
    // Closed nodes build their children when first opened: a long history stays cheap.
    node.build = () => { children.append(...entries.map(([k, v]) => jsonNode(k, v, depth + 1, openDepth))); };
    node.addEventListener("toggle", () => { if (node.open) buildNode(node); });
    if (opened) buildNode(node);
    return node;
  }
  const type = value === null ? "null" : typeof value;
  return el("div", { class: "j-line" }, label, el("span", { class: `j-${type}`, text: JSON.stringify(value) }));
}

function buildNode(node) {
  if (node.build) {
    const build = node.build;
    node.build = null;
    build();
  }
}

/** A JSON value for people: pretty, collapsible, with Copy / Expand / Collapse. */
function jsonView(value, openDepth = 2) {
  if (value === undefined || value === null) return el("span", { class: "muted j-none", text: "-" });
  const tree = el("div", { class: "json-tree" }, jsonNode(null, value, 0, openDepth));
  const setAll = (open) => {
    if (!open) {
      for (const node of tree.querySelectorAll("details[open]")) node.open = false;
      return;
    }
    for (let closed = tree.querySelectorAll("details:not([open])"); closed.length; closed = tree.querySelectorAll("details:not([open])")) {
      for (const node of closed) {
        buildNode(node);
        node.open = true;
      }
    }
  };
  const tools = el("div", { class: "json-tools" },
    el("button", { type: "button", class: "small", title: "Copy the JSON", onclick: () => copyText(JSON.stringify(value, null, 2)) }, "Copy"),
    typeof value === "object" ? el("button", { type: "button", class: "small", onclick: () => setAll(true) }, "Expand all") : null,
    typeof value === "object" ? el("button", { type: "button", class: "small", onclick: () => setAll(false) }, "Collapse all") : null);
  return el("div", { class: "json" }, tools, tree);
}

/** Shows `value` in `container`, unless it shows that already (keeps what the user expanded). */
function showJson(container, value, openDepth) {
  const text = value === undefined ? "undefined" : JSON.stringify(value);
  if (container.dataset.json === text) return;
  container.dataset.json = text;
  container.replaceChildren(jsonView(value, openDepth));
}

// ---- times -----------------------------------------------------------------------

function formatDuration(ms) {
  if (!Number.isFinite(ms)) return "-";
  const sign = ms < 0 ? "-" : "";
  ms = Math.abs(ms);
  if (ms < 10 && !Number.isInteger(ms)) return `${sign}${ms.toFixed(1)} ms`;
  if (ms < 1000) return `${sign}${Math.round(ms)} ms`;
  if (ms < 60_000) return `${sign}${(ms / 1000).toFixed(ms < 10_000 ? 2 : 1)} s`;
  if (ms < 3_600_000) return `${sign}${Math.floor(ms / 60_000)} min ${Math.round((ms % 60_000) / 1000)} s`;
  if (ms < 86_400_000) return `${sign}${Math.floor(ms / 3_600_000)} h ${Math.round((ms % 3_600_000) / 60_000)} min`;
  return `${sign}${(ms / 86_400_000).toFixed(1)} d`;
}

function clockTime(ms) {
  const date = new Date(ms);
  return `${date.toISOString().slice(11, 23)}Z`;
}

// ---- overview --------------------------------------------------------------------

async function loadOverview() {
  let overview;
  try {
    ({ body: overview } = await api("/overview"));
  } catch (error) {
    if (error.status === 404) {
      $("#overview-missing").textContent = "This host has no overview endpoint (GET …/overview answered 404).";
      $("#overview-missing").hidden = false;
      $("#overview-body").hidden = true;
      return;
    }
    throw error;
  }
  $("#overview-missing").hidden = true;
  $("#overview-body").hidden = false;
  renderOverview(overview || {});
}

function card(value, label, attributes = {}) {
  const tag = attributes.onclick ? "button" : "div";
  return el(tag, Object.assign({ class: "card", type: tag === "button" ? "button" : null }, attributes),
    el("span", { class: "card-value", text: value }),
    el("span", { class: "card-label", text: label }));
}

function renderOverview(overview) {
  const instances = overview.instances || {};
  const total = STATUSES.reduce((sum, status) => sum + (instances[status] || 0), 0);
  const counts = STATUSES.map((status) => card(instances[status] || 0, status, {
    class: `card status-card status-${status}`,
    dataset: { statusCount: status },
    title: `List the ${status} instances`,
    onclick: () => listInstancesWithStatus(status),
  }));
  counts.unshift(card(total, "all instances", { dataset: { statusCount: "all" }, onclick: () => listInstancesWithStatus("") }));
  $("#overview-counts").replaceChildren(...counts);

  const backlog = overview.backlog || {};
  $("#overview-hub").replaceChildren(
    card(overview.entities ?? 0, "entities", { dataset: { count: "entities" }, title: "Open the entities view", onclick: () => navigate("#entities") }),
    card(backlog.orchestrations ?? 0, "orchestration messages waiting", { dataset: { count: "backlog-orchestrations" } }),
    card(backlog.activities ?? 0, "activities waiting", { dataset: { count: "backlog-activities" } }),
    card(backlog.timers ?? 0, "timers pending", { dataset: { count: "backlog-timers" } }));

  const throughput = overview.throughput || {};
  const points = throughput.points || [];
  const interval = throughput.intervalSeconds;
  for (const span of document.querySelectorAll(".overview-interval")) span.textContent = interval ? `${interval} s` : "interval";
  renderChart($("#chart-throughput"), points, [
    ["instancesStarted", "instances started"],
    ["instancesFinished", "instances finished"],
    ["activitiesCompleted", "activities completed"],
    ["episodes", "episodes"],
  ], "Throughput");
  renderChart($("#chart-backlog"), points, [
    ["backlogOrchestrations", "orchestrations"],
    ["backlogActivities", "activities"],
    ["backlogTimers", "timers"],
  ], "Backlog");

  const workers = overview.workers || [];
  const list = (names) => (names && names.length ? names.join(", ") : "-");
  const rows = workers.map((worker) => el("tr", { dataset: { workerId: worker.id } },
    cell(worker.id), cell(worker.peer), cell(worker.connectedAt),
    cell(list(worker.orchestrators)), cell(list(worker.activities)), cell(list(worker.entities))));
  const body = $("#overview-workers tbody");
  body.replaceChildren(...rows);
  if (rows.length === 0) emptyRow(body, 6, "No SDK worker is connected over gRPC.");

  $("#overview-updated").textContent = `· as of ${new Date().toLocaleTimeString()}`;
  $("#overview-panel").dataset.loaded = "true";
}

const SVG = "http://www.w3.org/2000/svg";

function svg(tag, attributes = {}, ...children) {
  const element = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (name === "text") element.textContent = String(value);
    else element.setAttribute(name, String(value));
  }
  for (const child of children.flat(Infinity)) if (child) element.append(child);
  return element;
}

/** A small line chart of some fields of `points`, as inline SVG, with a legend. */
function renderChart(container, points, series, title) {
  if (points.length === 0) {
    container.replaceChildren(el("p", { class: "muted", text: "No data yet." }));
    return;
  }
  const width = 560, height = 150, left = 40, right = 10, top = 10, bottom = 22;
  const max = Math.max(1, ...points.flatMap((point) => series.map(([field]) => point[field] || 0)));
  const x = (index) => left + (points.length === 1 ? 0.5 : index / (points.length - 1)) * (width - left - right);
  const y = (value) => top + (1 - value / max) * (height - top - bottom);
  const grid = [0, max / 2, max].map((value) => [
    svg("line", { x1: left, x2: width - right, y1: y(value), y2: y(value), class: "grid" }),
    svg("text", { x: left - 6, y: y(value) + 4, "text-anchor": "end", class: "axis", text: Number.isInteger(value) ? value : value.toFixed(1) }),
  ]);
  const timeLabel = (point) => (point && point.time ? new Date(point.time).toLocaleTimeString() : "");
  const axis = [
    svg("text", { x: left, y: height - 6, class: "axis", text: timeLabel(points[0]) }),
    svg("text", { x: width - right, y: height - 6, "text-anchor": "end", class: "axis", text: timeLabel(points[points.length - 1]) }),
  ];
  const latest = points[points.length - 1];
  const lines = series.map(([field, label], index) => {
    const coordinates = points.map((point, i) => `${x(i).toFixed(1)},${y(point[field] || 0).toFixed(1)}`).join(" ");
    // Dots too: a host that just started has a point or two, which a line alone does not show.
    const dots = points.length <= 60
      ? points.map((point, i) => svg("circle", { cx: x(i).toFixed(1), cy: y(point[field] || 0).toFixed(1), r: 2.5, class: `dot series-${index}` }))
      : [];
    return svg("g", {},
      svg("polyline", { points: coordinates, class: `series series-${index}`, "data-field": field },
        svg("title", { text: `${label}: ${latest[field] || 0} in the last interval` })),
      dots);
  });
  const summary = series.map(([field, label]) => `${label} ${latest[field] || 0}`).join(", ");
  const chart = svg("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": `${title} over ${points.length} intervals; latest: ${summary}` },
    svg("title", { text: `${title}; latest: ${summary}` }), grid, axis, lines);
  const legend = el("ul", { class: "chart-legend" }, series.map(([field, label], index) =>
    el("li", {}, el("i", { class: `swatch series-${index}` }), `${label} `, el("strong", { text: latest[field] || 0 }))));
  container.replaceChildren(chart, legend);
}

function listInstancesWithStatus(status) {
  $("#filter-status").value = status;
  state.pageTokens = [null];
  navigate("#instances");
}

// ---- start -----------------------------------------------------------------------

async function loadOrchestrators() {
  const { body } = await api("/orchestrators");
  const select = $("#start-name");
  select.replaceChildren(...(body || []).map((name) => el("option", { value: name }, name)));
  if ((body || []).includes("PlaceOrder")) select.value = "PlaceOrder";
}

async function startInstance(event) {
  event.preventDefault();
  const name = $("#start-name").value;
  const id = $("#start-id").value.trim();
  const input = $("#start-input").value.trim();
  if (input) {
    try { JSON.parse(input); } catch (error) { showMessage(`The input is not valid JSON: ${error.message}`, true); return; }
  }
  const path = `/orchestrators/${encodeURIComponent(name)}` + (id ? `/${encodeURIComponent(id)}` : "");
  try {
    const { body } = await api(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: input });
    showMessage(`Started ${name} as ${body.id}`);
    $("#start-id").value = "";
    await loadInstances();
    await selectInstance(body.id);
  } catch (error) {
    reportError(error);
  }
}

// ---- list ------------------------------------------------------------------------

function filterQuery() {
  const params = new URLSearchParams();
  const top = parseInt($("#filter-top").value, 10);
  params.set("top", Number.isFinite(top) && top > 0 ? String(top) : "20");
  params.set("showInput", "false"); // the list shows no inputs; the instance's page fetches them
  if ($("#filter-status").value) params.set("runtimeStatus", $("#filter-status").value);
  if ($("#filter-prefix").value.trim()) params.set("instanceIdPrefix", $("#filter-prefix").value.trim());
  if ($("#filter-name").value.trim()) params.set("namePrefix", $("#filter-name").value.trim());
  for (const [field, param] of [["#filter-from", "createdTimeFrom"], ["#filter-to", "createdTimeTo"]]) {
    const value = $(field).value;
    if (value) params.set(param, new Date(value).toISOString());
  }
  return params.toString();
}

async function loadInstances() {
  const token = state.pageTokens[state.pageTokens.length - 1];
  const headers = token ? { "x-ms-continuation-token": token } : {};
  const { body, headers: responseHeaders } = await api(`/instances?${filterQuery()}`, { headers });
  state.nextToken = responseHeaders.get("x-ms-continuation-token");
  renderInstances(body || []);
  $("#page-next").disabled = !state.nextToken;
  $("#page-info").textContent = `page ${state.pageTokens.length}`;
}

function renderInstances(instances) {
  const rows = instances.map((instance) => {
    const row = el("tr", { dataset: { instanceId: instance.instanceId, status: instance.runtimeStatus } });
    if (instance.instanceId === state.selected) row.className = "selected";
    const statusCell = el("td", { class: "status-cell" }, statusBadge(instance.runtimeStatus));
    row.append(el("td", {}, instanceLink(instance.instanceId)), cell(instance.name), statusCell,
      cell(instance.createdTime), cell(instance.lastUpdatedTime));
    return row;
  });
  const body = $("#instances tbody");
  body.replaceChildren(...rows);
  if (rows.length === 0) emptyRow(body, 5, "No instances match.");
}

// ---- an instance's page ------------------------------------------------------------

async function selectInstance(instanceId) {
  if (state.selected !== instanceId) state.detail = emptyDetail();
  state.selected = instanceId;
  if (location.hash !== instanceHref(instanceId)) history.replaceState(null, "", instanceHref(instanceId));
  for (const row of document.querySelectorAll("#instances tbody tr")) {
    row.classList.toggle("selected", row.dataset.instanceId === instanceId);
  }
  await loadDetail();
}

const UNFINISHED = new Set(["Pending", "Running", "Suspended", "ContinuedAsNew"]);

async function loadDetail() {
  const id = state.selected;
  if (!id) return;
  const path = `/instances/${encodeURIComponent(id)}`;
  let status, exported;
  try {
    const { body: brief } = await api(`${path}?showInput=false`);
    const key = `${id}|${brief.runtimeStatus}|${brief.lastUpdatedTime}`;
    // A finished instance does not change: keep the page as it is (and what the user opened).
    if (key === state.detail.key && !UNFINISHED.has(brief.runtimeStatus)) return;
    const [full, history] = await Promise.all([
      api(`${path}?showHistory=true&showHistoryOutput=true`),
      api(`${path}/history`).catch((error) => ({ body: null, error })),
    ]);
    status = full.body;
    exported = history.body;
    if (history.error && history.error.status !== 404) showMessage(`The history export failed: ${history.error.message}`, true);
    if (state.selected !== id) return; // another instance was opened meanwhile
    state.detail.key = key;
  } catch (error) {
    if (error.status === 404 && state.selected === id) {
      closeDetail();
      showMessage(`Instance ${id} no longer exists.`, true);
      return;
    }
    throw error;
  }
  state.detail.status = status;
  state.detail.exported = exported;
  renderDetail();
  await renderStructure();
}

function renderDetail() {
  const { status, exported } = state.detail;
  $("#detail-panel").hidden = false;
  $("#detail-panel").dataset.status = status.runtimeStatus;
  $("#detail-id").textContent = status.instanceId;
  $("#detail-name").textContent = status.name;
  $("#detail-version").textContent = status.version ?? "-";
  $("#detail-status").replaceWith(Object.assign(statusBadge(status.runtimeStatus), { id: "detail-status" }));
  $("#detail-created").textContent = status.createdTime;
  $("#detail-updated").textContent = status.lastUpdatedTime;
  const parent = parentOf(exported);
  $("#detail-parent").replaceChildren(parent ? instanceLink(parent.instance_id, "parent") : "-");
  showJson($("#detail-input"), status.input);
  showJson($("#detail-output"), status.output);
  showJson($("#detail-custom"), status.customStatus);
  showJson($("#detail-json"), status, 1);
  renderHistory();
  if ($("#timeline-selection").dataset.instanceId !== status.instanceId) $("#timeline-selection").hidden = true;
  state.detail.timeline = exported ? timelineModel(exported.events || [], status.runtimeStatus) : null;
  renderTimeline();
}

function parentOf(exported) {
  const started = (exported?.events || []).find((event) => event.kind?.type === "ExecutionStarted");
  return started?.kind?.parent || null;
}

function showTab(tab) {
  state.tab = tab;
  for (const button of document.querySelectorAll("#detail-tabs [data-tab]")) {
    const active = button.dataset.tab === tab;
    button.setAttribute("aria-selected", String(active));
    button.classList.toggle("active", active);
    button.tabIndex = active ? 0 : -1;
  }
  for (const pane of document.querySelectorAll("#detail-panel .pane")) pane.hidden = pane.id !== `pane-${tab}`;
}

// ---- history (paged) -------------------------------------------------------------

function renderHistory() {
  const events = state.detail.status?.historyEvents || [];
  const pages = Math.max(1, Math.ceil(events.length / HISTORY_PAGE_SIZE));
  const page = Math.min(state.detail.historyPage, pages - 1);
  state.detail.historyPage = page;
  const first = page * HISTORY_PAGE_SIZE;
  const items = events.slice(first, first + HISTORY_PAGE_SIZE).map((event, index) => {
    const fields = Object.fromEntries(Object.entries(event).filter(([key, value]) => key !== "EventType" && key !== "Timestamp" && value != null));
    const what = [event.FunctionName || event.Name, event.InstanceId, event.OrchestrationStatus, event.Reason].filter(Boolean).join(" · ");
    return el("li", { class: `event event-${event.EventType}`, dataset: { index: first + index } },
      el("time", { text: event.Timestamp }),
      el("strong", { text: event.EventType }),
      el("span", { class: "details", text: what }),
      Object.keys(fields).length ? el("details", { class: "fields" }, el("summary", { text: "fields" }), jsonView(fields, 2)) : null);
  });
  $("#history-list").replaceChildren(...items);
  $("#history-list").start = first + 1;
  $("#history-prev").disabled = page === 0;
  $("#history-next").disabled = page >= pages - 1;
  for (const button of [$("#history-prev"), $("#history-next")]) button.hidden = pages === 1;
  $("#history-page-info").textContent = events.length
    ? `events ${first + 1}–${Math.min(first + HISTORY_PAGE_SIZE, events.length)} of ${events.length} (page ${page + 1} of ${pages})`
    : "no events yet";
}

// ---- timeline --------------------------------------------------------------------

/**
 * The rows of the timeline from an exported history (Keel's own events, with their ids):
 * activities (TaskScheduled → TaskCompleted/TaskFailed by task_scheduled_id),
 * sub-orchestrations (SubOrchestrationInstanceCreated → Completed/Failed), timers
 * (TimerCreated → TimerFired by timer_id), entity calls (by request id), and events
 * raised or sent as points. A call scheduled again with the same name and input after
 * its previous attempt failed is a retry.
 */
function timelineModel(events, runtimeStatus) {
  const rows = [];
  const byEventId = new Map();
  const byRequestId = new Map();
  const lastAttempt = new Map(); // name + input → the latest row of that call
  const episodes = [];
  let start = null, end = null, endOutcome = null, last = null;
  const span = (kind, event, name, extra = {}) => {
    const time = Date.parse(event.timestamp);
    const row = Object.assign({ kind, name, id: event.event_id, start: time, end: null, outcome: "running", attempt: 1, retry: false }, extra);
    rows.push(row);
    return row;
  };
  const attempt = (row, input) => {
    const key = `${row.kind}\u0000${row.name}\u0000${input ?? ""}`;
    const previous = lastAttempt.get(key);
    if (previous && previous.outcome === "failed") {
      row.attempt = previous.attempt + 1;
      row.retry = true;
      previous.retried = true;
    }
    lastAttempt.set(key, row);
  };
  const finish = (row, event, outcome, extra = {}) => {
    if (!row) return;
    row.end = Date.parse(event.timestamp);
    row.outcome = outcome;
    Object.assign(row, extra);
  };
  for (const event of events) {
    const kind = event.kind || {};
    const time = Date.parse(event.timestamp);
    last = Math.max(last ?? time, time);
    switch (kind.type) {
      case "OrchestratorStarted": episodes.push(time); break;
      case "ExecutionStarted": if (start == null) start = time; break;
      case "ExecutionCompleted": end = time; endOutcome = kind.status; break;
      case "ContinueAsNew": end = time; endOutcome = "ContinuedAsNew"; break;
      case "TaskScheduled": {
        const row = span("activity", event, kind.name, { input: parsePayload(kind.input) });
        attempt(row, kind.input);
        byEventId.set(event.event_id, row);
        break;
      }
      case "TaskCompleted": finish(byEventId.get(kind.task_scheduled_id), event, "completed", { result: parsePayload(kind.result) }); break;
      case "TaskFailed": finish(byEventId.get(kind.task_scheduled_id), event, "failed", { failure: kind.failure }); break;
      case "SubOrchestrationInstanceCreated": {
        const row = span("suborchestration", event, kind.name, { instanceId: kind.instance_id, input: parsePayload(kind.input) });
        attempt(row, kind.input);
        byEventId.set(event.event_id, row);
        break;
      }
      case "SubOrchestrationInstanceCompleted": finish(byEventId.get(kind.task_scheduled_id), event, "completed", { result: parsePayload(kind.result) }); break;
      case "SubOrchestrationInstanceFailed": finish(byEventId.get(kind.task_scheduled_id), event, "failed", { failure: kind.failure }); break;
      case "TimerCreated": byEventId.set(event.event_id, span("timer", event, "timer", { fireAt: kind.fire_at })); break;
      case "TimerFired": finish(byEventId.get(kind.timer_id), event, "completed"); break;
      case "EntityOperationCalled": {
        const row = span("entity", event, `${kind.target_instance_id} ${kind.operation}`, { input: parsePayload(kind.input) });
        byRequestId.set(kind.request_id, row);
        break;
      }
      case "EntityOperationCompleted": finish(byRequestId.get(kind.request_id), event, "completed", { result: parsePayload(kind.output) }); break;
      case "EntityOperationFailed": finish(byRequestId.get(kind.request_id), event, "failed", { failure: kind.failure }); break;
      case "EventRaised": span("event", event, kind.name, { point: true, outcome: "completed", input: parsePayload(kind.input) }); break;
      case "EventSent": span("event-sent", event, `${kind.name} → ${kind.instance_id}`, { point: true, outcome: "completed", input: parsePayload(kind.input) }); break;
      case "EntityOperationSignaled": span("signal", event, `${kind.target_instance_id} ${kind.operation}`, { point: true, outcome: "completed", input: parsePayload(kind.input) }); break;
      case "ExecutionSuspended": case "ExecutionResumed": case "ExecutionRewound": case "ExecutionTerminated":
        span("lifecycle", event, kind.type.replace("Execution", "").toLowerCase(), { point: true, outcome: "completed", input: kind.reason ?? null });
        break;
      default: break;
    }
  }
  const running = UNFINISHED.has(runtimeStatus) && end == null;
  // A finished execution leaves what it never got an answer for abandoned (a timeout's timer
  // after the event won, a call it stopped waiting for).
  if (!running) for (const row of rows) if (!row.point && row.end == null) row.outcome = "abandoned";
  const from = start ?? (rows.length ? rows[0].start : last);
  const to = end ?? (running ? Math.max(Date.now(), last ?? 0) : last);
  const orchestration = { kind: "orchestration", name: "orchestration", id: -1, start: from, end: end ?? (running ? null : to), outcome: endOutcome === "Failed" ? "failed" : (running ? "running" : "completed"), status: endOutcome || runtimeStatus, episodes };
  return { rows, orchestration, from, to, running };
}

function rowOutcomeText(row) {
  if (row.point) return `at ${clockTime(row.start)}`;
  const verb = {
    completed: row.kind === "timer" ? "fired" : "completed",
    failed: "failed",
    running: "still running",
    abandoned: row.kind === "timer" ? "never fired: the orchestration ended first" : "never answered: the orchestration ended first",
  }[row.outcome];
  const first = row.kind === "timer" ? "created" : (row.kind === "orchestration" ? "started" : "scheduled");
  const parts = [`${first} ${clockTime(row.start)}`];
  if (row.end != null) parts.push(`${verb} ${clockTime(row.end)} (${formatDuration(row.end - row.start)})`);
  else parts.push(verb);
  return parts.join(", ");
}

function barLabel(row) {
  const kindText = { activity: "activity", suborchestration: "sub-orchestration", timer: "timer", entity: "entity call", event: "event raised", "event-sent": "event sent", signal: "entity signal", lifecycle: "", orchestration: "orchestration" }[row.kind];
  const retry = row.retry ? `, retry (attempt ${row.attempt})` : "";
  return `${kindText} ${row.name}${row.id >= 0 ? ` #${row.id}` : ""}${retry}: ${rowOutcomeText(row)}`.trim();
}

function renderTimeline() {
  const container = $("#timeline");
  const model = state.detail.timeline;
  if (!model) {
    container.replaceChildren(el("p", { class: "muted", text: "No history to show (the history export is unavailable)." }));
    $("#timeline-summary").textContent = "";
    return;
  }
  const { rows, orchestration, from, to } = model;
  if (from == null) {
    container.replaceChildren(el("p", { class: "muted", text: "No history yet: the instance has not started." }));
    $("#timeline-summary").textContent = "";
    return;
  }
  const spanMs = Math.max(1, to - from);
  const fraction = (time) => (Math.min(Math.max(time - from, 0), spanMs) / spanMs) * 100;
  const percent = (time) => `${fraction(time)}%`;
  const pages = Math.max(1, Math.ceil(rows.length / TIMELINE_PAGE_SIZE));
  const page = Math.min(state.detail.timelinePage, pages - 1);
  state.detail.timelinePage = page;
  const shown = rows.slice(page * TIMELINE_PAGE_SIZE, (page + 1) * TIMELINE_PAGE_SIZE);

  const counts = (kind) => rows.filter((row) => row.kind === kind).length;
  const failed = rows.filter((row) => row.outcome === "failed").length;
  const retries = rows.filter((row) => row.retry).length;
  $("#timeline-summary").textContent = [
    `${formatDuration(to - from)} from ${clockTime(from)}`,
    `${counts("activity")} activities`, `${counts("suborchestration")} sub-orchestrations`, `${counts("timer")} timers`,
    `${counts("event")} events raised`, `${orchestration.episodes.length} episodes`,
    failed ? `${failed} failed` : null, retries ? `${retries} retries` : null,
  ].filter(Boolean).join(" · ");

  const ticks = [0, 0.25, 0.5, 0.75, 1].map((fraction) =>
    el("span", { class: "tick", style: `left: ${fraction * 100}%`, text: `+${formatDuration(spanMs * fraction)}` }));
  const axis = el("div", { class: "tl-row tl-axis", "aria-hidden": "true" }, el("div", { class: "tl-label" }, "time"), el("div", { class: "tl-track" }, ticks));

  const barFor = (row) => {
    const classes = ["timeline-bar", `kind-${row.kind}`, `outcome-${row.outcome}`];
    if (row.point) classes.push("point");
    if (row.retry) classes.push("retry");
    // Open bars run to the end of the axis; a timer that never fired, to its fire time at most.
    const end = row.end ?? (row.kind === "timer" && row.fireAt ? Math.min(Date.parse(row.fireAt), to) : to);
    const style = row.point ? `left: ${percent(row.start)}` : `left: ${percent(row.start)}; width: ${fraction(end) - fraction(row.start)}%`;
    return el("button", {
      type: "button", class: classes.join(" "), style, title: barLabel(row), "aria-label": barLabel(row),
      dataset: { kind: row.kind, outcome: row.outcome, eventId: row.id, name: row.name, retry: row.retry ? "true" : null, attempt: row.attempt, instanceId: row.instanceId || null },
      onclick: () => selectTimelineRow(row),
    });
  };
  const label = (row) => el("div", { class: "tl-label" },
    el("span", { class: `kind-icon kind-${row.kind}`, "aria-hidden": "true" }),
    row.kind === "suborchestration" && row.instanceId
      ? el("a", { href: instanceHref(row.instanceId), title: `Open ${row.instanceId}` }, row.name)
      : el("span", { class: "tl-name", text: row.name }),
    row.id >= 0 ? el("span", { class: "muted", text: ` #${row.id}` }) : null,
    row.retry ? el("span", { class: "badge retry", text: `retry ${row.attempt}` }) : null,
    row.retried && !row.retry ? el("span", { class: "badge retried", text: "retried" }) : null);

  const orchestrationTrack = el("div", { class: "tl-track" }, barFor(orchestration),
    orchestration.episodes.map((time) => el("span", { class: "episode-tick", style: `left: ${percent(time)}`, title: `episode at ${clockTime(time)}` })));
  const lines = [
    axis,
    el("div", { class: "tl-row tl-orchestration" }, el("div", { class: "tl-label" }, el("strong", { text: state.detail.status.name }), el("span", { class: "muted", text: ` ${orchestration.status}` })), orchestrationTrack),
    ...shown.map((row) => el("div", { class: `tl-row outcome-${row.outcome}`, dataset: { kind: row.kind } }, label(row), el("div", { class: "tl-track" }, barFor(row)))),
  ];
  if (rows.length === 0) lines.push(el("p", { class: "muted", text: "Nothing scheduled yet." }));
  container.replaceChildren(...lines);
  $("#timeline-prev").disabled = page === 0;
  $("#timeline-next").disabled = page >= pages - 1;
  $("#timeline-prev").parentElement.hidden = pages === 1;
  $("#timeline-page-info").textContent = rows.length > TIMELINE_PAGE_SIZE
    ? `rows ${page * TIMELINE_PAGE_SIZE + 1}–${Math.min((page + 1) * TIMELINE_PAGE_SIZE, rows.length)} of ${rows.length}`
    : "";
}

function selectTimelineRow(row) {
  $("#timeline-selection").hidden = false;
  $("#timeline-selection").dataset.instanceId = state.selected;
  $("#timeline-selection-title").replaceChildren(barLabel(row), " ",
    row.instanceId ? instanceLink(row.instanceId, "timeline-child") : "");
  const boxes = [];
  const box = (title, value) => {
    const holder = el("div", { class: "json-box" });
    showJson(holder, value);
    boxes.push(el("div", {}, el("h3", { text: title }), holder));
  };
  if (row.input !== undefined) box("Input", row.input);
  if (row.result !== undefined) box("Result", row.result);
  if (row.failure !== undefined) box("Failure", row.failure);
  if (row.fireAt) box("Fires at", row.fireAt);
  $("#timeline-selection-body").replaceChildren(...boxes);
}

// ---- structure -------------------------------------------------------------------

/** The sub-orchestrations an exported history started, with what became of them. */
function childrenOf(exported) {
  const children = new Map();
  for (const event of exported?.events || []) {
    const kind = event.kind || {};
    if (kind.type === "SubOrchestrationInstanceCreated") {
      children.set(event.event_id, { instanceId: kind.instance_id, name: kind.name, runtimeStatus: "Running" });
    } else if (kind.type === "SubOrchestrationInstanceCompleted" && children.has(kind.task_scheduled_id)) {
      children.get(kind.task_scheduled_id).runtimeStatus = "Completed";
    } else if (kind.type === "SubOrchestrationInstanceFailed" && children.has(kind.task_scheduled_id)) {
      children.get(kind.task_scheduled_id).runtimeStatus = "Failed";
    }
  }
  return [...children.values()];
}

async function exportOf(instanceId) {
  const { body } = await api(`/instances/${encodeURIComponent(instanceId)}/history`);
  return body;
}

/** The ancestors of the open instance, root first, read once per instance (they do not change). */
async function ancestors() {
  if (state.detail.ancestors) return state.detail.ancestors;
  const chain = [];
  let parent = parentOf(state.detail.exported);
  const seen = new Set([state.selected]);
  while (parent && chain.length < PARENT_CHAIN_LIMIT && !seen.has(parent.instance_id)) {
    seen.add(parent.instance_id);
    const node = { instanceId: parent.instance_id, name: parent.name, runtimeStatus: null };
    chain.unshift(node);
    try {
      const exported = await exportOf(parent.instance_id);
      node.runtimeStatus = exported.runtimeStatus;
      parent = parentOf(exported);
    } catch (error) {
      node.runtimeStatus = error.status === 404 ? "purged" : "unknown";
      parent = null;
    }
  }
  state.detail.ancestors = chain;
  return chain;
}

function treeNode(node, role, options = {}) {
  const children = el("ul", { role: "group", class: "tree-children", hidden: true });
  const toggle = el("button", { type: "button", class: "tree-toggle", "aria-expanded": "false", title: `Show the sub-orchestrations of ${node.instanceId}`, "aria-label": `Show the sub-orchestrations of ${node.instanceId}` }, "▸");
  toggle.addEventListener("click", async () => {
    const open = toggle.getAttribute("aria-expanded") !== "true";
    toggle.setAttribute("aria-expanded", String(open));
    toggle.textContent = open ? "▾" : "▸";
    children.hidden = !open;
    if (open && !children.dataset.loaded) {
      children.dataset.loaded = "true";
      children.replaceChildren(el("li", { class: "muted", text: "loading…" }));
      try {
        const grandchildren = childrenOf(await exportOf(node.instanceId));
        children.replaceChildren(...grandchildren.map((child) => treeNode(child, "descendant")));
        if (grandchildren.length === 0) children.replaceChildren(el("li", { class: "muted", text: "no sub-orchestrations" }));
      } catch (error) {
        children.replaceChildren(el("li", { class: "muted", text: error.message }));
      }
    }
  });
  const current = role === "current";
  const item = el("li", { role: "treeitem", class: `tree-node tree-${role}`, dataset: { instanceId: node.instanceId }, "aria-current": current ? "page" : null },
    el("div", { class: "tree-line" },
      options.noToggle ? el("span", { class: "tree-toggle-space" }) : toggle,
      current ? el("strong", { class: "tree-id", text: node.instanceId }) : instanceLink(node.instanceId, role),
      el("span", { class: "muted", text: ` ${node.name || ""} ` }),
      node.runtimeStatus ? statusBadge(node.runtimeStatus) : null,
      role === "parent" ? el("span", { class: "muted", text: " (parent)" }) : null));
  item.append(options.children || children);
  return item;
}

async function renderStructure() {
  const id = state.selected;
  const { status, exported } = state.detail;
  if (!status) return;
  const chain = await ancestors();
  if (state.selected !== id) return;
  const kids = childrenOf(exported);
  const childList = el("ul", { role: "group", class: "tree-children" }, kids.map((child) => treeNode(child, "child")));
  if (kids.length === 0) childList.append(el("li", { class: "muted", text: "no sub-orchestrations" }));
  let node = treeNode({ instanceId: id, name: status.name, runtimeStatus: status.runtimeStatus }, "current", { noToggle: true, children: childList });
  for (let index = chain.length - 1; index >= 0; index -= 1) {
    const wrapper = el("ul", { role: "group", class: "tree-children" }, node);
    node = treeNode(chain[index], index === chain.length - 1 ? "parent" : "ancestor", { noToggle: true, children: wrapper });
  }
  const tree = el("ul", { role: "tree", class: "tree", "aria-label": `Structure of ${id}` }, node);
  // Unchanged (a running instance that started no new child): keep what the user expanded.
  const signature = JSON.stringify([id, status.runtimeStatus, chain, kids]);
  if ($("#structure").dataset.signature === signature) return;
  $("#structure").dataset.signature = signature;
  $("#structure").replaceChildren(tree);
  $("#structure").dataset.instanceId = id;
}

// ---- actions ---------------------------------------------------------------------

function closeDetail() {
  state.selected = null;
  state.detail = emptyDetail();
  $("#detail-panel").hidden = true;
  history.replaceState(null, "", "#instances");
  for (const row of document.querySelectorAll("#instances tbody tr.selected")) row.classList.remove("selected");
}

async function exportHistory() {
  const id = state.selected;
  if (!id) return;
  try {
    const { body } = await api(`/instances/${encodeURIComponent(id)}/history`);
    const blob = new Blob([JSON.stringify(body, null, 2) + "\n"], { type: "application/json" });
    const link = el("a", { href: URL.createObjectURL(blob), download: `${id.replace(/[^\w.-]+/g, "_")}.history.json` });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 10_000);
  } catch (error) {
    reportError(error);
  }
}

async function runAction(action) {
  const id = state.selected;
  if (!id) return;
  const reason = $("#action-reason").value.trim();
  const base = `/instances/${encodeURIComponent(id)}`;
  try {
    if (action === "purge") {
      if (!confirm(`Purge instance ${id} and its history?`)) return;
      await api(base, { method: "DELETE" });
      showMessage(`Purged ${id}`);
      closeDetail();
    } else if (action === "restart") {
      const { body } = await api(`${base}/restart`, { method: "POST" });
      showMessage(`Restarted ${id} as ${body.id}`);
      await loadInstances();
      await selectInstance(body.id);
      return;
    } else {
      const query = reason ? `?reason=${encodeURIComponent(reason)}` : "";
      await api(`${base}/${action}${query}`, { method: "POST" });
      showMessage(`Requested ${action} of ${id}`);
      state.detail.key = null;
    }
    await refreshAll();
  } catch (error) {
    reportError(error);
  }
}

async function raiseEvent(event) {
  event.preventDefault();
  const id = state.selected;
  const name = $("#raise-name").value.trim();
  const data = $("#raise-data").value.trim() || "null";
  try { JSON.parse(data); } catch (error) { showMessage(`The event data is not valid JSON: ${error.message}`, true); return; }
  try {
    await api(`/instances/${encodeURIComponent(id)}/raiseEvent/${encodeURIComponent(name)}`, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: data,
    });
    showMessage(`Raised ${name} on ${id}`);
    await refreshAll();
  } catch (error) {
    reportError(error);
  }
}

// ---- entities ----------------------------------------------------------------------

function entityQuery() {
  const params = new URLSearchParams();
  const top = parseInt($("#entity-filter-top").value, 10);
  params.set("top", Number.isFinite(top) && top > 0 ? String(top) : "20");
  params.set("fetchState", "true");
  const prefix = $("#entity-filter-name").value.trim();
  if (prefix) params.set("namePrefix", prefix);
  if ($("#entity-filter-transient").checked) params.set("includeTransient", "true");
  return params.toString();
}

async function loadEntities() {
  const token = entityPages.pageTokens[entityPages.pageTokens.length - 1];
  const headers = token ? { "x-ms-continuation-token": token } : {};
  const { body, headers: responseHeaders } = await api(`/entities?${entityQuery()}`, { headers });
  entityPages.nextToken = responseHeaders.get("x-ms-continuation-token");
  renderEntities(body || []);
  $("#entity-page-next").disabled = !entityPages.nextToken;
  $("#entity-page-info").textContent = `page ${entityPages.pageTokens.length}`;
}

function renderEntities(entities) {
  // Rows are kept across refreshes (so are the JSON nodes a user opened); only changes re-render.
  const body = $("#entities tbody");
  const existing = new Map([...body.querySelectorAll("tr[data-entity-id]")].map((row) => [row.dataset.entityId, row]));
  const rows = entities.map((entity) => {
    const { name, key } = entity.entityId;
    const id = `@${name}@${key}`;
    const row = existing.get(id) || el("tr", {
      dataset: { entityId: id },
      title: "Click to signal this entity",
      onclick: (event) => {
        if (event.target.closest(".json-tools, summary")) return;
        $("#entity-name").value = name;
        $("#entity-key").value = key;
        $("#entity-op").focus();
      },
    }, cell(name), Object.assign(cell(key), { className: "key" }), cell(""), el("td", {}, el("div", { class: "json-box state" })));
    row.dataset.state = entity.state === undefined ? "" : JSON.stringify(entity.state);
    row.children[2].textContent = entity.lastOperationTime;
    showJson(row.querySelector(".state"), entity.state, 1);
    return row;
  });
  body.replaceChildren(...rows);
  if (rows.length === 0) emptyRow(body, 4, "No entities match.");
}

function entityPath() {
  const name = $("#entity-name").value.trim();
  const key = $("#entity-key").value.trim();
  if (!name || !key) {
    showMessage("Enter the entity's name and key.", true);
    return null;
  }
  return { label: `${name}/${key}`, path: `/entities/${encodeURIComponent(name)}/${encodeURIComponent(key)}` };
}

// The worker applies a signal a moment later: look again soon, not only at the next refresh.
function refreshEntitiesSoon() {
  for (const delay of [250, 1000]) {
    setTimeout(() => { if (currentView() === "entities") loadEntities().catch(reportError); }, delay);
  }
}

async function signalEntity(event) {
  event.preventDefault();
  const entity = entityPath();
  if (!entity) return;
  const op = $("#entity-op").value.trim();
  const input = $("#entity-input").value.trim();
  if (input) {
    try { JSON.parse(input); } catch (error) { showMessage(`The input is not valid JSON: ${error.message}`, true); return; }
  }
  try {
    await api(`${entity.path}?op=${encodeURIComponent(op)}`, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: input,
    });
    showMessage(`Signalled ${op} on ${entity.label}`);
    refreshEntitiesSoon();
  } catch (error) {
    reportError(error);
  }
}

async function deleteEntity() {
  const entity = entityPath();
  if (!entity) return;
  if (!confirm(`Delete the state of entity ${entity.label}?`)) return;
  try {
    await api(entity.path, { method: "DELETE" });
    showMessage(`Signalled delete on ${entity.label}`);
    refreshEntitiesSoon();
  } catch (error) {
    reportError(error);
  }
}

async function cleanEntityStorage() {
  try {
    const { body } = await api("/entities/clean", { method: "POST" });
    showMessage(`Removed ${body.emptyEntitiesRemoved} empty entities; released ${body.orphanedLocksReleased} orphaned locks`);
    await loadEntities();
  } catch (error) {
    reportError(error);
  }
}

// ---- views and navigation ----------------------------------------------------------

function currentView() {
  return VIEWS.includes(document.body.dataset.view) ? document.body.dataset.view : "overview";
}

function showView(view) {
  document.body.dataset.view = view;
  for (const tab of document.querySelectorAll("#views [data-view]")) {
    const active = tab.dataset.view === view;
    tab.classList.toggle("active", active);
    if (active) tab.setAttribute("aria-current", "page"); else tab.removeAttribute("aria-current");
  }
}

function selectionFromHash() {
  const match = location.hash.match(/^#instance=(.+)$/);
  return match ? decodeURIComponent(match[1]) : null;
}

/** What the address says: `#overview` (or nothing), `#instances`, `#instance=ID`, `#entities`. */
function route() {
  const id = selectionFromHash();
  if (id) {
    showView("instances");
    if (id !== state.selected) {
      state.selected = id;
      state.detail = emptyDetail();
    }
  } else if (location.hash === "#entities") {
    showView("entities");
  } else if (location.hash === "#instances") {
    showView("instances");
    if (state.selected) {
      state.selected = null;
      state.detail = emptyDetail();
      $("#detail-panel").hidden = true;
    }
  } else {
    showView("overview");
  }
}

/** Opens a view at once (pushState fires no hashchange; back and forward do). */
function navigate(hash) {
  if (location.hash !== hash) history.pushState(null, "", hash);
  route();
  refreshAll();
}

let refreshing = null;

async function refreshAll() {
  // One refresh at a time; a request during one runs right after it.
  if (refreshing) {
    refreshing.again = true;
    return refreshing.done;
  }
  refreshing = { again: false };
  refreshing.done = (async () => {
    do {
      refreshing.again = false;
      try {
        const view = currentView();
        if (view === "entities") {
          await loadEntities();
        } else if (view === "overview") {
          await loadOverview();
        } else {
          await loadInstances();
          await loadDetail();
        }
      } catch (error) {
        reportError(error);
      }
    } while (refreshing.again);
    refreshing = null;
  })();
  return refreshing.done;
}

function wireTabs() {
  const tabs = [...document.querySelectorAll("#detail-tabs [data-tab]")];
  for (const tab of tabs) {
    tab.addEventListener("click", () => showTab(tab.dataset.tab));
    tab.addEventListener("keydown", (event) => {
      const step = { ArrowRight: 1, ArrowLeft: -1 }[event.key];
      if (!step) return;
      const next = tabs[(tabs.indexOf(tab) + step + tabs.length) % tabs.length];
      showTab(next.dataset.tab);
      next.focus();
    });
  }
  showTab(state.tab);
}

async function main() {
  initApiKey();
  $("#start-form").addEventListener("submit", startInstance);
  $("#filter-form").addEventListener("submit", (event) => {
    event.preventDefault();
    state.pageTokens = [null];
    refreshAll();
  });
  $("#page-first").addEventListener("click", () => { state.pageTokens = [null]; refreshAll(); });
  $("#page-next").addEventListener("click", () => {
    if (state.nextToken) state.pageTokens.push(state.nextToken);
    refreshAll();
  });
  $("#detail-close").addEventListener("click", closeDetail);
  $("#detail-export").addEventListener("click", exportHistory);
  $("#raise-form").addEventListener("submit", raiseEvent);
  for (const button of document.querySelectorAll("[data-action]")) {
    button.addEventListener("click", () => runAction(button.dataset.action));
  }
  const pager = (prev, next, field, render) => {
    $(prev).addEventListener("click", () => { state.detail[field] = Math.max(0, state.detail[field] - 1); render(); });
    $(next).addEventListener("click", () => { state.detail[field] += 1; render(); });
  };
  pager("#history-prev", "#history-next", "historyPage", renderHistory);
  pager("#timeline-prev", "#timeline-next", "timelinePage", renderTimeline);
  wireTabs();
  for (const tab of document.querySelectorAll("#views [data-view]")) {
    tab.addEventListener("click", () => {
      const view = tab.dataset.view;
      navigate(view === "instances" && state.selected ? instanceHref(state.selected) : `#${view}`);
    });
  }
  $("#entity-signal-form").addEventListener("submit", signalEntity);
  $("#entity-delete-button").addEventListener("click", deleteEntity);
  $("#entity-clean").addEventListener("click", cleanEntityStorage);
  $("#entity-filter-form").addEventListener("submit", (event) => {
    event.preventDefault();
    entityPages.pageTokens = [null];
    refreshAll();
  });
  $("#entity-page-first").addEventListener("click", () => { entityPages.pageTokens = [null]; refreshAll(); });
  $("#entity-page-next").addEventListener("click", () => {
    if (entityPages.nextToken) entityPages.pageTokens.push(entityPages.nextToken);
    refreshAll();
  });
  window.addEventListener("hashchange", () => { route(); refreshAll(); });
  try {
    await loadOrchestrators();
  } catch (error) {
    reportError(error);
  }
  route();
  await refreshAll();
  document.body.dataset.ready = "true";
  setInterval(() => { if ($("#auto-refresh").checked) refreshAll(); }, REFRESH_MS);
}

main();
