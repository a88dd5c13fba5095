-- commit / release / extend of one reservation. ARGV: 1 prefix, 2 owner tenant (from the reservation id),
-- 3 retention_ms, 4 test clock, 5 endpoint, 6 reservation id, 7 key, 8 payload hash, 9 caller tenant ('' = admin),
-- 10 actual (commit) or extend_by_ms (extend), 11 unit (commit), 12 metadata json (commit), 13 governance
-- generation of the caller's cache ('' = no check; common.lua stale_governance)
local tenant_id, retention, endpoint, rid, key, payload_hash, caller =
  ARGV[2], tonumber(ARGV[3]), ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9]
local now = now_ms()
local stale = stale_governance(ARGV[13])
if stale then return stale end
local rk = k_res(rid)
local exists = redis.call('EXISTS', rk) == 1
-- Ownership before replay: another tenant must never see this tenant's stored responses.
if exists and caller ~= '' and caller ~= tenant_id then
  return fail('FORBIDDEN', 'Reservation ' .. rid .. ' belongs to another tenant')
end
if caller ~= '' or exists then
  local replayed = replay(endpoint, key, payload_hash, now)
  if replayed then return replayed end
end
if not exists then return fail('NOT_FOUND', 'Reservation ' .. rid .. ' not found') end
local _, err = guard_closed(tenant_id)
if err then return err end

local r = redis.call('HMGET', rk, 'status', 'unit', 'amount', 'expires_at_ms', 'deadline_ms', 'grace_ms',
  'budgeted_scopes', 'overage_policy', 'extensions', 'max_extensions', 'scope_path')
local status, unit, amount = r[1], r[2], I(r[3])
local expires, deadline = tonumber(r[4]), tonumber(r[5])
if status == 'COMMITTED' or status == 'RELEASED' then
  return fail('RESERVATION_FINALIZED', 'Reservation ' .. rid .. ' is already ' .. status, {status = status})
end
local limit = deadline
if endpoint == 'extend' then limit = expires end
if status == 'EXPIRED' or now > limit then
  return fail('RESERVATION_EXPIRED', 'Reservation ' .. rid .. ' has expired', {expires_at_ms = expires})
end

local result
if endpoint == 'commit' then
  local actual, actual_unit = I(ARGV[10]), ARGV[11]
  if actual_unit ~= unit then
    return fail('UNIT_MISMATCH', 'Commit unit ' .. actual_unit .. ' does not match the reservation unit ' .. unit,
      {scope = r[11], requested_unit = actual_unit, expected_units = {unit}})
  end
  -- the commit rate limits of the policies that governed the reserve: checked now, counted on success
  local limits = redis.call('HGET', rk, 'commit_limits')
  limits = (limits and limits ~= '') and cjson.decode(limits) or {}
  if #limits > 0 then
    local rerr = rate_check(limits, now)
    if rerr then return rerr end
  end
  local ls = scope_ledgers(cjson.decode(r[7]), unit)
  local charged, serr = settle(ls, amount, actual, r[8], true)
  if serr then return serr end
  if #limits > 0 then rate_count(limits, now) end
  local debt = ZERO
  for _, l in ipairs(ls) do
    debt = iadd(debt, isub(l.debt, l.prev.debt))
    save_ledger(l, now, rid, r[8])
  end
  if icmp(charged, amount) > 0 or icmp(actual, amount) > 0 then
    emit('reservation.commit_overage', tenant_id, r[11], jobj({{'reservation_id', jstr(rid)}, {'scope', jstr(r[11])},
      {'unit', jstr(unit)}, {'estimated_amount', S(amount)}, {'actual_amount', S(actual)},
      {'overage', S(isub(actual, amount))}, {'overage_policy', jopt(r[8])}, {'debt_incurred', S(debt)}}))
  end
  redis.call('HSET', rk, 'status', 'COMMITTED', 'committed', S(charged), 'finalized_at_ms', string.format('%d', now))
  if ARGV[12] ~= '' then redis.call('HSET', rk, 'committed_metadata', ARGV[12]) end
  redis.call('ZREM', k_deadline(), rid)
  result = {unit = unit, charged = S(charged), released = S(imax(ZERO, isub(amount, charged))),
            balances = balance_records(ls)}
elseif endpoint == 'release' then
  quota_uncount(redis.call('HGET', rk, 'quota_runs'))
  local ls = scope_ledgers(cjson.decode(r[7]), unit)
  for _, l in ipairs(ls) do
    l.reserved = isub(l.reserved, amount)
    save_ledger(l, now)
  end
  redis.call('HSET', rk, 'status', 'RELEASED', 'finalized_at_ms', string.format('%d', now))
  redis.call('ZREM', k_deadline(), rid)
  result = {unit = unit, released = S(amount), balances = balance_records(ls)}
else
  local exts, max_ext = tonumber(r[9]), tonumber(r[10])
  if exts >= max_ext then
    return fail('MAX_EXTENSIONS_EXCEEDED', 'Reservation ' .. rid .. ' reached its maximum of ' .. r[10] .. ' extensions')
  end
  local new_expires = expires + tonumber(ARGV[10])
  local t = tenant_state()
  if type(t) == 'table' and t.max_reservation_ttl_ms and t.max_reservation_ttl_ms ~= cjson.null then
    new_expires = math.max(expires, math.min(new_expires, now + t.max_reservation_ttl_ms))
  end
  local new_deadline = new_expires + tonumber(r[6])
  redis.call('HSET', rk, 'expires_at_ms', string.format('%d', new_expires), 'deadline_ms',
    string.format('%d', new_deadline), 'extensions', string.format('%d', exts + 1))
  redis.call('ZADD', k_deadline(), new_deadline, rid)
  result = {expires_at_ms = string.format('%d', new_expires), reservation_id = rid}
end
local js = cjson.encode(result)
remember(endpoint, key, payload_hash, js, rid, retention)
return ok(js, now, endpoint == 'extend')
