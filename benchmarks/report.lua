-- wrk script of bench.py: counts answers that are not 2xx, optionally paces
-- each connection, and prints the results as one JSON line.
--
--   WRK_PAUSE_MS=40 wrk -s report.lua ...   each connection waits 40 ms
--                                           between an answer and its next request

local threads = {}

function setup(thread)
   table.insert(threads, thread)
end

function init(args)
   non2xx = 0
end

function response(status, headers, body)
   if status < 200 or status > 299 then
      non2xx = non2xx + 1
   end
end

local pause = tonumber(os.getenv("WRK_PAUSE_MS") or "")
if pause then
   function delay()
      return pause
   end
end

function done(summary, latency, requests)
   local non2xx_total = 0
   for _, thread in ipairs(threads) do
      non2xx_total = non2xx_total + (thread:get("non2xx") or 0)
   end
   local e = summary.errors
   io.write(string.format(
      'WRK-JSON {"requests": %d, "duration_s": %.6f, "non2xx": %d, ' ..
      '"connect": %d, "read": %d, "write": %d, "timeout": %d, ' ..
      '"mean_ms": %.3f, "p50_ms": %.3f, "p90_ms": %.3f, "p99_ms": %.3f, ' ..
      '"p999_ms": %.3f, "max_ms": %.3f}\n',
      summary.requests, summary.duration / 1e6, non2xx_total,
      e.connect, e.read, e.write, e.timeout,
      latency.mean / 1e3, latency:percentile(50) / 1e3, latency:percentile(90) / 1e3,
      latency:percentile(99) / 1e3, latency:percentile(99.9) / 1e3, latency.max / 1e3))
end
