"""The relay's lease table in Redis, shared by several relays.

``twistd relay --registry redis://HOST:PORT/DB`` (see L{p2p.relay_tap})
keeps its leases here instead of in the relay's memory
(L{p2p.registry.MemoryRegistry}), so every relay on one Redis lists every
peer registered at any of them, and a relay restart loses no lease.  Only
this module imports C{txredisapi}, and only the Redis option imports it.

Layout, under a key prefix (default ``p2p:``); a peer is its *member*
string ``"HOST PORT"``:

* ``<prefix>l:<member>``: a hash per lease: name ``n``, listing key
  ``s``, registered ``r``, renewed ``w``, expires ``e``, verified ``v``,
  and the source ``S``, network ``N`` and wide network ``G`` it counts
  against (L{p2p.netgroup}).  It has no key TTL: it lives exactly as long
  as the member's entries in the sets below, since ending a lease (below)
  needs its source, network and wide network.  (A TTL, once kept as a
  safety net, removed the hash of every lease when all relays were down
  longer than three lease lengths, and left its counts and index entries
  behind for good.)  A member whose hash is gone all the same (evicted,
  deleted by hand, or expired under an earlier version) is a *ghost*: it
  is never listed, ending it removes its entries, and the relay that ends
  it takes it off the counts (L{RedisRegistry}, ``uncount``).
* ``<prefix>due``: a sorted set of members by expiry time.  Every script
  first ends the leases due by the caller's "now" (``ZRANGEBYSCORE -inf
  now``, at most L{EXPIRE_BATCH} of them): O(expired), never a scan.  The
  relay that trims a lease logs it.
* ``<prefix>ver`` and ``<prefix>unv``: members by listing key
  (L{p2p.registry.listing_key}, stored as the hash's ``s``), the verified
  tier and the other (the listing order, as in memory); a page is
  ``ZRANGEBYSCORE (cursor +inf LIMIT``: O(log n + limit).  Keys stay
  below 2**52, so the scores (doubles) hold them exactly.
* ``<prefix>files``: member -> its name filter (256 bytes), for the leases
  that announced one: a hinted query reads the filters of hundreds of
  leases per command (``HMGET``).
* ``<prefix>src``, ``<prefix>net`` and ``<prefix>grp``: hashes counting
  leases per source and per network, for the per-address and per-network
  caps, and per wide network, for listing keys; the table size is
  ``ZCARD due``.
* ``<prefix>seq``: the registration counter (``INCR``).

Each operation is one Lua script (loaded with ``SCRIPT LOAD``, called by
``EVALSHA``, reloaded when Redis answers ``NOSCRIPT`` after a restart): one
round trip per request, and atomic, so relays never see half an update.
Times come from the calling relay's clock (the scripts never read
Redis's), so relays sharing a Redis need synchronised clocks (NTP).  The
scripts touch keys they build from the prefix: one Redis server (or a
primary with replicas), not Redis Cluster.

A call that gets no answer within L{CALL_TIMEOUT_SECONDS} fails with
L{RegistryUnavailable} (the relay answers ``ERR 503``); the registry logs
once when Redis stops answering and once when it answers again, and the
client reconnects by itself.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from p2p import hints, netgroup
from p2p.interfaces import ISharedRegistry
from p2p.registry import (
    MAX_ROUND,
    ROUND_SHIFT,
    SUGGESTED_PER_NETWORK,
    UNVERIFIED_TIER,
    Lease,
    RegistryFull,
    RegistryUnavailable,
    check_settings,
    saturated,
    too_many_peers,
    too_many_per_host,
    too_many_per_network,
)

DEFAULT_PREFIX = "p2p:"
DEFAULT_REDIS_PORT = 6379
# A relay answers ERR 503 within a second when Redis does not answer: each
# call gets this long, which leaves the relay time to reply.
CALL_TIMEOUT_SECONDS = 0.75
CONNECT_TIMEOUT_SECONDS = 1.0
# The client's reconnection backoff stops growing here: a relay is back in
# service at most this long after Redis is.
MAX_RECONNECT_DELAY_SECONDS = 2.0
# Expired leases one script call ends at most: bounds the time Redis spends
# in one call (about 5 us each) when many leases come due at once; the
# relay's periodic sweep calls again until a batch comes back short.
EXPIRE_BATCH = 1000


class RedisURLError(ValueError):
    """A --registry URL that cannot be used; the message says why (and
    never repeats a password)."""


@dataclass(frozen=True)
class RedisAddress:
    """Where a Redis registry lives, parsed from a ``redis://`` URL."""

    host: str
    port: int
    db: int
    tls: bool
    password: str | None = None
    username: str | None = None

    def __str__(self) -> str:
        """The URL without its password, fit for logs and errors."""
        scheme = "rediss" if self.tls else "redis"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}/{self.db}"


