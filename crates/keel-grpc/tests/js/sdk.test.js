// The official Durable Task JavaScript SDK (@microsoft/durabletask-js) against the real
// `keel serve`: its worker runs the orchestrations below, its client manages them.
// Run by .ci/run with `node --test`.

const test = require("node:test");
const assert = require("node:assert/strict");
const grpc = require("@grpc/grpc-js");
const dt = require("@microsoft/durabletask-js");
const pb = require("@microsoft/durabletask-js/dist/proto/orchestrator_service_pb");
const services = require("@microsoft/durabletask-js/dist/proto/orchestrator_service_grpc_pb");
const { startKeel } = require("./keel");

const { OrchestrationStatus } = dt;
const WAIT_S = 30;

// ---- activities and orchestrations --------------------------------------------------

const attempts = new Map();

function js_hello(_ctx, name) {
  return `Hello ${name}!`;
}

function js_payload(_ctx, n) {
  return String(n).padStart(8, "0").repeat(512); // 4 KiB
}

function js_flaky(_ctx, key) {
  const attempt = (attempts.get(key) || 0) + 1;
  attempts.set(key, attempt);
  if (attempt < 2) throw new Error(`attempt ${attempt} failed`);
  return `succeeded on attempt ${attempt}`;
}

async function* js_chain(ctx, names) {
  const greetings = [];
  for (const name of names) greetings.push(yield ctx.callActivity(js_hello, name));
  return greetings;
}

async function* js_timer(ctx, seconds) {
  yield ctx.createTimer(seconds);
  return "woke";
}

async function* js_retry(ctx, key) {
  const retry = new dt.RetryPolicy({ maxNumberOfAttempts: 2, firstRetryIntervalInMilliseconds: 200 });
  return yield ctx.callActivity(js_flaky, key, { retry });
}

async function* js_forever(ctx) {
  yield ctx.waitForExternalEvent("never");
  return "unreachable";
}

async function* js_wait(ctx) {
  return yield ctx.waitForExternalEvent("go");
}

async function* js_child(ctx, n) {
  return { instanceId: ctx.instanceId, n };
}

async function* js_parent(ctx, n) {
  // No instance id: the SDK derives the child's from this execution's id.
  yield ctx.callActivity(js_hello, "tagged", { tags: { kind: "greeting" } });
  return yield ctx.callSubOrchestrator(js_child, n, { tags: { level: "child" } });
}

async function* js_big_fan_out(ctx, n) {
  const tasks = [];
  for (let i = 0; i < n; i++) tasks.push(ctx.callActivity(js_payload, i));
  const results = yield dt.whenAll(tasks);
  return results.reduce((total, result) => total + result.length, 0);
}

// ---- the server, the worker and the client ------------------------------------------

let keel;
let worker;
let client;
let stub;

test.before(async () => {
  keel = await startKeel();
  // Work-item filters: what this worker does not host stays with the task hub.
  worker = new dt.TaskHubGrpcWorker({ hostAddress: keel.grpc, logger: new dt.NoOpLogger(), workItemFilters: "auto" });
  for (const orchestrator of [js_chain, js_timer, js_retry, js_forever, js_wait, js_child, js_parent, js_big_fan_out]) {
    worker.addOrchestrator(orchestrator);
  }
  for (const activity of [js_hello, js_payload, js_flaky]) worker.addActivity(activity);
  await worker.start();
  client = new dt.TaskHubGrpcClient({ hostAddress: keel.grpc, logger: new dt.NoOpLogger() });
  stub = new services.TaskHubSidecarServiceClient(keel.grpc, grpc.credentials.createInsecure());
});

test.after(async () => {
  stub?.close();
  await client?.stop();
  await worker?.stop();
  await keel?.stop();
});

async function completion(instanceId) {
  const state = await client.waitForOrchestrationCompletion(instanceId, true, WAIT_S);
  assert.ok(state, `${instanceId} exists`);
  return state;
}

async function output(instanceId) {
  const state = await completion(instanceId);
  assert.equal(state.runtimeStatus, OrchestrationStatus.COMPLETED, JSON.stringify(state.failureDetails));
  return JSON.parse(state.serializedOutput);
}

async function statusBecomes(instanceId, status, timeoutMs = 5000) {
  const deadline = Date.now() + timeoutMs;
  let state;
  while (Date.now() < deadline) {
    state = await client.getOrchestrationState(instanceId, false);
    if (state && state.runtimeStatus === status) return state;
    await new Promise((resolve) => setTimeout(resolve, 25));
  }
  assert.fail(`${instanceId} never became ${status}: ${state?.runtimeStatus}`);
}

function call(method, request) {
  return new Promise((resolve, reject) => stub[method](request, (error, response) => (error ? reject(error) : resolve(response))));
}

/** Seconds from the episode that created the first timer to the episode it woke. */
function timerGap(history) {
  const started = history.map((event, i) => [event, i]).filter(([event]) => event.type === dt.HistoryEventType.OrchestratorStarted);
  const created = history.findIndex((event) => event.type === dt.HistoryEventType.TimerCreated);
  const fired = history.findIndex((event, i) => i > created && event.type === dt.HistoryEventType.TimerFired);
  const creating = started.filter(([, i]) => i < created).pop()[0];
  const woken = started.filter(([, i]) => i < fired).pop()[0];
  return (woken.timestamp.getTime() - creating.timestamp.getTime()) / 1000;
}

// ---- the tests ------------------------------------------------------------------------

test("an activity chain completes", async () => {
  const id = await client.scheduleNewOrchestration(js_chain, ["Tokyo", "Oslo"]);
  assert.deepEqual(await output(id), ["Hello Tokyo!", "Hello Oslo!"]);
});

