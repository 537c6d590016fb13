-- requires: common
-- Wake tokens: an idle worker waits on its services' lists with BLPOP, and Redis hands each token
-- pushed there to exactly one waiting worker (the one waiting longest), so a job wakes one worker,
-- not every idle worker of its service. A token is '{hops}:{job id}'; a worker that cannot take
-- the job passes the token on with one hop more (the claim script does), up to MAX_WAKE_HOPS.
-- A list is kept to WAKE_LIST_MAX tokens (newest first): with nobody waiting, tokens pile up
-- only that far, and a worker that comes back idle wastes at most that many claims on them.
-- provides: push_token, wake_job, wake_new

local MAX_WAKE_HOPS = 16
local WAKE_LIST_MAX = 64
local WOKEN_MS = 60000

local function push_token(service, hops, id)
  if type(service) ~= 'string' or service == '' or #service > 128 then return false end
  local lk = K('@WAKE_LIST@' .. service)
  local pushed = redis.pcall('LPUSH', lk, hops .. ':' .. id)
  if type(pushed) == 'table' and pushed['err'] then
    redis.call('DEL', lk)  -- not a list any more: replace it
    redis.call('LPUSH', lk, hops .. ':' .. id)
  end
  redis.call('LTRIM', lk, 0, WAKE_LIST_MAX - 1)
  return true
end

-- Wake one worker for a pending job; `dedupe`: at most one token per job per WOKEN_MS however
-- many relays ask (true when a token was pushed).
local function wake_job(id, hops, dedupe)
  local f = redis.pcall('HMGET', K('@JOB@' .. id), 'status', 'service_required')
  if f['err'] or f[1] ~= 'pending' or not redis.call('ZSCORE', K('@PENDING@'), id) then return false end
  if dedupe and not redis.call('SET', K('@WOKEN@' .. id), '1', 'NX', 'PX', WOKEN_MS) then return false end
  return push_token(f[2], hops, id)
end

-- Wake one worker for a job just submitted here (marked woken: a relay's job_submitted adds none).
local function wake_new(id, service)
  redis.call('SET', K('@WOKEN@' .. id), '1', 'PX', WOKEN_MS)
  return push_token(service, 0, id)
end
