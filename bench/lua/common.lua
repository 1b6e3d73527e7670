-- Shared by every workload (prepended by bench/wrkrun.py): thread ids, data files, and a JSON
-- summary line that the benchmark parses instead of wrk's human-readable output.
local bench_threads = {}

function setup(thread)
  thread:set("id", #bench_threads)
  thread:set("ran_out", 0)
  table.insert(bench_threads, thread)
end

function read_lines(path)
  local lines = {}
  for line in io.lines(path) do
    if #line > 0 then lines[#lines + 1] = line end
  end
  return lines
end

-- The items of a list that belong to this thread: every nth, starting at its id.
function my_slice(items, threads)
  local mine = {}
  for i = id + 1, #items, threads do mine[#mine + 1] = items[i] end
  return mine
end

json_headers = { ["Content-Type"] = "application/json" }

function done(summary, latency, requests)
  local ran_out = 0
  for _, thread in ipairs(bench_threads) do ran_out = ran_out + (thread:get("ran_out") or 0) end
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,'
    .. '"mean_us":%.1f,"max_us":%d,"ran_out_threads":%d,"errors":{"connect":%d,"read":%d,'
    .. '"write":%d,"status":%d,"timeout":%d}}\n',
    summary.requests, summary.duration, summary.bytes, latency:percentile(50),
    latency:percentile(90), latency:percentile(99), latency.mean, latency.max, ran_out,
    e.connect, e.read, e.write, e.status, e.timeout))
end
