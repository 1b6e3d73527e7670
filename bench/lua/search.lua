-- Admin search: round-robin over prepared paths (query strings already encoded).
-- args: paths file, admin token.
local paths, headers, i

function init(args)
  paths = read_lines(args[1])
  headers = { ["Authorization"] = "Bearer " .. args[2] }
  i = id * 7
end

function request()
  i = i + 1
  return wrk.format("GET", paths[(i % #paths) + 1], headers)
end
