-- requires: common match
-- The claim script's matcher on its own, for the shared case table in the tests.
-- KEYS: none (every key is the prefix in ARGV[1] plus a name from worker/keys.py).
-- ARGV: 1 prefix (unused), 2 capabilities JSON, 3 service, 4 requirements JSON or '', 5 customer id,
--       6 workflow id.
-- Returns 1 when the worker may run the job, else 0.

local meta = { service = ARGV[3], requirements = ARGV[4], customer_id = ARGV[5], workflow_id = ARGV[6] }
return matches(cjson.decode(ARGV[2]), meta) and 1 or 0
