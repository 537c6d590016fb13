-- requires: clock common untrusted loaded index final_fail requeue fence outage reconcile
-- Heartbeat, one command per beat:
--  * refresh the worker record, its heartbeat key and workers:active; a live worker's record never
--    expires (a past deregistration or offline mark set a TTL on it), so what is written to it only
--    on change (emp_models, Queue.set_models) stays;
--  * renew the leases of the jobs this worker runs (holder and attempt checked; one reaped from it
--    that nobody has claimed since is taken back, see lib/fence.lua); report the ones it no
--    longer holds (cancelled, taken over) so it stops them;
--  * promote delayed retries that are due;
--  * once per reap period fleet-wide (a lock), reap: put jobs whose lease expired back in the
--    queue at their original place (spending an attempt), or fail them when none are left, and
--    mark workers whose heartbeat key is gone offline; not while the grace period after an
--    outage is open (lib/outage.lua). A job the reaper cannot handle is quarantined. The reaper
--    also runs a reconcile step (lib/reconcile.lua) of REAPER_STEP ids: claims reconcile only
--    while jobs:pending and emp:indexed differ in size.
--  * a job put back in the queue, or promoted, wakes one idle worker (lib/wake.lua).
-- KEYS: none (every key is the prefix in ARGV[1] plus a name from worker/keys.py).
-- ARGV: 1 prefix, 2 worker id, 3 heartbeat ttl s, 4 status, 5 JSON object of worker fields to
--       set, 6 JSON object {job id: attempt} of the jobs this worker runs, 7 JSON list of the
--       models the worker has loaded ('' to leave them as they are),
--       8 options JSON: lease_ms, max_per_beat (jobs to promote/reap per beat at most),
--         reap_period_ms, retention_s, stream_maxlen, away_ms (how long this worker's beats have
--         been failing, when they were: see lib/outage.lua).
-- A worker id is written by one process at a time: when the fields carry emp_instance (the
-- writer's token), worker:{id}:instance must be absent or hold that token; it is then set with the
-- heartbeat TTL, else nothing is written and the script fails with 'EMP_INSTANCE <holder token>'.
-- Returns {leases renewed, jobs promoted, lost job ids (comma list), jobs reaped,
--          1 when the record has no emp_models (deleted by someone else: write them again) else 0}.

local worker = ARGV[2]
local ms = now_ms()
local at = iso(ms)
local opts = cjson.decode(ARGV[8])
local limit, retention, maxlen = tonumber(opts['max_per_beat']), tonumber(opts['retention_s']),
  tonumber(opts['stream_maxlen'])
local wk = K('@WORKER@' .. worker)
local fields = cjson.decode(ARGV[5])
if fields['emp_instance'] then
  local holder = redis.call('GET', K('@WORKER@' .. worker .. '@INSTANCE_SUFFIX@'))
  if holder and holder ~= fields['emp_instance'] then return redis.error_reply('EMP_INSTANCE ' .. holder) end
  redis.call('SET', K('@WORKER@' .. worker .. '@INSTANCE_SUFFIX@'), fields['emp_instance'], 'EX', tonumber(ARGV[3]))
end
local models_missing = redis.call('HEXISTS', wk, '@MODELS_FIELD@') == 0 and 1 or 0
redis.call('SET', K('@WORKER@' .. worker .. '@HEARTBEAT_SUFFIX@'), at, 'EX', tonumber(ARGV[3]))
redis.call('SADD', K('@WORKERS_ACTIVE@'), worker)
for f, v in pairs(fields) do redis.call('HSET', wk, f, tostring(v)) end
redis.call('HSET', wk, 'worker_id', worker, 'status', ARGV[4], 'last_heartbeat', at)
redis.call('HSETNX', wk, 'connected_at', at)
redis.call('PERSIST', wk)
local totals = redis.call('HGETALL', K('@TOTALS@' .. worker))
if #totals > 0 then
  redis.call('HSET', wk, unpack(totals))  -- counters survive someone deleting the record
  redis.call('EXPIRE', K('@TOTALS@' .. worker), retention)
end
if ARGV[7] ~= '' then set_loaded(worker, cjson.decode(ARGV[7])) end

local renewed, lost = 0, {}
for id, attempt in pairs(cjson.decode(ARGV[6])) do
  local f = redis.pcall('HMGET', K('@JOB@' .. id), 'worker_id', 'status', 'attempt')
  if f['err'] then
    lost[#lost + 1] = id
  elseif f[1] == worker and (f[2] == 'assigned' or f[2] == 'in_progress') and f[3] == tostring(attempt) then
    redis.call('ZADD', K('@LEASES@'), ms + tonumber(opts['lease_ms']), id)
    renewed = renewed + 1
  elseif f[2] == 'pending' and reclaim(K('@JOB@' .. id), worker, tostring(attempt)) then
    renewed = renewed + 1
  else
    lost[#lost + 1] = id
  end
end

local promoted = 0
for _, id in ipairs(redis.call('ZRANGEBYSCORE', K('@DELAYED@'), '-inf', ms, 'LIMIT', 0, limit)) do
  redis.call('ZREM', K('@DELAYED@'), id)
  local f = redis.call('HMGET', K('@JOB@' .. id), 'status', 'emp_pending_score')
  if f[1] == 'pending' then
    make_pending(id, f[2])
    wake_job(id, 0, false)
    promoted = promoted + 1
  end
end

-- Reap one expired lease; true when the job went back to the queue or failed.
local function reap(id)
  redis.call('ZREM', K('@LEASES@'), id)
  local j = hgetall(K('@JOB@' .. id))
  if j['status'] ~= 'assigned' and j['status'] ~= 'in_progress' then return false end
  local holder = j['worker_id'] or ''
  if holder ~= '' then
    redis.call('HDEL', K('@ACTIVE@' .. holder), id)
    redis.call('HSET', K('@WORKER@' .. holder), 'current_job_id', '')
  end
  local count = num_or(j['retry_count'], 0) + 1
  local err = 'lease expired: worker ' .. holder .. ' stopped renewing it'
  if count < num_or(j['max_retries'], 3) then  -- max_retries: attempts in all, as theirs
    redis.call('HSET', K('@JOB@' .. id), 'retry_count', tostring(count), 'error', err,
      'last_failed_worker', holder, 'emp_last_failed_ms', tostring(ms),
      'emp_reaped_from', holder .. '#' .. tostring(j['attempt']))
    requeue(id, j, 0)
    stream_event(id, 'requeued', { reason = err, retry_count = count }, maxlen, retention)
  else
    final_fail(id, j, holder, err, count, retention, maxlen)
  end
  return true
end

local REAPER_STEP = 256  -- ids of each index set the reaper checks per reap period
local reaped = 0
local reaper = redis.call('SET', K('@REAPER_LOCK@'), worker, 'NX', 'PX', tonumber(opts['reap_period_ms']))
if reaper then
  heal_index_keys()
  -- the membership step that claims skip while jobs:pending and emp:indexed are the same size
  local ok, err = pcall(function()
    sweep_pending(REAPER_STEP, retention, maxlen)
    sweep_indexed(REAPER_STEP)
    sweep_classes(REAPER_STEP)
  end)
  if not ok then redis.log(redis.LOG_WARNING, 'emp-worker reaper: reconcile step failed: ' .. printable(err, 300)) end
end
note_away(ms, tonumber(opts['lease_ms']), num_or(opts['away_ms'], 0))
if reaper and reaping_allowed(ms, tonumber(opts['lease_ms'])) then
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', K('@LEASES@'), '-inf', ms, 'LIMIT', 0, limit)) do
    local ok, done = pcall(reap, id)
    if not ok then
      quarantine(id, 'the reaper cannot handle it: ' .. printable(done, 200), 'reaper', retention)
    elseif done then
      reaped = reaped + 1
    end
  end
  for _, w in ipairs(redis.call('SMEMBERS', K('@WORKERS_ACTIVE@'))) do
    if redis.call('EXISTS', K('@WORKER@' .. w .. '@HEARTBEAT_SUFFIX@')) == 0 then
      redis.call('SREM', K('@WORKERS_ACTIVE@'), w)
      set_loaded(w, {})
      redis.call('HSET', K('@WORKER@' .. w), 'status', 'offline', 'current_job_id', '')
      redis.call('EXPIRE', K('@WORKER@' .. w), retention)
    end
  end
end
return {renewed, promoted, table.concat(lost, ','), reaped, models_missing}
