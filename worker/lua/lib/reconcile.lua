-- requires: common index final_fail
-- Reconcile jobs:pending with the class index; the claim script runs it before each claim, the
-- reconcile script on demand.
-- provides: reconcile

-- Index jobs that reached jobs:pending without us (the emp-job-queue API writes it directly) and
-- drop index entries of jobs no longer pending. O(1) when the two sets agree in size; otherwise
-- one worker at a time (a lock) walks them. Returns {indexed, dropped} or {-1} (locked out).
local function reconcile(lock_ms, retention, maxlen)
  local pending = redis.call('ZCARD', K('@PENDING@'))
  if pending == redis.call('SCARD', K('@INDEXED@')) then return {0, 0} end
  if not redis.call('SET', K('@RECONCILE_LOCK@'), '1', 'NX', 'PX', lock_ms) then return {-1} end
  local added, dropped = 0, 0
  for _, id in ipairs(redis.call('ZREVRANGE', K('@PENDING@'), 0, -1)) do
    if redis.call('SISMEMBER', K('@INDEXED@'), id) == 0 then
      local r = index_or_fail(id, '', retention, maxlen)
      if r == 'indexed' or r == 'already' then
        added = added + 1
      elseif string.sub(r, 1, 8) ~= 'invalid:' then
        redis.call('ZREM', K('@PENDING@'), id)  -- no such job, or not pending: not claimable
      end
    end
  end
  for _, id in ipairs(redis.call('SMEMBERS', K('@INDEXED@'))) do
    if not redis.call('ZSCORE', K('@PENDING@'), id) then
      local f = redis.call('HMGET', K('@JOB@' .. id), 'emp_class', 'emp_member')
      unindex_job(id, f[1], f[2])
      dropped = dropped + 1
    end
  end
  return {added, dropped}
end
