-- ---- JSON text surgery ----
-- Records are patched as text, member by member, so every other member stays byte for byte what Python
-- wrote (cjson would round int64 values to 14 digits and turn empty arrays into objects).
local function jws(s, i)
  local _, e = string.find(s, '^[ \t\r\n]*', i)
  return e + 1
end

local function jend(s, i)
  local c = string.sub(s, i, i)
  if c == '"' then
    local j = i + 1
    while true do
      local q = string.find(s, '["\\]', j)
      if string.sub(s, q, q) == '\\' then j = q + 2 else return q end
    end
  elseif c == '{' or c == '[' then
    local depth, j = 0, i
    while true do
      local q = string.find(s, '[%[%]{}"]', j)
      local d = string.sub(s, q, q)
      if d == '"' then
        j = jend(s, q) + 1
      else
        if d == '{' or d == '[' then depth = depth + 1 else depth = depth - 1 end
        if depth == 0 then return q end
        j = q + 1
      end
    end
  end
  local _, e = string.find(s, '^[^,}%]%s]+', i)
  return e
end

-- the members of a JSON object text: a list of {key, value text}
local function jmembers(s)
  local out = {}
  local i = jws(s, jws(s, 1) + 1)
  if string.sub(s, i, i) == '}' then return out end
  while true do
    local ke = jend(s, i)
    local key = cjson.decode(string.sub(s, i, ke))
    i = jws(s, jws(s, ke + 1) + 1)
    local ve = jend(s, i)
    table.insert(out, {key, string.sub(s, i, ve)})
    i = jws(s, ve + 1)
    if string.sub(s, i, i) ~= ',' then return out end
    i = jws(s, i + 1)
  end
end

local function jget(s, key)
  for _, m in ipairs(jmembers(s)) do
    if m[1] == key then return m[2] end
  end
  return nil
end

-- JSON text of a string value
local function jstr(v) return (string.gsub(cjson.encode(v), '\\/', '/')) end

-- Set members (a list of {key, value text}; value nil deletes); existing members keep their place.
-- With drop_null, members whose value is null are dropped as well.
local function jpatch(s, changes, drop_null)
  local members = jmembers(s)
  local pos = {}
  for i, m in ipairs(members) do pos[m[1]] = i end
  for _, c in ipairs(changes) do
    if pos[c[1]] then
      members[pos[c[1]]][2] = c[2]
    else
      table.insert(members, {c[1], c[2]})
      pos[c[1]] = #members
    end
  end
  local parts = {}
  for _, m in ipairs(members) do
    if m[2] ~= nil and not (drop_null and m[2] == 'null') then
      table.insert(parts, jstr(m[1]) .. ':' .. m[2])
    end
  end
  return '{' .. table.concat(parts, ',') .. '}'
end

-- the value of a member as Lua data (strings and small numbers), nil when absent or null
local function jvalue(s, key)
  local raw = jget(s, key)
  if raw == nil or raw == 'null' then return nil end
  return cjson.decode(raw)
end

-- ---- the journal: rows written in the same script as the change they record ----
-- Audit rows go to cy:audit:rec (log id -> JSON) indexed by time in cy:audit and cy:{T}:audit; governance
-- events to cy:events:rec (event id -> JSON), cy:events and cy:{T}:events.
local K_EVENTS_REC, K_EVENTS = 'cy:events:rec', 'cy:events'
if CLUSTER then K_EVENTS_REC = P .. 'events:rec' end

-- A script's result as the Python side reads it (cycles.store.redis._normalize): int64 values travel
-- as decimal strings inside scripts and are numbers in the records events carry.
local RESULT_INTS = {amount = true, expires_at_ms = true, charged = true, released = true, actual = true,
                     timestamp_ms = true}
local function result_members(text)
  local out = {}
  for _, m in ipairs(jmembers(text)) do
    local k, v = m[1], m[2]
    if RESULT_INTS[k] and string.match(v, '^"%-?%d+"$') then
      v = string.sub(v, 2, -2)
    elseif k == 'previous' or k == 'new' or k == 'balances' then
      if v == '{}' then v = '[]' end
      v = string.gsub(v, '"(%-?%d+)"', '%1')
    elseif k == 'affected_scopes' and v == '{}' then
      v = '[]'
    end
    table.insert(out, {k, v})
  end
  return out
