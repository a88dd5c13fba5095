-- a server setting. ARGV: 1 '', 2 '', 3 unused, 4 test clock, 5 name, 6 value, 7 only if absent (1/0)
local key = 'cy:setting:' .. ARGV[5]
if ARGV[7] == '1' then
  redis.call('SET', key, ARGV[6], 'NX')
  return cjson.encode({value = redis.call('GET', key)})
end
redis.call('SET', key, ARGV[6])
return cjson.encode({value = ARGV[6]})
