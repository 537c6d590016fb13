-- requires:
-- Server-clock time and ISO-8601 timestamps. Time always comes from Redis (TIME), so leases,
-- ages and timestamps share one clock however skewed the workers' clocks are.
-- provides: server_time, now_ms, now_us, iso, to_ms

-- A script is one atomic step: it reads the clock once, and every stamp it writes is that instant.
local script_time = nil
local function server_time()
  if not script_time then script_time = redis.call('TIME') end
  return script_time
end

local function now_ms()
  local t = server_time()
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Microseconds since the epoch, as an exact decimal string (pickup latency is sub-millisecond).
local function now_us()
  local t = server_time()
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