end

-- ---- governance events the store itself produces (the SQLite store's _emit) ----
-- Ledger transitions (exhausted, over limit entered / exited, debt incurred), commit overage, expiry,
-- rollover and the close cascade queue their events here while the script changes state; the epilogue
-- writes them in the same script. Data is built as JSON text so int64 values stay exact.
local TX_EVENTS = {}
local function emit(event_type, tenant, scope, data, system, correlation_id)
  table.insert(TX_EVENTS, {event_type, tenant, scope, data, system, correlation_id})
end

-- JSON object text from a list of {key, value text}
local function jobj(members)
  local parts = {}
  for i, m in ipairs(members) do parts[i] = jstr(m[1]) .. ':' .. m[2] end
  return '{' .. table.concat(parts, ',') .. '}'
end
local function jopt(v) if v == nil or v == false or v == cjson.null then return 'null' end return jstr(v) end
local function jbool(v) if v then return 'true' end return 'false' end

-- byte order of strings (Lua's `<` follows the locale Redis runs with; Python and SQLite compare code points)
local function blt(a, b)
  local n = math.min(#a, #b)
  for i = 1, n do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y end
  end
  return #a < #b
end

-- A journal row (kind 'a' audit, 'e' event) in its log. On Redis Cluster it also goes to the tenant's
-- outbox (outbox.lua), and a row of another tenant than the script's goes only there.
local function journal_put(kind, tenant, id, ts, text)
  if CLUSTER then
    outbox_row(kind, tenant, id, ts, text)
    if tenant ~= ARGV[2] then return end
  end
  if kind == 'e' then
    redis.call('HSET', K_EVENTS_REC, id, text)
    global_zadd(K_EVENTS, ts, id)
    redis.call('ZADD', prefix_of(tenant) .. 'events', ts, id)
  else
    redis.call('HSET', K_AUDIT_REC, id, text)
    global_zadd(K_AUDIT, ts, id)
    redis.call('ZADD', prefix_of(tenant) .. 'audit', ts, id)
  end
end

-- entries: {{entry json, merge result (0/1), only if created (0/1), take the script's event id (0/1)}, ...}
-- stamped by the Python side with everything but the time and the result; result: the JSON text of the
-- operation's result record, or nil; created: false when the operation found what it was to create (rows
-- marked only-if-created are skipped); event_id: the id an event entry takes (nil: keep its own)
local function write_entry(text, merge, nows, result, rid, event_id)
  local changes = {}
  local ts = jget(text, 'timestamp_ms')
  if ts == nil then
    ts = nows
    table.insert(changes, {'timestamp_ms', nows})
  end
  if jvalue(text, 'journal') == 'event' then
    if event_id then
      -- the placeholder id Python stamped is replaced, and so is a correlation id made from it
      local old_corr = jvalue(text, 'correlation_id')
      if old_corr and string.sub(old_corr, 1, 6) == 'event:' then
        table.insert(changes, {'correlation_id', jstr('event:' .. event_id)})
      end
      table.insert(changes, {'event_id', jstr(event_id)})
    end
    if merge and result then
      local data = jget(text, 'data')
      if data == nil or data == 'null' then data = '{}' end
      table.insert(changes, {'data', jpatch(data, result_members(result))})
    end
    if #changes > 0 then text = jpatch(text, changes) end
    journal_put('e', jvalue(text, 'tenant_id'), jvalue(text, 'event_id'), ts, text)
    return
  end
  if rid then
    local cur = jget(text, 'resource_id')
    if cur == nil or cur == 'null' then table.insert(changes, {'resource_id', rid}) end
  end
  if #changes > 0 then text = jpatch(text, changes) end
  journal_put('a', jvalue(text, 'tenant_id'), jvalue(text, 'log_id'), ts, text)
end

-- The epilogue of every script. jarg (the last ARGV): {items = entries as above, ctx = JSON text of what a
-- store event takes from the request's audit row (request_id, trace_id, actor), rand = 8 hex digits}.
-- When the answer is not an error, the entries are written; the store's own events (TX_EVENTS) are written
-- whatever the answer, since what they record happened (a denied reserve that expired overdue leases
-- first keeps those expiries), and then without the request's fields, as on the SQLite store.
-- Event ids: evt_<ms, 12 hex><sequence, 8 hex><random, 8 hex>; the sequence is one counter for every
-- server (cy:events:seq), so events of one millisecond sort in the order they were committed.
local K_EVENT_SEQ = 'cy:events:seq'
if CLUSTER then K_EVENT_SEQ = P .. 'events:seq' end
local function finish_journal(result, jarg)
  local j = cjson.decode(jarg)
  local items = j.items or {}
  if #items == 0 and #TX_EVENTS == 0 then return end
  local ok_, out = pcall(cjson.decode, result)
  local failed = ok_ and type(out) == 'table' and ((out.err ~= nil and out.err ~= cjson.null) or out.noop == true)
  local r, created = nil, nil
  if ok_ and type(out) == 'table' and out.replay ~= nil and out.result ~= nil then
    if type(out.result) == 'string' then r = out.result else r = jget(result, 'result') end
    if type(r) ~= 'string' or string.sub(r, 1, 1) ~= '{' then r = nil end
  end
  if ok_ and type(out) == 'table' and out.created == false then created = false end
  local todo = {}
  if not failed then
    for _, item in ipairs(items) do
      if not (created == false and item[3] == 1) then table.insert(todo, item) end
    end
  end
  local now = now_ms()
  local nows = string.format('%d', now)
  local n = #TX_EVENTS
  for _, item in ipairs(todo) do if item[4] == 1 then n = n + 1 end end
  local seq = 0
  if n > 0 then seq = redis.call('INCRBY', K_EVENT_SEQ, n) - n end
  local ms = string.format('%012x', now)
  local function next_id(rand)
    seq = seq + 1
    return 'evt_' .. ms .. string.format('%08x', seq % 4294967296) .. rand
  end
  local rid = nil
  if r then
    local v = jget(r, 'reservation_id')
    if v and v ~= 'null' and v ~= '""' then rid = v end
  end
  for _, item in ipairs(todo) do
    local eid = nil
    if item[4] == 1 then
      local own = jvalue(item[1], 'event_id')
      eid = next_id(string.sub(own, -8))
    end
    write_entry(item[1], item[2] == 1, nows, r, rid, eid)
  end
  local ctx = {}
  if not failed and j.ctx then ctx = jmembers(j.ctx) end
  for _, ev in ipairs(TX_EVENTS) do
    local event_type, tenant, scope, data, system, corr = ev[1], ev[2], ev[3], ev[4], ev[5], ev[6]
    local event_id = next_id(j.rand)
    local m = {{'journal', '"event"'}, {'event_type', jstr(event_type)}, {'tenant_id', jstr(tenant)},
               {'scope', jopt(scope)}, {'data', data}}
    if system then
      table.insert(m, {'actor', '{"type":"system"}'})
      table.insert(m, {'source', '"expiry-sweeper"'})
    end
    if corr then table.insert(m, {'correlation_id', jstr(corr)}) end
    table.insert(m, {'timestamp_ms', nows})
    table.insert(m, {'event_id', jstr(event_id)})
    table.insert(m, {'category', jstr(string.match(event_type, '^[^.]*'))})
    if not system then table.insert(m, {'source', '"cycles-server"'}) end
    local has_corr = corr ~= nil
    for _, c in ipairs(ctx) do
      if c[1] == 'correlation_id' then
        if not has_corr then table.insert(m, c); has_corr = true end
      elseif not (system and c[1] == 'actor') then
        table.insert(m, c)
      end
    end
    -- every event carries a correlation id: its request's, else its own
    if not has_corr then table.insert(m, {'correlation_id', jstr('event:' .. event_id)}) end
    journal_put('e', tenant, event_id, nows, jobj(m))
  end
end

