-- requires:
-- Fencing check shared by progress, complete, fail and hand-back: is the job still held by this
-- worker at this attempt? Returns nil when it is, else the reason it is not.
-- provides: fence

local function fence(jk, worker, attempt)
  local f = redis.call('HMGET', jk, 'status', 'worker_id', 'attempt')
  if not f[1] then return 'job no longer exists' end
  if f[1] ~= 'assigned' and f[1] ~= 'in_progress' then return 'job is ' .. f[1] end
  if f[2] ~= worker then return 'job is held by ' .. tostring(f[2]) end
  if f[3] ~= attempt then return 'job attempt is ' .. tostring(f[3]) .. ', not ' .. attempt end
  return nil
end
