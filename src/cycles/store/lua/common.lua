-- Shared prelude of every Cycles script (prepended by the Python loader, redis._PRELUDE): this file, then
-- common_journal.lua (JSON text surgery, the journal, store events), common_ledgers.lua (rate limits, tenant
-- state, ledgers, idempotency), common_quotas.lua (action quotas), common_leases.lua (leases, ledger rules).
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

