-- requires: clock untrusted
-- Outage-aware leases. Lease deadlines are server times, so while Redis is away (down, restarted,
-- failed over, cut off from the workers) every lease runs out, and the first beat back would
-- reap the jobs of workers that are alive and simply have not beaten yet. So after an outage a
-- grace period of one full lease opens, during which nothing is reaped and no worker is marked
-- offline: every live worker renews first. An outage is seen two ways: the reaper finds a new
-- Redis run_id (a restart or a failover), or a worker's beat says that its own beats failed for
-- over half a lease (a gap in our own heartbeats). A grace period opened by a worker's gap is
-- not opened again within two leases of the last one ending, so that a worker whose beats keep
-- failing cannot hold reaping off for ever. State: the emp:outage hash.
-- provides: open_grace, note_away, reaping_allowed

local function open_grace(ms, lease_ms, why)
  local ok = K('@OUTAGE@')
  redis.call('HSET', ok, 'grace_until_ms', ms + lease_ms, 'last_outage', why, 'last_outage_at', iso(ms))
  redis.call('HINCRBY', ok, 'outages', 1)
  redis.log(redis.LOG_WARNING, 'emp-worker: ' .. why .. '; no lease is reaped for ' .. lease_ms
    .. ' ms so that live workers renew theirs first')
end

-- A beat whose worker was away for away_ms (0: it was not): open a grace period when that gap
-- outlasts half a lease.
local function note_away(ms, lease_ms, away_ms)
  if away_ms <= lease_ms / 2 then return end
  local last = num_or(redis.call('HGET', K('@OUTAGE@'), 'grace_until_ms'), 0)
  if ms >= last + 2 * lease_ms then
    open_grace(ms, lease_ms, 'a worker could not reach Redis for ' .. math.floor(away_ms) .. ' ms')
  end
end

-- The reaper asks before it reaps (fleet-wide at most once per reap period): false while a
-- grace period is open. A new Redis run_id opens one.
local function reaping_allowed(ms, lease_ms)
  local ok = K('@OUTAGE@')
  local run_id = string.match(redis.call('INFO', 'server'), 'run_id:(%w+)') or ''
  local f = redis.call('HMGET', ok, 'run_id', 'grace_until_ms')
  redis.call('HSET', ok, 'run_id', run_id)
  if f[1] and f[1] ~= run_id then
    open_grace(ms, lease_ms, 'Redis restarted or failed over (a new run_id)')
    return false
  end
  return ms >= num_or(f[2], 0)
end
