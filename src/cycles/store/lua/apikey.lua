-- API keys. Records live at cy:apikey:<prefix> (authentication looks them up by prefix); cy:apikeys:id maps
-- key id -> prefix, cy:apikeys and cy:{T}:apikeys list key ids by creation time.
-- ARGV: 1 '', 2 '', 3 unused, 4 test clock, 5 mode, then
--   create: 6 key id, 7 key prefix, 8 tenant, 9 record json
--   update: 6 key id, 7 changes json, 8 guard tenant (1/0)
--   touch:  6, 7, ... pairs of key id, last used ms (ARGV[#ARGV] is the journal)
--   index:  6 key prefix, 7 creation ms (indexes a key stored before the key id index existed)
local mode = ARGV[5]

local function index(key_id, key_prefix, tenant, score)
  redis.call('HSET', K_KEY_IDS, key_id, key_prefix)
  redis.call('ZADD', K_KEYS, score, key_id)
  redis.call('ZADD', prefix_of(tenant) .. 'apikeys', score, key_id)
end

local function load(key_id)
  local key_prefix = redis.call('HGET', K_KEY_IDS, key_id)
  if not key_prefix then return nil end
  local raw = redis.call('GET', k_apikey(key_prefix))
  if not raw then return nil end
  return key_prefix, raw
end

if mode == 'create' then
  local key_id, key_prefix, tenant = ARGV[6], ARGV[7], ARGV[8]
  if redis.call('EXISTS', k_apikey(key_prefix)) == 1 or redis.call('HEXISTS', K_KEY_IDS, key_id) == 1 then
    return fail('INTERNAL_ERROR', 'API key prefix collision; retry the request')
  end
  redis.call('SET', k_apikey(key_prefix), ARGV[9])
  index(key_id, key_prefix, tenant, string.format('%d', now_ms()))
  return '{}'
end

if mode == 'update' then
  local key_id = ARGV[6]
  local key_prefix, raw = load(key_id)
  if not raw then return fail('NOT_FOUND', 'API key ' .. key_id .. ' not found') end
  if ARGV[8] == '1' then
    local gerr = guard_open(jvalue(raw, 'tenant_id'))
    if gerr then return gerr end
  end
  if jvalue(raw, 'status') == 'REVOKED' then
    return fail('KEY_REVOKED', 'API key ' .. key_id .. ' is revoked', nil, 409)
  end
  local js = jpatch(raw, jmembers(ARGV[7]))
  redis.call('SET', k_apikey(key_prefix), js)
  bump_governance(jvalue(raw, 'tenant_id'))
  return cjson.encode({record = js})
end

if mode == 'touch' then
  for i = 6, #ARGV - 1, 2 do
    local key_prefix, raw = load(ARGV[i])
    if raw then
      local cur = jget(raw, 'last_used_at_ms')
      if cur == nil or cur == 'null' then cur = '0' end
      if icmp(I(cur), I(ARGV[i + 1])) < 0 then  -- a later time never goes backwards
        redis.call('SET', k_apikey(key_prefix), jpatch(raw, {{'last_used_at_ms', ARGV[i + 1]}}))
      end
    end
  end
  return '{}'
end

if mode == 'index' then
  local raw = redis.call('GET', k_apikey(ARGV[6]))
  if raw then
    local key_id, tenant = jvalue(raw, 'key_id'), jvalue(raw, 'tenant_id')
    if type(key_id) == 'string' and type(tenant) == 'string' and redis.call('HEXISTS', K_KEY_IDS, key_id) == 0 then
      index(key_id, ARGV[6], tenant, ARGV[7])
    end
  end
  return '{}'
end

return fail('INVALID_REQUEST', 'unknown api key operation ' .. mode)
