-- requires: clock common untrusted index
-- Fencing check shared by progress, complete, fail and hand-back: is the job still held by this
-- worker at this attempt? Returns nil when it is, else the reason it is not.
-- A job the reaper took from this worker at this attempt (its lease ran out while Redis, or the
-- worker's link to it, was away) and that nobody has claimed since is taken back first: its
-- worker is alive, and the work it did stands (reclaim; the heartbeat's renewal uses it too).
-- provides: reclaim, fence

-- Take back a job reaped from `worker` at `attempt` that is still pending; true when it was.
local function reclaim(jk, worker, attempt)
  local f = redis.pcall('HMGET', jk, 'status', 'emp_reaped_from', 'attempt', 'retry_count', 'emp_class',
    'emp_member', 'emp_lease_ms', 'started_at')
  if f['err'] or f[1] ~= 'pending' or f[2] ~= worker .. '#' .. attempt or f[3] ~= attempt then return false end
  local id = string.sub(jk, #K('@JOB@') + 1)
  redis.call('ZREM', K('@PENDING@'), id)
  redis.call('ZREM', K('@DELAYED@'), id)
  unindex_job(id, f[5], f[6])
  local ms = now_ms()
  -- the reap spent an attempt that was not lost after all
  redis.call('HSET', jk, 'status', f[8] and 'in_progress' or 'assigned', 'worker_id', worker,
    'retry_count', tostring(math.max(0, num_or(f[4], 1) - 1)), 'error', '')
  redis.call('HDEL', jk, 'emp_reaped_from')
  redis.call('ZADD', K('@LEASES@'), ms + num_or(f[7], 8000), id)
  redis.call('HSET', K('@ACTIVE@' .. worker), id, cjson.encode(hgetall(jk)))
  stream_event(id, 'reclaimed', { worker_id = worker, attempt = tonumber(attempt) }, 1000, 7 * 86400)
  return true
end

local function fence(jk, worker, attempt)
  local f = redis.pcall('HMGET', jk, 'status', 'worker_id', 'attempt')
  if f['err'] then return 'the job key is not a hash' end
  if not f[1] then return 'job no longer exists' end
  if f[1] == 'pending' and reclaim(jk, worker, attempt) then return nil end
  if f[1] ~= 'assigned' and f[1] ~= 'in_progress' then return 'job is ' .. f[1] end
  if f[2] ~= worker then return 'job is held by ' .. tostring(f[2]) end
  if f[3] ~= attempt then return 'job attempt is ' .. tostring(f[3]) .. ', not ' .. attempt end
  return nil
end
