"""Every Lua script emp-worker runs in Redis, each one atomic.

Conventions, shared by all scripts:

* ``ARGV[1]`` is the key prefix (``Keys.prefix``); every key is that prefix plus a name from
  ``worker/keys.py``, substituted here for the ``@NAME@`` tokens. A claim picks its job *inside*
  the script, so per-job keys cannot be declared in ``KEYS`` ahead of time; the scripts therefore
  take no ``KEYS`` at all and derive every key from the prefix. (emp-job-queue's layout has no hash
  tags, so it cannot span Redis Cluster slots in any case; a Cluster deployment runs one shard.)
* Time comes from the server (``TIME``), so leases, ages and timestamps share one clock however
  skewed the workers' clocks are. Timestamps are written ISO-8601 UTC with milliseconds.
* Scripts are effect-replicated (the default from Redis 5), so ``TIME`` before writes is safe on
  Redis 6.2+, 7.x and Valkey.
* A fenced call (progress, complete, fail, hand-back) passes the worker id and attempt number it
  claimed with; the script refuses it with ``{0, reason}`` when either no longer matches.

Pending-job index. ``jobs:pending`` stays the emp-job-queue view (their API and monitor read it,
their API writes it). Claims are served from ``emp:q:{class}`` sorted sets, one per
(service, requirements, customer) class: score ``-effective_priority``, member
``{effective_ms:013}:{seq:012}:{job id}``, so ``ZRANGE 0 0`` yields the highest priority and,
within it, the oldest job, exactly (no float buckets). A claim inspects one head per class instead
of scanning jobs. Jobs written by the emp-job-queue API are indexed on ``job_submitted`` (the
claim's hint) and by ``RECONCILE``.
"""

from __future__ import annotations

from worker import keys

# --- shared Lua functions --------------------------------------------------------------------------

_COMMON = r"""
local P = ARGV[1]
local function K(name) return P .. name end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Microseconds since the epoch, as an exact decimal string (pickup latency is sub-millisecond).
local function now_us()
  local t = redis.call('TIME')
  return t[1] .. string.format('%06d', tonumber(t[2]))
end

-- Milliseconds since the epoch -> '2026-01-02T03:04:05.678Z' (civil-from-days, proleptic UTC).
local function iso(ms)
  local s = math.floor(ms / 1000)
  local frac = ms - s * 1000
  local days = math.floor(s / 86400)
  local sod = s - days * 86400
  local z = days + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
    - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local d = doy - math.floor((153 * mp + 2) / 5) + 1
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  return string.format('%04d-%02d-%02dT%02d:%02d:%02d.%03dZ', y, m, d,
    math.floor(sod / 3600), math.floor((sod % 3600) / 60), sod % 60, frac)
end

-- ISO-8601 (UTC assumed), epoch ms, or 'sec.usec' -> epoch ms; nil when unreadable.
local function to_ms(v)
  if not v or v == '' then return nil end
  local n = tonumber(v)
  if n then
    if n < 1e11 then return math.floor(n * 1000) end
    return math.floor(n)
  end
  local y, mo, d, h, mi, s, f = string.match(v,
    '^(%d%d%d%d)%-(%d%d)%-(%d%d)[T ](%d%d):(%d%d):(%d%d)%.?(%d*)')
  if not y then return nil end
  y = tonumber(y); mo = tonumber(mo)
  if mo <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local doy = math.floor((153 * ((mo + 9) % 12) + 2) / 5) + tonumber(d) - 1
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  local days = era * 146097 + doe - 719468
  local ms = (((days * 24 + tonumber(h)) * 60 + tonumber(mi)) * 60 + tonumber(s)) * 1000
  if f ~= '' then ms = ms + math.floor(tonumber('0.' .. f) * 1000) end
  return ms
end

local function hgetall(key)
  local flat = redis.call('HGETALL', key)
  local t = {}
  for i = 1, #flat, 2 do t[flat[i]] = flat[i + 1] end
  return t
end

local function decode(s)
  if not s or s == '' then return nil end
  local ok, v = pcall(cjson.decode, s)
  if ok then return v end
  return nil
end

-- Append a lifecycle/progress event to the job's stream, bounded and expiring.
local function stream_event(id, event, data, maxlen, ttl)
  local sk = K('@PROGRESS_STREAM@' .. id)
  redis.call('XADD', sk, 'MAXLEN', '~', maxlen, '*', 'event', event, 'data', cjson.encode(data))
  redis.call('EXPIRE', sk, ttl)
end

local function publish(channel, data)
  redis.call('PUBLISH', K(channel), cjson.encode(data))
end
"""

