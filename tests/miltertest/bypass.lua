-- MX Guard seen by Debian's miltertest (an independent libmilter client).
-- The guard runs with its primary up; MX_GUARD_SOCKET names its socket.
-- Exits non-zero (error()) on the first expectation that fails.

local sock = os.getenv("MX_GUARD_SOCKET")
if sock == nil then error("MX_GUARD_SOCKET is not set") end

local function expect(conn, want, what)
  local got = mt.getreply(conn)
  if got ~= want then
    error(what .. ": got reply " .. tostring(got) .. ", wanted " .. tostring(want))
  end
end

-- 1. An untrusted client bypassing a healthy primary.
local conn = mt.connect(sock, 20, 0.1)
if conn == nil then error("cannot connect to " .. sock) end
if mt.negotiate(conn, nil, nil, nil) ~= nil then error("negotiate failed") end
if mt.conninfo(conn, "spam.example", "203.0.113.7") ~= nil then error("conninfo") end
if mt.helo(conn, "spam.example") ~= nil then error("helo") end
if mt.mailfrom(conn, "<spam@spam.example>") ~= nil then error("mailfrom") end

if mt.rcptto(conn, "<user@example.org>") ~= nil then error("rcpt example.org") end
expect(conn, SMFIR_REPLYCODE, "RCPT for a guarded domain with its primary up")

if mt.rcptto(conn, "<user@unguarded.example>") ~= nil then error("rcpt unguarded") end
expect(conn, SMFIR_CONTINUE, "RCPT for an unguarded domain")

if mt.rcptto(conn, "<user@flagged.example>") ~= nil then error("rcpt flagged") end
expect(conn, SMFIR_CONTINUE, "RCPT for a flag domain")

-- The guard skips the steps it does not use; miltertest refuses skipped steps.
for _, skipped in ipairs({SMFIP_NODATA, SMFIP_NOEOH, SMFIP_NOBODY}) do
  if not mt.test_option(conn, skipped) then
    error("the guard should skip DATA, EOH and body (option " .. skipped .. ")")
  end
end
if mt.header(conn, "Subject", "hello") ~= nil then error("header") end
if mt.header(conn, "X-MX-Guard", "forged by the client") ~= nil then error("header") end
if mt.eom(conn) ~= nil then error("eom") end
expect(conn, SMFIR_CONTINUE, "EOM")

if not mt.eom_check(conn, MT_HDRCHANGE, "X-MX-Guard") then
  error("the forged X-MX-Guard header was not removed")
end
if not mt.eom_check(conn, MT_HDRADD, "X-MX-Guard") then
  error("no X-MX-Guard header was added for the flag domain")
end
local value = mt.getheader(conn, "X-MX-Guard", 0)
if value == nil or string.find(value, "^bypass; domain=flagged.example; primary=mx1.example.org up since ") == nil then
  error("unexpected header value: " .. tostring(value))
end
mt.echo("header: " .. value)
mt.disconnect(conn)

-- 2. A trusted client (the primary's own relay) is never guarded.
conn = mt.connect(sock, 20, 0.1)
if conn == nil then error("cannot connect again") end
if mt.negotiate(conn, nil, nil, nil) ~= nil then error("negotiate failed") end
if mt.conninfo(conn, "relay.example", "127.0.0.1") ~= nil then error("conninfo") end
if mt.mailfrom(conn, "<a@relay.example>") ~= nil then error("mailfrom") end
if mt.rcptto(conn, "<user@example.org>") ~= nil then error("rcpt") end
expect(conn, SMFIR_CONTINUE, "RCPT from a trusted client")
mt.disconnect(conn)
mt.echo("ok")
