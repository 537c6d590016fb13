-- requires: common loaded
-- Record the models a worker has loaded in GPU memory (model affinity reads them at claim time).
-- KEYS: none (every key is the prefix in ARGV[1] plus a name from worker/keys.py).
-- ARGV: 1 prefix, 2 worker id, 3 JSON list of model names ('[]' on shutdown).
-- Returns the number of models recorded.

local models = cjson.decode(ARGV[3])
if type(models) ~= 'table' then models = {} end
set_loaded(ARGV[2], models)
return #models
