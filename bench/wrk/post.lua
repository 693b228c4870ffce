-- wrk script for bench/load: POSTs the form in $BODY_FILE to the URL's path; with CLOSE=1
-- every request carries `Connection: close` (wrk then opens a new connection, and with https
-- a new TLS handshake, for every request). Prints one machine-readable line at the end:
--   RESULT <requests> <duration_us> <p50_us> <p99_us> <non2xx> <socket_errors>
local f = assert(io.open(os.getenv("BODY_FILE"), "rb"))
local body = f:read("*a")
f:close()
wrk.method = "POST"
wrk.body = body
wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"
if os.getenv("CLOSE") == "1" then
  wrk.headers["Connection"] = "close"
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %d %d %.1f %.1f %d %d\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), e.status, e.connect + e.read + e.write + e.timeout))
end
