-- Shared prelude of every Cycles script (prepended by the Python loader).
--
-- Amounts are int64, but Lua numbers are doubles (exact only to 2^53), so ledger arithmetic uses
-- pairs {hi, lo} with value = hi * 1e9 + lo and 0 <= lo < 1e9; hi stays below 1e10, exact in a double.
-- Every int64 crosses the script boundary as a decimal string, never as a cjson number (cjson keeps
-- only 14 significant digits).

local B = 1000000000

local function isub(a, b)
  local lo, hi = a[2] - b[2], a[1] - b[1]
  if lo < 0 then lo = lo + B; hi = hi - 1 end
  return {hi, lo}
end

local function iadd(a, b)
  local lo, hi = a[2] + b[2], a[1] + b[1]
  if lo >= B then lo = lo - B; hi = hi + 1 end
  return {hi, lo}
end

local function I(s)
  if s == nil or s == false or s == '' then return {0, 0} end
  s = tostring(s)
  local neg = string.sub(s, 1, 1) == '-'
  if neg then s = string.sub(s, 2) end
  local n = #s
  local v
  if n > 9 then v = {tonumber(string.sub(s, 1, n - 9)), tonumber(string.sub(s, n - 8))} else v = {0, tonumber(s)} end
  if neg then return isub({0, 0}, v) end
  return v
end

local function icmp(a, b)
  if a[1] ~= b[1] then if a[1] < b[1] then return -1 else return 1 end end
  if a[2] ~= b[2] then if a[2] < b[2] then return -1 else return 1 end end
  return 0
end

local function imin(a, b) if icmp(a, b) <= 0 then return a end return b end
local function imax(a, b) if icmp(a, b) >= 0 then return a end return b end

local function S(a)
  local hi, lo = a[1], a[2]
  if hi == 0 then return string.format('%d', lo) end
  if hi > 0 then return string.format('%d%09d', hi, lo) end
  local nhi, nlo = -hi, 0
  if lo > 0 then nhi = nhi - 1; nlo = B - lo end
  if nhi == 0 then return '-' .. string.format('%d', nlo) end
  return '-' .. string.format('%d%09d', nhi, nlo)
end

local ZERO = {0, 0}
local INT64_MAX = I('9223372036854775807')
local INT64_MIN = I('-9223372036854775808')

-- ARGV[4] is a test clock in epoch ms: always 0 in production (time is Redis TIME); tests that
-- drive time themselves pass their clock's value.
local TEST_NOW = tonumber(ARGV[4]) or 0
local function now_ms()
  if TEST_NOW > 0 then return TEST_NOW end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function fail(code, msg, details)
  return cjson.encode({err = code, msg = msg, details = details})
end

-- ---- keys (every key of a tenant shares the hash tag in P, so a script touches one slot) ----
local P = ARGV[1]
local function k_tenant() return P .. 'tenant' end
local function k_budget(scope, unit) return P .. 'b:' .. scope .. '|' .. unit end
local function k_budgets() return P .. 'budgets' end
local function k_res(rid) return P .. 'r:' .. rid end
local function k_created() return P .. 'rz:created' end
local function k_deadline() return P .. 'rz:deadline' end
local function k_idem(endpoint, key) return P .. 'i:' .. endpoint .. ':' .. key end

-- ---- governance state ----
local function tenant_state()
  local raw = redis.call('GET', k_tenant())
  if not raw then return nil end
  local ok, rec = pcall(cjson.decode, raw)
  if not ok or type(rec) ~= 'table' or (rec.status ~= 'ACTIVE' and rec.status ~= 'SUSPENDED' and rec.status ~= 'CLOSED') then
    return 'MALFORMED'
  end
  return rec
end

-- ---- ledgers ----
local FIELDS = {'allocated', 'spent', 'reserved', 'debt', 'overdraft_limit', 'is_over_limit', 'status', 'commit_overage_policy'}

local function load_ledger(scope, unit)
  local v = redis.call('HMGET', k_budget(scope, unit), unpack(FIELDS))
  if not v[1] then return nil end
  return {scope = scope, unit = unit, allocated = I(v[1]), spent = I(v[2]), reserved = I(v[3]), debt = I(v[4]),
          overdraft_limit = I(v[5]), is_over_limit = v[6] == '1', status = v[7] or 'ACTIVE', policy = v[8]}
end

local function remaining(l) return isub(isub(isub(l.allocated, l.spent), l.reserved), l.debt) end

