-- Redis Cluster: the cross-tenant views in the {agg} slot (cycles.store.redis_outbox). Plain script (no
-- common prelude); KEYS[1] = 'cy:{agg}:cursor' routes it. ARGV[1] is the mode:
--   apply <tenant> <entry>...: outbox entries of one tenant in sequence order (outbox.lua's format); those at
--       or below the tenant's cursor were applied already and are skipped, so a batch applied twice, or by two
--       drainers at once, counts once. Returns {the cursor after, entries applied now}.
--   purge <log> <older than ms> <batch>: removes up to `batch` of the view's oldest rows older than the limit,
--       and keeps the limit so that entries still waiting in an outbox do not bring purged rows back.
--   lease <owner> <ms>: takes or renews the drain lease; 1 when `owner` holds it.
local A = 'cy:{agg}:'
local mode = ARGV[1]
if mode == 'apply' then
  local tenant = ARGV[2]
  local cur = tonumber(redis.call('HGET', A .. 'cursor', tenant) or '0')
  local last, n = cur, 0
  local horizon = {a = tonumber(redis.call('HGET', A .. 'purged', 'audit') or '0'),
                   e = tonumber(redis.call('HGET', A .. 'purged', 'events') or '0')}
  local logs = {a = 'audit', e = 'events'}
  for i = 3, #ARGV do
    local entry = ARGV[i]
    local nl = string.find(entry, '\n', 1, true)
    local seq = tonumber(string.sub(entry, 1, nl - 1))
    if seq > last then
      local body = string.sub(entry, (string.find(entry, '\n', nl + 1, true) or #entry) + 1)
      for line in string.gmatch(body, '[^\n]+') do
        local kind = string.sub(line, 1, 1)
        if kind == 'c' then
          local name, delta = string.match(line, '^c\t([^\t]*)\t(%-?%d+)$')
          redis.call('HINCRBY', A .. 'counters', name, delta)
        else
          local _, id, ts, text = string.match(line, '^.\t([^\t]*)\t([^\t]*)\t([^\t]*)\t(.*)$')
          if tonumber(ts) >= horizon[kind] then
            redis.call('HSET', A .. logs[kind] .. ':rec', id, text)
            redis.call('ZADD', A .. logs[kind], ts, id)
          end
        end
      end
      last, n = seq, n + 1
    end
  end
  if last > cur then
    redis.call('HSET', A .. 'cursor', tenant, string.format('%d', last))
    redis.call('HINCRBY', A .. 'stats', 'applied', n)
  end
  return {string.format('%d', last), n}
end
if mode == 'purge' then
  local log, older = ARGV[2], tonumber(ARGV[3])
  if older > tonumber(redis.call('HGET', A .. 'purged', log) or '0') then
    redis.call('HSET', A .. 'purged', log, ARGV[3])
  end
  local ids = redis.call('ZRANGEBYSCORE', A .. log, '-inf', '(' .. ARGV[3], 'LIMIT', 0, tonumber(ARGV[4]))
  if #ids > 0 then
    redis.call('HDEL', A .. log .. ':rec', unpack(ids))
    redis.call('ZREM', A .. log, unpack(ids))
  end
  return #ids
end
if mode == 'lease' then
  local holder = redis.call('GET', A .. 'lease')
  if holder and holder ~= ARGV[2] then return 0 end
  redis.call('SET', A .. 'lease', ARGV[2], 'PX', tonumber(ARGV[3]))
  return 1
end
return redis.error_reply('outbox_apply: unknown mode ' .. tostring(mode))
