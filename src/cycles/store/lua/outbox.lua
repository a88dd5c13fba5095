-- Redis Cluster only (CLUSTER true): the tenant's outbox, from which the background drain
-- (cycles.store.redis_outbox) builds the cross-tenant views in the {agg} slot. Every script that recorded
-- something appends ONE entry, in the same script as the change, so a crash cannot keep the change and
-- lose its rows. cy:{T}:outbox is a sorted set: score = the tenant's outbox sequence (cy:{T}:outbox:seq),
-- member = "<seq>\n<ms>" then one line per row:
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
  -- the entry's age is what the lag figure reads: real time even under a test clock
  local t = redis.call('TIME')
  local seq = string.format('%d', redis.call('INCR', ARGV[1] .. 'outbox:seq'))
  redis.call('ZADD', ARGV[1] .. 'outbox', seq, seq .. '\n' .. t[1] .. string.format('%03d', math.floor(tonumber(t[2]) / 1000)) ..
    '\n' .. table.concat(OUTBOX_LINES, '\n'))
end
