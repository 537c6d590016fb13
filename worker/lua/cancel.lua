-- requires: clock common index
-- Cancel a job: a pending one leaves the queue; a held one is marked cancelled at once (so its
-- holder's later complete/fail is refused by the fence) and its holder is told on cancel_job.
-- KEYS: none (every key is the prefix in ARGV[1] plus a name from worker/keys.py).
-- ARGV: 1 prefix, 2 job id, 3 reason, 4 options JSON: retention_s, stream_maxlen.
-- Returns {1, previous status, holder or ''} or {0, reason}.

local id, reason = ARGV[2], ARGV[3]
local jk = K('@JOB@' .. id)
local j = hgetall(jk)
local status = j['status']
if not status then return {0, 'no job with id ' .. id} end
if status ~= 'pending' and status ~= 'assigned' and status ~= 'in_progress' then
  return {0, 'job is already ' .. status}
end
local ms = now_ms()
local at = iso(ms)
local holder = ''
if status ~= 'pending' then holder = j['worker_id'] or '' end
redis.call('ZREM', K('@PENDING@'), id)
redis.call('ZREM', K('@DELAYED@'), id)
redis.call('ZREM', K('@LEASES@'), id)
unindex_job(id, j['emp_class'], j['emp_member'])
if holder ~= '' then redis.call('HDEL', K('@ACTIVE@' .. holder), id) end
redis.call('HSET', jk, 'status', 'cancelled', 'cancelled_at', at, 'error', reason)
local opts = cjson.decode(ARGV[4])
local retention = tonumber(opts['retention_s'])
redis.call('EXPIRE', jk, retention)
stream_event(id, 'cancelled', { reason = reason, worker_id = holder }, tonumber(opts['stream_maxlen']), retention)
publish('@CH_CANCEL@', { job_id = id, worker_id = holder, reason = reason, timestamp = ms })
return {1, status, holder}
