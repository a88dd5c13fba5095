-- Shared prelude of every Cycles script (prepended by the Python loader).
--
-- Amounts are int64, but Lua numbers are doubles (exact only to 2^53), so ledger arithmetic uses
-- pairs {hi, lo} with value = hi * 1e9 + lo and 0 <= lo < 1e9; hi stays below 1e10, exact in a double.
-- Every int64 crosses the script boundary as a decimal string, never as a cjson number (cjson keeps
-- only 14 significant digits).

local B = 1000000000

local function isub(a, b)
  local lo, hi = a[2] - b[2], a[1] - b[1]
  if lo < 0 then lo = lo + B; hi = hi - 1 end
  return {hi, lo}
end

local function iadd(a, b)
  local lo, hi = a[2] + b[2], a[1] + b[1]
  if lo >= B then lo = lo - B; hi = hi + 1 end
  return {hi, lo}
end

local function I(s)
  if s == nil or s == false or s == '' then return {0, 0} end
  s = tostring(s)
  local neg = string.sub(s, 1, 1) == '-'
  if neg then s = string.sub(s, 2) end
  local n = #s
  local v
  if n > 9 then v = {tonumber(string.sub(s, 1, n - 9)), tonumber(string.sub(s, n - 8))} else v = {0, tonumber(s)} end
  if neg then return isub({0, 0}, v) end
  return v
end

local function icmp(a, b)
  if a[1] ~= b[1] then if a[1] < b[1] then return -1 else return 1 end end
  if a[2] ~= b[2] then if a[2] < b[2] then return -1 else return 1 end end
  return 0
end

local function imin(a, b) if icmp(a, b) <= 0 then return a end return b end
local function imax(a, b) if icmp(a, b) >= 0 then return a end return b end

local function S(a)
  local hi, lo = a[1], a[2]
  if hi == 0 then return string.format('%d', lo) end
  if hi > 0 then return string.format('%d%09d', hi, lo) end
  local nhi, nlo = -hi, 0
  if lo > 0 then nhi = nhi - 1; nlo = B - lo end
  if nhi == 0 then return '-' .. string.format('%d', nlo) end
  return '-' .. string.format('%d%09d', nhi, nlo)
end

local ZERO = {0, 0}
local INT64_MAX = I('9223372036854775807')
local INT64_MIN = I('-9223372036854775808')

-- ARGV[4] is a test clock in epoch ms: always 0 in production (time is Redis TIME); tests that
-- drive time themselves pass their clock's value.
local TEST_NOW = tonumber(ARGV[4]) or 0
-- One instant per script: the change and the journal rows written with it share it.
local NOW = nil
local function now_ms()
  if NOW then return NOW end
  if TEST_NOW > 0 then
    NOW = TEST_NOW
  else
    local t = redis.call('TIME')
    NOW = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  return NOW
end

-- `status` overrides the HTTP status the error code travels with.
local function fail(code, msg, details, status)
  return cjson.encode({err = code, msg = msg, details = details, status = status})
end

-- ---- keys (every key of a tenant shares the hash tag in P, so a script touches one slot) ----
local P = ARGV[1]
local function k_tenant() return P .. 'tenant' end
local function k_budget(scope, unit) return P .. 'b:' .. scope .. '|' .. unit end
local function k_budgets() return P .. 'budgets' end
local function k_res(rid) return P .. 'r:' .. rid end
local function k_created() return P .. 'rz:created' end
local function k_deadline() return P .. 'rz:deadline' end
local function k_idem(endpoint, key) return P .. 'i:' .. endpoint .. ':' .. key end

