-- requires: complete_job
-- Complete a held job, exactly once (lib/complete_job.lua).
-- KEYS: none (every key is the prefix in ARGV[1] plus a name from worker/keys.py).
-- ARGV: 1 prefix, 2 job id, 3 worker id, 4 attempt, 5 result JSON (the connector's output),
--       6 options JSON: retention_s, stream_maxlen, stream_ttl_s, envelope, progress (see
--         lib/complete_job.lua).
-- Returns {1} or {0, reason}.

local stale = complete_job(ARGV[2], ARGV[3], ARGV[4], ARGV[5], cjson.decode(ARGV[6]))
if stale then return {0, stale} end
return {1}