def parse_redis_url(url: str) -> RedisAddress:
    """
    Read ``redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]`` (``rediss://`` for
    TLS).

    :raise RedisURLError: for anything else.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise RedisURLError(
            "--registry: not a redis:// URL (a bad port or address)"
        ) from None
    if parts.scheme not in ("redis", "rediss"):
        raise RedisURLError(
            "--registry must be 'memory' or a redis:// or rediss:// URL"
        )
    if not parts.hostname:
        raise RedisURLError("--registry: the Redis URL names no host")
    if parts.query or parts.fragment:
        raise RedisURLError("--registry: the Redis URL takes no ?query or #fragment")
    path = parts.path.lstrip("/")
    if path and not (path.isascii() and path.isdigit()):
        raise RedisURLError("--registry: the database must be a number (/0, /1...)")
    return RedisAddress(
        host=parts.hostname,
        port=port if port is not None else DEFAULT_REDIS_PORT,
        db=int(path) if path else 0,
        tls=parts.scheme == "rediss",
        password=unquote(parts.password) if parts.password else None,
        username=unquote(parts.username) if parts.username else None,
    )


# -- the scripts -------------------------------------------------------------

# Shared by every script: ARGV[1] is the key prefix.  A lease as returned:
# {member, name, listing key, registered, renewed, expires, verified}.
_PRELUDE = """
local P = ARGV[1]
local DUE, VER, UNV = P .. 'due', P .. 'ver', P .. 'unv'
local SRC, NET, SEQ = P .. 'src', P .. 'net', P .. 'seq'
local GRP = P .. 'grp'
local FILES = P .. 'files'
local function key(m) return P .. 'l:' .. m end
local function row(m, f)
  return table.concat({m, f[1] or '', f[2] or '', f[3] or '', f[4] or '',
    f[5] or '', f[6] or ''}, '\\t')
end
local function fields(m)
  return row(m, redis.call('HMGET', key(m), 'n', 's', 'r', 'w', 'e', 'v'))
end
local function uncount(h, field)
  if redis.call('HINCRBY', h, field, -1) <= 0 then redis.call('HDEL', h, field) end
end
-- Ends a lease, a ghost too (its hash gone: then the row has an empty
-- seq, and the caller uncounts its source, network and wide network).
local function drop(m)
  local k = key(m)
  local f = redis.call('HMGET', k, 'n', 's', 'r', 'w', 'e', 'v', 'S', 'N', 'G')
  redis.call('ZREM', DUE, m)
  redis.call('ZREM', VER, m)
  redis.call('ZREM', UNV, m)
  if f[7] then uncount(SRC, f[7]) end
  if f[8] then uncount(NET, f[8]) end
  if f[9] then uncount(GRP, f[9]) end
  redis.call('HDEL', FILES, m)
  redis.call('DEL', k)
  return row(m, f)
end
local function trim(now, batch)
  local out = {}
  local due = redis.call('ZRANGEBYSCORE', DUE, '-inf', now, 'LIMIT', 0, batch)
  for i, m in ipairs(due) do out[i] = drop(m) end
  return out
end
local function pack(rows) return table.concat(rows, '\\n') end
"""
# The listing keys' layout (p2p.registry.listing_key), for _REGISTER.
_ROUNDS = f"local ROUND_UNIT, MAX_ROUND = {1 << ROUND_SHIFT}, {MAX_ROUND}\n"

# ARGV: prefix, now, batch.  -> {count, expired}
_EXPIRE = """
local expired = trim(ARGV[2], tonumber(ARGV[3]))
return {redis.call('ZCARD', DUE), pack(expired)}
"""

# ARGV: prefix, now, batch, member, expires, name, files, source, network,
# max peers, max per source, max per network, wide network.
# -> {status (1 new, 0 renewed, -1/-2/-3 refused by a cap), count, lease, expired}
_REGISTER = """
local now, m, expires = ARGV[2], ARGV[4], ARGV[5]
local name, files, source, network = ARGV[6], ARGV[7], ARGV[8], ARGV[9]
local max_peers = tonumber(ARGV[10])
local max_source, max_network = tonumber(ARGV[11]), tonumber(ARGV[12])
local wide = ARGV[13]
local expired = trim(now, tonumber(ARGV[3]))
local k = key(m)
local e = redis.call('HGET', k, 'e')
if (e and tonumber(e) <= tonumber(now))
    or (not e and redis.call('ZSCORE', DUE, m)) then
  -- Run out but not trimmed yet, or a ghost: a new registration.
  table.insert(expired, drop(m))
  e = false
