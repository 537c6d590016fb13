-- requires:
-- Keys under the prefix, hash and JSON helpers, and the two ways a script tells the world:
-- the job's progress stream and pub/sub. Every script needs it (ARGV[1] is the key prefix).
-- provides: K, hgetall, decode, stream_event, publish

local P = ARGV[1]
local function K(name) return P .. name end

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
