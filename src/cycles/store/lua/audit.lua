-- the audit log and the governance event log. ARGV: 1 '', 2 '', 3 unused, 4 test clock, 5 mode:
--   append: the rows ride in the journal argument and are written by the journal epilogue
--   purge:  6 older than ms, 7 batch, 8 log ('audit' or 'events'): removes up to `batch` of the oldest rows
--           older than the limit, from the records and both time indexes
if ARGV[5] == 'purge' then
  local rec, index = K_AUDIT_REC, K_AUDIT
  if ARGV[8] == 'events' then rec, index = K_EVENTS_REC, K_EVENTS end
  if CLUSTER then index = P .. ARGV[8] end  -- one tenant's log (the Python side walks the tenants)
  local ids = redis.call('ZRANGEBYSCORE', index, '-inf', '(' .. ARGV[6], 'LIMIT', 0, tonumber(ARGV[7]))
  for _, id in ipairs(ids) do
    local raw = redis.call('HGET', rec, id)
    if raw then
      local tenant = jvalue(raw, 'tenant_id')
      if type(tenant) == 'string' then redis.call('ZREM', prefix_of(tenant) .. ARGV[8], id) end
      redis.call('HDEL', rec, id)
    end
    redis.call('ZREM', index, id)
  end
  return cjson.encode({purged = #ids})
end
-- append after another script (Redis Cluster, rows of another tenant's slot): 6 that script's answer, which the
-- epilogue stamps the rows from as if they had ridden with it
if ARGV[5] == 'append' and #ARGV == 7 then return ARGV[6] end
return '{}'