# Index a pending job into its class queue. Returns 'indexed', 'already', 'skip' or 'invalid:<why>'.
# Needs _COMMON.
_INDEX = r"""
local MAX_SERVICE_LEN = 128
local MAX_REQUIREMENTS_LEN = 16384

local function check_job(j)
  local svc = j['service_required']
  if not svc or svc == '' then return 'service_required is missing' end
  if #svc > MAX_SERVICE_LEN then return 'service_required is longer than 128 characters' end
  if j['priority'] and j['priority'] ~= '' and not tonumber(j['priority']) then
    -- echo untrusted input only as printable ASCII
    return 'priority is not a number: ' .. string.gsub(string.sub(j['priority'], 1, 40), '[^ -~]', '?')
  end
  local req = j['requirements']
  if req and req ~= '' then
    if #req > MAX_REQUIREMENTS_LEN then return 'requirements is larger than 16384 bytes' end
    if type(decode(req)) ~= 'table' then return 'requirements is not a JSON object' end
  end
  return nil
end

local INDEX_FIELDS = { 'status', 'service_required', 'priority', 'requirements', 'customer_id',
  'created_at', 'workflow_priority', 'workflow_datetime', 'emp_member', 'emp_class', 'emp_score',
  'workflow_id' }

local function index_job(id)
  local jk = K('@JOB@' .. id)
  local values = redis.call('HMGET', jk, unpack(INDEX_FIELDS))
  local j = {}
  for i, name in ipairs(INDEX_FIELDS) do
    if values[i] then j[name] = values[i] end
  end
  if j['status'] ~= 'pending' then return 'skip' end
  local pscore = redis.call('ZSCORE', K('@PENDING@'), id)
  if not pscore then return 'skip' end
  local req = j['requirements'] or ''
  local cust = j['customer_id'] or ''
  -- a class leaves emp:classes when its queue empties; (re)register it whenever a job enters
  local function register(class)
    redis.call('HSETNX', K('@CLASSES@'), class, cjson.encode({
      service = j['service_required'], requirements = req, customer_id = cust }))
  end
  -- a job of a workflow is also queued by workflow, for workers restricted to one workflow
  local function enqueue(class, score, member)
    redis.call('ZADD', K('@CLASS_QUEUE@' .. class), score, member)
    local wf = j['workflow_id']
    if wf and wf ~= '' then redis.call('ZADD', K('@WF_QUEUE@' .. wf), score, member) end
    if redis.call('SADD', K('@INDEXED@'), id) == 1 then  -- claimable from now (model affinity's clock)
      redis.call('HSET', jk, 'emp_indexed_ms', tostring(now_ms()))
    end
  end
  if j['emp_member'] and j['emp_class'] then
    register(j['emp_class'])
    enqueue(j['emp_class'], j['emp_score'], j['emp_member'])
    return 'already'
  end
  local bad = check_job(j)
  if bad then return 'invalid:' .. bad end
  local prio = tonumber(j['workflow_priority']) or tonumber(j['priority']) or 50
  local eff = to_ms(j['workflow_datetime']) or to_ms(j['created_at']) or now_ms()
  local seq = redis.call('INCR', K('@SEQ@'))
  local member = string.format('%013.0f:%012.0f:%s', eff, seq, id)
  local class = redis.sha1hex(j['service_required'] .. '\n' .. req .. '\n' .. cust)
  register(class)
  redis.call('HSET', jk, 'emp_member', member, 'emp_class', class, 'emp_score', tostring(-prio),
    'emp_pending_score', pscore)
  enqueue(class, -prio, member)
  return 'indexed'
end

-- Make a pending job claimable again: back in jobs:pending at its old score, and indexed.
local function make_pending(id, pending_score)
  redis.call('ZADD', K('@PENDING@'), pending_score or '0', id)
  return index_job(id)
end

local function unindex_job(id, class, member)
  if class and member then
    redis.call('ZREM', K('@CLASS_QUEUE@' .. class), member)
    local wf = redis.call('HGET', K('@JOB@' .. id), 'workflow_id')
    if wf and wf ~= '' then redis.call('ZREM', K('@WF_QUEUE@' .. wf), member) end
  end
  redis.call('SREM', K('@INDEXED@'), id)
end
"""

# Record a final failure. Needs _COMMON and _INDEX. `worker` may be '' (failed before any worker held it).
_FINAL_FAIL = r"""
local function final_fail(id, j, worker, err, retry_count, retention, maxlen)
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

-- Index a pending job; one that is malformed fails for good. Returns index_job's verdict.
local function index_or_fail(id, worker, retention, maxlen)
  local r = index_job(id)
  if string.sub(r, 1, 8) == 'invalid:' then
    local j = hgetall(K('@JOB@' .. id))
    final_fail(id, j, worker, 'invalid job: ' .. string.sub(r, 9), tonumber(j['retry_count']) or 0,
      retention, maxlen)
  end
  return r
end
"""

# The loaded-model registry: emp:loaded:{model} -> workers holding it in GPU memory; the worker
# hash's emp_loaded field keeps the worker's own list so a change can be applied as a diff.
_LOADED = r"""
local function set_loaded(w, models)
  local wk = K('@WORKER@' .. w)
  local old = decode(redis.call('HGET', wk, 'emp_loaded'))
  local keep = {}
  for _, m in ipairs(models) do keep[m] = true end
  if type(old) == 'table' then
    for _, m in ipairs(old) do
      if not keep[m] then redis.call('SREM', K('@LOADED@' .. m), w) end
    end
  end
  for _, m in ipairs(models) do redis.call('SADD', K('@LOADED@' .. m), w) end
  redis.call('HSET', wk, 'emp_loaded', cjson.encode(models))
end
"""

