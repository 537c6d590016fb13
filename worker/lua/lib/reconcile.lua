-- requires: common untrusted index final_fail
-- Reconcile jobs:pending with the class index by membership, a bounded step at a time; the claim
-- script runs a step before each claim, the reconcile script on demand.
-- provides: claimable, sweep_pending, sweep_indexed, reconcile

-- Jobs reach jobs:pending without us (the emp-job-queue API, a script), and leave it without us
-- (their cancel): a pending id must be claimable (in emp:indexed, its entry in its class queue,
-- the class registered) and an indexed id must be pending. Equal sizes of the two sets prove
-- nothing (one stale id hides one new job), so each step checks members: it walks the next
-- `n` ids of each set from a cursor kept in emp:reconcile:cursor, and every worker's claims
-- advance the same cursors, so the whole of both sets is covered every (size / n) claims.

-- Is this pending id claimable as indexed? (false: index it again)
local function claimable(id)
  if redis.call('SISMEMBER', K('@INDEXED@'), id) == 0 then return false end
  local f = redis.pcall('HMGET', K('@JOB@' .. id), 'emp_class', 'emp_member')
  if f['err'] or not f[1] or not f[2] then return false end
  local entry = redis.pcall('ZSCORE', K('@CLASS_QUEUE@' .. f[1]), f[2])
  return type(entry) == 'string' and redis.call('HEXISTS', K('@CLASSES@'), f[1]) == 1
end

-- Index the next n pending ids that are not claimable; returns how many it indexed.
local function sweep_pending(n, retention, maxlen)
  local ck = K('@RECONCILE_CURSOR@')
  local start = math.max(0, math.floor(num_or(redis.call('HGET', ck, 'pending'), 0)))
  local ids = redis.call('ZREVRANGE', K('@PENDING@'), start, start + n - 1)
  redis.call('HSET', ck, 'pending', #ids < n and 0 or start + #ids)
  local added = 0
  for _, id in ipairs(ids) do
    if not claimable(id) then
      if redis.call('SISMEMBER', K('@INDEXED@'), id) == 1 then
        unindex_job(id, nil, nil)  -- its entry or its class is gone: index it afresh
      end
      local r = index_or_fail(id, '', retention, maxlen)
      if r == 'indexed' or r == 'already' then
        added = added + 1
      elseif r == 'skip' then
        redis.call('ZREM', K('@PENDING@'), id)  -- no such job, or not pending: not claimable
      end
    end
  end
  return added
end

-- Drop the next n indexed ids that are no longer pending; returns how many it dropped.
local function sweep_indexed(n)
  local ck = K('@RECONCILE_CURSOR@')
  local page = redis.pcall('SSCAN', K('@INDEXED@'), redis.call('HGET', ck, 'indexed') or '0', 'COUNT', n)
  if page['err'] then page = redis.call('SSCAN', K('@INDEXED@'), '0', 'COUNT', n) end
  redis.call('HSET', ck, 'indexed', page[1])
  local dropped = 0
  for _, id in ipairs(page[2]) do
    if not redis.call('ZSCORE', K('@PENDING@'), id) then
      local f = redis.pcall('HMGET', K('@JOB@' .. id), 'emp_class', 'emp_member')
      if f['err'] then unindex_job(id, nil, nil) else unindex_job(id, f[1], f[2]) end
      dropped = dropped + 1
    end
  end
  return dropped
end

local SMALL_STEP, BIG_STEP = 16, 1000

-- One step: a small one always; a big one while the two sets differ in size, by one worker at a
-- time (a lock, held lock_ms). Returns {indexed, dropped}.
local function reconcile(lock_ms, retention, maxlen)
  local n = SMALL_STEP
  if redis.call('ZCARD', K('@PENDING@')) ~= redis.call('SCARD', K('@INDEXED@'))
    and redis.call('SET', K('@RECONCILE_LOCK@'), '1', 'NX', 'PX', lock_ms) then
    n = BIG_STEP
  end
  return {sweep_pending(n, retention, maxlen), sweep_indexed(n)}
end
