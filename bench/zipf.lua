-- wrk script for bench/scale.sh: GET /kpi/k<rank> with ranks drawn from a Zipf
-- distribution (exponent ZIPF_S, default 0.99) over ZIPF_KEYS keys (default 1).
-- Each wrk thread draws ZIPF_DRAWS ranks (default 1,000,000) at start, by binary search in
-- the cumulative table, and then takes them in turn (starting again after the last), so
-- that what wrk spends per request does not grow with the number of keys: the run's
-- latency is the server's, whatever the size.
local n = tonumber(os.getenv("ZIPF_KEYS") or "1")
local s = tonumber(os.getenv("ZIPF_S") or "0.99")
local draws = tonumber(os.getenv("ZIPF_DRAWS") or "1000000")
local paths = {}
local next_draw = 1

function init(args)
  local cdf, total = {}, 0
  for k = 1, n do
    total = total + 1 / (k ^ s)
    cdf[k] = total
  end
  for k = 1, n do cdf[k] = cdf[k] / total end
  math.randomseed(os.time() + (tonumber(tostring({}):match("0x(%x+)"), 16) or 0) % 100000)
  for i = 1, draws do
    local u, lo, hi = math.random(), 1, n
    while lo < hi do
      local mid = math.floor((lo + hi) / 2)
      if cdf[mid] < u then lo = mid + 1 else hi = mid end
    end
    paths[i] = "/kpi/k" .. (lo - 1)
  end
end

function request()
  local path = paths[next_draw]
  next_draw = next_draw % draws + 1
  return wrk.format("GET", path)
end
