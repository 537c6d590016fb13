-- requires: common
-- What a job's start writes besides the job hash (start.lua, and a claim that starts its job):
-- the progress hash's in_progress and the stream's `started` event.
-- provides: started_event

local function started_event(id, worker, attempt, at, maxlen, ttl)
  local pk = K('@JOB@' .. id .. '@PROGRESS_HASH_SUFFIX@')
  redis.call('HSET', pk, 'status', 'in_progress', 'updated_at', at)
  redis.call('EXPIRE', pk, ttl)
  stream_event(id, 'started', { worker_id = worker, attempt = tonumber(attempt) }, maxlen, ttl)
end
