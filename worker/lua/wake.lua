-- requires: common wake
-- Wake one idle worker for a pending job (a relay's answer to job_submitted), or hand a popped
-- token on (a worker that got one it cannot use now).
-- KEYS: none (every key is the prefix in ARGV[1] plus a name from worker/keys.py).
-- ARGV: 1 prefix, 2 job id, 3 hops ('': a fresh token, at most one per job however many relays
--       ask; a number: the token passed on as it is).
-- Returns 1 when a token was pushed, else 0 (the job is not pending, or was woken already).

local id = ARGV[2]
if #id == 0 or #id > 256 then return 0 end
if ARGV[3] == '' then return wake_job(id, 0, true) and 1 or 0 end
local hops = tonumber(ARGV[3])
if not hops or hops ~= math.floor(hops) or hops < 0 or hops >= MAX_WAKE_HOPS then return 0 end
return wake_job(id, hops, false) and 1 or 0
