-- ---- action quotas (v0.1.26; cycles.core.actions and store/sqlite/quotas.py hold the same rules) ----
-- A counter is the hash P..'aq:'..<key>|<window key> {used, exp (end of its window instance, ms), last, lim,
-- pol, ttl (per_run: the key TTL a reset refreshes)}; the sorted set P..'aqi' indexes the keys by window end for
-- the admin view, P..'aqh' those that reached 80 % of their limit (the overview's quota health reads only
-- these). Windows end by `exp`, not by the key's TTL (that is stale-key cleanup).
local function k_quota(key) return P .. 'aq:' .. key end
local function k_quotas() return P .. 'aqi' end
local function k_quotas_hot() return P .. 'aqh' end

-- UTC calendar bucket of a time (fmt 1 minute, 2 hour, 3 day): days to civil date (H. Hinnant's algorithm)
local function utc_bucket(ms, fmt)
  local secs = math.floor(ms / 1000)
  local days = math.floor(secs / 86400)
  local sod = secs - days * 86400
  local z = days + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local d = doy - math.floor((153 * mp + 2) / 5) + 1
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  local day = string.format('%04d-%02d-%02d', y, m, d)
  if fmt == 3 then return day end
  local hour = day .. string.format('T%02d', math.floor(sod / 3600))
  if fmt == 2 then return hour end
  return hour .. string.format(':%02d', math.floor((sod % 3600) / 60))
end

-- q: {key, window ms (0: per_run), window key (per_run: the run id), bucket format, limit, key TTL ms,
-- threshold count, deny detail}
local function quota_instance(q, now)
  local size = tonumber(q[2])
  if size > 0 then
    local bucket = utc_bucket(now, tonumber(q[4]))
    return q[1] .. '|' .. bucket, bucket, now - now % size + size
  end
  return q[1] .. '|' .. q[3], q[3], now + tonumber(q[6])
end

-- Steps 2 and 3: the counters now, and the deny detail of the one that denies (the first risk-class one at its
-- limit, else the per-kind one with the least headroom), nil when all pass.
local function quota_check(quotas, now)
  local rows, full = {}, {}
  for i, q in ipairs(quotas) do
    local key, bucket, fin = quota_instance(q, now)
    local h = redis.call('HMGET', k_quota(key), 'used', 'exp')
    local used = 0
    if h[1] and tonumber(h[2]) > now then used = tonumber(h[1]) end
    rows[i] = {key, bucket, fin, used}
    if used >= tonumber(q[5]) then table.insert(full, i) end
  end
  if #full == 0 then return rows, nil end
  local hit = nil
  for _, i in ipairs(full) do
    if quotas[i][8].quota_violation.risk_class then hit = i; break end
  end
  if not hit then
    for _, i in ipairs(full) do
      if not hit or tonumber(quotas[i][5]) - rows[i][4] < tonumber(quotas[hit][5]) - rows[hit][4] then hit = i end
    end
  end
  local d = quotas[hit][8]
  d.quota_violation.used = rows[hit][4]
  d.quota_violation.window_key = rows[hit][2]
  return rows, d
end

local function quota_message(v)
  local what = 'action kind ' .. v.action_kind
  if v.risk_class then what = 'risk class ' .. v.risk_class end
  return 'Action quota exceeded: ' .. what .. ' used ' .. string.format('%d', v.used) .. ' of ' ..
    string.format('%d', v.limit) .. ' ' .. v.window .. ' at scope ' .. v.scope .. ' (policy ' ..
    tostring(v.policy_id) .. ')'
end

-- Step 5: one more on every counter; returns the per_run keys (counted down on release / expiry).
local function quota_count(quotas, rows, now)
  local runs = {}
  for i, q in ipairs(quotas) do
    local key, bucket, fin, used = rows[i][1], rows[i][2], rows[i][3], rows[i][4]
    local v = q[8].quota_violation
    local kq = k_quota(key)
    redis.call('HSET', kq, 'used', string.format('%d', used + 1), 'exp', string.format('%d', fin),
      'last', string.format('%d', now), 'lim', string.format('%d', q[5]), 'pol', v.policy_id or '',
      'ttl', string.format('%d', q[6]))
    redis.call('PEXPIRE', kq, tonumber(q[6]))
    -- the index is ordered by window end; ended windows leave it here, so it stays as small as the live counters
    redis.call('ZADD', k_quotas(), fin, key)
    redis.call('ZREMRANGEBYSCORE', k_quotas(), '-inf', string.format('%d', now))
    if (used + 1) * 5 >= tonumber(q[5]) * 4 then
      redis.call('ZADD', k_quotas_hot(), fin, key)
      redis.call('ZREMRANGEBYSCORE', k_quotas_hot(), '-inf', string.format('%d', now))
    end
    local t = tonumber(q[7])
    if used < t and t <= used + 1 then
      local label = v.action_kind
      local members = {{'scope', jstr(v.scope)}}
      if v.risk_class then
        label = '__risk__'
        table.insert(members, {'risk_class', jstr(v.risk_class)})
      end
      table.insert(members, {'action_kind', jstr(label)})
      table.insert(members, {'window', jstr(v.window)})
      table.insert(members, {'window_key', jstr(bucket)})
      table.insert(members, {'used', string.format('%d', used + 1)})
      table.insert(members, {'limit', string.format('%d', q[5])})
      table.insert(members, {'threshold_pct', string.format('%.4f', t / tonumber(q[5]))})
      table.insert(members, {'policy_id', jopt(v.policy_id)})
      table.insert(members, {'tenant_id', jstr(ARGV[2])})
      emit('quota.threshold_approaching', ARGV[2], v.scope, jobj(members))
    end
    if tonumber(q[2]) == 0 then table.insert(runs, key) end
  end
  return runs
end

local function quota_uncount(runs)
  if not runs or runs == '' then return end
  for _, key in ipairs(cjson.decode(runs)) do
    local kq = k_quota(key)
    local used = tonumber(redis.call('HGET', kq, 'used') or '0')
    if used > 0 then redis.call('HSET', kq, 'used', string.format('%d', used - 1)) end
  end
end

