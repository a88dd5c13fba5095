-- reserve (live and dry run) and decide. ARGV: 1 prefix, 2 tenant, 3 retention_ms, 4 test clock, 5 endpoint, 6 key,
-- 7 payload hash, 8 unit, 9 amount, 10 scope_path, 11 scopes (json), 12 dry_run (1/0), 13 ttl_ms, 14 grace_ms,
-- 15 overage policy, 16 subject (json), 17 action (json), 18 metadata (json), 19 reservation id, 20 decision when
-- allowed (ALLOW / ALLOW_WITH_CAPS), 21 caps (json text, returned verbatim), 22 governing policy settings (json:
-- default_ttl_ms, max_ttl_ms, max_extensions, overage_policy), 23 reserve rate limits (json [[bucket, limit,
-- policy_id, scope]], limits as decimal strings), 24 commit rate limits (same, '' = none; kept on the reservation),
-- 25 governance generation the caller read its key, tenant and policies at ('' = no check), 26 v0.1.26 action
-- rules (json {deny: [reason, detail, message]?, quotas: [...]?}, '' = none; core.actions.Plan), 27 the request's
-- observe_mode ('' = the tenant's)
local tenant_id, retention, endpoint, key, payload_hash = ARGV[2], tonumber(ARGV[3]), ARGV[5], ARGV[6], ARGV[7]
local unit, amount, scope_path, scopes_json = ARGV[8], I(ARGV[9]), ARGV[10], ARGV[11]
local evaluate_only = ARGV[12] == '1' or endpoint == 'decide'
local now = now_ms()
local stale = stale_governance(ARGV[25])
if stale then return stale end

local replayed = replay(endpoint, key, payload_hash, now)
if replayed then return replayed end

local scopes = cjson.decode(scopes_json)
local observed = nil
local function base(decision)
  return {scope_path = scope_path, affected_scopes = scopes, unit = unit, amount = S(amount), decision = decision,
    observed = observed}
end
local function deny(reason, ls, detail)
  local r = base('DENY')
  r.reason_code = reason
  r.balances = balance_records(ls or {})
  r.deny_detail = detail
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
if endpoint == 'reserve' then
  local mode = ARGV[27]
  if mode == '' and tenant then mode = tenant.observe_mode end
  if mode == 'OBSERVE' then  -- shadow mode: the full evaluation, nothing changed
    evaluate_only = true
    observed = true
  end
end
-- v0.1.26 steps 1 to 3, before rate limits and budgets
local quotas, qrows = nil, nil
if ARGV[26] ~= '' then
  local gov = cjson.decode(ARGV[26])
  if gov.deny then
    local reason, detail = gov.deny[1], gov.deny[2]
    if evaluate_only then return deny(reason, nil, detail) end
    return fail(reason, gov.deny[3], {scope = detail.blocked_by_scope, deny_detail = detail})
  end
  if gov.quotas and #gov.quotas > 0 then
    local d
    quotas = gov.quotas
    qrows, d = quota_check(quotas, now)
    if d then
      if evaluate_only then return deny('ACTION_QUOTA_EXCEEDED', nil, d) end
      return fail('ACTION_QUOTA_EXCEEDED', quota_message(d.quota_violation),
        {scope = d.blocked_by_scope, deny_detail = d})
    end
  end
end

local limits = cjson.decode(ARGV[23])
if not evaluate_only and #limits > 0 then
  local rerr = rate_check(limits, now)
  if rerr then return rerr end
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

-- caps travel as the caller's JSON text (int64 values stay exact)
local decision = ARGV[20]
local function with_caps(r)
  return '{"caps":' .. ARGV[21] .. ',' .. string.sub(cjson.encode(r), 2)
end

if evaluate_only then
  local r = base(decision)
  r.balances = balance_records(ls)
  local js = with_caps(r)
  remember(endpoint, key, payload_hash, js, nil, retention)
  return ok(js, now, false)
end

-- Precedence for every setting: the request, then the governing policy, then the budget (overage
-- only), then the tenant, then the built-in default. Unset, null, 0 and '' all count as not set.
local function set(v) return v ~= nil and v ~= cjson.null and v ~= false and v ~= 0 and v ~= '' end
local function first(...)
  local n = select('#', ...)
  for i = 1, n do
    local v = select(i, ...)
    if set(v) then return v end
  end
  return nil
end
tenant = tenant or {}
local pol = cjson.decode(ARGV[22])
local ttl = first(tonumber(ARGV[13]), pol.default_ttl_ms, tenant.default_reservation_ttl_ms, 60000)
local max_ttl = first(pol.max_ttl_ms, tenant.max_reservation_ttl_ms)
if max_ttl then ttl = math.min(ttl, max_ttl) end
local grace = tonumber(ARGV[14]) or 5000
local budget_policy = nil
for i = #ls, 1, -1 do
  if set(ls[i].policy) then budget_policy = ls[i].policy; break end
end
local policy = first(ARGV[15], pol.overage_policy, budget_policy, tenant.default_commit_overage_policy,
  'ALLOW_IF_AVAILABLE')
local max_ext = pol.max_extensions
if max_ext == nil then max_ext = tenant.max_reservation_extensions end
if max_ext == nil or max_ext == cjson.null then max_ext = 10 end
if #limits > 0 then rate_count(limits, now) end
local runs = quotas and quota_count(quotas, qrows, now) or {}

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
if ARGV[24] ~= '' then redis.call('HSET', rk, 'commit_limits', ARGV[24]) end
if #runs > 0 then redis.call('HSET', rk, 'quota_runs', cjson.encode(runs)) end
redis.call('ZADD', k_created(), now, rid)
redis.call('ZADD', k_deadline(), expires + grace, rid)

local r = base(decision)
r.reservation_id = rid
r.expires_at_ms = string.format('%d', expires)
r.balances = balance_records(ls)
local js = with_caps(r)
remember(endpoint, key, payload_hash, js, rid, retention)
return ok(js, now, true)
