-- send-otp or verify-otp over a list of numbers, each used once: the thread stops when its
-- share is done (it sends a GET /health meanwhile, so a few requests at the end are those).
-- args: mode ("send" or "verify"), numbers file, threads, code.
local mode, numbers, code, i

function init(args)
  mode = args[1]
  numbers = my_slice(read_lines(args[2]), tonumber(args[3]))
  code = args[4]
  i = 0
end

function request()
  i = i + 1
  local phone = numbers[i]
  if phone == nil then
    ran_out = 1
    return wrk.format("GET", "/health")
  end
  if mode == "send" then
    return wrk.format("POST", "/api/v1/auth/send-otp", json_headers,
      '{"phone_number":"' .. phone .. '"}')
  end
  return wrk.format("POST", "/api/v1/auth/verify-otp", json_headers,
    '{"phone_number":"' .. phone .. '","otp_code":"' .. code .. '"}')
end

function response(status, headers, body)
  if ran_out == 1 then wrk.thread:stop() end
end
