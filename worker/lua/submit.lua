-- requires: clock common index wake
-- Submit a job the way emp-job-queue's API does, index it in the same step, and wake one idle
-- worker of its service (the job_submitted message says so: emp_woken, for the relays).
-- KEYS: none (every key is the prefix in ARGV[1] plus a name from worker/keys.py).
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
wake_new(id, fields['service_required'])
publish('@CH_JOB_SUBMITTED@', { job_id = id, service_required = fields['service_required'],
  priority = tonumber(fields['priority']) or 50, customer_id = fields['customer_id'],
  timestamp = ms, emp_woken = true })
return {1, fields['created_at']}
