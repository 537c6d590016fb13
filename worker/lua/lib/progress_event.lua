-- requires: common
-- A progress report's event: update_job_progress (what their clients listen to) and the job's
-- stream (which also keeps a preview, when the report has one). Shared by progress.lua and
-- complete.lua (a job's last report, folded into its completion).
-- provides: progress_event

-- p: {progress = number, message, current_step, total_steps, estimated_completion ('' or nil:
-- unknown), data (table), preview, preview_type}
local function progress_event(id, worker, p, ms, maxlen, ttl)
  local data = { job_id = id, worker_id = worker, progress = tonumber(p['progress']) or 0,
    status = 'in_progress', message = p['message'] or '', timestamp = ms }
  if tonumber(p['current_step']) then data['current_step'] = tonumber(p['current_step']) end
  if tonumber(p['total_steps']) then data['total_steps'] = tonumber(p['total_steps']) end
  if type(p['estimated_completion']) == 'string' and p['estimated_completion'] ~= '' then
    data['estimated_completion'] = p['estimated_completion']
  end
  if type(p['data']) == 'table' then data['data'] = p['data'] end
  publish('@CH_PROGRESS@', data)
  if type(p['preview']) == 'string' then
    data['preview'] = p['preview']
    data['preview_type'] = p['preview_type']
  end
  stream_event(id, 'progress', data, maxlen, ttl)
end