test("a 200 ms timer and a 200 ms retry interval continue within 250 ms", async () => {
  const timer = await client.scheduleNewOrchestration(js_timer, 0.2);
  assert.equal(await output(timer), "woke");
  assert.ok(timerGap(await client.getOrchestrationHistory(timer)) < 0.25);
  const retry = await client.scheduleNewOrchestration(js_retry, `key-${Date.now()}`);
  assert.equal(await output(retry), "succeeded on attempt 2");
  assert.ok(timerGap(await client.getOrchestrationHistory(retry)) < 0.25);
});

test("tags on an orchestration and a sub-orchestration are kept; default child ids derive from the execution", async () => {
  const tags = { team: "payments", ticket: "T-17" };
  const id = await client.scheduleNewOrchestration(js_parent, 5, { tags });
  const child = await output(id);
  assert.equal(child.n, 5);
  assert.match(child.instanceId, /^[0-9a-f]{32}:0002$/, "execution id (32 hex digits) + action id");
  const state = await client.getOrchestrationState(id);
  assert.deepEqual(state.tags, tags);
  const response = await call("getInstance", new pb.GetInstanceRequest().setInstanceid(id));
  assert.match(response.getOrchestrationstate().getExecutionid().getValue(), /^[0-9a-f]{32}$/);
  assert.equal(child.instanceId.split(":")[0], response.getOrchestrationstate().getExecutionid().getValue());
  assert.deepEqual((await client.getOrchestrationState(child.instanceId)).tags, { level: "child" });
  const scheduled = (await client.getOrchestrationHistory(id)).find((e) => e.type === dt.HistoryEventType.TaskScheduled);
  assert.deepEqual(scheduled.tags, { kind: "greeting" }, "task tags are kept in the history");
});

test("a termination output stays the JSON value it was", async () => {
  const id = await client.scheduleNewOrchestration(js_forever);
  await client.waitForOrchestrationStart(id, false, WAIT_S);
  await client.terminateOrchestration(id, { reason: "enough", by: ["ops"] });
  const state = await completion(id);
  assert.equal(state.runtimeStatus, OrchestrationStatus.TERMINATED);
  assert.deepEqual(JSON.parse(state.serializedOutput), { reason: "enough", by: ["ops"] });
});

test("an instance no worker hosts is terminated and purged at once", async () => {
  const id = await client.scheduleNewOrchestration("nobody_hosts_this", 1);
  await new Promise((resolve) => setTimeout(resolve, 200));
  assert.equal((await client.getOrchestrationState(id)).runtimeStatus, OrchestrationStatus.PENDING);
  const started = Date.now();
  await client.terminateOrchestration(id, "nobody runs it");
  await statusBecomes(id, OrchestrationStatus.TERMINATED, 2000);
  assert.equal((await client.purgeOrchestration(id)).deletedInstanceCount, 1);
  assert.equal(await client.getOrchestrationState(id), undefined);
  assert.ok(Date.now() - started < 2000);
});

test("restart of a running instance under a new id leaves the old one alone", async () => {
  const id = await client.scheduleNewOrchestration(js_wait, "in");
  await client.waitForOrchestrationStart(id, false, WAIT_S);
  const other = await client.restartOrchestration(id, true);
  assert.notEqual(other, id);
  await statusBecomes(other, OrchestrationStatus.RUNNING);
  assert.equal((await client.getOrchestrationState(id)).runtimeStatus, OrchestrationStatus.RUNNING);
  await assert.rejects(client.restartOrchestration(id, false), "the same id needs a finished instance");
  for (const instanceId of [id, other]) {
    await client.raiseOrchestrationEvent(instanceId, "go", instanceId);
    assert.equal(await output(instanceId), instanceId);
  }
});

test("a reuse policy with running statuses replaces a running instance", async () => {
  const id = `reuse-${Date.now()}`;
  await client.scheduleNewOrchestration(js_forever, undefined, { instanceId: id });
  await client.waitForOrchestrationStart(id, false, WAIT_S);
  // The JavaScript client has no reuse option: the protocol's field, through the SDK's stub.
  const S = pb.OrchestrationStatus;
  const replaceAll = new pb.OrchestrationIdReusePolicy().setReplaceablestatusList([
    S.ORCHESTRATION_STATUS_PENDING, S.ORCHESTRATION_STATUS_RUNNING, S.ORCHESTRATION_STATUS_SUSPENDED,
    S.ORCHESTRATION_STATUS_COMPLETED, S.ORCHESTRATION_STATUS_FAILED, S.ORCHESTRATION_STATUS_TERMINATED,
  ]);
  const input = new (require("google-protobuf/google/protobuf/wrappers_pb").StringValue)().setValue('["again"]');
  const request = new pb.CreateInstanceRequest().setInstanceid(id).setName("js_chain").setInput(input)
    .setOrchestrationidreusepolicy(replaceAll);
  assert.equal((await call("startInstance", request)).getInstanceid(), id);
  assert.deepEqual(await output(id), ["Hello again!"]);
  const runningOnly = new pb.OrchestrationIdReusePolicy().setReplaceablestatusList([S.ORCHESTRATION_STATUS_RUNNING]);
  await assert.rejects(call("startInstance", request.setOrchestrationidreusepolicy(runningOnly)), (error) => {
    assert.equal(error.code, grpc.status.INVALID_ARGUMENT);
    return true;
  });
});

test("1,000 activities of 4 KiB each complete", async () => {
  const id = await client.scheduleNewOrchestration(js_big_fan_out, 1000);
  assert.equal(await output(id), 1000 * 4096);
});
