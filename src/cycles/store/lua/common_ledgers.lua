-- ---- rate limits: a sliding window over two fixed one-minute windows (cycles.core.policies) ----
local WINDOW = 60000
-- limits: {{bucket, limit (decimal string), policy_id, scope}, ...}; an error JSON when one is full
local function rate_check(limits, now)
  local w = math.floor(now / WINDOW)
  local elapsed = now - w * WINDOW
  for _, lim in ipairs(limits) do
    local prev = tonumber(redis.call('GET', k_rate(lim[1], w - 1)) or '0')
    local cur = tonumber(redis.call('GET', k_rate(lim[1], w)) or '0')
    if prev * (WINDOW - elapsed) + cur * WINDOW + WINDOW > tonumber(lim[2]) * WINDOW then
      return cjson.encode({err = 'RATE_LIMITED', rate = {lim[1], lim[2], lim[3], lim[4], string.format('%d', prev),
                                                         string.format('%d', cur), string.format('%d', now)}})
    end
  end
  return nil
end

local function rate_count(limits, now)
  local w = math.floor(now / WINDOW)
  for _, lim in ipairs(limits) do
    local k = k_rate(lim[1], w)
    redis.call('INCR', k)
    redis.call('PEXPIRE', k, 180000)
  end
end

-- ---- governance state ----
local function tenant_state(key)
  local raw = redis.call('GET', key or k_tenant())
  if not raw then return nil end
  local ok, rec = pcall(cjson.decode, raw)
  if not ok or type(rec) ~= 'table' or (rec.status ~= 'ACTIVE' and rec.status ~= 'SUSPENDED' and rec.status ~= 'CLOSED') then
    return 'MALFORMED'
  end
  return rec
end

-- ---- ledgers ----
local FIELDS = {'allocated', 'spent', 'reserved', 'debt', 'overdraft_limit', 'is_over_limit', 'status', 'commit_overage_policy'}

local function remaining(l) return isub(isub(isub(l.allocated, l.spent), l.reserved), l.debt) end

local function load_ledger(scope, unit)
  local v = redis.call('HMGET', k_budget(scope, unit), unpack(FIELDS))
  if not v[1] then return nil end
  local l = {scope = scope, unit = unit, allocated = I(v[1]), spent = I(v[2]), reserved = I(v[3]), debt = I(v[4]),
             overdraft_limit = I(v[5]), is_over_limit = v[6] == '1', status = v[7] or 'ACTIVE', policy = v[8]}
  l.stored = {over = l.is_over_limit, debt = icmp(l.debt, ZERO) > 0, status = l.status}
  -- the state events compare against (cycles.core.events.transitions)
  l.prev = {remaining = remaining(l), over = l.is_over_limit, debt = l.debt}
  return l
end

-- cycles.core.events.ledger_state as JSON members
local function ledger_state(l)
  return {{'allocated', S(l.allocated)}, {'remaining', S(remaining(l))}, {'reserved', S(l.reserved)},
          {'spent', S(l.spent)}, {'debt', S(l.debt)}, {'overdraft_limit', S(l.overdraft_limit)},
          {'is_over_limit', jbool(l.is_over_limit)}, {'status', jstr(l.status)}}
end

-- The events of the state a ledger change crossed into since it was loaded (or last compared), as
-- cycles.core.events.transitions: exhausted, over limit entered / exited, debt incurred.
local function ledger_transitions(l, rid, policy)
  local p, tenant = l.prev, ARGV[2]
  local rem = remaining(l)
  local function base(extra)
    local m = {{'scope', jstr(l.scope)}, {'unit', jstr(l.unit)}}
    for _, x in ipairs(extra) do table.insert(m, x) end
    return jobj(m)
  end
  if icmp(p.remaining, ZERO) > 0 and icmp(rem, ZERO) <= 0 then
    emit('budget.exhausted', tenant, l.scope, base(ledger_state(l)))
  end
  local over = {{'debt', S(l.debt)}, {'overdraft_limit', S(l.overdraft_limit)}, {'is_over_limit', jbool(l.is_over_limit)}}
  if not p.over and l.is_over_limit then
    emit('budget.over_limit_entered', tenant, l.scope, base(over))
  elseif p.over and not l.is_over_limit then
    emit('budget.over_limit_exited', tenant, l.scope, base(over))
  end
  if icmp(l.debt, p.debt) > 0 then
    emit('budget.debt_incurred', tenant, l.scope, base({{'reservation_id', jopt(rid)},
      {'debt_incurred', S(isub(l.debt, p.debt))}, {'total_debt', S(l.debt)}, {'overdraft_limit', S(l.overdraft_limit)},
      {'overage_policy', jopt(policy)}}))
  end
  l.prev = {remaining = rem, over = l.is_over_limit, debt = l.debt}
end

-- the counters of a ledger written since it was loaded (status, over limit, in debt)
local function count_ledger(l)
  local was, now_debt = l.stored, icmp(l.debt, ZERO) > 0
  if was.status == l.status and was.over == l.is_over_limit and was.debt == now_debt then return end
  count('budgets.' .. was.status, -1)
  count('budgets.' .. l.status, 1)
  local function b(v) if v then return 1 end return 0 end
  -- the overview's top lists read these small sets instead of scanning every budget
  local member = string.match(l.scope, '^tenant:([^/]+)') .. ' ' .. l.scope .. '|' .. l.unit
  if was.over ~= l.is_over_limit then
    count('budgets.over_limit', b(l.is_over_limit) - b(was.over))
    redis.call(l.is_over_limit and 'SADD' or 'SREM', K_OVER_LIMIT, member)
  end
  if was.debt ~= now_debt then
    count('budgets.with_debt', b(now_debt) - b(was.debt))
    redis.call(now_debt and 'SADD' or 'SREM', K_WITH_DEBT, member)
  end
  l.stored = {over = l.is_over_limit, debt = now_debt, status = l.status}
end

-- rid / policy: what a debt_incurred event names (the committed reservation, the overage policy)
local function save_ledger(l, now, rid, policy)
  ledger_transitions(l, rid, policy)
  local over = '0'
  if l.is_over_limit then over = '1' end
  redis.call('HSET', k_budget(l.scope, l.unit), 'allocated', S(l.allocated), 'spent', S(l.spent),
    'reserved', S(l.reserved), 'debt', S(l.debt), 'is_over_limit', over, 'updated_at_ms', string.format('%d', now))
  count_ledger(l)
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

