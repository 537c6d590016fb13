// PM2 set-up for emp-worker: one worker process per GPU, as emp-job-queue's machines run theirs.
//
//   HUB_REDIS_URL=redis://:secret@hub:6379/0 MACHINE_ID=gpu-box-7 EMP_GPUS=0,1,2,3 \
//     pm2 start packaging/pm2/ecosystem.config.js
//   pm2 logs emp-worker-gpu0        pm2 stop all        pm2 save && pm2 startup
//
// Stopping: PM2 sends SIGINT by default (not SIGTERM). emp-worker treats SIGINT exactly like
// SIGTERM: it stops claiming, lets running jobs finish within EMP_GRACE_PERIOD_S (30 s by
// default), hands any still running back to the queue, deregisters and exits 0. A *second*
// signal skips the drain and hands jobs back at once. PM2 sends SIGKILL once kill_timeout passes,
// so kill_timeout must exceed the grace period (see below).
//
// Settings come from each app's `env` below, from the environment `pm2 start` runs in
// (HUB_REDIS_URL, MACHINE_ID, ... are read there), and from a `.env` file in the app's cwd.

const BINARY = process.env.EMP_WORKER_BIN || '/usr/local/bin/emp-worker';
const MACHINE_ID = process.env.MACHINE_ID || require('os').hostname();
const CONNECTORS = process.env.CONNECTORS || 'comfyui';
const GRACE_S = Number(process.env.EMP_GRACE_PERIOD_S || 30);

// Which GPUs get a worker: EMP_GPUS=0,1,3 (explicit indices) or NUM_GPUS=4 (0..3); default GPU 0.
const GPUS = process.env.EMP_GPUS
  ? process.env.EMP_GPUS.split(',').map((s) => s.trim()).filter(Boolean)
  : Array.from({ length: Number(process.env.NUM_GPUS || 1) }, (_, i) => String(i));

const worker = (gpu) => ({
  name: `emp-worker-gpu${gpu}`,
  script: BINARY,
  args: ['run', '--connectors', CONNECTORS, '--gpu', gpu],
  interpreter: 'none', // a native executable: PM2 must not run it through node
  exec_mode: 'fork',   // one process per app; parallelism comes from one app per GPU
  instances: 1,

  env: {
    // emp-job-queue's own variable names; emp-worker reads them as aliases of EMP_*.
    HUB_REDIS_URL: process.env.HUB_REDIS_URL || 'redis://127.0.0.1:6379/0',
    MACHINE_ID,
    // Unique per process, in emp-job-queue's {machine}-worker-{type}-{index} form. Without it,
    // every app on this machine would register under the same default id.
    WORKER_ID: `${MACHINE_ID}-worker-${CONNECTORS.split(',')[0]}-${gpu}`,
    CONNECTORS,
    EMP_GRACE_PERIOD_S: String(GRACE_S),
    // stdout is a pipe under PM2: one JSON object per line, for log shippers.
    EMP_LOG_FORMAT: process.env.EMP_LOG_FORMAT || 'json',
  },

  // Shutdown. SIGINT is PM2's default; spelled out because the worker's drain relies on it.
  kill_signal: 'SIGINT',
  // SIGKILL only after the drain could have finished: the grace period, plus up to 10 s for the
  // jobs to hand back and the worker to deregister, plus a margin: 30 s -> 45000 ms.
  kill_timeout: (GRACE_S + 15) * 1000,
  // Signal the whole process tree (PM2's default). The one-file binary is two processes: a
  // bootloader and the Python worker it starts. The bootloader ignores signals (so a signal sent
  // to the group is not delivered twice), hence the worker itself must be signalled.
  treekill: true,

  // Restarts. A crash (non-zero exit) restarts the worker after restart_delay; a process that
  // dies within min_uptime counts as unstable, and after max_restarts unstable starts in a row
  // PM2 gives up (status "errored") instead of looping on e.g. a bad HUB_REDIS_URL.
  autorestart: true,
  restart_delay: 5000,
  min_uptime: '60s',
  max_restarts: 10,
  // A clean exit (0 = asked to stop, drained) is restarted too; add stop_exit_codes: [0] to
  // keep a worker down once it was told to stop by something other than PM2.

  // Logs: ~/.pm2/logs/emp-worker-gpuN-{out,error}.log. merge_logs keeps one file per app
  // (no "-<instance id>" suffix), so a restarted or rescaled app keeps writing the same file.
  // No log_date_format: the worker stamps its own lines, and a prefix would break JSON lines.
  merge_logs: true,

  watch: false, // never restart a worker mid-job because a file changed
});

module.exports = { apps: GPUS.map(worker) };
