-- requires: clock common untrusted index final_fail reconcile match wake complete_job started
-- Claim the best job this worker can run.
-- KEYS: none (every key is the prefix in ARGV[1] plus a name from worker/keys.py).
-- ARGV: 1 prefix, 2 worker id, 3 capabilities JSON (see worker/matching.py; without a models
--         key the worker's models are those Queue.set_models stored in its hash, emp_models),
--       4 hint job id ('' for none: a job_submitted or wake-token id to index first),
--       5 options JSON (QueueConfig's fields): lease_ms, stream_maxlen, stream_ttl_s,
--         retention_s (for jobs failed here as invalid), retry_exclusion_ms (skip jobs this
--         worker failed that recently), reconcile_lock_ms, affinity_ms (model affinity window,
--         0: off),
--       6 the hops of the wake token the hint came from ('' when it came from none): when the
--         hinted job is still pending after this claim (this worker cannot run it, or took a
--         better one), the token goes on to the next idle worker of its service (lib/wake.lua),
--       7 '1': the worker hands the job to its connector at once: mark it started here too
--         (in_progress, started_at, the progress hash and a `started` event, as start.lua does),
--         one round trip less per job; '' leaves it assigned until start.lua,
--       8-11 a job this worker finished, to complete first ('' in 8 for none): its id, attempt,
--         result JSON and completion options JSON (lib/complete_job.lua): a worker going from
--         one job to the next makes one call, not two.
-- Returns {} when nothing matches, {-1, ms} when a job was left to a worker that has its models
-- loaded (claim again after ms), else {attempt, job id, job JSON} (the job hash as it is now,
-- one JSON object of its fields; the id is the one of the key claimed, whatever the hash says);
-- with a job to complete first, that reply after {1, ''} (completed) or {0, why not}.
-- A claim reads only the classes of the services this worker serves (emp:classes:{service}),
-- one head per class; it reconciles only while jobs:pending and emp:indexed differ in size.
-- Nothing read here stops claiming: a malformed job fails for good with a readable error naming
-- the field, a job key that is not a hash or an id that cannot be echoed is quarantined, a
-- garbage index entry (emp:classes*, emp:q:*, emp:qw:*) is dropped or rebuilt from the jobs, an
-- index key of the wrong type is dropped and the claim tried again, and a class the script errors
-- on is set aside (logged) while the other classes are still served.

local worker = ARGV[2]
local caps = with_stored_models(cjson.decode(ARGV[3]), worker)
local opts = cjson.decode(ARGV[5])
local lease_ms = tonumber(opts['lease_ms'])
local maxlen, ttl, retention = tonumber(opts['stream_maxlen']), tonumber(opts['stream_ttl_s']),
  tonumber(opts['retention_s'])
local exclude_ms = tonumber(opts['retry_exclusion_ms'])
local now = now_ms()
local hint = ARGV[4]
local start_now = ARGV[7] == '1'
local completion = nil
if (ARGV[8] or '') ~= '' then
  local stale = complete_job(ARGV[8], worker, ARGV[9], ARGV[10], cjson.decode(ARGV[11]))
  completion = stale and { 0, stale } or { 1, '' }
end

-- The services this worker serves (each once, at most 64: untrusted in the sense that a plugin
-- builds them).
local services, seen_service = {}, {}
if type(caps['services']) == 'table' then
  for _, service in ipairs(caps['services']) do
    if type(service) == 'string' and not seen_service[service] and #services < 64 then
      seen_service[service] = true
      services[#services + 1] = service
    end
  end
end

-- indexing the hint and reconciling are optimisations of claiming, never a reason to fail it
local indexed_ok, index_err = pcall(function()
  if hint ~= '' and redis.call('SISMEMBER', K('@INDEXED@'), hint) == 0 then
    index_or_fail(hint, worker, retention, maxlen)
  end
  reconcile(tonumber(opts['reconcile_lock_ms']), retention, maxlen, true)
end)
if not indexed_ok then
  redis.log(redis.LOG_WARNING, 'emp-worker claim: reconcile step failed: ' .. printable(index_err, 300))
end

local affinity_ms = tonumber(opts['affinity_ms'])
local MAX_AFFINITY_MODELS = 16
local only_workflow = type(caps['workflow_id']) == 'string' and caps['workflow_id'] or ''
local loaded = {}
if type(caps['loaded']) == 'table' then
  for _, m in ipairs(caps['loaded']) do loaded[m] = true end
end
local function id_of(member) return string.match(member, '^[^:]*:[^:]*:(.+)$') end

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
        if type(other) == 'table' and matches(with_stored_models(other, w), meta) then return true end
      end
    end
  end
  return false
end

-- Is another live, idle worker that runs `service` around to take a job this worker is kept from
-- (it failed it moments ago)? The exclusion is a preference: with nobody else free, the worker
-- that failed a job takes it again at once (a lone worker restarted by its supervisor must not
-- wait out EMP_RETRY_EXCLUSION_S for its own crashed job). A sample of workers:active, once per
-- service per claim.
local other_free = {}
local function another_free(service)
  if other_free[service] ~= nil then return other_free[service] end
  local found = false
  local ok, sample = pcall(redis.call, 'SRANDMEMBER', K('@WORKERS_ACTIVE@'), 32)
  for _, w in ipairs(ok and sample or {}) do
    if w ~= worker and redis.call('EXISTS', K('@WORKER@' .. w .. '@HEARTBEAT_SUFFIX@')) == 1 then
      local f = redis.pcall('HMGET', K('@WORKER@' .. w), 'status', 'emp_caps')
      local wcaps = not f['err'] and f[1] == 'idle' and decode(f[2]) or nil
      if type(wcaps) == 'table' and type(wcaps['services']) == 'table' then
        for _, offered in ipairs(wcaps['services']) do
          if offered == service then found = true end
        end
      end
    end
    if found then break end
  end
  other_free[service] = found
  return found
end

-- Check one queued entry: drop it when stale or not this job's own; nil when this worker must
-- leave it alone.
local function usable(id, queue, class, member, service)
  local jk = K('@JOB@' .. id)
  local f = redis.pcall('HMGET', jk, 'last_failed_worker', 'emp_last_failed_ms', 'status',
    'emp_indexed_ms', 'emp_class', 'emp_member')
  if f['err'] then
    redis.call('ZREM', queue, member)
    quarantine(id, 'the job key is a ' .. redis.call('TYPE', jk)['ok'] .. ', not a hash', 'claim', retention)
    return nil
  end
  if f[3] ~= 'pending' or not redis.call('ZSCORE', K('@PENDING@'), id) or f[5] ~= class or f[6] ~= member then
    -- cancelled, taken elsewhere, or an entry that is not the job's own: drop the entry
    redis.call('ZREM', queue, member)
    if f[6] == member then unindex_job(id, class, member) end
    return nil
  end
  if f[1] == worker and now - num_or(f[2], 0) < exclude_ms and another_free(service) then
    return nil  -- this worker failed it moments ago: leave it to the free worker for a while
  end
  return num_or(f[4], 0)
end

-- The class's meta as index_job registers it, when it is that: {service, requirements, customer_id}.
local function class_meta(raw)
  local meta = decode(raw)
  if type(meta) ~= 'table' or type(meta['service']) ~= 'string'
    or type(meta['requirements'] or '') ~= 'string' or type(meta['customer_id'] or '') ~= 'string' then
    return nil
  end
  return meta
end

-- A garbage class entry of `service`: registered again from its queue's head job (its meta is
-- returned), or dropped (the queue's jobs are indexed again by reconcile, which registers their
-- class; nil is returned).
local function rebuild_class(class, service)
  local qk = K('@CLASS_QUEUE@' .. class)
  if redis.call('TYPE', qk)['ok'] == 'zset' then
    for _, member in ipairs(redis.call('ZRANGE', qk, 0, 7)) do
      local id = id_of(member)
      local f = id and redis.pcall('HMGET', K('@JOB@' .. id), 'service_required', 'requirements', 'customer_id')
      if f and not f['err'] and f[1] == service then
        local req, cust = f[2] or '', f[3] or ''
        if redis.sha1hex(f[1] .. '\n' .. req .. '\n' .. cust) == class then
          local meta = { service = f[1], requirements = req, customer_id = cust }
          local encoded = cjson.encode(meta)
          redis.call('HSET', K('@CLASSES@'), class, encoded)
          redis.call('HSET', K('@CLASSES_OF@' .. service), class, encoded)
          return meta
        end
      end
      redis.call('ZREM', qk, member)
      if id then redis.call('SREM', K('@INDEXED@'), id) end
    end
  else
    redis.call('DEL', qk)
  end
  unregister_class(class, service)
  return nil
end

local candidates = {}
local function consider(class, member, score, meta, indexed)
  candidates[#candidates + 1] = { class = class, member = member, score = score, meta = meta,
    indexed = indexed }
end

-- The first usable entry of each class in a workflow's queue.
local function look_at_workflow()
  -- (a workflow's pending jobs are few; the window bounds the work for a huge one)
  local wq = K('@WF_QUEUE@' .. only_workflow)
  if redis.call('TYPE', wq)['ok'] ~= 'zset' then
    redis.call('DEL', wq)
    return
  end
  local entries = redis.call('ZRANGE', wq, 0, 999, 'WITHSCORES')
  local seen_class = {}
  for h = 1, #entries, 2 do
    local member, score = entries[h], tonumber(entries[h + 1])
    local id = id_of(member)
    local class = id and redis.pcall('HGET', K('@JOB@' .. id), 'emp_class')
    local meta = type(class) == 'string' and class_meta(redis.call('HGET', K('@CLASSES@'), class)) or nil
    if not meta then
      redis.call('ZREM', wq, member)  -- its job is gone, or the entry is garbage
    elseif not seen_class[class] then
      local indexed = usable(id, wq, class, member, meta['service'])  -- drops it when stale
      if indexed then
        meta['workflow_id'] = only_workflow
        if matches(caps, meta) then consider(class, member, score, meta, indexed) end
        seen_class[class] = true  -- the first usable entry of a class is its best
      end
    end
  end
end

-- The first usable head of one class queue of `service`, when this worker matches the class.
local function look_at_class(class, raw, service)
  local meta = class_meta(raw)
  if not meta or meta['service'] ~= service then meta = rebuild_class(class, service) end
  if not meta then return end
  local qk = K('@CLASS_QUEUE@' .. class)
  if matches(caps, meta) then
    local heads = redis.call('ZRANGE', qk, 0, 7, 'WITHSCORES')
    if #heads == 0 then unregister_class(class, service) end
    for h = 1, #heads, 2 do
      local member, score = heads[h], tonumber(heads[h + 1])
      local id = id_of(member)
      local indexed = id and usable(id, qk, class, member, service)
      if not id then redis.call('ZREM', qk, member) end  -- not an entry of ours
      if indexed then
        consider(class, member, score, meta, indexed)
        break
      end
    end
  elseif redis.call('EXISTS', qk) == 0 then
    unregister_class(class, service)
  end
end

-- An error on one class (a record no check foresaw) sets that class aside, never the claim.
local function set_aside(class, service, err)
  redis.log(redis.LOG_WARNING, 'emp-worker claim: class ' .. printable(class) .. ' set aside: '
    .. printable(err, 300))
  unregister_class(class, service)
  if redis.call('TYPE', K('@CLASS_QUEUE@' .. class))['ok'] ~= 'zset' then redis.call('DEL', K('@CLASS_QUEUE@' .. class)) end
end

-- Model affinity: the models a candidate's jobs ask for, and whether they are all loaded here
-- (worked out only when affinity is on and this worker has models loaded).
local function with_models(c)
  if c.models == nil then
    c.models = (affinity_ms > 0 or next(loaded) ~= nil) and wanted_models(c.meta) or {}
    c.affine = next(loaded) ~= nil and all_loaded_here(c.models)
  end
  return c
end

-- Take a candidate: its whole hash is checked first (it may have changed since it was indexed);
-- a malformed one fails for good and the next candidate is taken instead. nil when it failed.
-- The lease is written first: an index key of the wrong type fails the claim before the job
-- has left the queue (the claim is then tried again, see below), never with the job held by nobody.
local function take(c)
  local id = id_of(c.member)
  local jk = K('@JOB@' .. id)
  local j = hgetall(jk)
  local bad = check_id(id)
  if bad then
    unindex_job(id, c.class, c.member)
    quarantine(id, bad, 'claim', retention)
    return nil
  end
  bad = check_job(id, j)
  if bad then
    final_fail(id, j, '', 'invalid job: ' .. bad, j['retry_count'], retention, maxlen)
    return nil
  end
  redis.call('ZADD', K('@LEASES@'), now + lease_ms, id)
  unindex_job(id, c.class, c.member, j['workflow_id'] or '')
  redis.call('ZREM', K('@PENDING@'), id)
  local attempt = (tonumber(j['attempt']) or 0) + 1
  local at = iso(now)
  local set = { id = id, status = 'assigned', worker_id = worker, assigned_at = at, attempt = tostring(attempt),
    emp_claimed_us = now_us(), emp_lease_until = tostring(now + lease_ms), emp_lease_ms = tostring(lease_ms) }
  if start_now then
    set['status'] = 'in_progress'
    set['started_at'] = at
  end
  local flat = {}
  for f, v in pairs(set) do
    flat[#flat + 1] = f
    flat[#flat + 1] = v
    j[f] = v
  end
  redis.call('HSET', jk, unpack(flat))
  if j['emp_reaped_from'] then
    redis.call('HDEL', jk, 'emp_reaped_from')
    j['emp_reaped_from'] = nil
  end
  local encoded = cjson.encode(j)
  redis.call('HSET', K('@ACTIVE@' .. worker), id, encoded)
  redis.call('HSET', K('@WORKER@' .. worker), 'status', 'busy', 'current_job_id', id)
  stream_event(id, 'claimed', { worker_id = worker, attempt = attempt }, maxlen, ttl)
  publish('@CH_JOB_CLAIMED@', { job_id = id, worker_id = worker, status = 'claimed',
    claimed_at = at, timestamp = now, attempt = attempt })
  if start_now then started_event(id, worker, attempt, at, maxlen, ttl) end
  return { attempt, id, encoded }
end

-- Look at the candidates, take the best; {} or {-1, ms} when none was taken.
local function claim()
  candidates = {}
  if only_workflow ~= '' then
    -- A worker restricted to one workflow looks only at that workflow's jobs.
    local ok, err = pcall(look_at_workflow)
    if not ok then
      redis.log(redis.LOG_WARNING, 'emp-worker claim: workflow queue dropped: ' .. printable(err, 300))
      redis.call('DEL', K('@WF_QUEUE@' .. only_workflow))
    end
  else
    for _, service in ipairs(services) do
      local classes = redis.call('HGETALL', K('@CLASSES_OF@' .. service))
      for i = 1, #classes, 2 do
        local ok, err = pcall(look_at_class, classes[i], classes[i + 1], service)
        if not ok then set_aside(classes[i], service, err) end
      end
    end
  end
  if #candidates > 1 then
    -- Best first: priority, then (model affinity) jobs whose models are loaded here, then FIFO.
    for _, c in ipairs(candidates) do with_models(c) end
    table.sort(candidates, function(a, b)
      if a.score ~= b.score then return a.score < b.score end
      if a.affine ~= b.affine then return a.affine end
      return a.member < b.member
    end)
  end
  -- A fresh job whose models another idle worker has loaded is left to that worker for a moment.
  local wait_ms = nil
  for _, c in ipairs(candidates) do
    with_models(c)
    local age = now - c.indexed
    if affinity_ms > 0 and not c.affine and #c.models > 0 and age < affinity_ms
      and idle_holder_elsewhere(c.models, c.meta) then
      wait_ms = math.min(wait_ms or affinity_ms, affinity_ms - age)
    else
      local out = take(c)
      if out then return out end
    end
  end
  if wait_ms then return { -1, wait_ms } end
  return {}
end

-- An index key of the wrong type (a foreign write) fails a Redis call: drop those keys, try again.
local ok, out = pcall(claim)
if not ok then
  redis.log(redis.LOG_WARNING, 'emp-worker claim: ' .. printable(out, 300) .. '; healing the index keys')
  heal_index_keys(services)
  out = claim()
end

-- The wake token the hint came from goes on while its job is still pending (lib/wake.lua).
local hops = ARGV[6] ~= '' and tonumber(ARGV[6]) or nil
if hops and hint ~= '' and out[2] ~= hint and hops + 1 < MAX_WAKE_HOPS then
  wake_job(hint, hops + 1, false)
end
if completion then
  table.insert(out, 1, completion[2])
  table.insert(out, 1, completion[1])
end
return out