# Capability matching, the Lua mirror of worker/matching.py (keep the two in step).
_MATCH = r"""
local JOB_ONLY_KEYS = { timeout_minutes = true, quality_level = true, priority = true,
  max_retries = true, estimated_duration = true, description = true, timeout = true,
  timeout_seconds = true, retries = true, tags = true }
local HARDWARE_MIN = { 'gpu_memory_gb', 'cpu_cores', 'ram_gb' }

-- Values compare only as JSON scalars (tables compare by identity in Lua, so never equal here).
local function same(a, b)
  if type(a) == 'table' or type(b) == 'table' then return false end
  return a == b
end

local function contains(list, value)
  if type(list) ~= 'table' then return false end
  for _, v in ipairs(list) do if same(v, value) then return true end end
  return false
end

-- A JSON object (not an array): a table with keys but no array part.
local function is_object(t)
  return type(t) == 'table' and #t == 0 and next(t) ~= nil
end

-- A number, or a string of decimal digits (no hex, no exponent), as worker/matching.py reads it.
local function num(v)
  if type(v) == 'number' then return v end
  if type(v) == 'string' and (string.match(v, '^%s*[-+]?%d+%.?%d*%s*$')
    or string.match(v, '^%s*[-+]?%.%d+%s*$')) then
    return tonumber(v)
  end
  return nil
end

local function has_model(caps, service, model)
  local models = caps['models']
  if type(models) ~= 'table' then return false end
  if contains(models[service], model) then return true end
  for _, list in pairs(models) do if contains(list, model) then return true end end
  return false
end

-- Does the worker value satisfy a custom requirement? list contains / number >= / equality.
local function custom_ok(have, want)
  if have == nil or have == cjson.null or is_object(have) or is_object(want) then return false end
  if type(want) == 'table' then
    for _, w in ipairs(want) do
      if type(have) == 'table' then
        if not contains(have, w) then return false end
      elseif not same(have, w) then return false end
    end
    return true
  end
  if type(have) == 'table' then return contains(have, want) end
  if type(want) == 'number' and type(have) == 'number' then return have >= want end
  return same(have, want)
end

local function customer_ok(caps, isolation, customer)
  local access = caps['customer_access']
  if type(access) ~= 'table' then access = {} end
  if customer ~= '' and contains(access['denied_customers'], customer) then return false end
  local wiso = access['isolation'] or 'none'
  if wiso == 'strict' and not contains(access['allowed_customers'], customer) then return false end
  if isolation == 'strict' then
    return wiso == 'strict' and contains(access['allowed_customers'], customer)
  end
  return true
end

local function positive_ok(caps, service, pos)
  local hw = pos['hardware']
  if type(hw) == 'table' then
    local have = caps['hardware'] or {}
    for _, key in ipairs(HARDWARE_MIN) do
      local want = num(hw[key])
      if want and want > (num(have[key]) or 0) then return false end
    end
    if type(hw['gpu_model']) == 'string' and hw['gpu_model'] ~= ''
      and string.lower(hw['gpu_model']) ~= string.lower(tostring(have['gpu_model'] or '')) then
      return false
    end
  end
  if type(pos['models']) == 'table' then
    for _, m in ipairs(pos['models']) do
      if not has_model(caps, service, m) then return false end
    end
  end
  if type(pos['service_type']) == 'string' and not contains(caps['services'], pos['service_type']) then
    return false
  end
  local custom = caps['custom'] or {}
  for key, want in pairs(pos) do
    if key ~= 'hardware' and key ~= 'models' and key ~= 'customer_isolation'
      and key ~= 'service_type' and not JOB_ONLY_KEYS[key] and want ~= cjson.null then
      if not custom_ok(custom[key], want) then return false end
    end
  end
  return true
end

local function negative_ok(caps, service, neg)
  if type(neg['models']) == 'table' then
    for _, m in ipairs(neg['models']) do
      if has_model(caps, service, m) then return false end
    end
  end
  local custom = caps['custom'] or {}
  for key, unwanted in pairs(neg) do
    if key ~= 'models' and key ~= 'hardware' and not JOB_ONLY_KEYS[key]
      and custom[key] ~= nil and custom_ok(custom[key], unwanted) then
      return false
    end
  end
  return true
end

local function matches(caps, meta)
  local service = meta['service']
  if not contains(caps['services'], service) then return false end
  local only = caps['workflow_id']
  if type(only) == 'string' and only ~= '' and meta['workflow_id'] ~= only then return false end
  local req = {}
  if meta['requirements'] and meta['requirements'] ~= '' then
    req = decode(meta['requirements'])
    if type(req) ~= 'table' then return false end
  end
  local pos, neg = req, {}
  if req['positive_requirements'] ~= nil or req['negative_requirements'] ~= nil then
    pos = type(req['positive_requirements']) == 'table' and req['positive_requirements'] or {}
    neg = type(req['negative_requirements']) == 'table' and req['negative_requirements'] or {}
  end
  local iso_req = pos['customer_isolation'] or req['customer_isolation'] or 'none'
  if not customer_ok(caps, iso_req, meta['customer_id'] or '') then return false end
  return positive_ok(caps, service, pos) and negative_ok(caps, service, neg)
end
"""


def _render(*parts: str) -> str:
    source = "\n".join(parts)
    for name, value in keys.LUA_NAMES.items():
        source = source.replace(f"@{name}@", value)
    if "@" in source.replace("'@'", ""):
        unknown = source[source.index("@") : source.index("@") + 40]
        raise RuntimeError(f"unsubstituted name in Lua source near {unknown!r}")
    return source


# --- scripts -----------------------------------------------------------------------------------------

