-- requires: common index wake
-- Put a job back in the queue at its original place (or in the delayed set until due_ms); a job
-- claimable at once wakes one idle worker of its service.
-- provides: requeue

local function requeue(id, j, due_ms)
  local jk = K('@JOB@' .. id)
  redis.call('HSET', jk, 'status', 'pending', 'worker_id', '')
  redis.call('ZREM', K('@LEASES@'), id)
  if due_ms > 0 then
    redis.call('ZADD', K('@DELAYED@'), due_ms, id)
  else
    make_pending(id, j['emp_pending_score'])
    push_token(j['service_required'], 0, id)
  end
end
