-- requires: clock common fence started
-- Mark a held job started: its connector has it now. As their worker does, `in_progress` and
-- `started_at` are written here, not at the first progress report (their processing time counts
-- from it). The job's stream gets a `started` event.
-- KEYS: none (every key is the prefix in ARGV[1] plus a name from worker/keys.py).
-- ARGV: 1 prefix, 2 job id, 3 worker id, 4 attempt, 5 options JSON: stream_maxlen, stream_ttl_s.
-- Returns {1} or {0, reason}.

local id, worker, attempt = ARGV[2], ARGV[3], ARGV[4]
local jk = K('@JOB@' .. id)
local stale = fence(jk, worker, attempt)
if stale then return {0, stale} end
local opts = cjson.decode(ARGV[5])
local at = iso(now_ms())
if redis.call('HGET', jk, 'status') == 'assigned' then
  redis.call('HSET', jk, 'status', 'in_progress', 'started_at', at)
end
redis.call('HSET', K('@WORKER@' .. worker), 'status', 'busy', 'current_job_id', id)
started_event(id, worker, attempt, at, tonumber(opts['stream_maxlen']), tonumber(opts['stream_ttl_s']))
return {1}