SUBMIT = _render(
    _COMMON,
    _INDEX,
    r"""
-- Submit a job the way emp-job-queue's API does, and index it in the same step.
-- ARGV: 1 prefix, 2 job id, 3 emp-job-queue score for jobs:pending, 4 JSON object of job fields.
-- created_at is stamped from the server clock when the caller leaves it out.
-- Returns {1, created_at} or {0, reason}.
local id = ARGV[2]
local jk = K('@JOB@' .. id)
if redis.call('EXISTS', jk) == 1 then return {0, 'a job with id ' .. id .. ' already exists'} end
local fields = cjson.decode(ARGV[4])
local ms = now_ms()
if not fields['created_at'] or fields['created_at'] == '' then fields['created_at'] = iso(ms) end
local flat = {}
for f, v in pairs(fields) do flat[#flat + 1] = f; flat[#flat + 1] = tostring(v) end
redis.call('HSET', jk, 'id', id, 'status', 'pending', 'emp_submitted_us', now_us(), unpack(flat))
redis.call('ZADD', K('@PENDING@'), ARGV[3], id)
local r = index_job(id)
if string.sub(r, 1, 8) == 'invalid:' then
  redis.call('DEL', jk)
  redis.call('ZREM', K('@PENDING@'), id)
  return {0, 'invalid job: ' .. string.sub(r, 9)}
end
publish('@CH_JOB_SUBMITTED@', { job_id = id, service_required = fields['service_required'],
  priority = tonumber(fields['priority']) or 50, customer_id = fields['customer_id'],
  timestamp = ms })
return {1, fields['created_at']}
""",
)

_RECONCILE_FN = r"""
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
"""

