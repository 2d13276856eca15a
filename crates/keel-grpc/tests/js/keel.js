// The real `keel serve` for the JavaScript SDK tests: SQLite in a temporary directory,
// ports picked by the system. The binary is $KEEL_BIN, else
// $CARGO_TARGET_DIR/debug/keel, else the workspace's target/debug/keel.

const { spawn } = require("node:child_process");
const fs = require("node:fs");
const os = require("node:os");
const path = require("node:path");
const readline = require("node:readline");

const REPO = path.resolve(__dirname, "../../../..");

function keelBinary() {
  if (process.env.KEEL_BIN) return process.env.KEEL_BIN;
  const target = process.env.CARGO_TARGET_DIR || path.join(REPO, "target");
  return path.join(target, "debug", "keel");
}

/** The environment without KEEL_API_KEY: these tests run an open host. */
function withoutApiKey(env) {
  const { KEEL_API_KEY: _ignored, ...rest } = env;
  return rest;
}

/** Starts `keel serve`; resolves to { grpc, http, stop() } once it prints its addresses. */
async function startKeel() {
  const binary = keelBinary();
  if (!fs.existsSync(binary)) throw new Error(`${binary} is missing: build it with \`cargo build -p keel-cli\``);
  const directory = fs.mkdtempSync(path.join(os.tmpdir(), "keel-js-"));
  const log = fs.openSync(path.join(directory, "host.log"), "a");
  const child = spawn(binary, ["serve", "--port", "0", "--grpc-port", "0", "--store", `sqlite://${directory}/hub.db`], {
    stdio: ["ignore", "pipe", log],
    env: { ...withoutApiKey(process.env), RUST_LOG: process.env.RUST_LOG || "info" },
  });
  const lines = readline.createInterface({ input: child.stdout });
  const addresses = await new Promise((resolve, reject) => {
    const found = {};
    const timer = setTimeout(() => reject(new Error("keel serve printed no gRPC address in 30 s")), 30_000);
    child.once("exit", (code) => reject(new Error(`keel serve exited early (${code}); see ${directory}/host.log`)));
    lines.on("line", (line) => {
      if (line.startsWith("keel: listening on ")) found.http = line.split(" ")[3];
      if (line.includes("gRPC (Durable Task SDKs):")) {
        found.grpc = line.trim().split(" ").pop();
        clearTimeout(timer);
        resolve(found);
      }
    });
  });
  return {
    ...addresses,
    directory,
    async stop() {
      if (child.exitCode !== null) return;
      const exited = new Promise((resolve) => child.once("exit", resolve));
      child.kill("SIGTERM");
      await exited;
    },
  };
}

module.exports = { startKeel };
