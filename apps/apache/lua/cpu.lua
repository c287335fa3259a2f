-- A CPU-bound page, what Crane's test.php did: a loop of 15 million
-- iterations per request, here inside Apache's worker thread (mod_lua).
-- ?n=N changes the count (1 .. 10^9) for quicker or heavier runs.
-- The answer depends only on n, so every replica sends the same bytes.

local DEFAULT_N = 15000000

function handle(r)
  local n = DEFAULT_N
  local args = r:parseargs()
  if args and args.n then
    local v = tonumber(args.n)
    if v == nil or v < 1 or v > 1e9 or v ~= math.floor(v) then
      r.status = 400
      r.content_type = "text/plain"
      r:puts("bad n\n")
      return apache2.OK
    end
    n = math.tointeger(v)
  end
  local sum = 0
  for i = 1, n do
    sum = sum + i
  end
  r.content_type = "text/plain"
  r:puts(string.format("loop=%d sum=%d\n", n, sum))
  return apache2.OK
end
