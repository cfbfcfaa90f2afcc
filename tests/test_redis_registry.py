"""
The Redis registry (``p2p.redis_registry``) against a real redis-server.

The shared behaviour suite (L{tests._registry_suite}) runs here on Redis, as
``tests/test_registry.py`` runs it in memory; then what only a shared table
has: one round trip per request, a relay that answers through it, and the
options.  pytest-twisted runs the tests that need Redis (the fixtures start
it on a free port, see L{tests._redis}); the URL and option tests are
SynchronousTestCases and run under trial too.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import pytest
import pytest_twisted
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from p2p import wire
from p2p.interfaces import ISharedRegistry
from p2p.redis_registry import (
    SCRIPTS,
    PatientEndpoint,
    RedisClientService,
    RedisConnection,
    RedisRegistry,
    RedisURLError,
    parse_redis_url,
)
from p2p.registry import RegistryUnavailable
from p2p.relay import Relay
from p2p.relay_tap import REDIS_URL_ENVIRONMENT_VARIABLE, Options, makeService

from ._certs import Authority
from ._redis import REDIS_SERVER, SKIP_REASON, RedisServer
from ._registry_suite import SCENARIOS, TTL, Scenario, call

_prefixes = itertools.count()


class CountingClient:
    """A Redis client that counts the round trips made through it."""

    def __init__(self, client) -> None:
        self.client = client
        self.calls: list[str] = []

    def evalsha(self, sha, keys, args):
        self.calls.append(sha)
        return self.client.evalsha(sha, keys, args)

    def script_load(self, source):
        self.calls.append("SCRIPT LOAD")
        return self.client.script_load(source)


@pytest_twisted.async_yield_fixture
async def connection(redis_server, reactor):
    """A client connected to the module's redis-server, closed at the end."""
    connection = RedisConnection(reactor, parse_redis_url(redis_server.url))
    connection.start()
    try:
        yield connection
    finally:
        await connection.stop()


@pytest.fixture
def make(connection, reactor):
    """Builds empty Redis registries, each under keys of its own."""

    def make(ttl: float, **limits: int) -> RedisRegistry:
        return RedisRegistry(
            CountingClient(connection.handler),
            reactor,
            ttl,
            prefix=f"test{os.getpid()}.{next(_prefixes)}:",
            **limits,
        )

    return make


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.__name__)
@pytest_twisted.ensureDeferred
async def test_shared_suite(scenario: Scenario, make) -> None:
    """Every scenario of the shared suite, on Redis."""
    await scenario(make)


@pytest_twisted.ensureDeferred
async def test_provides_the_interface(make) -> None:
    registry = make(TTL)
    assert verifyObject(ISharedRegistry, registry)
    lease = await registry.register("10.0.0.1", 1, None, 0.0)
    assert lease.created
    assert not (await registry.register("10.0.0.1", 1, None, 1.0)).created


@pytest_twisted.ensureDeferred
async def test_one_round_trip_per_request(make, reactor) -> None:
    """
    Each request a relay answers through the Redis registry costs exactly
    one round trip (one EVALSHA), expired leases swept in the same one, and
    replies match the in-memory relay's.
    """
    registry = make(TTL)
    await registry.load_scripts()
    counted = registry.client
    relay = Relay(registry, reactor, ttl=int(TTL))
    requests = [
        "REGISTER 9000 name=a",
        "REGISTER 9000 files=" + "00" * 256,  # a renewal sets the filter
        "REGISTER 9001",
        "PEERS",
        "PEERS limit=1",
        "PEERS hint=0123456789abcdef",
        "PEERS files=1",
        "UNREGISTER 9000",
    ]
    replies = []
    for line in requests:
        before = len(counted.calls)
        reply = await relay.handle(wire.parse_relay_request(line.encode()), "10.0.0.1")
        replies.append(reply)
        assert len(counted.calls) - before == 1, line
        assert counted.calls[-1] != "SCRIPT LOAD"
    assert replies[3][0] == b"OK 2"
    assert replies[4][0].startswith(b"OK 1 next=")
    assert replies[5] == [b"OK 0"]
    # files=1: each peer's filter, read in the same round trip.
    assert replies[6][1].endswith(b" files=" + b"00" * 256)
    assert b"files=" not in replies[6][2]
    assert replies[7] == [f"OK {wire.peer_id_for('10.0.0.1', 9000)}".encode()]
    assert relay.activity.registered == 2 and relay.activity.renewed == 1