local function save_ledger(l, now)
  local over = '0'
  if l.is_over_limit then over = '1' end
  redis.call('HSET', k_budget(l.scope, l.unit), 'allocated', S(l.allocated), 'spent', S(l.spent),
    'reserved', S(l.reserved), 'debt', S(l.debt), 'is_over_limit', over, 'updated_at_ms', string.format('%d', now))
end

local function balance_record(l)
  return {l.scope, l.unit, S(l.allocated), S(l.spent), S(l.reserved), S(l.debt), S(l.overdraft_limit), l.is_over_limit}
end

local function balance_records(ls)
  local out = {}
  for i, l in ipairs(ls) do out[i] = balance_record(l) end
  return out
end

-- Ledgers of `scopes` in `unit` in canonical order; a UNIT_MISMATCH error string when only other units exist.
local UNITS = {'USD_MICROCENTS', 'TOKENS', 'CREDITS', 'RISK_POINTS'}
local function scope_ledgers(scopes, unit)
  local out = {}
  for _, scope in ipairs(scopes) do
    local l = load_ledger(scope, unit)
    if l then table.insert(out, l) end
  end
  if #out == 0 then
    for _, scope in ipairs(scopes) do
      local others = {}
      for _, u in ipairs(UNITS) do
        if u ~= unit and redis.call('EXISTS', k_budget(scope, u)) == 1 then table.insert(others, u) end
      end
      if #others > 0 then
        table.sort(others)
        return nil, fail('UNIT_MISMATCH', 'No budget in unit ' .. unit .. ' at the derived scopes; scope ' .. scope ..
          ' has budgets in ' .. table.concat(others, ', '), {scope = scope, requested_unit = unit, expected_units = others})
      end
    end
  end
  return out, nil
end

-- ---- idempotency ----
local function replay(endpoint, key, payload_hash, now)
  local v = redis.call('HMGET', k_idem(endpoint, key), 'h', 'r', 'rid')
  if not v[1] then return nil end
  if v[1] ~= payload_hash then
    return fail('IDEMPOTENCY_MISMATCH', 'Idempotency key ' .. key .. ' was already used with a different request payload')
  end
  local active = false
  if v[3] then
    local s = redis.call('HMGET', k_res(v[3]), 'status', 'expires_at_ms')
    active = s[1] == 'ACTIVE' and s[2] and now <= tonumber(s[2])
  end
  return cjson.encode({replay = true, result = v[2], active = active, now = now})
end

local function remember(endpoint, key, payload_hash, result_json, rid, retention_ms)
  local k = k_idem(endpoint, key)
  if rid then
    redis.call('HSET', k, 'h', payload_hash, 'r', result_json, 'rid', rid)
  else
    redis.call('HSET', k, 'h', payload_hash, 'r', result_json)
  end
  redis.call('PEXPIRE', k, retention_ms)
end

local function ok(result_json, now, active)
  return '{"replay":false,"now":' .. string.format('%d', now) .. ',"active":' .. tostring(active) .. ',"result":' .. result_json .. '}'
end

-- ---- leases ----
local function unhold_reservation(rid, now)
  local r = redis.call('HMGET', k_res(rid), 'unit', 'amount', 'budgeted_scopes')
  local amount = I(r[2])
  for _, scope in ipairs(cjson.decode(r[3])) do
    local l = load_ledger(scope, r[1])
    if l then
      l.reserved = isub(l.reserved, amount)
      save_ledger(l, now)
    end
  end
end

-- Expire leases past expires_at + grace; each is returned exactly once (the deadline index entry goes with it).
local function expire_due(now, limit)
  local due = redis.call('ZRANGEBYSCORE', k_deadline(), '-inf', '(' .. string.format('%d', now), 'LIMIT', 0, limit)
  local n = 0
  for _, rid in ipairs(due) do
    if redis.call('HGET', k_res(rid), 'status') == 'ACTIVE' then
      unhold_reservation(rid, now)
      redis.call('HSET', k_res(rid), 'status', 'EXPIRED')
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

local function guard_closed(tenant_id)
  local t = tenant_state()
  if t == 'MALFORMED' then return nil, fail('INTERNAL_ERROR', 'Malformed tenant record: ' .. tenant_id) end
  if t and t.status == 'CLOSED' then return nil, fail('TENANT_CLOSED', 'Tenant ' .. tenant_id .. ' is closed') end
  return t, nil
end
