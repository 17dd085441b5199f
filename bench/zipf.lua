-- wrk script for bench/scale.sh: GET /kpi/k<rank> with ranks drawn from a Zipf
-- distribution (exponent ZIPF_S, default 0.99) over ZIPF_KEYS keys (default 1).
-- Each wrk thread builds its own cumulative table once, then draws by binary search.
local n = tonumber(os.getenv("ZIPF_KEYS") or "1")
local s = tonumber(os.getenv("ZIPF_S") or "0.99")
local cdf = {}

function init(args)
  local total = 0
  for k = 1, n do
    total = total + 1 / (k ^ s)
    cdf[k] = total
  end
  for k = 1, n do cdf[k] = cdf[k] / total end
  math.randomseed(os.time() + (tonumber(tostring({}):match("0x(%x+)"), 16) or 0) % 100000)
end

function request()
  local u, lo, hi = math.random(), 1, n
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    if cdf[mid] < u then lo = mid + 1 else hi = mid end
  end
  return wrk.format("GET", "/kpi/k" .. (lo - 1))
end