CLAIM = _render(
    _COMMON,
    _INDEX,
    _FINAL_FAIL,
    _RECONCILE_FN,
    _MATCH,
    r"""
-- Claim the best job this worker can run.
-- ARGV: 1 prefix, 2 worker id, 3 capabilities JSON (see worker/matching.py), 4 lease ms,
--       5 hint job id ('' for none: a job_submitted id to index first), 6 stream maxlen,
--       7 stream ttl s, 8 retention s (for jobs failed here as invalid),
--       9 retry exclusion ms (skip jobs this worker failed that recently), 10 reconcile lock ms,
--       11 model affinity window ms (0: off).
-- Returns {} when nothing matches, {-1, ms} when a job was left to a worker that has its models
-- loaded (claim again after ms), else {attempt, field, value, field, value, ...} of the job.
local worker = ARGV[2]
local caps = cjson.decode(ARGV[3])
local lease_ms = tonumber(ARGV[4])
local maxlen, ttl, retention = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local exclude_ms = tonumber(ARGV[9])
local now = now_ms()

if ARGV[5] ~= '' then index_or_fail(ARGV[5], worker, retention, maxlen) end
reconcile(tonumber(ARGV[10]), retention, maxlen)

local affinity_ms = tonumber(ARGV[11])
local MAX_AFFINITY_MODELS = 16
local only_workflow = type(caps['workflow_id']) == 'string' and caps['workflow_id'] or ''
local loaded = {}
if type(caps['loaded']) == 'table' then
  for _, m in ipairs(caps['loaded']) do loaded[m] = true end
end
local function id_of(member) return string.match(member, '^[^:]*:[^:]*:(.*)$') end

-- The models a class's jobs ask for (positive requirements), as strings.
local function wanted_models(meta)
  local req = decode(meta['requirements'])
  if type(req) ~= 'table' then return {} end
  local pos = req
  if req['positive_requirements'] ~= nil or req['negative_requirements'] ~= nil then
    pos = req['positive_requirements']
  end
  local out, seen = {}, {}
  if type(pos) == 'table' and type(pos['models']) == 'table' then
    for _, m in ipairs(pos['models']) do
      if type(m) == 'string' and not seen[m] then
        seen[m] = true
        out[#out + 1] = m
      end
    end
  end
  if #out > MAX_AFFINITY_MODELS then return {} end  -- untrusted: bound the work affinity does
  return out
end

local function all_loaded_here(models)
  if #models == 0 then return false end
  for _, m in ipairs(models) do
    if not loaded[m] then return false end
  end
  return true
end

-- Is another live worker with a free slot, able to run this class, holding all its models?
-- (A sample of at most 32 holders of the first model is looked at.)
local function idle_holder_elsewhere(models, meta)
  for _, w in ipairs(redis.call('SRANDMEMBER', K('@LOADED@' .. models[1]), 32)) do
    local holds = w ~= worker
    for i = 2, #models do
      if holds and redis.call('SISMEMBER', K('@LOADED@' .. models[i]), w) == 0 then holds = false end
    end
    if holds and redis.call('EXISTS', K('@WORKER@' .. w .. '@HEARTBEAT_SUFFIX@')) == 1 then
      local f = redis.call('HMGET', K('@WORKER@' .. w), 'status', 'max_concurrent_jobs', 'emp_caps')
      if f[1] ~= 'draining' and f[1] ~= 'offline'
        and redis.call('HLEN', K('@ACTIVE@' .. w)) < (tonumber(f[2]) or 1) then
        local other = decode(f[3])
        if type(other) == 'table' and matches(other, meta) then return true end
      end
    end
  end
  return false
end

-- Check one queued entry: drop it when stale; nil when this worker must leave it alone.
local function usable(id, class, member)
  local f = redis.call('HMGET', K('@JOB@' .. id), 'last_failed_worker', 'emp_last_failed_ms', 'status',
    'emp_indexed_ms')
  if f[3] ~= 'pending' or not redis.call('ZSCORE', K('@PENDING@'), id) then
    unindex_job(id, class, member)  -- cancelled or taken elsewhere: drop the stale entry
    return nil
  end
  if f[1] == worker and now - (tonumber(f[2]) or 0) < exclude_ms then
    return nil  -- this worker failed it moments ago: leave it to another worker for a while
  end
  return tonumber(f[4]) or 0
end

local candidates = {}
local function consider(class, member, score, meta, indexed)
  local models = wanted_models(meta)
  candidates[#candidates + 1] = { class = class, member = member, score = score, meta = meta,
    models = models, affine = all_loaded_here(models), indexed = indexed }
end

if only_workflow ~= '' then
  -- A worker restricted to one workflow looks only at that workflow's jobs.
  -- (a workflow's pending jobs are few; the window bounds the work for a huge one)
  local wq = K('@WF_QUEUE@' .. only_workflow)
  local entries = redis.call('ZRANGE', wq, 0, 999, 'WITHSCORES')
  local seen_class = {}
  for h = 1, #entries, 2 do
    local member, score = entries[h], tonumber(entries[h + 1])
    local id = id_of(member)
    local class = redis.call('HGET', K('@JOB@' .. id), 'emp_class')
    local meta = decode(class and redis.call('HGET', K('@CLASSES@'), class) or '')
    if type(meta) ~= 'table' then
      redis.call('ZREM', wq, member)  -- its job is gone
    elseif not seen_class[class] then
      local indexed = usable(id, class, member)  -- drops it when stale
      if indexed then
        meta['workflow_id'] = only_workflow
        if matches(caps, meta) then consider(class, member, score, meta, indexed) end
        seen_class[class] = true  -- the first usable entry of a class is its best
      end
    end
  end
else
  -- The first usable head of each class queue this worker matches.
  local classes = redis.call('HGETALL', K('@CLASSES@'))
  for i = 1, #classes, 2 do
    local class, meta = classes[i], cjson.decode(classes[i + 1])
    local qk = K('@CLASS_QUEUE@' .. class)
    if matches(caps, meta) then
      local heads = redis.call('ZRANGE', qk, 0, 7, 'WITHSCORES')
      if #heads == 0 then redis.call('HDEL', K('@CLASSES@'), class) end
      for h = 1, #heads, 2 do
        local member, score = heads[h], tonumber(heads[h + 1])
        local indexed = usable(id_of(member), class, member)
        if indexed then
          consider(class, member, score, meta, indexed)
          break
        end
      end
    elseif redis.call('EXISTS', qk) == 0 then
      redis.call('HDEL', K('@CLASSES@'), class)
    end
  end
end

-- Best first: priority, then (model affinity) jobs whose models are loaded here, then FIFO.
table.sort(candidates, function(a, b)
  if a.score ~= b.score then return a.score < b.score end
  if a.affine ~= b.affine then return a.affine end
  return a.member < b.member
end)
-- A fresh job whose models another idle worker has loaded is left to that worker for a moment.
local chosen, wait_ms = nil, nil
for _, c in ipairs(candidates) do
  local age = now - c.indexed
  if affinity_ms > 0 and not c.affine and #c.models > 0 and age < affinity_ms
    and idle_holder_elsewhere(c.models, c.meta) then
    wait_ms = math.min(wait_ms or affinity_ms, affinity_ms - age)
  else
    chosen = c
    break
  end
end
if not chosen then
  if wait_ms then return { -1, wait_ms } end
  return {}
end

local class, member = chosen.class, chosen.member
local id = id_of(member)
local jk = K('@JOB@' .. id)
unindex_job(id, class, member)
redis.call('ZREM', K('@PENDING@'), id)
local attempt = redis.call('HINCRBY', jk, 'attempt', 1)
local at = iso(now)
redis.call('HSET', jk, 'status', 'assigned', 'worker_id', worker, 'assigned_at', at,
  'emp_claimed_us', now_us(), 'emp_lease_until', tostring(now + lease_ms))
redis.call('ZADD', K('@LEASES@'), now + lease_ms, id)
local j = hgetall(jk)
redis.call('HSET', K('@ACTIVE@' .. worker), id, cjson.encode(j))
redis.call('HSET', K('@WORKER@' .. worker), 'status', 'busy', 'current_job_id', id)
stream_event(id, 'claimed', { worker_id = worker, attempt = attempt }, maxlen, ttl)
publish('@CH_JOB_CLAIMED@', { job_id = id, worker_id = worker, status = 'claimed',
  claimed_at = at, timestamp = now, attempt = attempt })
local out = { attempt }
for f, v in pairs(j) do out[#out + 1] = f; out[#out + 1] = v end
return out
""",
)

# Fencing check shared by progress, complete, fail and hand-back.
_FENCE = r"""
local function fence(jk, worker, attempt)
  local f = redis.call('HMGET', jk, 'status', 'worker_id', 'attempt')
  if not f[1] then return 'job no longer exists' end
  if f[1] ~= 'assigned' and f[1] ~= 'in_progress' then return 'job is ' .. f[1] end
  if f[2] ~= worker then return 'job is held by ' .. tostring(f[2]) end
  if f[3] ~= attempt then return 'job attempt is ' .. tostring(f[3]) .. ', not ' .. attempt end
  return nil
end
"""

