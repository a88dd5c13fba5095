-- the admin view of a tenant's action quota counters (v0.1.26). ARGV: 1 prefix, 2 tenant, 3 unused, 4 test clock,
-- 5 'list' or 'reset', 6 full counter key (reset)
local now = now_ms()
local function state(key, h)
  return {counter = key, used = tonumber(h[1]), expires_at_ms = tonumber(h[2]), last_ms = tonumber(h[3]),
    limit = tonumber(h[4]), policy_id = h[5]}
end
if ARGV[5] == 'list' then
  local out = {}
  for _, key in ipairs(redis.call('ZRANGEBYSCORE', k_quotas(), '(' .. string.format('%d', now), '+inf')) do
    local h = redis.call('HMGET', k_quota(key), 'used', 'exp', 'last', 'lim', 'pol')
    if h[1] and tonumber(h[2]) > now then
      table.insert(out, state(key, h))
    end
  end
  if #out == 0 then return '{"counters":[]}' end
  return cjson.encode({counters = out})
end
local key = ARGV[6]
local kq = k_quota(key)
local h = redis.call('HMGET', kq, 'used', 'exp', 'last', 'lim', 'pol', 'ttl')
if not h[1] or tonumber(h[2]) <= now then return fail('NOT_FOUND', 'No live action quota counter ' .. key) end
redis.call('HSET', kq, 'used', '0')
redis.call('ZREM', k_quotas_hot(), key)
-- the spec's reset: a calendar window keeps its end (and its key TTL); a per_run counter's TTL starts again
if string.match(key, '^[^|]*|[^|]*|([^|]*)|') == 'per_run' then
  local ttl = tonumber(h[6]) or 86400000
  h[2] = string.format('%d', now + ttl)
  redis.call('HSET', kq, 'exp', h[2])
  redis.call('PEXPIRE', kq, ttl)
  redis.call('ZADD', k_quotas(), h[2], key)
end
local rec = state(key, h)
rec.previous_used = rec.used
rec.used = 0
-- the result record: the reset's quota.counter_reset event takes previous_used, limit and policy_id from it
return ok(cjson.encode(rec), now, false)
