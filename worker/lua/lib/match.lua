-- requires: common
-- Capability matching, the Lua mirror of worker/matching.py (keep the two in step; the shared
-- case table in tests/worker/test_matching.py runs both).
-- A worker's models may live in its worker hash (field emp_models, written by Queue.set_models)
-- rather than in the capabilities: with_stored_models(caps, w) says so for capabilities without
-- a models key, and the field is then read only when a requirement asks about a model, once per
-- script call and worker.
-- provides: same, contains, is_object, num, with_stored_models, models_of, has_model, custom_ok,
--   customer_ok, positive_ok, negative_ok, matches

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

local stored_models_of = {}  -- capabilities table -> worker id whose emp_models stands in for them
local stored_models = {}     -- worker id -> its decoded emp_models (false when none or unreadable)

-- Mark capabilities that carry no models as those of worker w, whose models are stored in Redis.
local function with_stored_models(caps, w)
  if caps['models'] == nil then stored_models_of[caps] = w end
  return caps
end

-- The capabilities' models: their own models key when present, else the stored ones (read lazily).
local function models_of(caps)
  local models = caps['models']
  if models ~= nil then return models end
  local w = stored_models_of[caps]
  if not w then return nil end
  if stored_models[w] == nil then
    local got = decode(redis.call('HGET', K('@WORKER@' .. w), '@MODELS_FIELD@'))
    stored_models[w] = type(got) == 'table' and got or false
  end
  return stored_models[w]
end

local function has_model(caps, service, model)
  local models = models_of(caps)
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