PROGRESS = _render(
    _COMMON,
    _FENCE,
    r"""
-- Record progress of a held job.
-- ARGV: 1 prefix, 2 job id, 3 worker id, 4 attempt, 5 progress (0-100), 6 message,
--       7 current step ('' if unknown), 8 total steps ('' if unknown), 9 stream maxlen,
--       10 stream ttl s, 11 estimated completion ISO ('' if unknown).
-- Returns {1} or {0, reason}.
local id, worker, attempt = ARGV[2], ARGV[3], ARGV[4]
local jk = K('@JOB@' .. id)
local stale = fence(jk, worker, attempt)
if stale then return {0, stale} end
local ms = now_ms()
local at = iso(ms)
local progress = tonumber(ARGV[5])
if redis.call('HGET', jk, 'status') == 'assigned' then
  redis.call('HSET', jk, 'status', 'in_progress', 'started_at', at)
  redis.call('HSET', K('@WORKER@' .. worker), 'status', 'busy', 'current_job_id', id)
end
redis.call('HSET', K('@JOB@' .. id .. '@PROGRESS_HASH_SUFFIX@'), 'progress', ARGV[5],
  'status', 'in_progress', 'message', ARGV[6], 'updated_at', at)
redis.call('EXPIRE', K('@JOB@' .. id .. '@PROGRESS_HASH_SUFFIX@'), tonumber(ARGV[10]))
local data = { job_id = id, worker_id = worker, progress = progress, status = 'in_progress',
  message = ARGV[6], timestamp = ms }
if ARGV[7] ~= '' then data['current_step'] = tonumber(ARGV[7]) end
if ARGV[8] ~= '' then data['total_steps'] = tonumber(ARGV[8]) end
if ARGV[11] ~= '' then data['estimated_completion'] = ARGV[11] end
stream_event(id, 'progress', data, tonumber(ARGV[9]), tonumber(ARGV[10]))
publish('@CH_PROGRESS@', data)
return {1}
""",
)

COMPLETE = _render(
    _COMMON,
    _FENCE,
    r"""
-- Complete a held job, exactly once.
-- ARGV: 1 prefix, 2 job id, 3 worker id, 4 attempt, 5 result JSON, 6 retention s,
--       7 stream maxlen.
-- Returns {1} or {0, reason}.
local id, worker, attempt = ARGV[2], ARGV[3], ARGV[4]
local jk = K('@JOB@' .. id)
local stale = fence(jk, worker, attempt)
if stale then return {0, stale} end
local retention, maxlen = tonumber(ARGV[6]), tonumber(ARGV[7])
local ms = now_ms()
local at = iso(ms)
local j = hgetall(jk)
local started = to_ms(j['started_at']) or to_ms(j['assigned_at']) or ms
redis.call('HSET', jk, 'status', 'completed', 'completed_at', at,
  'processing_time', tostring(ms - started), 'result', ARGV[5])
redis.call('HDEL', K('@ACTIVE@' .. worker), id)
redis.call('ZREM', K('@LEASES@'), id)
local result = decode(ARGV[5])
if result == nil then result = ARGV[5] end
redis.call('HSET', K('@COMPLETED@'), id, cjson.encode({ success = true, data = result,
  completed_at = at }))
redis.call('EXPIRE', K('@COMPLETED@'), retention)  -- as their worker does: the hash lives on while written
local wk = K('@WORKER@' .. worker)
redis.call('HINCRBY', wk, 'total_jobs_completed', 1)
redis.call('HSET', wk, 'status', 'idle', 'current_job_id', '')
redis.call('HSET', K('@JOB@' .. id .. '@PROGRESS_HASH_SUFFIX@'), 'progress', '100',
  'status', 'completed', 'message', 'completed', 'updated_at', at)
redis.call('EXPIRE', jk, retention)
redis.call('EXPIRE', K('@JOB@' .. id .. '@PROGRESS_HASH_SUFFIX@'), retention)
stream_event(id, 'completed', { worker_id = worker, attempt = tonumber(attempt) }, maxlen, retention)
local event = { job_id = id, worker_id = worker, progress = 100, status = 'completed',
  message = 'Job completed successfully', result = result, timestamp = ms }
for _, f in ipairs({ 'workflow_id', 'current_step', 'total_steps', 'workflow_priority',
  'workflow_datetime' }) do
  if j[f] and j[f] ~= '' then event[f] = tonumber(j[f]) or j[f] end
end
publish('@CH_COMPLETE@', event)
return {1}
""",
)

_REQUEUE = r"""
-- Put a job back in the queue at its original place (or in the delayed set until due_ms).
local function requeue(id, j, due_ms)
  local jk = K('@JOB@' .. id)
  redis.call('HSET', jk, 'status', 'pending', 'worker_id', '')
  redis.call('ZREM', K('@LEASES@'), id)
  if due_ms > 0 then
    redis.call('ZADD', K('@DELAYED@'), due_ms, id)
  else
    make_pending(id, j['emp_pending_score'])
  end
end
"""

