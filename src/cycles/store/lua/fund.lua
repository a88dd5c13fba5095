-- budget funding. ARGV: 1 prefix, 2 tenant, 3 retention_ms, 4 test clock, 5 key ('' = none), 6 payload hash, 7 scope,
-- 8 unit, 9 operation, 10 amount, 11 spent ('' = none)
local tenant_id, retention, key, payload_hash = ARGV[2], tonumber(ARGV[3]), ARGV[5], ARGV[6]
local scope, unit, op, amount = ARGV[7], ARGV[8], ARGV[9], I(ARGV[10])
local now = now_ms()
if key ~= '' then
  local replayed = replay('fund', key, payload_hash, now)
  if replayed then return replayed end
end
local tenant = tenant_state()
if tenant == 'MALFORMED' then return fail('INTERNAL_ERROR', 'Malformed tenant record: ' .. tenant_id) end
if not tenant then return fail('NOT_FOUND', 'Tenant ' .. tenant_id .. ' not found') end
if tenant.status == 'CLOSED' then return fail('TENANT_CLOSED', 'Tenant ' .. tenant_id .. ' is closed') end
local l = load_ledger(scope, unit)
if not l then return fail('NOT_FOUND', 'Budget not found for scope ' .. scope .. ' and unit ' .. unit) end
if l.status == 'FROZEN' then return fail('BUDGET_FROZEN', 'Budget is frozen for scope ' .. scope) end
if l.status == 'CLOSED' then return fail('BUDGET_CLOSED', 'Budget is closed for scope ' .. scope) end
local before = {S(l.allocated), S(remaining(l)), S(l.debt), S(l.spent)}
local function over64(v, what)
  if icmp(v, INT64_MAX) > 0 then return fail('INVALID_REQUEST', what .. ' would exceed the int64 range') end
end
if op == 'CREDIT' then
  local e = over64(iadd(l.allocated, amount), 'allocated'); if e then return e end
  l.allocated = iadd(l.allocated, amount)
elseif op == 'DEBIT' then
  if icmp(isub(remaining(l), amount), ZERO) < 0 then
    return fail('BUDGET_EXCEEDED', 'DEBIT of ' .. S(amount) .. ' would make remaining negative for scope ' .. scope ..
      ' (remaining ' .. S(remaining(l)) .. ')')
  end
  l.allocated = isub(l.allocated, amount)
elseif op == 'RESET' then
  l.allocated = amount
elseif op == 'RESET_SPENT' then
  l.allocated = amount
  l.spent = I(ARGV[11])
elseif op == 'REPAY_DEBT' then
  local repay = imin(amount, l.debt)
  local e = over64(iadd(l.allocated, amount), 'allocated') or over64(iadd(l.spent, repay), 'spent')
  if e then return e end
  l.debt = isub(l.debt, repay)
  l.spent = iadd(l.spent, repay)
  l.allocated = iadd(l.allocated, amount)
else
  return fail('INVALID_REQUEST', 'unknown funding operation ' .. op)
end
if icmp(remaining(l), INT64_MIN) < 0 then
  return fail('INVALID_REQUEST', op .. ' would push remaining below the int64 range')
end
l.is_over_limit = icmp(l.debt, l.overdraft_limit) > 0
save_ledger(l, now)
if op == 'RESET' or op == 'RESET_SPENT' then
  -- a reset sets the allocation of every later period too
  local bk = k_budget(scope, unit)
  local extra = redis.call('HGET', bk, 'extra') or '{}'
  if jget(extra, 'period_allocation') ~= nil then
    redis.call('HSET', bk, 'extra', jpatch(extra, {{'period_allocation', ARGV[10]}}))
  end
end
local js = cjson.encode({operation = op, unit = unit, timestamp_ms = string.format('%d', now), previous = before,
                         new = {S(l.allocated), S(remaining(l)), S(l.debt), S(l.spent)}})
if key ~= '' then remember('fund', key, payload_hash, js, nil, retention) end
return ok(js, now, false)
