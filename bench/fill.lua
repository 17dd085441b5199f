-- wrk script for bench/scale.sh: requests /kpi/k0 .. /kpi/k<FILL_KEYS - 1> once each,
-- spread over FILL_THREADS wrk threads (wrk -t), then keeps asking for /kpi/k0 (a hit)
-- until its share of answers is in, and stops the thread (wrk itself runs for its -d:
-- bench/scale.sh stops it once every key was answered).
local n = tonumber(os.getenv("FILL_KEYS") or "1")
local step = tonumber(os.getenv("FILL_THREADS") or "1")
local counter = 0

function setup(thread)
  thread:set("id", counter)
  counter = counter + 1
end

function init(args)
  next_key = id
  answered = 0
  mine = math.floor((n - id + step - 1) / step)
end

function request()
  local k = next_key
  if k < n then next_key = next_key + step else k = 0 end
  return wrk.format("GET", "/kpi/k" .. k)
end

function response(status, headers, body)
  answered = answered + 1
  if answered >= mine + 1000 then wrk.thread:stop() end
end