FAIL = _render(
    _COMMON,
    _INDEX,
    _FENCE,
    _FINAL_FAIL,
    _REQUEUE,
    r"""
-- Fail a held job: back to the queue (after a backoff) while retries remain and the failure is
-- retryable, else for good.
-- ARGV: 1 prefix, 2 job id, 3 worker id, 4 attempt, 5 error, 6 retryable (1/0), 7 backoff ms,
--       8 retention s, 9 stream maxlen.
-- Returns {1, 'retry'|'failed'} or {0, reason}.
local id, worker, attempt = ARGV[2], ARGV[3], ARGV[4]
local jk = K('@JOB@' .. id)
local stale = fence(jk, worker, attempt)
if stale then return {0, stale} end
local err, retryable, backoff = ARGV[5], ARGV[6] == '1', tonumber(ARGV[7])
local retention, maxlen = tonumber(ARGV[8]), tonumber(ARGV[9])
local j = hgetall(jk)
local count = (tonumber(j['retry_count']) or 0) + 1
local max = tonumber(j['max_retries']) or 3
local wk = K('@WORKER@' .. worker)
redis.call('HDEL', K('@ACTIVE@' .. worker), id)
redis.call('ZREM', K('@LEASES@'), id)
redis.call('HINCRBY', wk, 'total_jobs_failed', 1)
redis.call('HSET', wk, 'status', 'idle', 'current_job_id', '')
if retryable and count <= max then
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
""",
)

HAND_BACK = _render(
    _COMMON,
    _INDEX,
    _FENCE,
    _REQUEUE,
    r"""
-- Give a held job back to the queue without spending an attempt (graceful drain).
-- ARGV: 1 prefix, 2 job id, 3 worker id, 4 attempt, 5 reason, 6 stream maxlen, 7 stream ttl s.
-- Returns {1} or {0, reason}.
local id, worker, attempt = ARGV[2], ARGV[3], ARGV[4]
local jk = K('@JOB@' .. id)
local stale = fence(jk, worker, attempt)
if stale then return {0, stale} end
local j = hgetall(jk)
redis.call('HDEL', K('@ACTIVE@' .. worker), id)
redis.call('HSET', K('@WORKER@' .. worker), 'current_job_id', '')
-- retry_count is untouched: a hand-back spends no attempt. (The fencing token `attempt` still
-- moves on at the next claim, so this worker's stale calls stay refused.)
requeue(id, j, 0)
stream_event(id, 'handed_back', { worker_id = worker, reason = ARGV[5] },
  tonumber(ARGV[6]), tonumber(ARGV[7]))
return {1}
""",
)

HEARTBEAT = _render(
    _COMMON,
    _LOADED,
    _INDEX,
    _FINAL_FAIL,
    _REQUEUE,
    r"""
-- Heartbeat, one command per beat:
--  * refresh the worker record, its heartbeat key and workers:active;
--  * renew the leases of the jobs this worker runs (holder and attempt checked); report the ones
--    it no longer holds (reaped, cancelled, taken over) so it stops them;
--  * promote delayed retries that are due;
--  * once per reap period fleet-wide (a lock), reap: put jobs whose lease expired back in the
--    queue at their original place (spending an attempt), or fail them when none are left, and
--    mark workers whose heartbeat key is gone offline.
-- ARGV: 1 prefix, 2 worker id, 3 heartbeat ttl s, 4 lease ms, 5 status, 6 JSON object of worker
--       fields to set, 7 max jobs to promote/reap per beat, 8 JSON object {job id: attempt} of
--       the jobs this worker runs, 9 reap period ms, 10 retention s, 11 stream maxlen,
--       12 JSON list of the models the worker has loaded ('' to leave them as they are).
-- Returns {leases renewed, jobs promoted, lost job ids (comma list), jobs reaped}.
local worker = ARGV[2]
local ms = now_ms()
local at = iso(ms)
local limit, retention, maxlen = tonumber(ARGV[7]), tonumber(ARGV[10]), tonumber(ARGV[11])
local wk = K('@WORKER@' .. worker)
redis.call('SET', K('@WORKER@' .. worker .. '@HEARTBEAT_SUFFIX@'), at, 'EX', tonumber(ARGV[3]))
redis.call('SADD', K('@WORKERS_ACTIVE@'), worker)
for f, v in pairs(cjson.decode(ARGV[6])) do redis.call('HSET', wk, f, tostring(v)) end
redis.call('HSET', wk, 'worker_id', worker, 'status', ARGV[5], 'last_heartbeat', at)
redis.call('HSETNX', wk, 'connected_at', at)
if ARGV[12] ~= '' then set_loaded(worker, cjson.decode(ARGV[12])) end

local renewed, lost = 0, {}
for id, attempt in pairs(cjson.decode(ARGV[8])) do
  local f = redis.call('HMGET', K('@JOB@' .. id), 'worker_id', 'status', 'attempt')
  if f[1] == worker and (f[2] == 'assigned' or f[2] == 'in_progress') and f[3] == tostring(attempt) then
    redis.call('ZADD', K('@LEASES@'), ms + tonumber(ARGV[4]), id)
    renewed = renewed + 1
  else
    lost[#lost + 1] = id
  end
end

local promoted = 0
for _, id in ipairs(redis.call('ZRANGEBYSCORE', K('@DELAYED@'), '-inf', ms, 'LIMIT', 0, limit)) do
  redis.call('ZREM', K('@DELAYED@'), id)
  local f = redis.call('HMGET', K('@JOB@' .. id), 'status', 'emp_pending_score')
  if f[1] == 'pending' then
    make_pending(id, f[2])
    publish('@CH_JOB_SUBMITTED@', { job_id = id, retry = true, timestamp = ms })
    promoted = promoted + 1
  end
end

local reaped = 0
if redis.call('SET', K('@REAPER_LOCK@'), worker, 'NX', 'PX', tonumber(ARGV[9])) then
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', K('@LEASES@'), '-inf', ms, 'LIMIT', 0, limit)) do
    redis.call('ZREM', K('@LEASES@'), id)
    local j = hgetall(K('@JOB@' .. id))
    if j['status'] == 'assigned' or j['status'] == 'in_progress' then
      local holder = j['worker_id'] or ''
      if holder ~= '' then
        redis.call('HDEL', K('@ACTIVE@' .. holder), id)
        redis.call('HSET', K('@WORKER@' .. holder), 'current_job_id', '')
      end
      local count = (tonumber(j['retry_count']) or 0) + 1
      local err = 'lease expired: worker ' .. holder .. ' stopped renewing it'
      if count <= (tonumber(j['max_retries']) or 3) then
        redis.call('HSET', K('@JOB@' .. id), 'retry_count', tostring(count), 'error', err,
          'last_failed_worker', holder, 'emp_last_failed_ms', tostring(ms))
        requeue(id, j, 0)
        stream_event(id, 'requeued', { reason = err, retry_count = count }, maxlen, retention)
        publish('@CH_JOB_SUBMITTED@', { job_id = id, service_required = j['service_required'],
          retry = true, timestamp = ms })
      else
        final_fail(id, j, holder, err, count, retention, maxlen)
      end
      reaped = reaped + 1
    end
  end
  for _, w in ipairs(redis.call('SMEMBERS', K('@WORKERS_ACTIVE@'))) do
    if redis.call('EXISTS', K('@WORKER@' .. w .. '@HEARTBEAT_SUFFIX@')) == 0 then
      redis.call('SREM', K('@WORKERS_ACTIVE@'), w)
      set_loaded(w, {})
      redis.call('HSET', K('@WORKER@' .. w), 'status', 'offline', 'current_job_id', '')
      redis.call('EXPIRE', K('@WORKER@' .. w), retention)
    end
  end
end
return {renewed, promoted, table.concat(lost, ','), reaped}
""",
)

