-- takes the overview counts once, for data written before the counters existed; afterwards every script
-- keeps them. ARGV: 1 '', 2 '', 3 unused, 4 test clock
local READY = 'cy:counters:ready'
if redis.call('EXISTS', READY) == 1 then return '{}' end
local tenants = redis.call('SMEMBERS', K_TENANTS)
if #tenants > 0 then
  redis.call('DEL', K_COUNTERS, K_OVER_LIMIT, K_WITH_DEBT)
  count('budgets.over_limit', 0)
  count('budgets.with_debt', 0)
  for _, tenant in ipairs(tenants) do
    local raw = redis.call('GET', prefix_of(tenant) .. 'tenant')
    if raw then count('tenants.' .. tostring(jvalue(raw, 'status')), 1) end
    for _, member in ipairs(redis.call('ZRANGE', prefix_of(tenant) .. 'budgets', 0, -1)) do
      local v = redis.call('HMGET', prefix_of(tenant) .. 'b:' .. member, 'status', 'unit', 'is_over_limit', 'debt')
      if v[1] then
        count('budgets.' .. v[1], 1)
        count('budgets.unit.' .. v[2], 1)
        local member = tenant .. ' ' .. member
        if v[3] == '1' then count('budgets.over_limit', 1); redis.call('SADD', K_OVER_LIMIT, member) end
        if icmp(I(v[4]), ZERO) > 0 then count('budgets.with_debt', 1); redis.call('SADD', K_WITH_DEBT, member) end
      end
    end
  end
end
redis.call('SET', READY, '1')
return '{}'
