// PM2 set-up for emp-worker. As shipped it works on any box, with or without GPUs:
//
//   cp .env.example .env && $EDITOR .env        # EMP_REDIS_URL (or HUB_REDIS_URL), CONNECTORS...
//   pm2 start ecosystem.config.js
//   pm2 logs emp-worker        pm2 stop all        pm2 save && pm2 startup
//
// Two layouts:
//   * one agent for the whole box (the default): app "emp-worker" runs one worker slot per GPU
//     NVML reports (each with its own worker id, {machine}-worker-{connector}-{gpu}), or one
//     CPU-only slot on a box without a GPU;
//   * one app per GPU: EMP_GPUS=0,1,3 (those indices) or NUM_GPUS=4 (0..3), in the environment of
//     `pm2 start` or in .env. Apps "emp-worker-gpu0", ... each run `emp-worker run --gpu I`.
//     Leave WORKER_ID unset there: with one id for all apps, only the first would run (a worker id
//     is held by one process at a time; the others wait for it, then exit saying so).
//
// Settings: the worker reads .env in this directory (the apps' cwd) and the environment `pm2 start`
// runs in (PM2 passes it on): EMP_* or emp-job-queue's HUB_REDIS_URL, MACHINE_ID, WORKER_ID,
// CONNECTORS. This file reads only what PM2 itself needs: EMP_WORKER_BIN, EMP_GPUS / NUM_GPUS,
// EMP_GRACE_PERIOD_S (for kill_timeout) and EMP_LOG_FORMAT.

const fs = require('fs');
const path = require('path');

// KEY=value lines of a .env file (comments, blank lines, `export ` and quotes allowed).
function readDotenv(file) {
  const found = {};
  if (!fs.existsSync(file)) return found;
  for (const raw of fs.readFileSync(file, 'utf8').split(/\r?\n/)) {
    const line = raw.trim().replace(/^export\s+/, '');
    const eq = line.indexOf('=');
    if (!line || line.startsWith('#') || eq < 1) continue;
    found[line.slice(0, eq).trim()] = line.slice(eq + 1).trim().replace(/^(['"])(.*)\1$/, '$2');
  }
  return found;
}

const HERE = __dirname;
const DOTENV = readDotenv(path.join(HERE, '.env'));
const setting = (name, fallback) => process.env[name] || DOTENV[name] || fallback;

// The binary beside this file (the release tarball's layout), else the installed one.
const BESIDE = path.join(HERE, 'emp-worker');
const BINARY = setting('EMP_WORKER_BIN', fs.existsSync(BESIDE) ? BESIDE : '/usr/local/bin/emp-worker');
const GRACE_S = Number(setting('EMP_GRACE_PERIOD_S', '30'));
const GPUS = setting('EMP_GPUS', '')
  ? setting('EMP_GPUS', '').split(',').map((s) => s.trim()).filter(Boolean)
  : Array.from({ length: Number(setting('NUM_GPUS', '0')) }, (_, i) => String(i));

const app = (name, args) => ({
  name,
  // `exec` keeps one process (PM2's pid is the worker's, or the one-file bootloader's) and 2>&1
  // puts the worker's log lines in PM2's out log: its error log is for PM2's own complaints.
  script: '/bin/sh',
  args: ['-c', 'exec "$0" "$@" 2>&1', BINARY, 'run', ...args],
  interpreter: 'none', // a native executable: PM2 must not run it through node
  exec_mode: 'fork',
  instances: 1,
  cwd: HERE, // the worker reads .env here
  env: {
    // stdout is a pipe under PM2: one JSON object per line, for log shippers.
    EMP_LOG_FORMAT: setting('EMP_LOG_FORMAT', 'json'),
  },

  // Stopping. SIGINT (PM2's default) starts the worker's drain: no new claims, running jobs get
  // EMP_GRACE_PERIOD_S to finish, the rest go back to the queue, it deregisters and exits 0.
  kill_signal: 'SIGINT',
  // SIGKILL only after the drain could have finished: grace + up to 10 s to hand jobs back and
  // deregister + margin (30 s -> 45000 ms). Raise EMP_GRACE_PERIOD_S and this follows.
  kill_timeout: (GRACE_S + 15) * 1000,
  // PM2 checks every kill_retry_time whether the process is gone and logs "failed to kill" each
  // time it is not: 100 ms by default, ~300 lines for one drain. Every 2 s is enough.
  kill_retry_time: 2000,
  // Signal the whole tree (engines the worker started included). The one-file binary's
  // bootloader forwards the signal to the worker too; the worker takes both copies, arriving
  // together, as one stop. `kill -9` of PM2's pid kills the bootloader, and the worker with it.
  treekill: true,

  // Restarts. A crash restarts the worker after restart_delay; a process that dies within
  // min_uptime counts as unstable, and after max_restarts unstable starts in a row PM2 gives up
  // (status "errored") instead of looping on e.g. a bad EMP_REDIS_URL.
  autorestart: true,
  restart_delay: 5000,
  min_uptime: '60s',
  max_restarts: 10,

  // Logs: $PM2_HOME/logs/<name>-out.log. merge_logs: one file per app, whatever its instance id.
  // No log_date_format: the worker stamps its own lines, and a prefix would break JSON lines.
  merge_logs: true,
  watch: false, // never restart a worker mid-job because a file changed
});

module.exports = {
  apps: GPUS.length ? GPUS.map((gpu) => app(`emp-worker-gpu${gpu}`, ['--gpu', gpu])) : [app('emp-worker', [])],
};
