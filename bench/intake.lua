-- wrk script for the intake benchmark: 3-alert Alertmanager webhooks, each alert with a unique
-- fingerprint (BENCH_DUPLICATES=1: the same webhook every time), with the ingest token.
-- Prints one line "BENCH {json}" with requests, duration, non-2xx and latency percentiles.
local run = os.getenv("BENCH_RUN") or "r"
local duplicates = os.getenv("BENCH_DUPLICATES") == "1"
local counter = 0

wrk.method = "POST"
wrk.path = "/api/v1/alertmanager"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer bench-ingest"

local alert_fmt = '{"status":"firing","labels":{"alertname":"BenchAlert","seq":"%s","run":"%s","severity":"page"},'
  .. '"annotations":{"summary":"bench alert %s"},"startsAt":"2026-11-23T05:00:00.000Z",'
  .. '"endsAt":"0001-01-01T00:00:00Z","generatorURL":"http://prometheus.example:9090/graph",'
  .. '"fingerprint":"%016x"}'
local webhook_fmt = '{"version":"4","groupKey":"{}:{alertname=\\"BenchAlert\\"}","truncatedAlerts":0,'
  .. '"status":"firing","receiver":"responder","groupLabels":{"alertname":"BenchAlert"},'
  .. '"commonLabels":{"alertname":"BenchAlert"},"commonAnnotations":{},'
  .. '"externalURL":"http://alertmanager.example:9093","alerts":[%s]}'

local base = 0
for i = 1, #run do base = (base * 31 + string.byte(run, i)) % 1000000 end

local function body(n)
  local alerts = {}
  for k = 1, 3 do
    local seq = string.format("%d-%d", n, k)
    alerts[k] = string.format(alert_fmt, seq, run, seq, base * 100000000 + n * 4 + k)
  end
  return string.format(webhook_fmt, table.concat(alerts, ","))
end

local fixed = body(0)

request = function()
  if duplicates then
    return wrk.format(nil, nil, nil, fixed)
  end
  counter = counter + 1
  return wrk.format(nil, nil, nil, body(counter))
end

done = function(summary, latency, requests)
  local non2xx = summary.errors.status + summary.errors.connect + summary.errors.read
    + summary.errors.write + summary.errors.timeout
  io.write(string.format(
    'BENCH {"requests": %d, "duration_s": %f, "non_2xx": %d, "p50_ms": %f, "p99_ms": %f, "max_ms": %f}\n',
    summary.requests, summary.duration / 1e6, non2xx,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, latency.max / 1000))
end