@pytest_twisted.ensureDeferred
async def test_scripts_reloaded_after_flush(make, connection) -> None:
    """After SCRIPT FLUSH (what a Redis restart does), a call loads its
    script again and succeeds."""
    registry = make(TTL)
    await registry.load_scripts()
    await connection.handler.execute_command("SCRIPT", "FLUSH")
    lease = await registry.register("10.0.0.1", 1, "again", 0.0)
    assert lease.name == "again"
    assert "SCRIPT LOAD" in registry.client.calls


GHOST_HOST = "127.80.0.1"
GHOST_WIDE_NETWORK = b"127.80.0.0/16"
GHOST_TTL = 5.0


async def table(registry: RedisRegistry, redis) -> dict[str, object]:
    """What a registry's keys hold besides the lease hashes (sent after
    any call in flight on the one connection, so it sees their effect)."""
    prefix = registry.prefix
    return {
        "src": await redis.hgetall(prefix + "src"),
        "net": await redis.hgetall(prefix + "net"),
        "grp": await redis.hgetall(prefix + "grp"),
        "due": await redis.zcard(prefix + "due"),
        "ver": await redis.zcard(prefix + "ver"),
        "unv": await redis.zcard(prefix + "unv"),
    }


@pytest_twisted.ensureDeferred
async def test_every_relay_down_longer_than_a_lease_leaves_no_ghost(
    make, connection
) -> None:
    """
    ``--ttl 5 --max-per-host 8``: 8 leases from one address, 4 verified,
    then every relay down for 20 s (e6).  Lease keys used to expire after
    3 x ttl + 1 = 16 s, leaving the counts and index entries behind for
    good: that address got ``ERR 429`` for ever and the verified ghosts
    were listed first, never to be unregistered.  Now a lease key has no
    TTL, and the first relay back ends the eight, counts and all.
    """
    redis = connection.handler
    registry = make(GHOST_TTL, max_per_host=8)
    await registry.load_scripts()
    for port in range(8):
        await registry.register(GHOST_HOST, 9000 + port, None, 0.0)
    for port in range(4):
        await registry.mark_verified(GHOST_HOST, 9000 + port)
    keys = await redis.keys(registry.prefix + "l:*")
    assert len(keys) == 8
    assert [await redis.ttl(key) for key in keys] == [-1] * 8
    back = RedisRegistry(redis, registry.clock, GHOST_TTL, 0, 8, prefix=registry.prefix)
    assert await back.page(20.0, 0, 100) == ([], False)
    assert await table(back, redis) == {
        "src": {},
        "net": {},
        "grp": {},
        "due": 0,
        "ver": 0,
        "unv": 0,
    }
    assert await redis.keys(registry.prefix + "l:*") == []
    for port in range(8):
        assert (await back.register(GHOST_HOST, 9100 + port, None, 21.0)).created


