-- change a ledger's settings or status (the rules of cycles.core.ledger.configure), read and written in this
-- one script so concurrent reserves and commits never lose an update. ARGV: 1 prefix, 2 tenant, 3 unused,
-- 4 test clock, 5 scope, 6 unit, 7 guard tenant (1/0), 8 status ('' = unchanged), 9 from_status (json list),
-- 10 allocated ('' = unchanged), 11 overdraft_limit ('' = unchanged), 12 commit overage policy ('-' = unchanged,
-- '' = none), 13 extra members to merge (json object, '' = none; null values are dropped)
local tenant_id, scope, unit = ARGV[2], ARGV[5], ARGV[6]
local now = now_ms()
if ARGV[7] == '1' then
  local gerr = guard_open(tenant_id)
  if gerr then return gerr end
end
local l = load_ledger(scope, unit)
if not l then return fail('NOT_FOUND', 'Budget not found for scope ' .. scope .. ' and unit ' .. unit) end
if l.status == 'CLOSED' then return fail('BUDGET_CLOSED', 'Budget is closed for scope ' .. scope) end
local status = ARGV[8]
if status ~= '' and status ~= l.status then
  local allowed = cjson.decode(ARGV[9])
  if #allowed > 0 then
    local found = false
    for _, s in ipairs(allowed) do
      if s == l.status then found = true end
    end
    if not found then
      return fail('INVALID_REQUEST', 'Budget for scope ' .. scope .. ' is ' .. l.status .. '; cannot become ' .. status,
        nil, 409)
    end
  end
  if status == 'CLOSED' and icmp(l.reserved, ZERO) > 0 then
    return fail('INVALID_REQUEST', 'Budget for scope ' .. scope .. ' still holds ' .. S(l.reserved) ..
      ' for open reservations; release them (or let them expire) before closing it', nil, 409)
  end
  l.status = status
elseif status ~= '' then
  local code = 'INVALID_REQUEST'
  if status == 'FROZEN' then code = 'BUDGET_FROZEN' end
  return fail(code, 'Budget for scope ' .. scope .. ' is already ' .. status, nil, 409)
end
if ARGV[10] ~= '' then
  l.allocated = I(ARGV[10])
  if icmp(remaining(l), INT64_MIN) < 0 then
    return fail('INVALID_REQUEST', 'allocated would push remaining below the int64 range')
  end
end
if ARGV[11] ~= '' then
  -- as with funding: a changed limit re-decides the flag from the debt
  l.overdraft_limit = I(ARGV[11])
  l.is_over_limit = icmp(l.debt, l.overdraft_limit) > 0
end
ledger_transitions(l)
local bk = k_budget(scope, unit)
local over = '0'
if l.is_over_limit then over = '1' end
local fields = {'allocated', S(l.allocated), 'overdraft_limit', S(l.overdraft_limit), 'is_over_limit', over,
                'status', l.status, 'updated_at_ms', string.format('%d', now)}
if ARGV[12] ~= '-' then
  table.insert(fields, 'commit_overage_policy')
  table.insert(fields, ARGV[12])
end
if ARGV[13] ~= '' then
  table.insert(fields, 'extra')
  table.insert(fields, jpatch(redis.call('HGET', bk, 'extra') or '{}', jmembers(ARGV[13]), true))
end
redis.call('HSET', bk, unpack(fields))
count_ledger(l)
return cjson.encode({row = redis.call('HGETALL', bk)})
