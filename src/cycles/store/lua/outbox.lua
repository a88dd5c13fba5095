-- Redis Cluster only (CLUSTER true): the tenant's outbox, from which the background drain
-- (cycles.store.redis_outbox) builds the cross-tenant views in the {agg} slot. Every script that recorded
-- something appends ONE entry, in the same script as the change, so a crash cannot keep the change and
-- lose its rows. cy:{T}:outbox is a sorted set: score = the tenant's outbox sequence (cy:{T}:outbox:seq, a hash
-- of the last entry's sequence s and time m), member = "<seq>\n<ms>" then one line per row:
--   a|e \t <owner tenant> \t <id> \t <timestamp ms> \t <JSON text>   an audit row | an event
--   c \t <counter> \t <delta>                                        an overview counter change
-- JSON text never holds a raw newline, so the lines split safely. An owner other than the script's tenant
-- (an operator's __admin__ audit row) is written nowhere else by the script: the drain writes it into its
-- owner's slot as well as into the view.
local OUTBOX_LINES, OUTBOX_COUNTS, OUTBOX_NAMES = {}, {}, {}
local function outbox_row(kind, owner, id, ts, text)
  table.insert(OUTBOX_LINES, kind .. '\t' .. owner .. '\t' .. id .. '\t' .. ts .. '\t' .. text)
end
local function outbox_count(name, delta)
  if OUTBOX_COUNTS[name] == nil then
    OUTBOX_COUNTS[name] = 0
    table.insert(OUTBOX_NAMES, name)
  end
  OUTBOX_COUNTS[name] = OUTBOX_COUNTS[name] + delta
end
local function outbox_flush()
  if not CLUSTER or ARGV[1] == '' then return end
  for _, name in ipairs(OUTBOX_NAMES) do
    -- a zero delta too: the counter exists from then on, as a new budget's over_limit and with_debt do
    table.insert(OUTBOX_LINES, 'c\t' .. name .. '\t' .. string.format('%d', OUTBOX_COUNTS[name]))
  end
  if #OUTBOX_LINES == 0 then return end
  -- the entry's time: real time even under a test clock (the lag figure reads it), and never below the
  -- tenant's previous entry, so (sequence, time) only grows; outbox_apply.lua tells by the time an entry
  -- written after a failover took the sequence back (the promoted replica lacked the last writes) from
  -- one it applied already
  local t = redis.call('TIME')
  local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local k = ARGV[1] .. 'outbox:seq'
  local last = redis.call('HMGET', k, 's', 'm')
  local seq = (tonumber(last[1]) or 0) + 1
  ms = math.max(ms, tonumber(last[2]) or 0)
  local s, m = string.format('%d', seq), string.format('%d', ms)
  redis.call('HSET', k, 's', s, 'm', m)
  redis.call('ZADD', ARGV[1] .. 'outbox', s, s .. '\n' .. m .. '\n' .. table.concat(OUTBOX_LINES, '\n'))
end