@pytest_twisted.ensureDeferred
async def test_ghosts_are_never_listed_and_their_counts_go(make, connection) -> None:
    """
    A lease whose hash is gone all the same (expired under an earlier
    version, evicted, deleted by hand) is a ghost: a listing skips it and
    ends it, a sweep or UNREGISTER ends it, a registration of it starts
    afresh; its source, network and wide network counts go with it, and
    no cursor is made of it.
    """
    redis = connection.handler
    registry = make(GHOST_TTL, max_per_host=8)
    # Loaded first (as a relay does at start), so that no call waits for a
    # reload and every one runs in order on the connection.
    await registry.load_scripts()
    prefix = registry.prefix
    for port in range(8):
        await registry.register(GHOST_HOST, 9000 + port, None, 0.0)
    for port in range(4):
        await registry.mark_verified(GHOST_HOST, 9000 + port)
    # Ports 9000 (verified) and 9004: ghosts that are not due yet.
    await redis.delete([f"{prefix}l:{GHOST_HOST} {port}" for port in (9000, 9004)])
    page, more = await registry.page(1.0, 0, 3)
    assert [lease.port for lease in page] == [9001, 9002, 9003] and more
    page, more = await registry.page(1.0, registry.position(page[-1]), 10)
    assert [lease.port for lease in page] == [9005, 9006, 9007] and not more
    assert all(lease.seq for lease in page)
    counts = await table(registry, redis)
    assert counts["src"] == {GHOST_HOST.encode(): b"6"}, counts
    assert counts["grp"] == {GHOST_WIDE_NETWORK: b"6"}, counts
    assert (counts["due"], counts["ver"], counts["unv"]) == (6, 3, 3)

    # UNREGISTER ends a ghost; a registration of one starts afresh.
    await redis.delete([f"{prefix}l:{GHOST_HOST} {port}" for port in (9001, 9005)])
    ended = await registry.unregister(GHOST_HOST, 9001)
    assert (ended.host, ended.port) == (GHOST_HOST, 9001)
    again = await registry.register(GHOST_HOST, 9005, None, 2.0)
    assert again.created and not again.verified
    counts = await table(registry, redis)
    assert counts["src"] == {GHOST_HOST.encode(): b"5"}, counts
    assert counts["grp"] == {GHOST_WIDE_NETWORK: b"5"}, counts
    assert (counts["due"], counts["ver"], counts["unv"]) == (5, 2, 3)

    # A sweep ends ghosts that came due, and a hinted query never names one.
    await redis.delete([f"{prefix}l:{GHOST_HOST} 9002"])
    await registry.likely_holders(3.0, "0123456789abcdef", 10, 100)
    ended = await registry.expire(6.0)
    assert sorted(lease.port for lease in ended) == [9002, 9003, 9006, 9007]
    counts = await table(registry, redis)
    assert counts["src"] == {GHOST_HOST.encode(): b"1"}, counts
    assert counts["grp"] == {GHOST_WIDE_NETWORK: b"1"}, counts
    assert (counts["due"], counts["ver"], counts["unv"]) == (1, 0, 1)


@pytest_twisted.ensureDeferred
async def test_two_registries_share_the_table(make) -> None:
    """Two relays' registries on one prefix see each other's leases at
    once; the one that sweeps an expired lease reports it."""
    a = make(TTL)
    b = RedisRegistry(a.client, a.clock, TTL, prefix=a.prefix)
    reported: list = []
    b.report_expired_to(reported.extend)
    await a.register("10.0.0.1", 1, "x", 0.0)
    page, more = await b.page(1.0, 0, 10)
    assert [(lease.host, lease.port, lease.name) for lease in page] == [
        ("10.0.0.1", 1, "x")
    ]
    await b.expire(61.0)
    assert [(lease.host, lease.port) for lease in reported] == [("10.0.0.1", 1)]
    assert await call(a.active(61.0, 10)) == []


@pytest_twisted.ensureDeferred
async def test_unreachable_redis_is_unavailable_within_a_second(reactor) -> None:
    """Nothing listening: a call fails with RegistryUnavailable within the
    call timeout, and the outage is logged once however many calls fail."""
    from ._redis import free_port

    address = parse_redis_url(f"redis://127.0.0.1:{free_port()}/0")
    connection = RedisConnection(reactor, address)
    connection.start()
    registry = RedisRegistry(connection.handler, reactor, TTL, where=str(address))
    logged: list[dict] = []

    def observe(event: dict) -> None:
        if event.get("log_source") is registry:
            logged.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        started = reactor.seconds()
        for _ in range(2):
            with pytest.raises(RegistryUnavailable):
                await registry.page(0.0, 0, 10)
        assert reactor.seconds() - started < 2 * 1.0
        assert len(logged) == 1 and "unavailable" in logged[0]["log_format"]
        assert not registry.available
        assert registry.errors == 2  # the relay's metrics count each
    finally:
        globalLogPublisher.removeObserver(observe)
        await connection.stop()


