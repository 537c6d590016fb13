-- requires: common untrusted index final_fail reconcile
-- Reconcile on demand (the claim script also does it before each claim).
-- KEYS: none (every key is the prefix in ARGV[1] plus a name from worker/keys.py).
-- ARGV: 1 prefix, 2 options JSON: reconcile_lock_ms, retention_s, stream_maxlen.
-- Returns {indexed, dropped} of one step (see lib/reconcile.lua).

local opts = cjson.decode(ARGV[2])
heal_index_keys()
return reconcile(tonumber(opts['reconcile_lock_ms']), tonumber(opts['retention_s']),
  tonumber(opts['stream_maxlen']))
