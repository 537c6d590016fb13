-- requires: common
-- The loaded-model registry: emp:loaded:{model} -> workers holding it in GPU memory; the worker
-- hash's emp_loaded field keeps the worker's own list so a change can be applied as a diff.
-- provides: set_loaded

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
