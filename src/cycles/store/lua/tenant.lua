-- create (ARGV 5 = 'create') or update (ARGV 5 = 'update') a tenant record. ARGV: 1 prefix, 2 tenant,
-- 3 unused, 4 test clock, 5 mode, 6 record json (create) or changes json (update), 7 now iso (update)
local tenant_id, mode = ARGV[2], ARGV[5]
local raw = redis.call('GET', k_tenant())
if mode == 'create' then
  if raw then return cjson.encode({created = false, record = raw}) end
  redis.call('SET', k_tenant(), ARGV[6])
  if not CLUSTER then redis.call('SADD', K_TENANTS, tenant_id) end  -- on a cluster the caller adds it first
  count('tenants.' .. tostring(jvalue(ARGV[6], 'status')), 1)
  return cjson.encode({created = true, record = ARGV[6]})
end
if not raw then return fail('NOT_FOUND', 'Tenant ' .. tenant_id .. ' not found') end
local t = tenant_state()
if t == 'MALFORMED' then return fail('INTERNAL_ERROR', 'Malformed tenant record: ' .. tenant_id) end
if t.status == 'CLOSED' then return fail('TENANT_CLOSED', 'Tenant ' .. tenant_id .. ' is closed') end
-- The record is patched as text: members the change does not name stay exactly as stored.
local changes = ARGV[6]
local status, patch = jvalue(changes, 'status'), {}
local now_iso = jstr(ARGV[7])
if status == 'SUSPENDED' and t.status ~= 'SUSPENDED' then table.insert(patch, {'suspended_at', now_iso}) end
if status == 'CLOSED' then
  table.insert(patch, {'closed_at', now_iso})
  table.insert(patch, {'cascade', '"PENDING"'})  -- finished by cascade.lua, resumed after a crash
end
for _, m in ipairs(jmembers(changes)) do table.insert(patch, m) end
table.insert(patch, {'updated_at', now_iso})
local js = jpatch(raw, patch)
redis.call('SET', k_tenant(), js)
bump_governance(tenant_id)
local new_status = jvalue(js, 'status')
if new_status ~= t.status then
  count('tenants.' .. tostring(t.status), -1)
  count('tenants.' .. tostring(new_status), 1)
end
return cjson.encode({record = js})
