-- usage over time (read only, off the hot path): one page of the tenant's creation index, newest first.
-- ARGV: 1 prefix, 2 tenant, 3 retention_ms, 4 test clock, 5 top score (inclusive), 6 entries at the top score
-- already read (skipped), 7 page size, 8 from_ms, 9 to_ms. Answers the COMMITTED reservations finalized in
-- [from_ms, to_ms] as [scope_path, subject, action, unit, committed, finalized_at_ms], and where the page
-- ended: its entry count, its lowest score and how many of its entries have that score.
local page = redis.call('ZREVRANGEBYSCORE', k_created(), ARGV[5], '-inf', 'WITHSCORES', 'LIMIT', tonumber(ARGV[6]),
  tonumber(ARGV[7]))
local lo, hi = tonumber(ARGV[8]), tonumber(ARGV[9])
local rows, n, low, at_low = {}, #page / 2, nil, 0
for i = 1, #page, 2 do
  local v = redis.call('HMGET', P .. 'r:' .. page[i], 'status', 'finalized_at_ms', 'committed', 'scope_path',
    'subject', 'action', 'unit')
  local fin = tonumber(v[2])
  if v[1] == 'COMMITTED' and fin and fin >= lo and fin <= hi then
    rows[#rows + 1] = {v[4], v[5], v[6], v[7], v[3] or '0', v[2]}
  end
  if page[i + 1] == low then at_low = at_low + 1 else low, at_low = page[i + 1], 1 end
end
return cjson.encode({n = n, low = low or '', at_low = at_low, rows = rows})
