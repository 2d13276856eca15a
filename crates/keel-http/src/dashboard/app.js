// Keel dashboard: talks to the management API of the host that serves it. Two views:
// instances (start, list, detail with history and actions) and entities (signal, list
// with states).
"use strict";

const API = "/runtime/webhooks/durabletask";
const REFRESH_MS = 2000;

const $ = (selector) => document.querySelector(selector);

const state = {
  pageTokens: [null], // continuation token of each page seen; the last is the current page
  nextToken: null,
  selected: null,
};

const entityPages = {
  pageTokens: [null], // as for instances
  nextToken: null,
};

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

// ---- start ---------------------------------------------------------------------

async function loadOrchestrators() {
  const { body } = await api("/orchestrators");
  const select = $("#start-name");
  select.replaceChildren();
  for (const name of body || []) {
    const option = document.createElement("option");
    option.value = name;
    option.textContent = name;
    select.append(option);
  }
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

// ---- list ----------------------------------------------------------------------

function filterQuery() {
  const params = new URLSearchParams();
  const top = parseInt($("#filter-top").value, 10);
  params.set("top", Number.isFinite(top) && top > 0 ? String(top) : "20");
  params.set("showInput", "false"); // the list shows no inputs; the detail view fetches them
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

function statusBadge(status) {
  const badge = document.createElement("span");
  badge.className = `status status-${status}`;
  badge.textContent = status;
  return badge;
}

function renderInstances(instances) {
  const rows = instances.map((instance) => {
    const row = document.createElement("tr");
    row.dataset.instanceId = instance.instanceId;
    row.dataset.status = instance.runtimeStatus;
    if (instance.instanceId === state.selected) row.className = "selected";
    const idCell = document.createElement("td");
    const link = document.createElement("a");
    link.href = `#instance=${encodeURIComponent(instance.instanceId)}`;
    link.textContent = instance.instanceId;
    idCell.append(link);
    const statusCell = document.createElement("td");
    statusCell.className = "status-cell";
    statusCell.append(statusBadge(instance.runtimeStatus));
    row.append(idCell, cell(instance.name), statusCell, cell(instance.createdTime), cell(instance.lastUpdatedTime));
    return row;
  });
  const body = $("#instances tbody");
  body.replaceChildren(...rows);
  if (rows.length === 0) {
    const row = document.createElement("tr");
    const empty = cell("No instances match.");
    empty.colSpan = 5;
    empty.className = "empty";
    row.append(empty);
    body.append(row);
  }
}

function cell(text) {
  const td = document.createElement("td");
  td.textContent = text == null ? "" : String(text);
  return td;
}

// ---- detail --------------------------------------------------------------------

function pretty(value) {
  return value == null ? "-" : JSON.stringify(value, null, 2);
}

async function selectInstance(instanceId) {
  state.selected = instanceId;
  if (location.hash !== `#instance=${encodeURIComponent(instanceId)}`) {
    history.replaceState(null, "", `#instance=${encodeURIComponent(instanceId)}`);
  }
  for (const row of document.querySelectorAll("#instances tbody tr")) {
    row.classList.toggle("selected", row.dataset.instanceId === instanceId);
  }
  await loadDetail();
}

async function loadDetail() {
  if (!state.selected) return;
  const path = `/instances/${encodeURIComponent(state.selected)}?showHistory=true&showHistoryOutput=true`;
  let status;
  try {
    ({ body: status } = await api(path));
  } catch (error) {
    if (error.status === 404) {
      closeDetail();
      showMessage(`Instance ${state.selected} no longer exists.`, true);
      return;
    }
    throw error;
  }
  $("#detail-panel").hidden = false;
  $("#detail-panel").dataset.status = status.runtimeStatus;
  $("#detail-id").textContent = status.instanceId;
  $("#detail-name").textContent = status.name;
  $("#detail-version").textContent = status.version ?? "-";
  $("#detail-status").replaceWith(Object.assign(statusBadge(status.runtimeStatus), { id: "detail-status" }));
  $("#detail-created").textContent = status.createdTime;
  $("#detail-updated").textContent = status.lastUpdatedTime;
  $("#detail-input").textContent = pretty(status.input);
  $("#detail-output").textContent = pretty(status.output);
  $("#detail-custom").textContent = pretty(status.customStatus);
  renderTimeline(status.historyEvents || []);
}

function renderTimeline(events) {
  const items = events.map((event) => {
    const item = document.createElement("li");
    item.className = `event event-${event.EventType}`;
    const time = document.createElement("time");
    time.textContent = event.Timestamp;
    const type = document.createElement("strong");
    type.textContent = event.EventType;
    const details = document.createElement("span");
    details.className = "details";
    details.textContent = Object.entries(event)
      .filter(([key, value]) => key !== "EventType" && key !== "Timestamp" && value != null)
      .map(([key, value]) => `${key}: ${typeof value === "string" ? value : JSON.stringify(value)}`)
      .join("  ·  ");
    item.append(time, type, details);
    return item;
  });
  $("#timeline").replaceChildren(...items);
}

function closeDetail() {
  state.selected = null;
  $("#detail-panel").hidden = true;
  history.replaceState(null, "", location.pathname + location.search);
  for (const row of document.querySelectorAll("#instances tbody tr.selected")) row.classList.remove("selected");
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

// ---- entities ------------------------------------------------------------------

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
  const rows = entities.map((entity) => {
    const { name, key } = entity.entityId;
    const row = document.createElement("tr");
    row.dataset.entityId = `@${name}@${key}`;
    row.dataset.state = entity.state === undefined ? "" : JSON.stringify(entity.state);
    const keyCell = cell(key);
    keyCell.className = "key";
    const stateCell = document.createElement("td");
    const statePre = document.createElement("pre");
    statePre.className = "state";
    statePre.textContent = pretty(entity.state);
    stateCell.append(statePre);
    row.append(cell(name), keyCell, cell(entity.lastOperationTime), stateCell);
    row.title = "Click to signal this entity";
    row.addEventListener("click", () => {
      $("#entity-name").value = name;
      $("#entity-key").value = key;
      $("#entity-op").focus();
    });
    return row;
  });
  const body = $("#entities tbody");
  body.replaceChildren(...rows);
  if (rows.length === 0) {
    const row = document.createElement("tr");
    const empty = cell("No entities match.");
    empty.colSpan = 4;
    empty.className = "empty";
    row.append(empty);
    body.append(row);
  }
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

// ---- views ---------------------------------------------------------------------

function currentView() {
  return document.body.dataset.view === "entities" ? "entities" : "instances";
}

function showView(view) {
  document.body.dataset.view = view;
  for (const tab of document.querySelectorAll("#views [data-view]")) {
    tab.classList.toggle("active", tab.dataset.view === view);
  }
  if (view === "entities" && location.hash !== "#entities") {
    history.replaceState(null, "", "#entities");
  } else if (view === "instances" && location.hash === "#entities") {
    history.replaceState(null, "", location.pathname + location.search);
  }
}

// ---- wiring --------------------------------------------------------------------

async function refreshAll() {
  try {
    if (currentView() === "entities") {
      await loadEntities();
    } else {
      await loadInstances();
      await loadDetail();
    }
  } catch (error) {
    reportError(error);
  }
}

function selectionFromHash() {
  const match = location.hash.match(/^#instance=(.+)$/);
  return match ? decodeURIComponent(match[1]) : null;
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
  $("#raise-form").addEventListener("submit", raiseEvent);
  for (const button of document.querySelectorAll("[data-action]")) {
    button.addEventListener("click", () => runAction(button.dataset.action));
  }
  for (const tab of document.querySelectorAll("#views [data-view]")) {
    tab.addEventListener("click", () => { showView(tab.dataset.view); refreshAll(); });
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
  window.addEventListener("hashchange", () => {
    if (location.hash === "#entities") {
      showView("entities");
      refreshAll();
      return;
    }
    const id = selectionFromHash();
    if (id && id !== state.selected) {
      showView("instances");
      selectInstance(id).catch(reportError);
    }
  });
  try {
    await loadOrchestrators();
  } catch (error) {
    reportError(error);
  }
  showView(location.hash === "#entities" ? "entities" : "instances");
  state.selected = selectionFromHash();
  await refreshAll();
  document.body.dataset.ready = "true";
  setInterval(() => { if ($("#auto-refresh").checked) refreshAll(); }, REFRESH_MS);
}

main();
