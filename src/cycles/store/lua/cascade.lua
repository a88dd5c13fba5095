-- one bounded step of a CLOSED tenant's cascade: release up to `batch` ACTIVE reservations (their holds go
-- back); when fewer were left, close every budget, revoke every key, disable every webhook and mark the
-- cascade DONE. ARGV: 1 prefix, 2 tenant, 3 unused, 4 test clock, 5 batch
local tenant_id, batch = ARGV[2], tonumber(ARGV[5])
local now = now_ms()
local nows = string.format('%d', now)
local t = tenant_state()
if t == 'MALFORMED' then return fail('INTERNAL_ERROR', 'Malformed tenant record: ' .. tenant_id) end
if not t or t.status ~= 'CLOSED' then return cjson.encode({done = true}) end

-- every ACTIVE reservation is in the deadline queue (commit, release and expiry take it out)
local released = 0
while released < batch do
  local ids = redis.call('ZRANGE', k_deadline(), 0, batch - released - 1)
  if #ids == 0 then break end
  for _, rid in ipairs(ids) do
    if redis.call('HGET', k_res(rid), 'status') == 'ACTIVE' then
      unhold_reservation(rid, now)
      redis.call('HSET', k_res(rid), 'status', 'RELEASED', 'finalized_at_ms', nows)
      released = released + 1
    end
    redis.call('ZREM', k_deadline(), rid)
  end
end
if released == batch then return cjson.encode({done = false}) end

for _, member in ipairs(redis.call('ZRANGE', k_budgets(), 0, -1)) do
  local sep = string.find(member, '|[^|]*$')
  local l = load_ledger(string.sub(member, 1, sep - 1), string.sub(member, sep + 1))
  if l and l.status ~= 'CLOSED' then
    redis.call('HSET', P .. 'b:' .. member, 'status', 'CLOSED', 'updated_at_ms', nows)
    l.status = 'CLOSED'
    count_ledger(l)
  end
end
for _, key_id in ipairs(redis.call('ZRANGE', P .. 'apikeys', 0, -1)) do
  local key_prefix = redis.call('HGET', K_KEY_IDS, key_id)
  local raw = key_prefix and redis.call('GET', k_apikey(key_prefix))
  if raw and jvalue(raw, 'status') ~= 'REVOKED' then
    redis.call('SET', k_apikey(key_prefix), jpatch(raw, {{'status', '"REVOKED"'}, {'revoked_at_ms', nows},
                                                        {'revoked_reason', '"tenant closed"'}}))
  end
end
for _, doc_id in ipairs(redis.call('ZRANGE', P .. 'docs:webhook', 0, -1)) do
  local dk = k_doc('webhook', doc_id)
  local d = redis.call('HMGET', dk, 'v', 'r')
  if d[2] and jvalue(d[2], 'status') ~= 'DISABLED' then
    local v = string.format('%d', (tonumber(d[1]) or 0) + 1)
    redis.call('HSET', dk, 'v', v, 'r', jpatch(d[2], {{'status', '"DISABLED"'}, {'version', v}}))
  end
end
redis.call('SET', k_tenant(), jpatch(redis.call('GET', k_tenant()), {{'cascade', '"DONE"'}}))
return cjson.encode({done = true})
