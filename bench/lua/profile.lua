-- GET profile with a skewed (Zipf) mix of bearer tokens obtained beforehand.
-- args: tokens file (by rank), cumulative-probability file (one per token).
local tokens, cdf, headers

function init(args)
  tokens = read_lines(args[1])
  cdf = {}
  for _, line in ipairs(read_lines(args[2])) do cdf[#cdf + 1] = tonumber(line) end
  math.randomseed(7919 * (id + 1))
  headers = {}
end

function request()
  local r = math.random()
  local lo, hi = 1, #cdf
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    if cdf[mid] < r then lo = mid + 1 else hi = mid end
  end
  headers["Authorization"] = "Bearer " .. tokens[lo]
  return wrk.format("GET", "/api/v1/users/profile", headers)
end
