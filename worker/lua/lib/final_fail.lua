-- requires: clock common untrusted index
-- Record a final failure (worker may be '' when the job failed before any worker held it), and
-- index a pending job or fail it for good when it is malformed (quarantine it when it cannot
-- even be read).
-- provides: final_fail, index_or_fail

local function final_fail(id, j, worker, err, retry_count, retention, maxlen)
  retry_count = num_or(retry_count, 0)  -- from an untrusted hash: cjson refuses NaN and inf
  local jk = K('@JOB@' .. id)
  local ms = now_ms()
  local at = iso(ms)
  redis.call('HSET', jk, 'status', 'failed', 'error', err, 'failed_at', at,
    'retry_count', tostring(retry_count))
  if worker ~= '' then redis.call('HSET', jk, 'last_failed_worker', worker) end
  redis.call('ZREM', K('@PENDING@'), id)
  unindex_job(id, j['emp_class'], j['emp_member'])
  redis.call('HSET', K('@FAILED@'), id, cjson.encode({
    error = err, failed_at = at, retry_count = retry_count }))
  redis.call('EXPIRE', K('@FAILED@'), retention)
  redis.call('EXPIRE', jk, retention)
  redis.call('EXPIRE', K('@JOB@' .. id .. '@PROGRESS_HASH_SUFFIX@'), retention)
  stream_event(id, 'failed', { error = err, retry_count = retry_count }, maxlen, retention)
  publish('@CH_FAILED@', { job_id = id, worker_id = worker, status = 'failed', error = err,
    failed_at = at, retry_count = retry_count, can_retry = false, timestamp = ms })
end

-- Index a pending job; one that is malformed fails for good, one that cannot be read is
-- quarantined. Returns index_job's verdict.
local function index_or_fail(id, worker, retention, maxlen)
  local r = index_job(id)
  if string.sub(r, 1, 8) == 'invalid:' then
    local j = hgetall(K('@JOB@' .. id))
    final_fail(id, j, worker, 'invalid job: ' .. string.sub(r, 9), j['retry_count'], retention, maxlen)
  elseif string.sub(r, 1, 11) == 'unreadable:' then
    quarantine(id, string.sub(r, 12), 'index', retention)
  end
  return r
end
