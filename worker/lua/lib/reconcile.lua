-- requires: common untrusted index final_fail
-- Reconcile jobs:pending with the class index by membership, a bounded step at a time: a claim
-- runs a step while the two sets differ in size, the reaper (one worker fleet-wide, once per reap
-- period) a step of REAPER_STEP ids whatever the sizes, the reconcile script on demand.
-- provides: claimable, sweep_pending, next_page, sweep_indexed, sweep_classes, reconcile

-- Jobs reach jobs:pending without us (the emp-job-queue API, a script), and leave it without us
-- (their cancel): a pending id must be claimable (in emp:indexed, its entry in its class queue,
-- the class registered) and an indexed id must be pending. Equal sizes of the two sets prove
-- nothing (one stale id hides one new job), so each step checks members: it walks the next
-- `n` ids of each set from a cursor kept in emp:reconcile:cursor, and every step advances the
-- same cursors, so the whole of both sets is covered every (size / n) steps.

-- Is this pending id claimable as indexed? (false: index it again)
local function claimable(id)
  if redis.call('SISMEMBER', K('@INDEXED@'), id) == 0 then return false end
  local f = redis.pcall('HMGET', K('@JOB@' .. id), 'emp_class', 'emp_member', 'service_required')
  if f['err'] or not f[1] or not f[2] or not f[3] then return false end
  local entry = redis.pcall('ZSCORE', K('@CLASS_QUEUE@' .. f[1]), f[2])
  local registered = redis.pcall('HEXISTS', K('@CLASSES_OF@' .. f[3]), f[1])
  return type(entry) == 'string' and registered == 1
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

-- The next page of an SSCAN / HSCAN of `key` from the cursor kept in emp:reconcile:cursor under
-- `field` (a cursor Redis refuses starts again at 0); the cursor moves on.
local function next_page(command, key, field, n)
  local ck = K('@RECONCILE_CURSOR@')
  local page = redis.pcall(command, key, redis.call('HGET', ck, field) or '0', 'COUNT', n)
  if page['err'] then page = redis.call(command, key, '0', 'COUNT', n) end
  redis.call('HSET', ck, field, page[1])
  return page[2]
end

-- Drop the next n indexed ids that are no longer pending; returns how many it dropped.
local function sweep_indexed(n)
  local dropped = 0
  for _, id in ipairs(next_page('SSCAN', K('@INDEXED@'), 'indexed', n)) do
    if not redis.call('ZSCORE', K('@PENDING@'), id) then
      local f = redis.pcall('HMGET', K('@JOB@' .. id), 'emp_class', 'emp_member')
      if f['err'] then unindex_job(id, nil, nil) else unindex_job(id, f[1], f[2]) end
      dropped = dropped + 1
    end
  end
  return dropped
end

-- Drop the next n emp:classes entries that are garbage or whose queue is gone; returns how many.
-- (Claims keep the per-service hashes, emp:classes:{service}; this all-classes view is read by
-- status and rebuilt by indexing, which registers a class whenever a job of it enters.)
local function sweep_classes(n)
  local entries = next_page('HSCAN', K('@CLASSES@'), 'classes', n)
  local dropped = 0
  for i = 1, #entries, 2 do
    local class, meta = entries[i], decode(entries[i + 1])
    if type(meta) ~= 'table' or type(meta['service']) ~= 'string'
      or redis.call('EXISTS', K('@CLASS_QUEUE@' .. class)) == 0 then
      redis.call('HDEL', K('@CLASSES@'), class)
      dropped = dropped + 1
    end
  end
  return dropped
end

local SMALL_STEP, BIG_STEP = 16, 1000

-- One step: a small one, or a big one while the two sets differ in size, by one worker at a
-- time (a lock, held lock_ms). `when_apart`: only while they differ (a claim's step: equal sizes
-- are the steady state, and the reaper's steps find what they may hide). Returns {indexed, dropped}.
local function reconcile(lock_ms, retention, maxlen, when_apart)
  local apart = redis.call('ZCARD', K('@PENDING@')) ~= redis.call('SCARD', K('@INDEXED@'))
  if when_apart and not apart then return {0, 0} end
  local n = SMALL_STEP
  if apart and redis.call('SET', K('@RECONCILE_LOCK@'), '1', 'NX', 'PX', lock_ms) then
    n = BIG_STEP
  end
  return {sweep_pending(n, retention, maxlen), sweep_indexed(n)}
end
