-- requires: clock common untrusted
-- The pending-job index: validate a pending job, put it in its class queue (and its workflow's
-- queue), take it out again; repair index keys that hold something else.
-- index_job returns 'indexed', 'already', 'skip', 'invalid:<why>' (a malformed job: fail it) or
-- 'unreadable:<why>' (its key is not a hash: quarantine it).
-- Everything it reads is untrusted: numbers are checked before any ZADD, a field written by an
-- earlier indexing (emp_member, emp_class, emp_score) is used only when it is well formed, and a
-- garbage emp:seq starts again.
-- Classes are registered twice: in emp:classes (every class: reconcile and status walk it) and
-- in emp:classes:{service} (a claim reads only the services its worker serves, so its cost does
-- not grow with classes it cannot run). Both hold class id -> {service, requirements, customer_id}.
-- provides: check_id, check_job, job_when, next_seq, earlier_place, register_class,
--   unregister_class, index_job, make_pending, unindex_job, heal_index_keys

local MAX_SERVICE_LEN = 128
local MAX_REQUIREMENTS_LEN = 16384
local MAX_ID_LEN = 256
local MAX_PRIORITY = 1e15   -- beyond it emp-job-queue's own score (priority * 1e15) means nothing
local MAX_COUNT = 1e9
local MAX_MS = 1e13         -- epoch ms with 13 digits (the member's width): until the year 2286

-- Why a job hash (all of it, or the fields index_job reads) cannot be queued, or nil.
-- id is the job's key id: the hash's own id field, when present, must name the same job.
-- Why an id cannot be handed to a worker, or nil. Ids are uuids and the like: one with control
-- or non-ASCII bytes cannot be failed readably (it would be echoed on job_failed), so it is
-- quarantined instead.
local function check_id(id)
  if #id == 0 or #id > MAX_ID_LEN then return 'the job id is empty or longer than 256 bytes' end
  if string.find(id, '[%z\1-\31\127-\255]') then return 'the job id has control or non-ASCII bytes' end
  return nil
end

local function check_job(id, j)
  if j['id'] and j['id'] ~= id then
    return "id field names job '" .. printable(j['id']) .. "', not this job"
  end
  local svc = j['service_required']
  if not svc or svc == '' then return 'service_required is missing' end
  if #svc > MAX_SERVICE_LEN then return 'service_required is longer than 128 characters' end
  for _, name in ipairs({ 'priority', 'workflow_priority' }) do
    local v = j[name]
    if v and v ~= '' then
      if not tonumber(v) then return name .. ' is not a number: ' .. printable(v, 40) end
      if not finite_num(v, -MAX_PRIORITY, MAX_PRIORITY) then
        return name .. ' is not a finite number within +-1e15: ' .. printable(v, 40)
      end
    end
  end
  for _, name in ipairs({ 'retry_count', 'max_retries' }) do
    local v = j[name]
    if v and v ~= '' and not finite_num(v, 0, MAX_COUNT) then
      return name .. ' must be a number from 0 to 1e9, got ' .. printable(v, 40)
    end
  end
  local attempt = j['attempt']
  if attempt and not (string.match(attempt, '^%d+$') and #attempt < 15) then
    return 'attempt must be a whole number, got ' .. printable(attempt, 40)
  end
  local req = j['requirements']
  if req and req ~= '' then
    if #req > MAX_REQUIREMENTS_LEN then return 'requirements is larger than 16384 bytes' end
    if type(decode(req)) ~= 'table' then return 'requirements is not a JSON object' end
  end
  return nil
end

-- A job's effective time in ms from a field (ISO, epoch ms or seconds), when it is a sane one.
local function job_when(v)
  local ms = to_ms(v)
  if ms and finite_num(ms, 0, MAX_MS - 1) then return ms end
  return nil
end

-- The next sequence number; an emp:seq that is not a counter (garbage, another type, too large
-- for the member's 12 digits) starts again at 1 (it only orders jobs within one millisecond).
local function next_seq()
  local n = redis.pcall('INCR', K('@SEQ@'))
  if type(n) == 'number' and n > 0 and n < 1e12 then return n end
  redis.call('SET', K('@SEQ@'), '1')
  return 1
end

local INDEX_FIELDS = { 'status', 'service_required', 'priority', 'requirements', 'customer_id',
  'created_at', 'workflow_priority', 'workflow_datetime', 'emp_member', 'emp_class', 'emp_score',
  'workflow_id', 'id', 'retry_count', 'max_retries', 'attempt' }

-- emp_member/emp_class/emp_score of an earlier indexing, when they are well formed for this id.
local function earlier_place(id, j)
  local member, class, score = j['emp_member'], j['emp_class'], finite_num(j['emp_score'])
  if not (member and class and score) then return nil end
  if not string.match(class, '^%x+$') or #class ~= 40 then return nil end
  if string.sub(member, -(#id + 1)) ~= ':' .. id or not string.match(member, '^[%d.-]+:%d+:') then
    return nil
  end
  return member, class, score
end

local function register_class(class, meta_json, service)
  redis.call('HSETNX', K('@CLASSES@'), class, meta_json)
  redis.call('HSETNX', K('@CLASSES_OF@' .. service), class, meta_json)
end

local function unregister_class(class, service)
  redis.call('HDEL', K('@CLASSES@'), class)
  if type(service) == 'string' then redis.call('HDEL', K('@CLASSES_OF@' .. service), class) end
end

local function index_job(id)
  local jk = K('@JOB@' .. id)
  local kind = redis.call('TYPE', jk)['ok']
  if kind == 'none' then return 'skip' end
  if kind ~= 'hash' then return 'unreadable:the job key is a ' .. kind .. ', not a hash' end
  local bad_id = check_id(id)
  if bad_id then return 'unreadable:' .. bad_id end
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
    register_class(class, cjson.encode({ service = j['service_required'], requirements = req,
      customer_id = cust }), j['service_required'])
  end
  -- a job of a workflow is also queued by workflow, for workers restricted to one workflow
  local function zadd(key, score, member)
    local kind = redis.call('TYPE', key)['ok']
    if kind ~= 'zset' and kind ~= 'none' then redis.call('DEL', key) end  -- not ours any more: replace it
    redis.call('ZADD', key, score, member)
  end
  local function enqueue(class, score, member)
    zadd(K('@CLASS_QUEUE@' .. class), score, member)
    local wf = j['workflow_id']
    if wf and wf ~= '' then zadd(K('@WF_QUEUE@' .. wf), score, member) end
    if redis.call('SADD', K('@INDEXED@'), id) == 1 then  -- claimable from now (model affinity's clock)
      redis.call('HSET', jk, 'emp_indexed_ms', tostring(now_ms()))
    end
  end
  local bad = check_job(id, j)
  if bad then return 'invalid:' .. bad end
  local member, class, score = earlier_place(id, j)
  if member then
    register(class)
    enqueue(class, score, member)
    return 'already'
  end
  local prio = finite_num(j['workflow_priority']) or finite_num(j['priority']) or 50
  local eff = job_when(j['workflow_datetime']) or job_when(j['created_at']) or now_ms()
  member = string.format('%013.0f:%012.0f:%s', eff, next_seq(), id)
  class = redis.sha1hex(j['service_required'] .. '\n' .. req .. '\n' .. cust)
  register(class)
  redis.call('HSET', jk, 'emp_member', member, 'emp_class', class, 'emp_score', tostring(-prio),
    'emp_pending_score', pscore)
  enqueue(class, -prio, member)
  return 'indexed'
end

-- Make a pending job claimable again: back in jobs:pending at its old score, and indexed.
local function make_pending(id, pending_score)
  redis.call('ZADD', K('@PENDING@'), num_or(pending_score, 0), id)
  return index_job(id)
end

-- workflow: the job's workflow_id when the caller read it ('' for none; nil: read it here)
local function unindex_job(id, class, member, workflow)
  if class and member then
    redis.pcall('ZREM', K('@CLASS_QUEUE@' .. class), member)  -- a key of another type is replaced when next indexed
    local wf = workflow
    if wf == nil then wf = redis.pcall('HGET', K('@JOB@' .. id), 'workflow_id') end
    if type(wf) == 'string' and wf ~= '' then redis.pcall('ZREM', K('@WF_QUEUE@' .. wf), member) end
  end
  redis.call('SREM', K('@INDEXED@'), id)
end

-- Our index keys of the wrong Redis type are dropped (a script would fail on each of them);
-- emp:classes and emp:indexed go together, and reconcile rebuilds both from jobs:pending.
-- services: the per-service class hashes to look at too (a claim's services), when given.
local OWN_KEYS = { { '@SEQ@', 'string' }, { '@LEASES@', 'zset' }, { '@DELAYED@', 'zset' },
  { '@RECONCILE_CURSOR@', 'hash' }, { '@OUTAGE@', 'hash' }, { '@QUARANTINE@', 'hash' } }

local function heal_index_keys(services)
  for _, service in ipairs(services or {}) do
    local t = redis.call('TYPE', K('@CLASSES_OF@' .. service))['ok']
    if t ~= 'hash' and t ~= 'none' then
      redis.log(redis.LOG_WARNING, 'emp-worker: the class index of a service was not readable; rebuilding it')
      redis.call('DEL', K('@CLASSES_OF@' .. service), K('@INDEXED@'))
    end
  end
  local classes = redis.call('TYPE', K('@CLASSES@'))['ok']
  local indexed = redis.call('TYPE', K('@INDEXED@'))['ok']
  if (classes ~= 'hash' and classes ~= 'none') or (indexed ~= 'set' and indexed ~= 'none') then
    redis.log(redis.LOG_WARNING, 'emp-worker: the class index was not readable; rebuilding it')
    redis.call('DEL', K('@CLASSES@'), K('@INDEXED@'))
  end
  for _, own in ipairs(OWN_KEYS) do
    local t = redis.call('TYPE', K(own[1]))['ok']
    if t ~= own[2] and t ~= 'none' then
      redis.log(redis.LOG_WARNING, 'emp-worker: dropping ' .. K(own[1]) .. ' (a ' .. t .. ', not a ' .. own[2] .. ')')
      redis.call('DEL', K(own[1]))
    end
  end
end
