-- wrk script for bench/scale.sh: GET /kpi/k<rank> with ranks drawn from a Zipf
-- distribution (exponent ZIPF_S, default 0.99) over ZIPF_KEYS keys (default 1).
-- Each wrk thread draws ZIPF_DRAWS ranks (default 1,000,000) at start, by binary search in
-- the cumulative table, formats each distinct key's request once (`wrk.format`), and then
-- sends the drawn requests in turn (starting again after the last), so that what wrk
-- spends per request does not grow with the number of keys: the run's latency is the
-- server's, whatever the size. (Formatting per request, or looking up a path string per
-- request, made wrk itself 8-15% slower at 1 M keys than at 1.)
-- With ZIPF_DELAY_MS=N (N > 0), each connection waits N milliseconds after each response
-- before its next request (wrk's `delay`): a paced load, below saturation.
-- With ZIPF_BARRIER=DIR, ZIPF_PARTY=I and ZIPF_PARTIES=N, init ends only once all N wrk
-- processes (each `-t1`) have finished theirs (a file per party in DIR; at most 120 s), so
-- that they start loading together. wrk runs a thread's init on its main thread just
-- before starting that thread: with `-t2`, the second thread's init (over a second at 1 M
-- keys) ran while the first thread already loaded the server alone, on the same cores,
-- and those requests counted against a duration that starts after it.
local n = tonumber(os.getenv("ZIPF_KEYS") or "1")
local s = tonumber(os.getenv("ZIPF_S") or "0.99")
local draws = tonumber(os.getenv("ZIPF_DRAWS") or "1000000")
local requests = {}
local next_draw = 1

function init(args)
  local cdf, total = {}, 0
  for k = 1, n do
    total = total + 1 / (k ^ s)
    cdf[k] = total
  end
  for k = 1, n do cdf[k] = cdf[k] / total end
  math.randomseed(os.time() + (tonumber(tostring({}):match("0x(%x+)"), 16) or 0) % 100000)
  local formatted = {}
  for i = 1, draws do
    local u, lo, hi = math.random(), 1, n
    while lo < hi do
      local mid = math.floor((lo + hi) / 2)
      if cdf[mid] < u then lo = mid + 1 else hi = mid end
    end
    local request = formatted[lo]
    if not request then
      request = wrk.format("GET", "/kpi/k" .. (lo - 1))
      formatted[lo] = request
    end
    requests[i] = request
  end
  local barrier = os.getenv("ZIPF_BARRIER")
  if barrier then
    local party = os.getenv("ZIPF_PARTY") or "1"
    local parties = tonumber(os.getenv("ZIPF_PARTIES") or "1")
    local mark = assert(io.open(barrier .. "/ready." .. party, "w"))
    mark:close()
    local deadline = os.time() + 120
    while os.time() <= deadline do
      local ready = 0
      for j = 1, parties do
        local f = io.open(barrier .. "/ready." .. j)
        if f then
          f:close()
          ready = ready + 1
        end
      end
      if ready >= parties then
        break
      end
      os.execute("sleep 0.01")
    end
  end
end

function request()
  local request = requests[next_draw]
  next_draw = next_draw % draws + 1
  return request
end

local pause_ms = tonumber(os.getenv("ZIPF_DELAY_MS") or "0")
if pause_ms > 0 then
  -- Defined only when asked for: with `delay` defined, wrk goes through a timer for
  -- every request.
  function delay()
    return pause_ms
  end
end
