-- reserve (live and dry run) and decide. ARGV: 1 prefix, 2 tenant, 3 retention_ms, 4 test clock, 5 endpoint, 6 key,
-- 7 payload hash, 8 unit, 9 amount, 10 scope_path, 11 scopes (json), 12 dry_run (1/0), 13 ttl_ms, 14 grace_ms,
-- 15 overage policy, 16 subject (json), 17 action (json), 18 metadata (json), 19 reservation id
local tenant_id, retention, endpoint, key, payload_hash = ARGV[2], tonumber(ARGV[3]), ARGV[5], ARGV[6], ARGV[7]
local unit, amount, scope_path, scopes_json = ARGV[8], I(ARGV[9]), ARGV[10], ARGV[11]
local evaluate_only = ARGV[12] == '1' or endpoint == 'decide'
local now = now_ms()

local replayed = replay(endpoint, key, payload_hash, now)
if replayed then return replayed end

local scopes = cjson.decode(scopes_json)
local function base(decision)
  return {scope_path = scope_path, affected_scopes = scopes, unit = unit, amount = S(amount), decision = decision}
end
local function deny(reason, ls)
  local r = base('DENY')
  r.reason_code = reason
  r.balances = balance_records(ls or {})
  local js = cjson.encode(r)
  remember(endpoint, key, payload_hash, js, nil, retention)
  return ok(js, now, false)
end

local tenant = tenant_state()
if tenant == 'MALFORMED' then return fail('INTERNAL_ERROR', 'Malformed tenant record: ' .. tenant_id) end
local status = tenant and tenant.status
if status == 'CLOSED' then
  if evaluate_only then return deny('TENANT_CLOSED') end
  return fail('TENANT_CLOSED', 'Tenant ' .. tenant_id .. ' is closed')
end
if status == 'SUSPENDED' then
  if evaluate_only then return deny('TENANT_SUSPENDED') end
  return fail('FORBIDDEN', 'Tenant ' .. tenant_id .. ' is suspended; new reservations are refused')
end

local ls, err = scope_ledgers(scopes, unit)
if err then return err end
if #ls == 0 then
  if evaluate_only then return deny('BUDGET_NOT_FOUND') end
  return fail('NOT_FOUND', 'Budget not found for provided scope: ' .. scope_path, {scope = scope_path, unit = unit})
end
local code, scope, msg = check_reserve(ls, amount)
if code and expire_due(now, 1000) > 0 then
  ls = scope_ledgers(scopes, unit)
  code, scope, msg = check_reserve(ls, amount)
end
if code then
  if evaluate_only then return deny(code, ls) end
  return fail(code, msg, {scope = scope})
end

if evaluate_only then
  local r = base('ALLOW')
  r.balances = balance_records(ls)
  local js = cjson.encode(r)
  remember(endpoint, key, payload_hash, js, nil, retention)
  return ok(js, now, false)
end

tenant = tenant or {}
local ttl = tonumber(ARGV[13]) or tenant.default_reservation_ttl_ms or 60000
if tenant.max_reservation_ttl_ms and tenant.max_reservation_ttl_ms ~= cjson.null then
  ttl = math.min(ttl, tenant.max_reservation_ttl_ms)
end
local grace = tonumber(ARGV[14]) or 5000
local policy = ARGV[15]
if policy == '' then
  policy = nil
  for i = #ls, 1, -1 do
    if ls[i].policy and ls[i].policy ~= '' then policy = ls[i].policy; break end
  end
  policy = policy or tenant.default_commit_overage_policy or 'ALLOW_IF_AVAILABLE'
end
local max_ext = tenant.max_reservation_extensions
if max_ext == nil or max_ext == cjson.null then max_ext = 10 end

local budgeted = {}
for i, l in ipairs(ls) do
  l.reserved = iadd(l.reserved, amount)
  save_ledger(l, now)
  budgeted[i] = l.scope
end
local rid = ARGV[19]
local expires = now + ttl
local rk = k_res(rid)
redis.call('HSET', rk, 'reservation_id', rid, 'tenant_id', tenant_id, 'status', 'ACTIVE', 'subject', ARGV[16],
  'action', ARGV[17], 'unit', unit, 'amount', S(amount), 'scope_path', scope_path, 'affected_scopes', scopes_json,
  'budgeted_scopes', cjson.encode(budgeted), 'created_at_ms', string.format('%d', now),
  'expires_at_ms', string.format('%d', expires), 'grace_ms', string.format('%d', grace),
  'deadline_ms', string.format('%d', expires + grace), 'overage_policy', policy, 'idempotency_key', key,
  'extensions', '0', 'max_extensions', string.format('%d', max_ext))
if ARGV[18] ~= '' then redis.call('HSET', rk, 'metadata', ARGV[18]) end
redis.call('ZADD', k_created(), now, rid)
redis.call('ZADD', k_deadline(), expires + grace, rid)

local r = base('ALLOW')
r.reservation_id = rid
r.expires_at_ms = string.format('%d', expires)
r.balances = balance_records(ls)
local js = cjson.encode(r)
remember(endpoint, key, payload_hash, js, rid, retention)
return ok(js, now, true)
