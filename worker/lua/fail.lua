-- requires: clock common index fence final_fail requeue
-- Fail a held job: back to the queue (after a backoff) while retries remain and the failure is
-- retryable, else for good.
-- KEYS: none (every key is the prefix in ARGV[1] plus a name from worker/keys.py).
-- ARGV: 1 prefix, 2 job id, 3 worker id, 4 attempt, 5 error, 6 retryable (1/0), 7 backoff ms,
--       8 options JSON: retention_s, stream_maxlen.
-- Returns {1, 'retry'|'failed'} or {0, reason}.

local id, worker, attempt = ARGV[2], ARGV[3], ARGV[4]
local jk = K('@JOB@' .. id)
local stale = fence(jk, worker, attempt)
if stale then return {0, stale} end
local err, retryable, backoff = ARGV[5], ARGV[6] == '1', tonumber(ARGV[7])
local opts = cjson.decode(ARGV[8])
local retention, maxlen = tonumber(opts['retention_s']), tonumber(opts['stream_maxlen'])
local j = hgetall(jk)
local count = (tonumber(j['retry_count']) or 0) + 1
local max = tonumber(j['max_retries']) or 3
local wk = K('@WORKER@' .. worker)
redis.call('HDEL', K('@ACTIVE@' .. worker), id)
redis.call('ZREM', K('@LEASES@'), id)
redis.call('HSET', wk, 'total_jobs_failed', redis.call('HINCRBY', K('@TOTALS@' .. worker), 'total_jobs_failed', 1))
redis.call('HSET', wk, 'status', 'idle', 'current_job_id', '')
if retryable and count < max then  -- max_retries counts attempts in all, as their worker does
  local ms = now_ms()
  redis.call('HSET', jk, 'retry_count', tostring(count), 'error', err,
    'last_failed_worker', worker, 'emp_last_failed_ms', tostring(ms))
  requeue(id, j, backoff > 0 and ms + backoff or 0)
  stream_event(id, 'retry', { worker_id = worker, error = err, retry_count = count,
    backoff_ms = backoff }, maxlen, retention)
  return {1, 'retry'}
end
final_fail(id, j, worker, err, count, retention, maxlen)
return {1, 'failed'}
