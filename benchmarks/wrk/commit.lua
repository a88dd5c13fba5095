-- wrk: POST /v1/reservations/{id}/commit, each reservation id written by reserve.lua once (each thread
-- reads the ids of the reserve thread with the same number). A thread that runs out of ids starts over
-- (idempotent replays): hotpath.py flags a run that answered more commits than there were ids.
local key, dir, tag = os.getenv("APIKEY"), os.getenv("IDS_DIR"), os.getenv("RUN_TAG")
local counter = 0

function setup(thread)
  counter = counter + 1
  thread:set("tid", counter)
end

local ids, i = {}, 0

function init(args)
  for line in io.lines(dir .. "/ids-" .. tid .. ".txt") do
    ids[#ids + 1] = line
  end
end

request = function()
  i = i + 1
  local rid = ids[((i - 1) % #ids) + 1]
  local k = "hpc-" .. tag .. "-" .. rid
  local body = '{"idempotency_key":"' .. k .. '","actual":{"unit":"USD_MICROCENTS","amount":700}}'
  return wrk.format("POST", "/v1/reservations/" .. rid .. "/commit",
    {["Content-Type"] = "application/json", ["X-Cycles-API-Key"] = key, ["X-Idempotency-Key"] = k}, body)
end
