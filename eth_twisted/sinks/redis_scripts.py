"""The Redis sink's Lua scripts and the packed form of a batch they read.

Each script runs atomically on the Redis server; the sink loads them by SHA
(``EVALSHA``) and reloads one that a restarted Redis forgot (``NOSCRIPT``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from eth_twisted.model import storable_client_ip

# One batch. KEYS: hashes, ip_addresses, ip_messages. ARGV[1]: n; ARGV[2]: the n
# messages packed by :func:`pack_store_entries`, one line "hash score ip flag" each,
# with flag "1" = the record stored it (first delivery), "0" = the record called it
# a duplicate, "?" = no record: decide by ZADD NX. One packed string rather than
# four arguments a message: the client then encodes five arguments a batch, not
# 4n+5 (txredisapi's per-argument encoding was about a tenth of the server's CPU).
# A line that does not parse (the count differs from n) fails the whole script
# before it writes anything. Answers one character per message, "1" when ZADD
# added the hash, else "0", as a single bulk string: an array of integers costs
# the client a parsed element (and, in txredisapi, a Deferred) per message.
STORE_SCRIPT = """
local n = tonumber(ARGV[1])
local entries = {}
for h, score, ip, flag in string.gmatch(ARGV[2], '(%S+) (%S+) (%S+) ([01?])\\n') do
  entries[#entries + 1] = {h, score, ip, flag}
end
if #entries ~= n then
  return redis.error_reply('ERR store script: ' .. #entries .. ' entries parsed, ' .. n .. ' announced')
end
local added = {}
local firsts = {}
local delivered = {}
for i, e in ipairs(entries) do
  local h, score, ip, flag = e[1], e[2], e[3], e[4]
  local a = redis.call('ZADD', KEYS[1], 'NX', score, h)
  added[i] = a
  delivered[ip] = (delivered[ip] or 0) + 1
  if flag == '1' or (flag == '?' and a == 1) then
    firsts[ip] = (firsts[ip] or 0) + 1
  end
end
for ip, c in pairs(delivered) do redis.call('HINCRBY', KEYS[3], ip, c) end
for ip, c in pairs(firsts) do redis.call('HINCRBY', KEYS[2], ip, c) end
return table.concat(added)
"""


def score(received_at: float) -> str:
    """A sorted-set score for a receipt time, exact enough to round-trip a float."""
    return repr(float(received_at))


def pack_store_entries(entries: Sequence[tuple[str, float, str, str]]) -> str:
    """The store script's ARGV[2]: ``(hash, received_at, client_ip, flag)`` a line each.

    Each IP goes in the form the record stores
    (:func:`~eth_twisted.model.storable_client_ip`): printable, no spaces, never
    empty, bounded. So an address holding whitespace, a newline or a lone
    surrogate can neither break the line format nor fail the encoding, and the
    counts the store script keeps are the ones reconciliation rebuilds from SQL.
    """
    lines = []
    last_at, at_score = None, ""
    ips: dict[str, str] = {}
    for h, at, ip, flag in entries:
        if at != last_at:  # the messages of one read share their receipt time
            last_at, at_score = at, score(at)
        field = ips.get(ip)
        if field is None:
            field = ips[ip] = storable_client_ip(ip)
        lines.append(f"{h} {at_score} {field} {flag}\n")
    return "".join(lines)


# Reconciliation, page by page (the record is read in bounded pages of summaries,
# never whole). One page: KEYS hashes, the run's own count key. ARGV[1]: seconds
# the count key lives (refreshed by every page, so an abandoned run leaves
# nothing behind); ARGV[2]: 2n; then n "score hash" pairs for ZADD NX; then
# "ip count" pairs: this page's first deliveries per IP, added to the count key.
# Answers how many hashes were added.
RECONCILE_PAGE_SCRIPT = """
local ttl, n = tonumber(ARGV[1]), tonumber(ARGV[2])
local added = 0
local i = 3
while i < 3 + n do
  local j = math.min(i + 999, 2 + n)
  added = added + redis.call('ZADD', KEYS[1], 'NX', unpack(ARGV, i, j))
  i = j + 1
end
for k = 3 + n, #ARGV, 2 do
  redis.call('HINCRBY', KEYS[2], ARGV[k], ARGV[k + 1])
end
if #ARGV > 2 + n then redis.call('EXPIRE', KEYS[2], ttl) end
return added
"""


# Raise ip_messages to at least the rebuilt first-delivery count (it cannot be
# rebuilt from SQL, which keeps no duplicates). KEYS: ip_messages. ARGV: ip,
# count, ... (one HSCAN page of the run's count key). Answers how many were raised.
RAISE_MESSAGES_SCRIPT = """
local raised = 0
for k = 1, #ARGV, 2 do
  local c = tonumber(ARGV[k + 1])
  local m = tonumber(redis.call('HGET', KEYS[1], ARGV[k]) or '0')
  if m < c then
    redis.call('HSET', KEYS[1], ARGV[k], c)
    raised = raised + 1
  end
end
return raised
"""


# Put the run's counts in place of ip_addresses. KEYS: the run's count key,
# ip_addresses. Answers how many IPs ip_addresses now holds.
INSTALL_COUNTS_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('PERSIST', KEYS[1])
  redis.call('RENAME', KEYS[1], KEYS[2])
else
  redis.call('DEL', KEYS[2])
end
return redis.call('HLEN', KEYS[2])
"""


# A consistent snapshot of both count hashes. KEYS: ip_addresses, ip_messages.
READ_COUNTS_SCRIPT = """
return {redis.call('HGETALL', KEYS[1]), redis.call('HGETALL', KEYS[2])}
"""


class Script:
    """A Lua script with its SHA-1, for EVALSHA."""

    def __init__(self, name: str, source: str) -> None:
        self.name = name
        self.source = source.strip().encode()
        self.sha = hashlib.sha1(self.source).hexdigest()


STORE = Script("store", STORE_SCRIPT)


RECONCILE_PAGE = Script("reconcile-page", RECONCILE_PAGE_SCRIPT)


RAISE_MESSAGES = Script("raise-messages", RAISE_MESSAGES_SCRIPT)


INSTALL_COUNTS = Script("install-counts", INSTALL_COUNTS_SCRIPT)


READ_COUNTS = Script("read-counts", READ_COUNTS_SCRIPT)


SCRIPTS = (STORE, RECONCILE_PAGE, RAISE_MESSAGES, INSTALL_COUNTS, READ_COUNTS)