-- Global keys (the admin plane). On one primary (CLUSTER false, set by the loader's first line) scripts
-- keep the cross-tenant views inline with the change. On Redis Cluster a script may touch one slot only,
-- so every one of these is a key of the script's own tenant (P), and the journal rows and counter changes
-- also go to the tenant's outbox (outbox.lua), from which redis_outbox.py builds the cross-tenant views;
-- the Python side writes the registries (cy:tenants, key and document pointers) itself.
local K_TENANTS = 'cy:tenants'
local K_AUDIT_REC, K_AUDIT = 'cy:audit:rec', 'cy:audit'
local K_KEY_IDS, K_KEYS = 'cy:apikeys:id', 'cy:apikeys'
local K_PERIODS = 'cy:periods'
-- overview counts, kept by every script that changes what they count (like the SQLite store's triggers)
local K_COUNTERS = 'cy:counters'
local K_OVER_LIMIT, K_WITH_DEBT = 'cy:budgets:over_limit', 'cy:budgets:with_debt'
local G = 'cy:'  -- the prefix of global records (API keys, documents)
if CLUSTER then
  K_AUDIT_REC, K_KEY_IDS, K_KEYS, K_PERIODS = P .. 'audit:rec', P .. 'apikeys:id', P .. 'apikeys', P .. 'periods'
  K_COUNTERS, K_OVER_LIMIT, K_WITH_DEBT, G = P .. 'counters', P .. 'over_limit', P .. 'with_debt', P
end
local function count(name, delta)
  redis.call('HINCRBY', K_COUNTERS, name, delta)
  if CLUSTER then outbox_count(name, delta) end
end
-- a member of a global time index (none on Redis Cluster: the per-tenant index is read instead)
local function global_zadd(key, score, member)
  if not CLUSTER then redis.call('ZADD', key, score, member) end
end
local function prefix_of(tenant) return 'cy:{' .. tenant .. '}:' end
local function k_apikey(key_prefix) return G .. 'apikey:' .. key_prefix end
local function k_doc(kind, id) return G .. 'doc:' .. kind .. ':' .. id end
local function k_docs(kind) return G .. 'docs:' .. kind end
-- The governance generation of a tenant: bumped by every change to what servers cache about it (its record,
-- its API keys, its policies). Runtime scripts are passed the generation the caller's cache was read at and
-- refuse to act on an older one (cycles.store.base.StaleGovernance); '' skips the check.
local function bump_governance(tenant)
  if type(tenant) == 'string' and tenant ~= '' then redis.call('INCR', prefix_of(tenant) .. 'gen') end
end
local function stale_governance(expected)
  if expected == nil or expected == '' then return nil end
  if (redis.call('GET', P .. 'gen') or '0') == expected then return nil end
  return cjson.encode({err = 'STALE_GOVERNANCE', msg = 'governance changed'})
end
local function k_rate(bucket, window) return P .. 'rl:' .. bucket .. ':' .. string.format('%d', window) end

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

-- ---- rate limits: a sliding window over two fixed one-minute windows (cycles.core.policies) ----
local WINDOW = 60000
-- limits: {{bucket, limit (decimal string), policy_id, scope}, ...}; an error JSON when one is full
local function rate_check(limits, now)
  local w = math.floor(now / WINDOW)
  local elapsed = now - w * WINDOW
  for _, lim in ipairs(limits) do
    local prev = tonumber(redis.call('GET', k_rate(lim[1], w - 1)) or '0')
    local cur = tonumber(redis.call('GET', k_rate(lim[1], w)) or '0')
    if prev * (WINDOW - elapsed) + cur * WINDOW + WINDOW > tonumber(lim[2]) * WINDOW then
      return cjson.encode({err = 'RATE_LIMITED', rate = {lim[1], lim[2], lim[3], lim[4], string.format('%d', prev),
                                                         string.format('%d', cur), string.format('%d', now)}})
    end
  end
  return nil
end

local function rate_count(limits, now)
  local w = math.floor(now / WINDOW)
  for _, lim in ipairs(limits) do
    local k = k_rate(lim[1], w)
    redis.call('INCR', k)
    redis.call('PEXPIRE', k, 180000)
  end
end

-- ---- governance state ----
local function tenant_state(key)
  local raw = redis.call('GET', key or k_tenant())
  if not raw then return nil end
  local ok, rec = pcall(cjson.decode, raw)
  if not ok or type(rec) ~= 'table' or (rec.status ~= 'ACTIVE' and rec.status ~= 'SUSPENDED' and rec.status ~= 'CLOSED') then
    return 'MALFORMED'
  end
  return rec
end

-- ---- ledgers ----
local FIELDS = {'allocated', 'spent', 'reserved', 'debt', 'overdraft_limit', 'is_over_limit', 'status', 'commit_overage_policy'}

local function remaining(l) return isub(isub(isub(l.allocated, l.spent), l.reserved), l.debt) end

local function load_ledger(scope, unit)
  local v = redis.call('HMGET', k_budget(scope, unit), unpack(FIELDS))
  if not v[1] then return nil end
  local l = {scope = scope, unit = unit, allocated = I(v[1]), spent = I(v[2]), reserved = I(v[3]), debt = I(v[4]),
             overdraft_limit = I(v[5]), is_over_limit = v[6] == '1', status = v[7] or 'ACTIVE', policy = v[8]}
  l.stored = {over = l.is_over_limit, debt = icmp(l.debt, ZERO) > 0, status = l.status}
  -- the state events compare against (cycles.core.events.transitions)
  l.prev = {remaining = remaining(l), over = l.is_over_limit, debt = l.debt}
  return l
end

-- cycles.core.events.ledger_state as JSON members
local function ledger_state(l)
  return {{'allocated', S(l.allocated)}, {'remaining', S(remaining(l))}, {'reserved', S(l.reserved)},
          {'spent', S(l.spent)}, {'debt', S(l.debt)}, {'overdraft_limit', S(l.overdraft_limit)},
          {'is_over_limit', jbool(l.is_over_limit)}, {'status', jstr(l.status)}}
end

-- The events of the state a ledger change crossed into since it was loaded (or last compared), as
-- cycles.core.events.transitions: exhausted, over limit entered / exited, debt incurred.
local function ledger_transitions(l, rid, policy)
  local p, tenant = l.prev, ARGV[2]
  local rem = remaining(l)
  local function base(extra)
    local m = {{'scope', jstr(l.scope)}, {'unit', jstr(l.unit)}}
    for _, x in ipairs(extra) do table.insert(m, x) end
    return jobj(m)
  end
  if icmp(p.remaining, ZERO) > 0 and icmp(rem, ZERO) <= 0 then
    emit('budget.exhausted', tenant, l.scope, base(ledger_state(l)))
  end
  local over = {{'debt', S(l.debt)}, {'overdraft_limit', S(l.overdraft_limit)}, {'is_over_limit', jbool(l.is_over_limit)}}
  if not p.over and l.is_over_limit then
    emit('budget.over_limit_entered', tenant, l.scope, base(over))
  elseif p.over and not l.is_over_limit then
    emit('budget.over_limit_exited', tenant, l.scope, base(over))
  end
  if icmp(l.debt, p.debt) > 0 then
    emit('budget.debt_incurred', tenant, l.scope, base({{'reservation_id', jopt(rid)},
      {'debt_incurred', S(isub(l.debt, p.debt))}, {'total_debt', S(l.debt)}, {'overdraft_limit', S(l.overdraft_limit)},
      {'overage_policy', jopt(policy)}}))
  end
  l.prev = {remaining = rem, over = l.is_over_limit, debt = l.debt}
end

-- the counters of a ledger written since it was loaded (status, over limit, in debt)
local function count_ledger(l)
  local was, now_debt = l.stored, icmp(l.debt, ZERO) > 0
  if was.status == l.status and was.over == l.is_over_limit and was.debt == now_debt then return end
  count('budgets.' .. was.status, -1)
  count('budgets.' .. l.status, 1)
  local function b(v) if v then return 1 end return 0 end
  -- the overview's top lists read these small sets instead of scanning every budget
  local member = string.match(l.scope, '^tenant:([^/]+)') .. ' ' .. l.scope .. '|' .. l.unit
  if was.over ~= l.is_over_limit then
    count('budgets.over_limit', b(l.is_over_limit) - b(was.over))
    redis.call(l.is_over_limit and 'SADD' or 'SREM', K_OVER_LIMIT, member)
  end
  if was.debt ~= now_debt then
    count('budgets.with_debt', b(now_debt) - b(was.debt))
    redis.call(now_debt and 'SADD' or 'SREM', K_WITH_DEBT, member)
  end
  l.stored = {over = l.is_over_limit, debt = now_debt, status = l.status}
end

-- rid / policy: what a debt_incurred event names (the committed reservation, the overage policy)
local function save_ledger(l, now, rid, policy)
  ledger_transitions(l, rid, policy)
  local over = '0'
  if l.is_over_limit then over = '1' end
  redis.call('HSET', k_budget(l.scope, l.unit), 'allocated', S(l.allocated), 'spent', S(l.spent),
    'reserved', S(l.reserved), 'debt', S(l.debt), 'is_over_limit', over, 'updated_at_ms', string.format('%d', now))
  count_ledger(l)
end

local function balance_record(l)
  return {l.scope, l.unit, S(l.allocated), S(l.spent), S(l.reserved), S(l.debt), S(l.overdraft_limit), l.is_over_limit}
end

local function balance_records(ls)
  local out = {}
  for i, l in ipairs(ls) do out[i] = balance_record(l) end
  return out
end

-- Ledgers of `scopes` in `unit` in canonical order; a UNIT_MISMATCH error string when only other units exist.
local UNITS = {'USD_MICROCENTS', 'TOKENS', 'CREDITS', 'RISK_POINTS'}
local function scope_ledgers(scopes, unit)
  local out = {}
  for _, scope in ipairs(scopes) do
    local l = load_ledger(scope, unit)
    if l then table.insert(out, l) end
  end
  if #out == 0 then
    for _, scope in ipairs(scopes) do
      local others = {}
      for _, u in ipairs(UNITS) do
        if u ~= unit and redis.call('EXISTS', k_budget(scope, u)) == 1 then table.insert(others, u) end
      end
      if #others > 0 then
        table.sort(others)
        return nil, fail('UNIT_MISMATCH', 'No budget in unit ' .. unit .. ' at the derived scopes; scope ' .. scope ..
          ' has budgets in ' .. table.concat(others, ', '), {scope = scope, requested_unit = unit, expected_units = others})
      end
    end
  end
  return out, nil
end

-- ---- idempotency ----
local function replay(endpoint, key, payload_hash, now)
  local v = redis.call('HMGET', k_idem(endpoint, key), 'h', 'r', 'rid')
  if not v[1] then return nil end
  if v[1] ~= payload_hash then
    return fail('IDEMPOTENCY_MISMATCH', 'Idempotency key ' .. key .. ' was already used with a different request payload')
  end
  local active = false
  if v[3] then
    local s = redis.call('HMGET', k_res(v[3]), 'status', 'expires_at_ms')
    active = s[1] == 'ACTIVE' and s[2] and now <= tonumber(s[2])
  end
  return cjson.encode({replay = true, result = v[2], active = active, now = now})
end

local function remember(endpoint, key, payload_hash, result_json, rid, retention_ms)
  local k = k_idem(endpoint, key)
  if rid then
    redis.call('HSET', k, 'h', payload_hash, 'r', result_json, 'rid', rid)
  else
    redis.call('HSET', k, 'h', payload_hash, 'r', result_json)
  end
  redis.call('PEXPIRE', k, retention_ms)
end

local function ok(result_json, now, active)
  return '{"replay":false,"now":' .. string.format('%d', now) .. ',"active":' .. tostring(active) .. ',"result":' .. result_json .. '}'
end

-- ---- action quotas (v0.1.26; cycles.core.actions and store/sqlite/quotas.py hold the same rules) ----
-- A counter is the hash P..'aq:'..<key>|<window key> {used, exp (end of its window instance, ms), last, lim,
-- pol, ttl (per_run: the key TTL a reset refreshes)}; the sorted set P..'aqi' indexes the keys by window end for
-- the admin view, P..'aqh' those that reached 80 % of their limit (the overview's quota health reads only
-- these). Windows end by `exp`, not by the key's TTL (that is stale-key cleanup).
local function k_quota(key) return P .. 'aq:' .. key end
local function k_quotas() return P .. 'aqi' end
local function k_quotas_hot() return P .. 'aqh' end

-- UTC calendar bucket of a time (fmt 1 minute, 2 hour, 3 day): days to civil date (H. Hinnant's algorithm)
local function utc_bucket(ms, fmt)
  local secs = math.floor(ms / 1000)
  local days = math.floor(secs / 86400)
  local sod = secs - days * 86400
  local z = days + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local d = doy - math.floor((153 * mp + 2) / 5) + 1
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  local day = string.format('%04d-%02d-%02d', y, m, d)
  if fmt == 3 then return day end
  local hour = day .. string.format('T%02d', math.floor(sod / 3600))
  if fmt == 2 then return hour end
  return hour .. string.format(':%02d', math.floor((sod % 3600) / 60))
end

-- q: {key, window ms (0: per_run), window key (per_run: the run id), bucket format, limit, key TTL ms,
-- threshold count, deny detail}
local function quota_instance(q, now)
  local size = tonumber(q[2])
  if size > 0 then
    local bucket = utc_bucket(now, tonumber(q[4]))
    return q[1] .. '|' .. bucket, bucket, now - now % size + size
  end
  return q[1] .. '|' .. q[3], q[3], now + tonumber(q[6])
end

-- Steps 2 and 3: the counters now, and the deny detail of the one that denies (the first risk-class one at its
-- limit, else the per-kind one with the least headroom), nil when all pass.
local function quota_check(quotas, now)
  local rows, full = {}, {}
  for i, q in ipairs(quotas) do
    local key, bucket, fin = quota_instance(q, now)
    local h = redis.call('HMGET', k_quota(key), 'used', 'exp')
    local used = 0
    if h[1] and tonumber(h[2]) > now then used = tonumber(h[1]) end
    rows[i] = {key, bucket, fin, used}
    if used >= tonumber(q[5]) then table.insert(full, i) end
  end
  if #full == 0 then return rows, nil end
  local hit = nil
  for _, i in ipairs(full) do
    if quotas[i][8].quota_violation.risk_class then hit = i; break end
  end
  if not hit then
    for _, i in ipairs(full) do
      if not hit or tonumber(quotas[i][5]) - rows[i][4] < tonumber(quotas[hit][5]) - rows[hit][4] then hit = i end
    end
  end
  local d = quotas[hit][8]
  d.quota_violation.used = rows[hit][4]
  d.quota_violation.window_key = rows[hit][2]
  return rows, d
end

local function quota_message(v)
  local what = 'action kind ' .. v.action_kind
  if v.risk_class then what = 'risk class ' .. v.risk_class end
  return 'Action quota exceeded: ' .. what .. ' used ' .. string.format('%d', v.used) .. ' of ' ..
    string.format('%d', v.limit) .. ' ' .. v.window .. ' at scope ' .. v.scope .. ' (policy ' ..
    tostring(v.policy_id) .. ')'
end

-- Step 5: one more on every counter; returns the per_run keys (counted down on release / expiry).
local function quota_count(quotas, rows, now)
  local runs = {}
  for i, q in ipairs(quotas) do
    local key, bucket, fin, used = rows[i][1], rows[i][2], rows[i][3], rows[i][4]
    local v = q[8].quota_violation
    local kq = k_quota(key)
    redis.call('HSET', kq, 'used', string.format('%d', used + 1), 'exp', string.format('%d', fin),
      'last', string.format('%d', now), 'lim', string.format('%d', q[5]), 'pol', v.policy_id or '',
      'ttl', string.format('%d', q[6]))
    redis.call('PEXPIRE', kq, tonumber(q[6]))
    -- the index is ordered by window end; ended windows leave it here, so it stays as small as the live counters
    redis.call('ZADD', k_quotas(), fin, key)
    redis.call('ZREMRANGEBYSCORE', k_quotas(), '-inf', string.format('%d', now))
    if (used + 1) * 5 >= tonumber(q[5]) * 4 then
      redis.call('ZADD', k_quotas_hot(), fin, key)
      redis.call('ZREMRANGEBYSCORE', k_quotas_hot(), '-inf', string.format('%d', now))
    end
    local t = tonumber(q[7])
    if used < t and t <= used + 1 then
      local label = v.action_kind
      local members = {{'scope', jstr(v.scope)}}
      if v.risk_class then
        label = '__risk__'
        table.insert(members, {'risk_class', jstr(v.risk_class)})
      end
      table.insert(members, {'action_kind', jstr(label)})
      table.insert(members, {'window', jstr(v.window)})
      table.insert(members, {'window_key', jstr(bucket)})
      table.insert(members, {'used', string.format('%d', used + 1)})
      table.insert(members, {'limit', string.format('%d', q[5])})
      table.insert(members, {'threshold_pct', string.format('%.4f', t / tonumber(q[5]))})
      table.insert(members, {'policy_id', jopt(v.policy_id)})
      table.insert(members, {'tenant_id', jstr(ARGV[2])})
      emit('quota.threshold_approaching', ARGV[2], v.scope, jobj(members))
    end
    if tonumber(q[2]) == 0 then table.insert(runs, key) end
  end
  return runs
end

local function quota_uncount(runs)
  if not runs or runs == '' then return end
  for _, key in ipairs(cjson.decode(runs)) do
    local kq = k_quota(key)
    local used = tonumber(redis.call('HGET', kq, 'used') or '0')
    if used > 0 then redis.call('HSET', kq, 'used', string.format('%d', used - 1)) end
  end
end

-- ---- leases ----
-- Returns the hold back to the reservation's ledgers; returns the unit, the amount and the scopes held.
local function unhold_reservation(rid, now)
  local r = redis.call('HMGET', k_res(rid), 'unit', 'amount', 'budgeted_scopes', 'quota_runs')
  local amount = I(r[2])
  quota_uncount(r[4])
  local held = {}
  for _, scope in ipairs(cjson.decode(r[3])) do
    local l = load_ledger(scope, r[1])
    if l then
      l.reserved = isub(l.reserved, amount)
      save_ledger(l, now)
      table.insert(held, scope)
    end
  end
  return r[1], amount, held
end

-- Expire leases past expires_at + grace; each is returned exactly once (the deadline index entry goes with it).
local function expire_due(now, limit)
  local due = redis.call('ZRANGEBYSCORE', k_deadline(), '-inf', '(' .. string.format('%d', now), 'LIMIT', 0, limit)
  local n = 0
  for _, rid in ipairs(due) do
    if redis.call('HGET', k_res(rid), 'status') == 'ACTIVE' then
      unhold_reservation(rid, now)
      redis.call('HSET', k_res(rid), 'status', 'EXPIRED')
      local r = redis.call('HMGET', k_res(rid), 'scope_path', 'unit', 'amount', 'created_at_ms', 'expires_at_ms',
        'extensions')
      emit('reservation.expired', ARGV[2], r[1], jobj({{'reservation_id', jstr(rid)}, {'scope', jstr(r[1])},
        {'unit', jstr(r[2])}, {'estimated_amount', S(I(r[3]))}, {'created_at_ms', S(I(r[4]))},
        {'expired_at_ms', string.format('%d', now)}, {'ttl_ms', S(isub(I(r[5]), I(r[4])))},
        {'extensions_used', S(I(r[6]))}}), true)
      n = n + 1
    end
    redis.call('ZREM', k_deadline(), rid)
  end
  return n
end

-- ---- ledger rules (the same as cycles.core.ledger) ----
local function check_reserve(ls, amount)
  for _, l in ipairs(ls) do
    if l.status == 'CLOSED' then return 'BUDGET_CLOSED', l.scope, 'Budget is closed for scope ' .. l.scope end
  end
  for _, l in ipairs(ls) do
    if l.status == 'FROZEN' then return 'BUDGET_FROZEN', l.scope, 'Budget is frozen for scope ' .. l.scope end
  end
  for _, l in ipairs(ls) do
    if l.is_over_limit then
      return 'OVERDRAFT_LIMIT_EXCEEDED', l.scope,
        'Scope ' .. l.scope .. ' is over its overdraft limit; no new reservations until reconciled'
    end
  end
  for _, l in ipairs(ls) do
    if icmp(l.debt, ZERO) > 0 and icmp(l.overdraft_limit, ZERO) == 0 then
      return 'DEBT_OUTSTANDING', l.scope, 'Scope ' .. l.scope .. ' has outstanding debt ' .. S(l.debt)
    end
  end
  for _, l in ipairs(ls) do
    if icmp(remaining(l), amount) < 0 then
      return 'BUDGET_EXCEEDED', l.scope, 'Insufficient remaining budget for scope ' .. l.scope .. ': remaining ' ..
        S(remaining(l)) .. ', requested ' .. S(amount)
    end
  end
  return nil
end

-- Charge `actual` against ledgers holding `held` for it; mutates ls. Returns charged or nil, error.
local function settle_unchecked(ls, held, actual, policy, reject_any)
  local delta = isub(actual, held)
  local function plain()
    for _, l in ipairs(ls) do l.reserved = isub(l.reserved, held); l.spent = iadd(l.spent, actual) end
    return actual
  end
  if icmp(delta, ZERO) <= 0 then return plain() end
  if policy == 'REJECT' and reject_any then
    return nil, fail('BUDGET_EXCEEDED', 'Actual ' .. S(actual) .. ' exceeds the reserved ' .. S(held) ..
      ' and the overage policy is REJECT', {scope = ls[1].scope, reserved = S(held), actual = S(actual)})
  end
  local shorts, any = {}, false
  for i, l in ipairs(ls) do
    shorts[i] = imax(ZERO, isub(delta, imax(ZERO, remaining(l))))
    if icmp(shorts[i], ZERO) > 0 then any = true end
  end
  if not any then return plain() end
  if policy == 'REJECT' then
    for i, l in ipairs(ls) do
      if icmp(shorts[i], ZERO) > 0 then
        return nil, fail('BUDGET_EXCEEDED', 'Actual ' .. S(actual) .. ' exceeds what is available for scope ' ..
          l.scope .. ' and the overage policy is REJECT', {scope = l.scope})
      end
    end
  end
  if policy == 'ALLOW_WITH_OVERDRAFT' then
    for i, l in ipairs(ls) do
      if icmp(iadd(l.debt, shorts[i]), l.overdraft_limit) > 0 then
        return nil, fail('OVERDRAFT_LIMIT_EXCEEDED', 'Overdraft limit exceeded for scope ' .. l.scope .. ': debt ' ..
          S(l.debt) .. ' + shortfall ' .. S(shorts[i]) .. ' > limit ' .. S(l.overdraft_limit),
          {scope = l.scope, debt = S(l.debt), shortfall = S(shorts[i]), overdraft_limit = S(l.overdraft_limit)})
      end
    end
    for i, l in ipairs(ls) do
      l.reserved = isub(l.reserved, held)
      l.spent = iadd(l.spent, isub(actual, shorts[i]))
      l.debt = iadd(l.debt, shorts[i])
      if icmp(l.debt, l.overdraft_limit) > 0 then l.is_over_limit = true end
    end
    return actual
  end
  -- ALLOW_IF_AVAILABLE: charge what every scope can cover; flag the scopes that could not cover it all.
  local covered = delta
  for _, l in ipairs(ls) do covered = imin(covered, imax(ZERO, remaining(l))) end
  local charged = iadd(held, covered)
  for i, l in ipairs(ls) do
    l.reserved = isub(l.reserved, held)
    l.spent = iadd(l.spent, charged)
    if icmp(shorts[i], ZERO) > 0 then l.is_over_limit = true end
  end
  return charged
end

local function settle(ls, held, actual, policy, reject_any)
  local charged, err = settle_unchecked(ls, held, actual, policy, reject_any)
  if err then return nil, err end
  for _, l in ipairs(ls) do
    if icmp(l.spent, INT64_MAX) > 0 then
      return nil, fail('INVALID_REQUEST', 'charging ' .. S(actual) .. ' would take spent past the int64 range for scope ' .. l.scope)
    end
  end
  return charged
end

-- the guard of admin writes: the tenant must exist and not be CLOSED
local function guard_open(tenant_id)
  local t = tenant_state(prefix_of(tenant_id) .. 'tenant')
  if t == 'MALFORMED' then return fail('INTERNAL_ERROR', 'Malformed tenant record: ' .. tenant_id) end
  if not t then return fail('NOT_FOUND', 'Tenant ' .. tenant_id .. ' not found') end
  if t.status == 'CLOSED' then return fail('TENANT_CLOSED', 'Tenant ' .. tenant_id .. ' is closed') end
  return nil
end

local function guard_closed(tenant_id)
  local t = tenant_state()
  if t == 'MALFORMED' then return nil, fail('INTERNAL_ERROR', 'Malformed tenant record: ' .. tenant_id) end
  if t and t.status == 'CLOSED' then return nil, fail('TENANT_CLOSED', 'Tenant ' .. tenant_id .. ' is closed') end
  return t, nil
end
