-- Redis Cluster: the cross-tenant views in the {agg} slot (cycles.store.redis_outbox). Plain script (no
-- common prelude); KEYS[1] = 'cy:{agg}:cursor' routes it. ARGV[1] is the mode:
--   apply <tenant> <entry>...: outbox entries of one tenant in sequence order (outbox.lua's format); those at
--       or below the tenant's cursor were applied already and are skipped, so a batch applied twice, or by two
--       drainers at once, counts once. Returns {the batch's highest sequence (the drain trims up to it),
--       entries applied now}.
--   purge <log> <older than ms> <batch>: removes up to `batch` of the view's oldest rows older than the limit,
--       and keeps the limit so that entries still waiting in an outbox do not bring purged rows back.
--   lease <owner> <ms>: takes or renews the drain lease; 1 when `owner` holds it.
local A = 'cy:{agg}:'
local mode = ARGV[1]
if mode == 'apply' then
  local tenant = ARGV[2]
  -- the cursor: "<sequence>:<time ms>" of the last entry applied. Entries only grow in both (outbox.lua), so
  -- one at or below both was applied already. One past the time but not the sequence was written after a
  -- failover took the tenant's sequence back: new, applied. One past the sequence but below the time is
  -- a stale read from before such a failover: skipped.
  local cur = redis.call('HGET', A .. 'cursor', tenant) or '0:0'
  local colon = string.find(cur, ':', 1, true)
  local cseq, cms = tonumber(string.sub(cur, 1, colon - 1)), tonumber(string.sub(cur, colon + 1))
  local top, n = 0, 0
  local horizon = {a = tonumber(redis.call('HGET', A .. 'purged', 'audit') or '0'),
                   e = tonumber(redis.call('HGET', A .. 'purged', 'events') or '0')}
  local logs = {a = 'audit', e = 'events'}
  for i = 3, #ARGV do
    local entry = ARGV[i]
    local nl = string.find(entry, '\n', 1, true)
    local nl2 = string.find(entry, '\n', nl + 1, true) or (#entry + 1)
    local seq, ms = tonumber(string.sub(entry, 1, nl - 1)), tonumber(string.sub(entry, nl + 1, nl2 - 1))
    if seq > top then top = seq end
    if (seq > cseq and ms >= cms) or (seq <= cseq and ms > cms) then
      for line in string.gmatch(string.sub(entry, nl2 + 1), '[^\n]+') do
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
      cseq, cms, n = seq, ms, n + 1
    end
  end
  if n > 0 then
    redis.call('HSET', A .. 'cursor', tenant, string.format('%d:%d', cseq, cms))
    redis.call('HINCRBY', A .. 'stats', 'applied', n)
  end
  -- every entry of the batch is applied or was before: the drain trims the outbox up to the highest
  return {string.format('%d', top), n}
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
