-- requires: clock common
-- Reading untrusted values, and setting aside what cannot be read. A job hash, an index entry
-- or an option may hold anything: 'nan', '1e400' and '-inf' pass tonumber (as NaN and +-inf)
-- and then break ZADD, cjson.encode and arithmetic; bytes that are not text must never be echoed
-- back raw. What a script cannot read or fail readably is parked in the quarantine hash
-- (emp:quarantine: id -> JSON {reason, at, where}), which `emp-worker status` shows.
-- provides: finite_num, num_or, printable, quarantine

-- v as a finite number, within [lo, hi] when given; nil otherwise.
local function finite_num(v, lo, hi)
  local n = tonumber(v)
  if n == nil or n ~= n or n == math.huge or n == -math.huge then return nil end
  if (lo and n < lo) or (hi and n > hi) then return nil end
  return n
end

-- v as a finite number, else the default.
local function num_or(v, default)
  local n = finite_num(v)
  if n == nil then return default end
  return n
end

-- At most n (default 60) bytes of v, every byte outside printable ASCII shown as '?' (an error
-- a redis.call raised, caught by pcall, is a table: its message is shown).
local function printable(v, n)
  if type(v) == 'table' and v['err'] then v = v['err'] end
  local s = string.sub(tostring(v), 1, n or 60)
  return (string.gsub(s, '[^ -~]', '?'))
end

local MAX_QUARANTINED = 10000

-- Take an id out of every queue and park it with its reason; claiming goes on without it.
local function quarantine(id, reason, where, retention)
  redis.call('ZREM', K('@PENDING@'), id)
  redis.call('ZREM', K('@LEASES@'), id)
  redis.call('ZREM', K('@DELAYED@'), id)
  redis.call('SREM', K('@INDEXED@'), id)
  local qk = K('@QUARANTINE@')
  if redis.call('TYPE', qk)['ok'] ~= 'hash' then redis.call('DEL', qk) end
  if redis.call('HLEN', qk) < MAX_QUARANTINED then
    redis.call('HSET', qk, id, cjson.encode({ reason = printable(reason, 300), where = where,
      at = iso(now_ms()) }))
  end
  redis.call('EXPIRE', qk, num_or(retention, 86400))
  redis.log(redis.LOG_WARNING, 'emp-worker: job ' .. printable(id) .. ' quarantined (' .. where .. '): '
    .. printable(reason, 300))
end