@pytest_twisted.ensureDeferred
async def test_tls_and_password(launcher, tmp_path, reactor) -> None:
    """
    rediss:// with a password: the server's certificate is checked (against
    the CA given, here a throwaway one) and the registry works through it;
    a wrong password is an unavailable registry, and nothing logged shows
    the password.
    """
    if REDIS_SERVER is None:
        pytest.skip(SKIP_REASON)
    authority = Authority(str(tmp_path / "ca"))
    credentials = authority.issue("redis", ips=["127.0.0.1"], dns=["localhost"])
    server = RedisServer(
        launcher, str(tmp_path / "redis"), tls=credentials, password="s3cret"
    )
    await server.start()
    logged: list[str] = []

    def observe(event: dict) -> None:
        logged.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    connections = []
    try:
        for url, works in [
            (server.url, True),
            (server.url.replace("s3cret", "wrong"), False),
        ]:
            address = parse_redis_url(url)
            connection = RedisConnection(reactor, address, authority.certificate)
            connections.append(connection)
            connection.start()
            registry = RedisRegistry(
                connection.handler, reactor, TTL, where=str(address), timeout=2.0
            )
            if works:
                lease = await registry.register("10.0.0.1", 1, "tls", 0.0)
                assert lease.name == "tls"
            else:
                with pytest.raises(RegistryUnavailable):
                    await registry.register("10.0.0.1", 1, "tls", 0.0)
    finally:
        globalLogPublisher.removeObserver(observe)
        for connection in connections:
            await connection.stop()
    assert not [line for line in logged if "s3cret" in line or "wrong" in line]


# -- URLs and options (no Redis needed) ---------------------------------------


class URLTests(SynchronousTestCase):
    """``--registry`` URLs: what is read, what is refused, what is shown."""

    def test_parse(self) -> None:
        address = parse_redis_url("rediss://user:s%40cret@redis.example:6380/2")
        self.assertEqual(
            (address.host, address.port, address.db, address.tls),
            ("redis.example", 6380, 2, True),
        )
        self.assertEqual((address.username, address.password), ("user", "s@cret"))
        self.assertEqual(str(address), "rediss://redis.example:6380/2")
        plain = parse_redis_url("redis://[::1]")
        self.assertEqual(str(plain), "redis://[::1]:6379/0")

    def test_refused(self) -> None:
        for url in [
            "http://host/0",
            "redis://:pw@/0",
            "redis://host:99999/0",
            "redis://:secret@host/x",
            "redis://host/0?db=1",
        ]:
            with self.assertRaises(RedisURLError) as caught:
                parse_redis_url(url)
            self.assertNotIn("secret", str(caught.exception))


