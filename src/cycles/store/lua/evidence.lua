-- a CyclesEvidence envelope and its links (none for a denial), unless the first link already points at one
-- (then that id). ARGV: 1 '', 2 '', 3 unused, 4 unused, 5 evidence id, 6 envelope, 7 .. #ARGV-1 links, #ARGV journal
-- on Redis Cluster every evidence key shares one hash tag (a script touches one slot)
local E = 'cy:'
if CLUSTER then E = 'cy:{evidence}:' end
if #ARGV > 7 then
  local existing = redis.call('GET', E .. 'evl:' .. ARGV[7])
  if existing then
    return cjson.encode({id = existing})
  end
end
redis.call('SET', E .. 'ev:' .. ARGV[5], ARGV[6], 'NX')
for i = 7, #ARGV - 1 do
  redis.call('SET', E .. 'evl:' .. ARGV[i], ARGV[5], 'NX')
end
return cjson.encode({id = ARGV[5]})
