-- send-otp with a fresh, valid number per request: +1 <area> <7 digits>, unique per thread.
-- args: area code, threads.
local area, base, n

function init(args)
  area = args[1]
  base = 2000000 + id * 1000000
  n = 0
end

function request()
  n = n + 1
  local body = '{"phone_number":"+1' .. area .. tostring(base + n) .. '"}'
  return wrk.format("POST", "/api/v1/auth/send-otp", json_headers, body)
end
