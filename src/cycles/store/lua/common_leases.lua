-- ---- leases ----
-- Returns the hold back to the reservation's ledgers; returns the unit, the amount and the scopes held.
local function unhold_reservation(rid, now)
  local r = redis.call('HMGET', k_res(rid), 'unit', 'amount', 'budgeted_scopes', 'quota_runs')
  local amount = I(r[2])
  quota_uncount(r[4])
  local held = {}
  for _, scope in ipairs(cjson.decode(r[3])) do
    local l = load_ledger(scope, r[1])
    if l then
      l.reserved = isub(l.reserved, amount)
      save_ledger(l, now)
      table.insert(held, scope)
    end
  end
  return r[1], amount, held
end

-- Expire leases past expires_at + grace; each is returned exactly once (the deadline index entry goes with it).
local function expire_due(now, limit)
  local due = redis.call('ZRANGEBYSCORE', k_deadline(), '-inf', '(' .. string.format('%d', now), 'LIMIT', 0, limit)
  local n = 0
  for _, rid in ipairs(due) do
    if redis.call('HGET', k_res(rid), 'status') == 'ACTIVE' then
      unhold_reservation(rid, now)
      redis.call('HSET', k_res(rid), 'status', 'EXPIRED')
      local r = redis.call('HMGET', k_res(rid), 'scope_path', 'unit', 'amount', 'created_at_ms', 'expires_at_ms',
        'extensions')
      emit('reservation.expired', ARGV[2], r[1], jobj({{'reservation_id', jstr(rid)}, {'scope', jstr(r[1])},
        {'unit', jstr(r[2])}, {'estimated_amount', S(I(r[3]))}, {'created_at_ms', S(I(r[4]))},
        {'expired_at_ms', string.format('%d', now)}, {'ttl_ms', S(isub(I(r[5]), I(r[4])))},
        {'extensions_used', S(I(r[6]))}}), true)
      n = n + 1
    end
    redis.call('ZREM', k_deadline(), rid)
  end
  return n
end

-- ---- ledger rules (the same as cycles.core.ledger) ----
local function check_reserve(ls, amount)
  for _, l in ipairs(ls) do
    if l.status == 'CLOSED' then return 'BUDGET_CLOSED', l.scope, 'Budget is closed for scope ' .. l.scope end
  end
  for _, l in ipairs(ls) do
    if l.status == 'FROZEN' then return 'BUDGET_FROZEN', l.scope, 'Budget is frozen for scope ' .. l.scope end
  end
  for _, l in ipairs(ls) do
    if l.is_over_limit then
      return 'OVERDRAFT_LIMIT_EXCEEDED', l.scope,
        'Scope ' .. l.scope .. ' is over its overdraft limit; no new reservations until reconciled'
    end
  end
  for _, l in ipairs(ls) do
    if icmp(l.debt, ZERO) > 0 and icmp(l.overdraft_limit, ZERO) == 0 then
      return 'DEBT_OUTSTANDING', l.scope, 'Scope ' .. l.scope .. ' has outstanding debt ' .. S(l.debt)
    end
  end
  for _, l in ipairs(ls) do
    if icmp(remaining(l), amount) < 0 then
      return 'BUDGET_EXCEEDED', l.scope, 'Insufficient remaining budget for scope ' .. l.scope .. ': remaining ' ..
        S(remaining(l)) .. ', requested ' .. S(amount)
    end
  end
  return nil
end

