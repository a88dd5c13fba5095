-- post-only accounting event. ARGV: 1 prefix, 2 tenant, 3 retention_ms, 4 test clock, 5 key, 6 payload hash, 7 unit,
-- 8 amount, 9 scope_path, 10 scopes (json), 11 overage policy, 12 event id, 13 subject json, 14 action json,
-- 15 extra json (metadata, metrics, client time), 16 governance generation of the caller's cache ('' = no check)
local tenant_id, retention, key, payload_hash = ARGV[2], tonumber(ARGV[3]), ARGV[5], ARGV[6]
local unit, amount, scope_path = ARGV[7], I(ARGV[8]), ARGV[9]
local now = now_ms()
local stale = stale_governance(ARGV[16])
if stale then return stale end
local replayed = replay('event', key, payload_hash, now)
if replayed then return replayed end
local tenant, err = guard_closed(tenant_id)
if err then return err end
local ls, uerr = scope_ledgers(cjson.decode(ARGV[10]), unit)
if uerr then return uerr end
if #ls == 0 then
  return fail('NOT_FOUND', 'Budget not found for provided scope: ' .. scope_path, {scope = scope_path, unit = unit})
end
local policy = ARGV[11]
if policy == '' then
  policy = nil
  for i = #ls, 1, -1 do
    if ls[i].policy and ls[i].policy ~= '' then policy = ls[i].policy; break end
  end
  policy = policy or (tenant and tenant.default_commit_overage_policy) or 'ALLOW_IF_AVAILABLE'
end
local charged, serr = settle(ls, ZERO, amount, policy, false)
if serr then return serr end
for _, l in ipairs(ls) do save_ledger(l, now, nil, policy) end
local eid = ARGV[12]
redis.call('HSET', P .. 'e:' .. eid, 'event_id', eid, 'tenant_id', tenant_id, 'scope_path', scope_path,
  'subject', ARGV[13], 'action', ARGV[14], 'unit', unit, 'actual', S(amount), 'charged', S(charged),
  'overage_policy', policy, 'extra', ARGV[15], 'created_at_ms', string.format('%d', now))
redis.call('ZADD', P .. 'ez:created', now, eid)  -- the tenant's events by time (usage over time reads it)
local js = cjson.encode({event_id = eid, unit = unit, actual = S(amount), charged = S(charged),
                         balances = balance_records(ls)})
remember('event', key, payload_hash, js, nil, retention)
return ok(js, now, false)
