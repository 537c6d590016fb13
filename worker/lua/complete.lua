-- requires: clock common fence progress_event
-- Complete a held job, exactly once.
-- KEYS: none (every key is the prefix in ARGV[1] plus a name from worker/keys.py).
-- ARGV: 1 prefix, 2 job id, 3 worker id, 4 attempt, 5 result JSON (the connector's output),
--       6 options JSON: retention_s, stream_maxlen, stream_ttl_s, envelope (JSON object: more
--         JobResult fields), progress (the job's last progress report when it was not sent on
--         its own: {progress, message, current_step, total_steps, estimated_completion, data,
--         preview, preview_type}; its event goes out first, as progress.lua would send it).
-- The job's `result` field keeps the connector's output; `jobs:completed` and `complete_job` carry
-- their JobResult envelope {success, data, processing_time_ms, ...}, as their worker writes it.
-- The envelope is spliced as text (cjson would turn the output's [] into {}).
-- Returns {1} or {0, reason}.

local id, worker, attempt = ARGV[2], ARGV[3], ARGV[4]
local jk = K('@JOB@' .. id)
local stale = fence(jk, worker, attempt)
if stale then return {0, stale} end
local opts = cjson.decode(ARGV[6])
local retention, maxlen = tonumber(opts['retention_s']), tonumber(opts['stream_maxlen'])
local ms = now_ms()
if type(opts['progress']) == 'table' then
  progress_event(id, worker, opts['progress'], ms, maxlen, tonumber(opts['stream_ttl_s']))
end
local at = iso(ms)
-- the fields read here (not the whole hash: a job's payload may be large)
local EVENT_FIELDS = { 'workflow_id', 'current_step', 'total_steps', 'workflow_priority', 'workflow_datetime' }
local values = redis.call('HMGET', jk, 'started_at', 'assigned_at', unpack(EVENT_FIELDS))
local j = { started_at = values[1], assigned_at = values[2] }
for i, f in ipairs(EVENT_FIELDS) do j[f] = values[i + 2] end
local started = to_ms(j['started_at']) or to_ms(j['assigned_at']) or ms
redis.call('HSET', jk, 'status', 'completed', 'completed_at', at,
  'processing_time', tostring(ms - started), 'result', ARGV[5])
redis.call('HDEL', K('@ACTIVE@' .. worker), id)
redis.call('ZREM', K('@LEASES@'), id)
local tail = type(opts['envelope']) == 'string' and opts['envelope'] or '{}'
local envelope = '{"success":true,"data":' .. ARGV[5] .. ',"processing_time_ms":' .. tostring(ms - started)
  .. (tail ~= '{}' and (',' .. string.sub(tail, 2)) or '}')
redis.call('HSET', K('@COMPLETED@'), id, '{"success":true,"data":' .. envelope .. ',"completed_at":"' .. at .. '"}')
redis.call('EXPIRE', K('@COMPLETED@'), retention)  -- as their worker does: the hash lives on while written
local wk = K('@WORKER@' .. worker)
redis.call('HSET', wk, 'total_jobs_completed',
  redis.call('HINCRBY', K('@TOTALS@' .. worker), 'total_jobs_completed', 1))
redis.call('HSET', wk, 'status', 'idle', 'current_job_id', '')
redis.call('HSET', K('@JOB@' .. id .. '@PROGRESS_HASH_SUFFIX@'), 'progress', '100',
  'status', 'completed', 'message', 'completed', 'updated_at', at)
redis.call('EXPIRE', jk, retention)
redis.call('EXPIRE', K('@JOB@' .. id .. '@PROGRESS_HASH_SUFFIX@'), retention)
stream_event(id, 'completed', { worker_id = worker, attempt = tonumber(attempt) }, maxlen, retention)
local event = { job_id = id, worker_id = worker, progress = 100, status = 'completed',
  message = 'Job completed successfully', timestamp = ms }
for _, f in ipairs(EVENT_FIELDS) do
  if j[f] and j[f] ~= '' then event[f] = tonumber(j[f]) or j[f] end
end
local encoded = cjson.encode(event)
redis.call('PUBLISH', K('@CH_COMPLETE@'), string.sub(encoded, 1, -2) .. ',"result":' .. envelope .. '}')
return {1}
