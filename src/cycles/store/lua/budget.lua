-- create a budget ledger. ARGV: 1 prefix, 2 tenant, 3 unused, 4 test clock, 5 scope, 6 unit, 7 ledger id, 8 allocated,
-- 9 overdraft_limit, 10 commit overage policy ('' = none), 11 extra json
local tenant_id, scope, unit = ARGV[2], ARGV[5], ARGV[6]
local now = now_ms()
local _, err = guard_closed(tenant_id)
if err then return err end
if not redis.call('GET', k_tenant()) then return fail('NOT_FOUND', 'Tenant ' .. tenant_id .. ' not found') end
local bk = k_budget(scope, unit)
if redis.call('EXISTS', bk) == 1 then
  return fail('DUPLICATE_RESOURCE', 'Budget already exists for scope ' .. scope .. ' and unit ' .. unit,
    {scope = scope, unit = unit})
end
redis.call('HSET', bk, 'ledger_id', ARGV[7], 'tenant_id', tenant_id, 'scope', scope, 'unit', unit,
  'allocated', ARGV[8], 'spent', '0', 'reserved', '0', 'debt', '0', 'overdraft_limit', ARGV[9],
  'is_over_limit', '0', 'status', 'ACTIVE', 'commit_overage_policy', ARGV[10], 'extra', ARGV[11],
  'created_at_ms', string.format('%d', now), 'updated_at_ms', string.format('%d', now))
redis.call('ZADD', k_budgets(), 0, scope .. '|' .. unit)
count('budgets.ACTIVE', 1)
count('budgets.unit.' .. unit, 1)
count('budgets.over_limit', 0)
count('budgets.with_debt', 0)
-- budgets with periods are queued by the end of their period for the rollover sweep
local period_end = jget(ARGV[11], 'period_end_ms')
if period_end and string.match(period_end, '^%-?%d+$') then
  redis.call('ZADD', K_PERIODS, period_end, tenant_id .. '|' .. scope .. '|' .. unit)
end
return cjson.encode({row = redis.call('HGETALL', bk)})
