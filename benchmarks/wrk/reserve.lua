-- wrk: POST /v1/reservations with a fresh idempotency key each time; the reservation ids answered are
-- written to IDS_DIR/ids-<thread>.txt for a later commit run (benchmarks/hotpath.py).
local tenant, key, dir, tag = os.getenv("TENANT"), os.getenv("APIKEY"), os.getenv("IDS_DIR"), os.getenv("RUN_TAG")
local counter = 0

function setup(thread)
  counter = counter + 1
  thread:set("tid", counter)
end

local n, out = 0, nil

function init(args)
  if dir and dir ~= "" then
    out = io.open(dir .. "/ids-" .. tid .. ".txt", "w")
    out:setvbuf("line")
  end
end

request = function()
  n = n + 1
  -- unique across threads and runs: a thread that reused another's keys would measure replays
  local k = "hp-" .. tag .. "-" .. tid .. "-" .. n
  local body = '{"idempotency_key":"' .. k .. '","subject":{"tenant":"' .. tenant .. '","agent":"a1"},' ..
    '"action":{"kind":"llm.completion","name":"m"},"estimate":{"unit":"USD_MICROCENTS","amount":1000},"ttl_ms":600000}'
  return wrk.format("POST", "/v1/reservations",
    {["Content-Type"] = "application/json", ["X-Cycles-API-Key"] = key, ["X-Idempotency-Key"] = k}, body)
end

response = function(status, headers, body)
  if out and status == 200 then
    local rid = string.match(body, '"reservation_id":"([^"]+)"')
    if rid then out:write(rid, "\n") end
  end
end