RECONCILE = _render(
    _COMMON,
    _INDEX,
    _FINAL_FAIL,
    _RECONCILE_FN,
    r"""
-- Reconcile on demand (the claim script also does it before each claim).
-- ARGV: 1 prefix, 2 lock ms, 3 retention s, 4 stream maxlen.
-- Returns {indexed, dropped}, or {-1} when another worker holds the lock.
return reconcile(tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]))
""",
)

CANCEL = _render(
    _COMMON,
    _INDEX,
    r"""
-- Cancel a job: a pending one leaves the queue; a held one is marked cancelled at once (so its
-- holder's later complete/fail is refused by the fence) and its holder is told on cancel_job.
-- ARGV: 1 prefix, 2 job id, 3 reason, 4 retention s, 5 stream maxlen.
-- Returns {1, previous status, holder or ''} or {0, reason}.
local id, reason = ARGV[2], ARGV[3]
local jk = K('@JOB@' .. id)
local j = hgetall(jk)
local status = j['status']
if not status then return {0, 'no job with id ' .. id} end
if status ~= 'pending' and status ~= 'assigned' and status ~= 'in_progress' then
  return {0, 'job is already ' .. status}
end
local ms = now_ms()
local at = iso(ms)
local holder = ''
if status ~= 'pending' then holder = j['worker_id'] or '' end
redis.call('ZREM', K('@PENDING@'), id)
redis.call('ZREM', K('@DELAYED@'), id)
redis.call('ZREM', K('@LEASES@'), id)
unindex_job(id, j['emp_class'], j['emp_member'])
if holder ~= '' then redis.call('HDEL', K('@ACTIVE@' .. holder), id) end
redis.call('HSET', jk, 'status', 'cancelled', 'cancelled_at', at, 'error', reason)
local retention = tonumber(ARGV[4])
redis.call('EXPIRE', jk, retention)
stream_event(id, 'cancelled', { reason = reason, worker_id = holder }, tonumber(ARGV[5]), retention)
publish('@CH_CANCEL@', { job_id = id, worker_id = holder, reason = reason, timestamp = ms })
return {1, status, holder}
""",
)

SET_LOADED = _render(
    _COMMON,
    _LOADED,
    r"""
-- Record the models a worker has loaded in GPU memory (model affinity reads them at claim time).
-- ARGV: 1 prefix, 2 worker id, 3 JSON list of model names ('[]' on shutdown).
local models = cjson.decode(ARGV[3])
if type(models) ~= 'table' then models = {} end
set_loaded(ARGV[2], models)
return #models
""",
)

MATCH_PROBE = _render(
    _COMMON,
    _MATCH,
    r"""
-- The claim script's matcher on its own, for the shared case table in the tests.
-- ARGV: 1 prefix (unused), 2 capabilities JSON, 3 service, 4 requirements JSON or '', 5 customer id,
--       6 workflow id.
-- Returns 1 when the worker may run the job, else 0.
local meta = { service = ARGV[3], requirements = ARGV[4], customer_id = ARGV[5], workflow_id = ARGV[6] }
return matches(cjson.decode(ARGV[2]), meta) and 1 or 0
""",
)

ALL: dict[str, str] = {
    "submit": SUBMIT,
    "claim": CLAIM,
    "progress": PROGRESS,
    "complete": COMPLETE,
    "fail": FAIL,
    "hand_back": HAND_BACK,
    "heartbeat": HEARTBEAT,
    "reconcile": RECONCILE,
    "cancel": CANCEL,
    "set_loaded": SET_LOADED,
    "match_probe": MATCH_PROBE,
}