class OptionTests(SynchronousTestCase):
    """``twistd relay --registry``."""

    def setUp(self) -> None:
        self.environment = os.environ.pop(REDIS_URL_ENVIRONMENT_VARIABLE, None)
        self.addCleanup(self.restore)

    def restore(self) -> None:
        os.environ.pop(REDIS_URL_ENVIRONMENT_VARIABLE, None)
        if self.environment is not None:
            os.environ[REDIS_URL_ENVIRONMENT_VARIABLE] = self.environment

    def parse(self, *argv: str) -> Options:
        config = Options()
        config.parseOptions(list(argv))
        return config

    def test_memory_by_default(self) -> None:
        self.assertIsNone(self.parse()["redis"])
        self.assertIsNone(self.parse("--registry", "memory")["redis"])

    def test_environment(self) -> None:
        os.environ[REDIS_URL_ENVIRONMENT_VARIABLE] = "redis://:pw@127.0.0.1:7000/3"
        address = self.parse()["redis"]
        self.assertEqual((address.port, address.db, address.password), (7000, 3, "pw"))
        self.assertIsNone(self.parse("--registry", "memory")["redis"])

    def test_bad_url_is_one_line(self) -> None:
        with self.assertRaises(usage.UsageError) as caught:
            self.parse("--registry", "redis://:hunter2@host:0x/1")
        self.assertNotIn("hunter2", str(caught.exception))
        self.assertEqual(len(str(caught.exception).splitlines()), 1)

    def test_memory_imports_no_redis(self) -> None:
        """The default relay never imports the Redis code or client."""
        code = (
            "import sys\n"
            "from twisted.internet.testing import MemoryReactorClock\n"
            "from p2p import relay_tap\n"
            "config = relay_tap.Options()\n"
            "config.parseOptions([])\n"
            "relay_tap.makeService(config, MemoryReactorClock())\n"
            "print(sorted({'txredisapi', 'p2p.redis_registry'} & set(sys.modules)))\n"
        )
        environment = {
            k: v for k, v in os.environ.items() if k != REDIS_URL_ENVIRONMENT_VARIABLE
        }
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env=environment,
        ).stdout
        self.assertEqual(out.strip(), "[]")

    def test_service(self) -> None:
        """The service tree gets a Redis client service, which connects only
        when started; the relay gets a shared registry."""
        reactor = MemoryReactorClock()
        config = self.parse("--registry", "redis://127.0.0.1:7000/1")
        parent = makeService(config, reactor)
        services = [s for s in parent if isinstance(s, RedisClientService)]
        self.assertEqual(len(services), 1)
        registry = services[0].registry
        self.assertTrue(ISharedRegistry.providedBy(registry))
        self.assertEqual(registry.prefix, "p2p:")
        self.assertEqual(registry.where, "redis://127.0.0.1:7000/1")
        self.assertEqual(reactor.tcpClients, [])


class ScriptTests(SynchronousTestCase):
    def test_one_script_per_operation(self) -> None:
        """Each operation has its script, named by the SHA-1 EVALSHA uses."""
        self.assertEqual(
            sorted(SCRIPTS),
            [
                "expire",
                "hinted",
                "page",
                "register",
                "uncount",
                "unregister",
                "verify",
            ],
        )
        self.assertEqual(len({s.sha for s in SCRIPTS.values()}), len(SCRIPTS))


class PatientEndpointTests(SynchronousTestCase):
    """The Redis connection's endpoint retries by itself, quietly, and stops
    when cancelled."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.attempts: list[Deferred] = []
        wrapped = self

        class Endpoint:
            def connect(self, factory):
                d: Deferred = Deferred()
                wrapped.attempts.append(d)
                return d

        self.endpoint = PatientEndpoint(Endpoint(), self.clock, "redis://h:1/0")

    def test_retries_until_connected(self) -> None:
        connected = self.endpoint.connect(object())
        self.attempts[0].errback(ConnectionRefusedError())
        self.assertEqual(len(self.attempts), 1)
        self.clock.advance(0.25)
        self.attempts[1].errback(ConnectionRefusedError())
        self.clock.advance(0.49)
        self.assertEqual(len(self.attempts), 2)
        self.clock.advance(0.01)
        protocol = Protocol()
        protocol.makeConnection(StringTransport())
        nodelay: list[bool] = []
        protocol.transport.setTcpNoDelay = nodelay.append  # type: ignore[attr-defined]
        self.attempts[2].callback(protocol)
        self.assertIs(self.successResultOf(connected), protocol)
        self.assertEqual(nodelay, [True])  # small requests are not held back
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(repr(self.endpoint), "<Redis endpoint redis://h:1/0>")

    def test_cancel(self) -> None:
        """Cancelled while waiting to retry, or during an attempt (which may
        fail with another error than CancelledError): nothing is left."""
        connected = self.endpoint.connect(object())
        self.attempts[0].errback(ConnectionRefusedError())
        connected.cancel()
        self.failureResultOf(connected, CancelledError)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        connecting = self.endpoint.connect(object())
        connecting.cancel()
        self.failureResultOf(connecting, CancelledError)
        self.assertTrue(self.attempts[1].called)  # the attempt was cancelled
        self.assertEqual(self.clock.getDelayedCalls(), [])