end
local status = 0
if e then
  redis.call('HSET', k, 'w', now, 'e', expires)
else
  local count = redis.call('ZCARD', DUE)
  if max_peers > 0 and count >= max_peers then
    return {-1, count, '', pack(expired)}
  end
  local held = tonumber(redis.call('HGET', SRC, source) or 0)
  if max_source > 0 and held >= max_source then
    return {-2, count, '', pack(expired)}
  end
  held = tonumber(redis.call('HGET', NET, network) or 0)
  if max_network > 0 and held >= max_network then
    return {-3, count, '', pack(expired)}
  end
  -- The listing key (p2p.registry.listing_key): under 2^52, so exact as a
  -- Lua number and as Redis passes it on (shortest exact digits).
  local round = tonumber(redis.call('HGET', GRP, wide) or 0)
  local seq = math.min(round, MAX_ROUND) * ROUND_UNIT + redis.call('INCR', SEQ)
  redis.call('HSET', k, 's', seq, 'r', now, 'w', now, 'e', expires,
    'S', source, 'N', network, 'G', wide)
  redis.call('ZADD', UNV, seq, m)
  redis.call('HINCRBY', SRC, source, 1)
  redis.call('HINCRBY', NET, network, 1)
  redis.call('HINCRBY', GRP, wide, 1)
  status = 1
