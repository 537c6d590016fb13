-- requires: clock common fence progress_event
-- Record progress of a held job.
-- KEYS: none (every key is the prefix in ARGV[1] plus a name from worker/keys.py).
-- ARGV: 1 prefix, 2 job id, 3 worker id, 4 attempt, 5 progress (0-100), 6 message,
--       7 current step ('' if unknown), 8 total steps ('' if unknown),
--       9 estimated completion ISO ('' if unknown),
--       10 extra JSON ('' if none): {data = connector detail, preview = base64 image, preview_type}
--          (the detail goes to the stream and the channel; a preview only to the stream),
--       11 options JSON: stream_maxlen, stream_ttl_s.
-- Returns {1} or {0, reason}.

local id, worker, attempt = ARGV[2], ARGV[3], ARGV[4]
local jk = K('@JOB@' .. id)
local stale = fence(jk, worker, attempt)
if stale then return {0, stale} end
local ms = now_ms()
local at = iso(ms)
local progress = tonumber(ARGV[5])
local opts = cjson.decode(ARGV[11])
local maxlen, ttl = tonumber(opts['stream_maxlen']), tonumber(opts['stream_ttl_s'])
if redis.call('HGET', jk, 'status') == 'assigned' then
  redis.call('HSET', jk, 'status', 'in_progress', 'started_at', at)
  redis.call('HSET', K('@WORKER@' .. worker), 'status', 'busy', 'current_job_id', id)
end
redis.call('HSET', K('@JOB@' .. id .. '@PROGRESS_HASH_SUFFIX@'), 'progress', ARGV[5],
  'status', 'in_progress', 'message', ARGV[6], 'updated_at', at)
redis.call('EXPIRE', K('@JOB@' .. id .. '@PROGRESS_HASH_SUFFIX@'), ttl)
local extra = ARGV[10] ~= '' and cjson.decode(ARGV[10]) or {}
progress_event(id, worker, { progress = progress, message = ARGV[6], current_step = ARGV[7],
  total_steps = ARGV[8], estimated_completion = ARGV[9], data = extra['data'], preview = extra['preview'],
  preview_type = extra['preview_type'] }, ms, maxlen, ttl)
return {1}
