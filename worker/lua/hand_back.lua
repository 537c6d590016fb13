-- requires: common index fence requeue
-- Give a held job back to the queue without spending an attempt (graceful drain).
-- KEYS: none (every key is the prefix in ARGV[1] plus a name from worker/keys.py).
-- ARGV: 1 prefix, 2 job id, 3 worker id, 4 attempt, 5 reason,
--       6 options JSON: stream_maxlen, stream_ttl_s.
-- Returns {1} or {0, reason}.

local id, worker, attempt = ARGV[2], ARGV[3], ARGV[4]
local jk = K('@JOB@' .. id)
local stale = fence(jk, worker, attempt)
if stale then return {0, stale} end
local j = hgetall(jk)
redis.call('HDEL', K('@ACTIVE@' .. worker), id)
redis.call('HSET', K('@WORKER@' .. worker), 'current_job_id', '')
-- retry_count is untouched: a hand-back spends no attempt. (The fencing token `attempt` still
-- moves on at the next claim, so this worker's stale calls stay refused.)
requeue(id, j, 0)
local opts = cjson.decode(ARGV[6])
stream_event(id, 'handed_back', { worker_id = worker, reason = ARGV[5] },
  tonumber(opts['stream_maxlen']), tonumber(opts['stream_ttl_s']))
return {1}