end
if name ~= '' then redis.call('HSET', k, 'n', name)
else redis.call('HDEL', k, 'n') end
if files ~= '' then redis.call('HSET', FILES, m, files)
else redis.call('HDEL', FILES, m) end
redis.call('ZADD', DUE, expires, m)
-- No TTL (see the module docstring); clears one an earlier version set.
redis.call('PERSIST', k)
return {status, redis.call('ZCARD', DUE), fields(m), pack(expired)}
"""

# ARGV: prefix, now, batch, tier (0 verified, 1 unverified), after, limit,
# files ('1': with the leases' filters).
# -> {count, more, leases, expired, a '1' or '0' per lease: whether it has
# a filter, the filters (256 bytes each) one after another}
_PAGE = """
local expired = trim(ARGV[2], tonumber(ARGV[3]))
local tier, after, limit = ARGV[4], ARGV[5], tonumber(ARGV[6])
local want_files = ARGV[7] == '1'
local out, more, flags, filters = {}, 0, {}, {}
-- Up to wanted members of set after the cursor into out; whether more
-- follow.  A ghost met on the way is ended, not listed.
local function take(set, wanted)
  local got, from = 0, '(' .. after
  while true do
    local asked = wanted - got + 1
    local ms = redis.call('ZRANGEBYSCORE', set, from, '+inf', 'WITHSCORES',
      'LIMIT', 0, asked)
    for i = 1, #ms, 2 do
      local m = ms[i]
      if got >= wanted then return true end
      from = '(' .. ms[i + 1]
      local f = redis.call('HMGET', key(m), 'n', 's', 'r', 'w', 'e', 'v')
      if f[2] then
        got = got + 1
        out[#out + 1] = row(m, f)
        if want_files then
          local f = redis.call('HGET', FILES, m)
          flags[#flags + 1] = f and '1' or '0'
          if f then filters[#filters + 1] = f end
        end
      else
        expired[#expired + 1] = drop(m)
      end
    end
    if #ms < 2 * asked then return false end
  end
end
local done = false
if tier == '0' then
  if take(VER, limit) then
    more, done = 1, true
  elseif #out >= limit then
    if redis.call('ZCARD', UNV) > 0 then more = 1 end
    done = true
  end
  after = '0'
end
if not done and take(UNV, limit - #out) then more = 1 end
return {redis.call('ZCARD', DUE), more, pack(out), pack(expired),
  table.concat(flags), table.concat(filters)}
"""

# ARGV: prefix, now, batch, limit, scan, per network, then the three
# (byte index, mask) pairs of the hint's filter bits.  -> {count, leases, expired}
_HINTED = """
local expired = trim(ARGV[2], tonumber(ARGV[3]))
local limit, scan = tonumber(ARGV[4]), tonumber(ARGV[5])
local per_network = tonumber(ARGV[6])
local ai, am = tonumber(ARGV[7]) + 1, tonumber(ARGV[8])
local bi, bm = tonumber(ARGV[9]) + 1, tonumber(ARGV[10])
local ci, cm = tonumber(ARGV[11]) + 1, tonumber(ARGV[12])
local result, overflow, taken = {}, {}, {}
local seen = 0
local function finish()
  local out = {}
  for i = 1, math.min(#result, limit) do out[i] = fields(result[i]) end
  for i = 1, #overflow do
    if #out >= limit then break end
    out[#out + 1] = fields(overflow[i])
  end
  return {redis.call('ZCARD', DUE), pack(out), pack(expired)}
end
-- The filters of HINT_CHUNK members per HMGET: one command per chunk,
-- not per lease.
local HINT_CHUNK = 500
for _, set in ipairs({VER, UNV}) do
  while seen < scan do
    local last = seen + math.min(HINT_CHUNK, scan - seen) - 1
    local ms = redis.call('ZRANGE', set, seen, last)
    if #ms == 0 then break end
    local filters = redis.call('HMGET', FILES, unpack(ms))
    for i, m in ipairs(ms) do
      local files = filters[i]
      local network = files and bit.band(string.byte(files, ai), am) ~= 0
          and bit.band(string.byte(files, bi), bm) ~= 0
          and bit.band(string.byte(files, ci), cm) ~= 0
          and redis.call('HGET', key(m), 'N')
      -- (no network: a ghost, never suggested; the next trim or page ends it)
      if network then
        local n = taken[network] or 0
        if n >= per_network then
          overflow[#overflow + 1] = m
        else
          taken[network] = n + 1
          result[#result + 1] = m
          if #result >= limit then return finish() end
        end
      end
    end
    seen = seen + #ms
  end
  scan = scan - seen
  seen = 0
end
return finish()
"""

# ARGV: prefix, member.  -> {count, lease or false}
_UNREGISTER = """
local m = ARGV[2]
local lease = ''
if redis.call('EXISTS', key(m)) == 1 or redis.call('ZSCORE', DUE, m) then
  lease = drop(m)
end
return {redis.call('ZCARD', DUE), lease}
"""

# ARGV: prefix, then a source, a network and a wide network per ghost ended
# (their counts were left for the relay to take off).  -> the table size
_UNCOUNT = """
for i = 2, #ARGV, 3 do
  uncount(SRC, ARGV[i])
  uncount(NET, ARGV[i + 1])
  uncount(GRP, ARGV[i + 2])
end
return redis.call('ZCARD', DUE)
"""

# ARGV: prefix, member.  -> {count, lease or false}
_VERIFY = """
local m = ARGV[2]
local k = key(m)
local seq = redis.call('HGET', k, 's')
if not seq then return {redis.call('ZCARD', DUE), ''} end
if redis.call('HGET', k, 'v') ~= '1' then
  redis.call('ZREM', UNV, m)
  redis.call('ZADD', VER, seq, m)
  redis.call('HSET', k, 'v', '1')
end
return {redis.call('ZCARD', DUE), fields(m)}
"""


def register_arguments(
    host: str,
    port: int,
    expires: float,
    name: str | None = None,
    files: bytes | None = None,
    limits: tuple[int, int, int] = (0, 0, 0),
) -> list[object]:
    """
    The register script's arguments after the prefix, the time and the
    expiry batch (see L{_REGISTER}): the one place that lays them out, for
    L{RedisRegistry.register} and for tools that load leases in bulk.
    C{limits}: the most peers, per source and per network (0: none).
    """
    return [
        _member(host, port),
        repr(expires),
        name or "",
        files or b"",
        netgroup.source_of(host),
        netgroup.network_of(host),
        *limits,
        netgroup.wide_network_of(host),
    ]


class _Script:
    """One Lua script and the SHA-1 that EVALSHA names it by."""

    def __init__(self, name: str, body: str) -> None:
        self.name = name
        self.source = (_ROUNDS + _PRELUDE + body).encode()
        self.sha = hashlib.sha1(self.source).hexdigest()


SCRIPTS = {
    name: _Script(name, body)
    for name, body in [
        ("expire", _EXPIRE),
        ("register", _REGISTER),
        ("page", _PAGE),
        ("hinted", _HINTED),
        ("unregister", _UNREGISTER),
        ("verify", _VERIFY),
        ("uncount", _UNCOUNT),
    ]
}


class SharedLease(Lease):
    """A lease read back from Redis; C{created}: whether the call that
    returned it created it (a registration, not a renewal)."""

    __slots__ = ("created",)


def _member(host: str, port: int) -> str:
    return f"{host} {port}"


def _text(value: bytes) -> str:
    return value.decode("utf-8", "replace")


def _leases(rows: bytes) -> list[SharedLease]:
    """The leases of a script's rows, one a line (see L{_lease})."""
    return [_lease(row) for row in rows.split(b"\n")] if rows else []


def _lease(row: bytes, created: bool = False) -> SharedLease:
    """
    A L{SharedLease} from a script's row: member, name, seq, registered,
    renewed, expires and verified, tab-separated (empty when missing: a
    ghost: a lease whose hash is gone).  Scripts answer with rows in
    one string, not a nested array: C{txredisapi} parses each array element
    in a turn of the reactor of its own, about 25 us each.
    """
    member, name, seq, registered, renewed, expires, verified = row.split(b"\t")
    host, port = member.decode("utf-8").rsplit(" ", 1)
    lease = SharedLease(
        host,
        int(port),
        _text(name) or None,
        float(registered or 0),
        float(expires or 0),
        int(seq or 0),
    )
    lease.renewed = float(renewed or 0)
    lease.verified = verified == b"1"
    lease.created = created
    return lease


def _is_noscript(failure: Failure) -> bool:
    # txredisapi turns Redis's "NOSCRIPT ..." into ScriptDoesNotExist.
    return type(failure.value).__name__ == "ScriptDoesNotExist" or (
        "NOSCRIPT" in str(failure.value)
    )


@implementer(ISharedRegistry)
class RedisRegistry:
    """
    ISharedRegistry on Redis (see the module docstring): the same leases,
    caps, order, paging and name suggestions as L{MemoryRegistry}, for any
    number of relays.

    :param client: a Redis client whose C{evalsha(sha, keys, args)} and
        C{script_load(source)} return Deferreds (a C{txredisapi} handler,
        replies as bytes).
    :param clock: bounds each call (L{CALL_TIMEOUT_SECONDS}).
    :param ttl: seconds a lease lasts after each registration or renewal.
    :param max_peers: total leases allowed (0: no limit).
    :param max_per_host: leases per source: an IPv4 address or an IPv6 /64.
    :param max_per_network: leases per IPv4 /24 or IPv6 /48.
    :param prefix: the keys' prefix; relays sharing a table use the same.
    :param where: how logs name the Redis (never with its password).
    """

    log = Logger()

    def __init__(
        self,
        client: Any,
        clock: IReactorTime,
        ttl: float,
        max_peers: int = 0,
        max_per_host: int = 0,
        max_per_network: int = 0,
        prefix: str = DEFAULT_PREFIX,
        where: str = "Redis",
        timeout: float = CALL_TIMEOUT_SECONDS,
    ) -> None:
        check_settings(ttl, max_peers, max_per_host, max_per_network)
        self.client = client
        self.clock = clock
        self.ttl = ttl
        self.max_peers = max_peers
        self.max_per_host = max_per_host
        self.max_per_network = max_per_network
        self.prefix = prefix
        self.where = where
        self.timeout = timeout
        self.available = True
        # Calls Redis did not answer (timeouts, lost connections, Redis
        # errors), since the start: p2p_relay_registry_errors_total.
        self.errors = 0
        self._count = 0
        self._on_expired: Callable[[list[Lease]], None] | None = None
        # What this relay knows without asking Redis, for the decisions it
        # takes before a request's one round trip (charging a renewal to
        # its source only, reserving connections for registered hosts):
        # member -> expiry of the leases it granted or renewed, in expiry
        # order (each renewal moves its member to the end), and how many
        # of them each host holds.
        self._granted: dict[str, float] = {}
        self._hosts: dict[str, int] = {}
        # The granted members known verified, and how many each host holds:
        # the connection reserve's members.
        self._verified: set[str] = set()
        self._verified_hosts: dict[str, int] = {}

    # -- ISharedRegistry -----------------------------------------------------

    def __len__(self) -> int:
        """The table size Redis reported with its last answer."""
        return self._count

    def report_expired_to(self, callback: Callable[[list[Lease]], None]) -> None:
        """ISharedRegistry API."""
        self._on_expired = callback

    def position(self, lease: Lease) -> int:
        """ISharedRegistry API: as L{MemoryRegistry.position}."""
        return lease.seq if lease.verified else UNVERIFIED_TIER | lease.seq

    def find(self, host: str, port: int) -> _Granted | None:
        """ISharedRegistry API: this relay's record of the lease (its
        C{expires}), if it granted or renewed it."""
        expires = self._granted.get(_member(host, port))
        return None if expires is None else _Granted(expires)

    def holds(self, host: str) -> bool:
        """ISharedRegistry API: whether C{host} renewed a lease here."""
        return host in self._hosts

    def holds_verified(self, host: str) -> bool:
        """ISharedRegistry API: whether C{host} renewed a lease here that
        a relay (this one or another) verified."""
        return host in self._verified_hosts

    def register(
        self,
        host: str,
        port: int,
        name: str | None,
        now: float,
        files: bytes | None = None,
    ) -> Deferred[SharedLease]:
        """ISharedRegistry API (see L{IRegistry.register})."""
        if files is not None and saturated(files):
            files = None
        member = _member(host, port)
        limits = (self.max_peers, self.max_per_host, self.max_per_network)
        d = self._call(
            "register",
            now,
            *register_arguments(host, port, now + self.ttl, name, files, limits),
        )

        def registered(reply: list) -> SharedLease:
            status, self._count, row, expired = reply
            self._expired(expired)
            if status < 0:
                raise RegistryFull(self._refusal(status, host))
            lease = _lease(row, created=status == 1)
            lease.files = files
            self._grant(member, host, lease.expires, now)
            if lease.verified:
                self._note_verified(member, host)
            return lease

        return d.addCallback(registered)

    def _refusal(self, status: int, host: str) -> str:
        """The same words as L{MemoryRegistry}'s refusals."""
        if status == -1:
            return too_many_peers(self.max_peers)
        if status == -2:
            return too_many_per_host(self.max_per_host)
        return too_many_per_network(self.max_per_network, netgroup.network_of(host))

    def unregister(self, host: str, port: int) -> Deferred[SharedLease | None]:
        """ISharedRegistry API."""
        member = _member(host, port)
        self._forget(member)

        def unregistered(reply: list) -> SharedLease | None:
            self._count, row = reply
            if not row:
                return None
            lease = _lease(row)
            self._uncount_ghosts([lease])
            return lease

        return self._call("unregister", member).addCallback(unregistered)

    def mark_verified(self, host: str, port: int) -> Deferred[SharedLease | None]:
        """ISharedRegistry API: list the lease with the verified ones."""

        member = _member(host, port)

        def verified(reply: list) -> SharedLease | None:
            self._count, row = reply
            if not row:
                return None
            lease = _lease(row)
            if lease.verified and member in self._granted:
                self._note_verified(member, host)
            return lease

        return self._call("verify", member).addCallback(verified)

    def expire(self, now: float) -> Deferred[list[SharedLease]]:
        """
        ISharedRegistry API: end the leases due by C{now}, a batch per
        round trip until a batch comes back short; they are also reported
        (L{report_expired_to}).
        """
        ended: list[SharedLease] = []

        def batch(reply: list) -> list[SharedLease] | Deferred:
            self._count, expired = reply
            batch_ended = self._expired(expired)
            ended.extend(batch_ended)
            if len(batch_ended) >= EXPIRE_BATCH:
                return self._call("expire", now).addCallback(batch)
            return ended

        return self._call("expire", now).addCallback(batch)

    def page(
        self, now: float, after: int, limit: int, files: bool = False
    ) -> Deferred[tuple[list[SharedLease], bool]]:
        """ISharedRegistry API (see L{IRegistry.page}); with C{files}, the
        leases carry their name filters (for ``PEERS files=1``)."""
        tier = 1 if after & UNVERIFIED_TIER else 0

        def paged(reply: list) -> tuple[list[SharedLease], bool]:
            self._count, more, rows, expired, flags, filters = reply
            self._expired(expired)
            leases = _leases(rows)
            offset = 0
            for lease, flag in zip(leases, flags, strict=False):
                if flag == ord("1"):
                    lease.files = filters[offset : offset + hints.FILTER_BYTES]
                    offset += hints.FILTER_BYTES
            return leases, bool(more)

        d = self._call("page", now, tier, after & ~UNVERIFIED_TIER, limit, int(files))
        return d.addCallback(paged)

    def active(self, now: float, limit: int) -> Deferred[list[SharedLease]]:
        """ISharedRegistry API."""
        return self.page(now, 0, limit).addCallback(lambda result: result[0])

    def likely_holders(
        self, now: float, hint: str, limit: int, scan: int
    ) -> Deferred[list[SharedLease]]:
        """ISharedRegistry API (see L{IRegistry.likely_holders})."""
        bits = [
            value
            for position in hints.positions(hint)
            for value in (position >> 3, 1 << (position & 7))
        ]

        def found(reply: list) -> list[SharedLease]:
            self._count, rows, expired = reply
            self._expired(expired)
            return _leases(rows)

        d = self._call("hinted", now, limit, scan, SUGGESTED_PER_NETWORK, *bits)
        return d.addCallback(found)

    # -- this relay's own records --------------------------------------------

    def _grant(self, member: str, host: str, expires: float, now: float) -> None:
        granted = self._granted
        if granted.pop(member, None) is None:
            netgroup.tally(self._hosts, host, 1)
        granted[member] = expires
        # Forget one record that ran out, oldest first: as many go as come,
        # and no scan.
        oldest = next(iter(granted))
        if granted[oldest] <= now:
            self._forget(oldest)

    def _note_verified(self, member: str, host: str) -> None:
        if member not in self._verified:
            self._verified.add(member)
            netgroup.tally(self._verified_hosts, host, 1)

    def _forget(self, member: str) -> None:
        if self._granted.pop(member, None) is not None:
            host = member.rsplit(" ", 1)[0]
            netgroup.tally(self._hosts, host, -1)
            if member in self._verified:
                self._verified.discard(member)
                netgroup.tally(self._verified_hosts, host, -1)

    def _uncount_ghosts(self, leases: list[SharedLease]) -> None:
        """
        Take the ghosts among C{leases} (ended with their hash gone: no
        sequence number) off the source, network and wide network counts,
        which the script could not read from the hash.  One more round
        trip, only when there are ghosts; a failure leaves the counts high
        (logged as any unanswered call).
        """
        groups = [
            group
            for lease in leases
            if not lease.seq
            for group in (
                *netgroup.groups(lease.host),
                netgroup.wide_network_of(lease.host),
            )
        ]
        if groups:
            d = self._call("uncount", *groups)
            d.addCallbacks(self._counted, lambda f: f.trap(RegistryUnavailable))

    def _counted(self, count: bytes | int) -> None:
        self._count = int(count)

    def _expired(self, rows: bytes) -> list[SharedLease]:
        leases = _leases(rows)
        self._uncount_ghosts(leases)
        for lease in leases:
            self._forget(_member(lease.host, lease.port))
        if leases and self._on_expired is not None:
            self._on_expired(leases)
        return leases

    # -- calling Redis -------------------------------------------------------

    def _call(self, name: str, *args: object) -> Deferred[list]:
        """
        Run script C{name} with the prefix, then (for every script but the
        by-address ones) the time and the expiry batch, then C{args}.
        """
        script = SCRIPTS[name]
        if name in ("unregister", "verify", "uncount"):
            argv = [self.prefix, *args]
        else:
            now, *rest = args
            argv = [self.prefix, repr(now), EXPIRE_BATCH, *rest]

        def reload(failure: Failure) -> Deferred | Failure:
            # Redis restarted (or SCRIPT FLUSH): load the script again and
            # retry, once.
            if not _is_noscript(failure):
                return failure
            d = self.client.script_load(script.source)
            return d.addCallback(lambda _: self.client.evalsha(script.sha, [], argv))

        d = self.client.evalsha(script.sha, [], argv)
        d.addErrback(reload)
        d.addTimeout(self.timeout, self.clock)
        return d.addCallbacks(self._answered, self._unanswered)

    def load_scripts(self) -> Deferred[None]:
        """Load every script (at start, so the first requests need one
        round trip too); fails with L{RegistryUnavailable}."""
        loads = Deferred.fromCoroutine(self._load_all())
        loads.addTimeout(self.timeout, self.clock)
        return loads.addCallbacks(self._answered, self._unanswered)

    async def _load_all(self) -> None:
        for script in SCRIPTS.values():
            await self.client.script_load(script.source)

    def _answered(self, reply: Any) -> Any:
        if not self.available:
            self.available = True
            self.log.info("registry available again at {where}", where=self.where)
        return reply

    def _unanswered(self, failure: Failure) -> Failure:
        if not failure.check(
            DeferredTimeoutError, CancelledError, ConnectError, *_redis_errors()
        ):
            return failure  # a bug: let it show
        self.errors += 1
        if self.available:
            self.available = False
            self.log.error(
                "registry unavailable: {where} does not answer ({error}); "
                "answering ERR 503 until it does",
                where=self.where,
                error=_describe(failure),
            )
        raise RegistryUnavailable(f"{self.where} does not answer")


@dataclass(frozen=True, slots=True)
class _Granted:
    """What L{RedisRegistry.find} knows of a lease: when it ends."""

    expires: float


def _redis_errors() -> tuple[type[Exception], ...]:
    import txredisapi

    return (txredisapi.RedisError,)


def _describe(failure: Failure) -> str:
    if failure.check(DeferredTimeoutError, CancelledError):
        return f"no reply within {CALL_TIMEOUT_SECONDS:g} s"
    return failure.getErrorMessage() or type(failure.value).__name__


# -- the client ----------------------------------------------------------------


class RedisConnection:
    """
    A lazy C{txredisapi} client for C{address} (L{handler}): made at once,
    it connects when L{start}ed and reconnects after every loss, backing off
    up to L{MAX_RECONNECT_DELAY_SECONDS}; a command waits for a connection
    (the registry bounds the wait).  ``rediss://`` uses Twisted's TLS, the
    server's certificate checked against the system's CAs, or against the
    CA certificate in the PEM file C{ca}.
    """

    def __init__(
        self, reactor: Any, address: RedisAddress, ca: str | None = None
    ) -> None:
        import txredisapi
        from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
        from twisted.internet.ssl import Certificate, optionsForClientTLS

        self.factory = txredisapi.RedisFactory(
            str(address),
            address.db,
            1,
            isLazy=True,
            charset=None,
            password=address.password,
            replyTimeout=CALL_TIMEOUT_SECONDS,
            convertNumbers=False,
            username=address.username,
        )
        endpoint = HostnameEndpoint(
            reactor, address.host, address.port, timeout=CONNECT_TIMEOUT_SECONDS
        )
        if address.tls:
            trust = None
            if ca is not None:
                with open(ca, "rb") as stream:
                    trust = Certificate.loadPEM(stream.read())
            endpoint = wrapClientTLS(optionsForClientTLS(address.host, trust), endpoint)
        self.endpoint = PatientEndpoint(endpoint, reactor, str(address))
        # After a lost connection: the first attempt soon, then the endpoint
        # keeps trying by itself.
        self.factory.initialDelay = 0.25
        self.factory.maxDelay = MAX_RECONNECT_DELAY_SECONDS
        self.handler = self.factory.handler
        # Fails when Redis refuses the connection for good (a wrong
        # password): say why, once; calls fail meanwhile (503).
        self.factory.deferred.addErrback(self._refused)

    log = Logger()

    def _refused(self, failure: Failure) -> None:
        self.log.error(
            "Redis refused the registry's connection: {error}",
            error=failure.getErrorMessage(),
        )

    def start(self) -> None:
        self.factory.startConnecting(self.endpoint)

    def stop(self) -> Deferred[None]:
        return self.factory.disconnect()


class PatientEndpoint:
    """
    Connects through C{endpoint}, trying again after each failure (every
    L{MAX_RECONNECT_DELAY_SECONDS} at most) until it succeeds or is
    cancelled, quietly: the registry logs an outage once, where the
    reconnecting client would log every failed attempt.
    """

    def __init__(self, endpoint: Any, clock: IReactorTime, where: str) -> None:
        self.endpoint = endpoint
        self.clock = clock
        self.where = where

    def __repr__(self) -> str:
        # Twisted's reconnecting client logs its endpoint: no password here.
        return f"<Redis endpoint {self.where}>"

    def connect(self, factory: Any) -> Deferred:
        attempt: Deferred | None = None
        timer: Any = None
        stopped = False

        def cancel(_: Deferred) -> None:
            nonlocal stopped
            stopped = True
            if timer is not None and timer.active():
                timer.cancel()
            if attempt is not None:
                attempt.cancel()

        connected: Deferred = Deferred(cancel)

        def again(failures: int) -> None:
            nonlocal attempt, timer
            timer = None
            attempt = self.endpoint.connect(factory)
            attempt.addCallbacks(done, failed, errbackArgs=(failures,))

        def done(protocol: Any) -> None:
            # Requests go out one by one as clients send them: without
            # TCP_NODELAY, Nagle's algorithm holds each small write back
            # until the previous one is acknowledged (tens of ms).
            transport = protocol.transport
            while transport is not None and not hasattr(transport, "setTcpNoDelay"):
                transport = getattr(transport, "transport", None)  # TLS
            if transport is not None:
                transport.setTcpNoDelay(True)
            connected.callback(protocol)

        def failed(failure: Failure, failures: int) -> None:
            nonlocal attempt, timer
            attempt = None
            # A cancelled TCP attempt fails with ConnectingCancelledError.
            if stopped or failure.check(CancelledError):
                return
            delay = min(0.25 * 2**failures, MAX_RECONNECT_DELAY_SECONDS)
            timer = self.clock.callLater(delay, again, failures + 1)

        again(0)
        return connected


class RedisClientService(Service):
    """Connects at start and loads the scripts (logging whether Redis
    answers; the relay starts either way, answering 503 until it does);
    disconnects at stop."""

    log = Logger()

    def __init__(self, connection: RedisConnection, registry: RedisRegistry) -> None:
        self.connection = connection
        self.registry = registry

    def startService(self) -> None:
        super().startService()
        self.connection.start()

        def ready(_: None) -> None:
            self.log.info(
                "registry: {where}, keys under {prefix!r}",
                where=self.registry.where,
                prefix=self.registry.prefix,
            )

        d = self.registry.load_scripts()
        d.addCallbacks(ready, lambda f: f.trap(RegistryUnavailable))

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return self.connection.stop()
