-- expiry sweep of one tenant. ARGV: 1 prefix, 2 tenant, 3 unused, 4 test clock, 5 limit
return string.format('%d', expire_due(now_ms(), tonumber(ARGV[5])))
