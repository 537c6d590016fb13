-- requires: clock common fence progress_event
-- Complete a held job, exactly once (complete.lua, and a claim that completes its worker's last
-- job first). The job's `result` field keeps the connector's output; `jobs:completed` and
-- `complete_job` carry their JobResult envelope {success, data, processing_time_ms, ...}, as
-- their worker writes it. The envelope is spliced as text (cjson would turn the output's [] into {}).
-- provides: complete_job

-- opts: retention_s, stream_maxlen, stream_ttl_s, envelope (JSON object: more JobResult fields),
-- progress (the job's last progress report when it was not sent on its own: {progress, message,
-- current_step, total_steps, estimated_completion, data, preview, preview_type}; its event goes
-- out first, as progress.lua would send it). Returns nil, or why the job is not this worker's.
local function complete_job(id, worker, attempt, result, opts)
  local jk = K('@JOB@' .. id)
  local stale = fence(jk, worker, attempt)
  if stale then return stale end
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
    'processing_time', tostring(ms - started), 'result', result)
  redis.call('HDEL', K('@ACTIVE@' .. worker), id)
  redis.call('ZREM', K('@LEASES@'), id)
  local tail = type(opts['envelope']) == 'string' and opts['envelope'] or '{}'
  local envelope = '{"success":true,"data":' .. result .. ',"processing_time_ms":' .. tostring(ms - started)
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
  return nil
end
