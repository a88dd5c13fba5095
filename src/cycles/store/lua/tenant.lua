-- create (ARGV 5 = 'create') or update (ARGV 5 = 'update') a tenant record. ARGV: 1 prefix, 2 tenant,
-- 3 unused, 4 test clock, 5 mode, 6 record json (create) or changes json (update), 7 now iso (update)
local tenant_id, mode = ARGV[2], ARGV[5]
local raw = redis.call('GET', k_tenant())
if mode == 'create' then
  if raw then return cjson.encode({created = false, record = raw}) end
  redis.call('SET', k_tenant(), ARGV[6])
  return cjson.encode({created = true, record = ARGV[6]})
end
if not raw then return fail('NOT_FOUND', 'Tenant ' .. tenant_id .. ' not found') end
local t = tenant_state()
if t == 'MALFORMED' then return fail('INTERNAL_ERROR', 'Malformed tenant record: ' .. tenant_id) end
if t.status == 'CLOSED' then return fail('TENANT_CLOSED', 'Tenant ' .. tenant_id .. ' is closed') end
local changes = cjson.decode(ARGV[6])
if changes.status == 'SUSPENDED' and t.status ~= 'SUSPENDED' then t.suspended_at = ARGV[7] end
if changes.status == 'CLOSED' then t.closed_at = ARGV[7] end
for k, v in pairs(changes) do t[k] = v end
t.updated_at = ARGV[7]
local js = cjson.encode(t)
redis.call('SET', k_tenant(), js)
return cjson.encode({record = js})
