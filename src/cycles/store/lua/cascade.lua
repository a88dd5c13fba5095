-- one bounded step of a CLOSED tenant's cascade: release up to `batch` ACTIVE reservations (their holds go
-- back); when fewer were left, close every budget, revoke every key, disable every webhook and mark the
-- cascade DONE. Each change has its event (cascade_reason tenant_closed, one correlation id per close):
-- one reservation.released_via_tenant_cascade per ledger and step, then one per budget, key and webhook,
-- in the order of the SQLite store (ledgers by scope and unit, keys by key id, webhooks by id).
-- ARGV: 1 prefix, 2 tenant, 3 unused, 4 test clock, 5 batch
local tenant_id, batch = ARGV[2], tonumber(ARGV[5])
local now = now_ms()
local nows = string.format('%d', now)
local t = tenant_state()
if t == 'MALFORMED' then return fail('INTERNAL_ERROR', 'Malformed tenant record: ' .. tenant_id) end
if not t or t.status ~= 'CLOSED' then return cjson.encode({done = true}) end

local closed_at = t.closed_at
if closed_at == nil then closed_at = '' elseif closed_at == cjson.null then closed_at = 'None' end
local corr = 'tenant_close_cascade:' .. tenant_id .. ':' .. tostring(closed_at)
local function cascade_event(event_type, scope, members)
  table.insert(members, {'cascade_reason', '"tenant_closed"'})
  emit(event_type, tenant_id, scope, jobj(members), false, corr)
end
local function by_scope_unit(a, b)
  if a.scope ~= b.scope then return blt(a.scope, b.scope) end
  return blt(a.unit, b.unit)
end

-- every ACTIVE reservation is in the deadline queue (commit, release and expiry take it out)
local released = 0
local freed, freed_list = {}, {}
while released < batch do
  local ids = redis.call('ZRANGE', k_deadline(), 0, batch - released - 1)
  if #ids == 0 then break end
  for _, rid in ipairs(ids) do
    if redis.call('HGET', k_res(rid), 'status') == 'ACTIVE' then
      local unit, amount, scopes = unhold_reservation(rid, now)
      for _, scope in ipairs(scopes) do
        local id = scope .. '|' .. unit
        if not freed[id] then
          freed[id] = {scope = scope, unit = unit, amount = ZERO}
          table.insert(freed_list, freed[id])
        end
        freed[id].amount = iadd(freed[id].amount, amount)
      end
      redis.call('HSET', k_res(rid), 'status', 'RELEASED', 'finalized_at_ms', nows)
      released = released + 1
    end
    redis.call('ZREM', k_deadline(), rid)
  end
end
table.sort(freed_list, by_scope_unit)
for _, f in ipairs(freed_list) do
  cascade_event('reservation.released_via_tenant_cascade', f.scope,
    {{'scope', jstr(f.scope)}, {'unit', jstr(f.unit)}, {'released_amount', S(f.amount)}})
end
if released == batch then return cjson.encode({done = false}) end

local ledgers = {}
for _, member in ipairs(redis.call('ZRANGE', k_budgets(), 0, -1)) do
  local sep = string.find(member, '|[^|]*$')
  table.insert(ledgers, {scope = string.sub(member, 1, sep - 1), unit = string.sub(member, sep + 1), member = member})
end
table.sort(ledgers, by_scope_unit)
for _, b in ipairs(ledgers) do
  local l = load_ledger(b.scope, b.unit)
  if l and l.status ~= 'CLOSED' then
    cascade_event('budget.closed_via_tenant_cascade', b.scope, {
      {'ledger_id', jopt(redis.call('HGET', P .. 'b:' .. b.member, 'ledger_id'))}, {'scope', jstr(b.scope)},
      {'unit', jstr(b.unit)}, {'prior_status', jstr(l.status)}, {'new_status', '"CLOSED"'}})
    redis.call('HSET', P .. 'b:' .. b.member, 'status', 'CLOSED', 'updated_at_ms', nows)
    l.status = 'CLOSED'
    count_ledger(l)
  end
end
local key_ids = redis.call('ZRANGE', P .. 'apikeys', 0, -1)
table.sort(key_ids, blt)
for _, key_id in ipairs(key_ids) do
  local key_prefix = redis.call('HGET', K_KEY_IDS, key_id)
  local raw = key_prefix and redis.call('GET', k_apikey(key_prefix))
  if raw and jvalue(raw, 'status') ~= 'REVOKED' then
    cascade_event('api_key.revoked_via_tenant_cascade', nil, {{'key_id', jstr(key_id)},
      {'name', jget(raw, 'name') or 'null'}, {'prior_status', jget(raw, 'status') or 'null'},
      {'new_status', '"REVOKED"'}})
    bump_governance(jvalue(raw, 'tenant_id'))
    redis.call('SET', k_apikey(key_prefix), jpatch(raw, {{'status', '"REVOKED"'}, {'revoked_at_ms', nows},
                                                        {'revoked_reason', '"tenant closed"'}}))
  end
end
for _, doc_id in ipairs(redis.call('ZRANGE', P .. 'docs:webhook', 0, -1)) do
  local dk = k_doc('webhook', doc_id)
  local d = redis.call('HMGET', dk, 'v', 'r')
  if d[2] and jvalue(d[2], 'status') ~= 'DISABLED' then
    cascade_event('webhook.disabled_via_tenant_cascade', nil, {{'subscription_id', jstr(doc_id)},
      {'prior_status', jget(d[2], 'status') or 'null'}, {'new_status', '"DISABLED"'}})
    local v = string.format('%d', (tonumber(d[1]) or 0) + 1)
    redis.call('HSET', dk, 'v', v, 'r', jpatch(d[2], {{'status', '"DISABLED"'}, {'version', v}}))
  end
end
redis.call('SET', k_tenant(), jpatch(redis.call('GET', k_tenant()), {{'cascade', '"DONE"'}}))
return cjson.encode({done = true})