-- Charge `actual` against ledgers holding `held` for it; mutates ls. Returns charged or nil, error.
local function settle_unchecked(ls, held, actual, policy, reject_any)
  local delta = isub(actual, held)
  local function plain()
    for _, l in ipairs(ls) do l.reserved = isub(l.reserved, held); l.spent = iadd(l.spent, actual) end
    return actual
  end
  if icmp(delta, ZERO) <= 0 then return plain() end
  if policy == 'REJECT' and reject_any then
    return nil, fail('BUDGET_EXCEEDED', 'Actual ' .. S(actual) .. ' exceeds the reserved ' .. S(held) ..
      ' and the overage policy is REJECT', {scope = ls[1].scope, reserved = S(held), actual = S(actual)})
  end
  local shorts, any = {}, false
  for i, l in ipairs(ls) do
    shorts[i] = imax(ZERO, isub(delta, imax(ZERO, remaining(l))))
    if icmp(shorts[i], ZERO) > 0 then any = true end
  end
  if not any then return plain() end
  if policy == 'REJECT' then
    for i, l in ipairs(ls) do
      if icmp(shorts[i], ZERO) > 0 then
        return nil, fail('BUDGET_EXCEEDED', 'Actual ' .. S(actual) .. ' exceeds what is available for scope ' ..
          l.scope .. ' and the overage policy is REJECT', {scope = l.scope})
      end
    end
  end
  if policy == 'ALLOW_WITH_OVERDRAFT' then
    for i, l in ipairs(ls) do
      if icmp(iadd(l.debt, shorts[i]), l.overdraft_limit) > 0 then
        return nil, fail('OVERDRAFT_LIMIT_EXCEEDED', 'Overdraft limit exceeded for scope ' .. l.scope .. ': debt ' ..
          S(l.debt) .. ' + shortfall ' .. S(shorts[i]) .. ' > limit ' .. S(l.overdraft_limit),
          {scope = l.scope, debt = S(l.debt), shortfall = S(shorts[i]), overdraft_limit = S(l.overdraft_limit)})
      end
    end
    for i, l in ipairs(ls) do
      l.reserved = isub(l.reserved, held)
      l.spent = iadd(l.spent, isub(actual, shorts[i]))
      l.debt = iadd(l.debt, shorts[i])
      if icmp(l.debt, l.overdraft_limit) > 0 then l.is_over_limit = true end
    end
    return actual
  end
  -- ALLOW_IF_AVAILABLE: charge what every scope can cover; flag the scopes that could not cover it all.
  local covered = delta
  for _, l in ipairs(ls) do covered = imin(covered, imax(ZERO, remaining(l))) end
  local charged = iadd(held, covered)
  for i, l in ipairs(ls) do
    l.reserved = isub(l.reserved, held)
    l.spent = iadd(l.spent, charged)
    if icmp(shorts[i], ZERO) > 0 then l.is_over_limit = true end
  end
  return charged
end

local function settle(ls, held, actual, policy, reject_any)
  local charged, err = settle_unchecked(ls, held, actual, policy, reject_any)
  if err then return nil, err end
  for _, l in ipairs(ls) do
    if icmp(l.spent, INT64_MAX) > 0 then
      return nil, fail('INVALID_REQUEST', 'charging ' .. S(actual) .. ' would take spent past the int64 range for scope ' .. l.scope)
    end
  end
  return charged
end

-- the guard of admin writes: the tenant must exist and not be CLOSED
local function guard_open(tenant_id)
  local t = tenant_state(prefix_of(tenant_id) .. 'tenant')
  if t == 'MALFORMED' then return fail('INTERNAL_ERROR', 'Malformed tenant record: ' .. tenant_id) end
  if not t then return fail('NOT_FOUND', 'Tenant ' .. tenant_id .. ' not found') end
  if t.status == 'CLOSED' then return fail('TENANT_CLOSED', 'Tenant ' .. tenant_id .. ' is closed') end
  return nil
end

local function guard_closed(tenant_id)
  local t = tenant_state()
  if t == 'MALFORMED' then return nil, fail('INTERNAL_ERROR', 'Malformed tenant record: ' .. tenant_id) end
  if t and t.status == 'CLOSED' then return nil, fail('TENANT_CLOSED', 'Tenant ' .. tenant_id .. ' is closed') end
  return t, nil
end
