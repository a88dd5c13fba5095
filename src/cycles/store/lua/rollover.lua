-- start a budget's next period (the rules of cycles.core.ledger.rollover), only if the stored period still
-- ends at the expected time: each boundary is applied exactly once however many sweepers run.
-- ARGV: 1 prefix, 2 tenant, 3 unused, 4 test clock, 5 scope, 6 unit, 7 expected period_end_ms,
-- 8 the new period fields (json object, with period_end_ms)
local tenant_id, scope, unit = ARGV[2], ARGV[5], ARGV[6]
local now = now_ms()
local bk = k_budget(scope, unit)
local l = load_ledger(scope, unit)
-- noop: nothing changed, so finish_journal records none of the request's journal (the scheduler's audit row)
if not l or l.status == 'CLOSED' then return cjson.encode({rolled = false, noop = true}) end
local extra = redis.call('HGET', bk, 'extra') or '{}'
local stored_end = jget(extra, 'period_end_ms')
if not stored_end or not string.match(stored_end, '^%-?%d+$') or icmp(I(stored_end), I(ARGV[7])) ~= 0 then
  return cjson.encode({rolled = false, noop = true})  -- another process rolled it over first
end
local before = redis.call('HGETALL', bk)
local base = jget(extra, 'period_allocation')
if base and string.match(base, '^%-?%d+$') then base = I(base) else base = l.allocated end
local policy = jvalue(extra, 'rollover_policy')
local unused = imax(ZERO, remaining(l))
local carried = ZERO
if policy == 'CARRY_FORWARD' then
  carried = unused
elseif policy == 'CAP_AT_ALLOCATED' then
  carried = imin(unused, base)
end
local allocated = iadd(base, carried)
if icmp(allocated, INT64_MAX) > 0 then return fail('INVALID_REQUEST', 'allocated would exceed the int64 range') end
local previous_state = jobj(ledger_state(l))
l.allocated = allocated
l.spent = ZERO
l.is_over_limit = icmp(l.debt, l.overdraft_limit) > 0
local new_extra = jpatch(extra, jmembers(ARGV[8]))
local over = '0'
if l.is_over_limit then over = '1' end
redis.call('HSET', bk, 'allocated', S(l.allocated), 'spent', '0', 'is_over_limit', over, 'extra', new_extra,
  'updated_at_ms', string.format('%d', now))
count_ledger(l)
local function raw(text, key) return jget(text, key) or 'null' end
emit('budget.reset_spent', tenant_id, scope, jobj({{'ledger_id', jopt(redis.call('HGET', bk, 'ledger_id'))},
  {'scope', jstr(scope)}, {'unit', jstr(unit)}, {'operation', '"ROLLOVER"'},
  {'rollover_policy', raw(new_extra, 'rollover_policy')}, {'previous_state', previous_state},
  {'new_state', jobj(ledger_state(l))}, {'period_start', raw(new_extra, 'period_start')},
  {'period_end', raw(new_extra, 'period_end')}}))
local member = tenant_id .. '|' .. scope .. '|' .. unit
local new_end = jget(new_extra, 'period_end_ms')
if new_end and string.match(new_end, '^%-?%d+$') then
  redis.call('ZADD', K_PERIODS, new_end, member)
else
  redis.call('ZREM', K_PERIODS, member)
end
return cjson.encode({rolled = true, before = before, row = redis.call('HGETALL', bk)})
