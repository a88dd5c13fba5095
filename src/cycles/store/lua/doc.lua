-- versioned documents (policies, webhooks, ...): create, replace or delete when the stored version is the
-- expected one. ARGV: 1 tenant prefix, 2 tenant, 3 unused, 4 test clock, 5 kind, 6 doc id,
-- 7 record json ('' = delete), 8 expected version ('' = create: must not exist), 9 guard tenant (1/0)
local tenant, kind, doc_id, record, expect = ARGV[2], ARGV[5], ARGV[6], ARGV[7], ARGV[8]
if ARGV[9] == '1' then
  local gerr = guard_open(tenant)
  if gerr then return gerr end
end
local dk = k_doc(kind, doc_id)
local cur = redis.call('HMGET', dk, 'v', 't')
local current, owner = cur[1], cur[2]
if (current or '') ~= expect then
  if expect == '' then return fail('DUPLICATE_RESOURCE', kind .. ' ' .. doc_id .. ' already exists') end
  if not current then return fail('NOT_FOUND', kind .. ' ' .. doc_id .. ' not found') end
  return cjson.encode({err = 'VERSION_CONFLICT', msg = kind .. ' ' .. doc_id})
end
if owner then redis.call('ZREM', prefix_of(owner) .. 'docs:' .. kind, doc_id) end
if kind == 'policy' then
  bump_governance(tenant)
  if owner and owner ~= tenant then bump_governance(owner) end
end
-- documents with a `due_ms` (work queues) are queued by it for due_docs
local due = record ~= '' and jget(record, 'due_ms') or nil
if due and string.match(due, '^%-?%d+$') then
  redis.call('ZADD', k_docs(kind) .. ':due', due, doc_id)
else
  redis.call('ZREM', k_docs(kind) .. ':due', doc_id)
end
if record == '' then
  redis.call('DEL', dk)
  redis.call('ZREM', k_docs(kind), doc_id)
  return cjson.encode({deleted = true})
end
local version = string.format('%d', (tonumber(current) or 0) + 1)
redis.call('HSET', dk, 't', tenant, 'v', version, 'r', jpatch(record, {{'version', version}}))
redis.call('ZADD', k_docs(kind), 0, doc_id)
redis.call('ZADD', prefix_of(tenant) .. 'docs:' .. kind, 0, doc_id)
return cjson.encode({version = version})
