-- requires: clock common
-- The pending-job index: validate a pending job, put it in its class queue (and its workflow's
-- queue), take it out again.
-- index_job returns 'indexed', 'already', 'skip' or 'invalid:<why>'.
-- provides: check_job, index_job, make_pending, unindex_job

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
