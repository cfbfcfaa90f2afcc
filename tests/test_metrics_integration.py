"""
``--metrics`` end to end: real ``twist relay`` / ``twist peer`` processes,
scraped over HTTP with Twisted's Agent while requests are made.

pytest-twisted runs these (fixtures in ``conftest.py``); trial finds nothing
here.  A metrics port in use is tested in memory (test_metrics.py): the
same one-line exit as a listener's, which test_plugins.py runs for real.
"""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families
from twisted.web.client import Agent, readBody

from ._processes import EVENT_TIMEOUT_SECONDS, LOOPBACK, Launcher, sample
from .test_integration import integration

# Twisted's Agent hands the body to a transport proxy without
# abortConnection; readBody warns, but only cancelling it would need one.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Using readBody with a transport:DeprecationWarning"
)

METRICS_LISTENING = r"(?P<role>relay|peer) metrics listening on (?P<address>\S+)"

Samples = dict[tuple[str, frozenset], float]


async def scrape(reactor, address: str) -> Samples:
    """GET http://ADDRESS/metrics; its samples by (name, labels)."""
    agent = Agent(reactor)
    d = agent.request(b"GET", f"http://{address}/metrics".encode())
    response = await d.addTimeout(EVENT_TIMEOUT_SECONDS, reactor)
    body = await readBody(response).addTimeout(EVENT_TIMEOUT_SECONDS, reactor)
    assert response.code == 200, body
    [content_type] = response.headers.getRawHeaders(b"content-type")
    assert content_type.startswith(b"text/plain; version=0.0.4"), content_type
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


@integration
async def test_relay_metrics_follow_requests(launcher: Launcher, reactor):
    """
    Requests made to a relay started with ``--metrics`` move its counters:
    a PEERS, a REGISTER and an unknown command (refused, 501), each timed;
    the connection making them is counted while open.
    """
    relay = await launcher.relay(args=["--metrics", LOOPBACK])
    metrics = (await relay.process.wait_for(METRICS_LISTENING))["address"]
    before = await scrape(reactor, metrics)
    assert value(before, "p2p_relay_registrations_total") == 0
    assert value(before, "p2p_relay_request_duration_seconds_count") == 0
    assert value(before, "p2p_relay_registry_errors_total") == 0

    connection = await launcher.connect_raw(relay.address)
    await connection.wait_lines(1)  # the banner
    connection.send_line("PEERS")
    await connection.wait_lines(2)
    connection.send_line("REGISTER 9 name=metrics")
    await connection.wait_lines(3)
    connection.send_line("BOGUS")
    lines = await connection.wait_lines(4)
    assert lines[3].startswith("ERR 501"), lines

    after = await scrape(reactor, metrics)
    assert value(after, "p2p_relay_queries_total", kind="list") == 1
    assert value(after, "p2p_relay_registrations_total") == 1
    assert value(after, "p2p_relay_leases") == 1
    assert value(after, "p2p_relay_refusals_total", reason="501") == 1
    assert value(after, "p2p_relay_request_duration_seconds_count") == 3
    assert value(after, "p2p_relay_request_duration_seconds_sum") > 0
    assert value(after, "p2p_relay_connections") == 1
    await connection.close()


@integration
async def test_peer_metrics_follow_a_transfer(launcher: Launcher, reactor):
    """A peer started with ``--metrics`` counts its indexed file, then the
    transfer a ``p2p get`` makes and the bytes it sent."""
    relay = await launcher.relay()
    peer = await launcher.peer(
        relay.address, ["sample1.txt"], args=["--metrics", LOOPBACK]
    )
    metrics = (await peer.process.wait_for(METRICS_LISTENING))["address"]
    await peer.process.wait_for(r"indexed the share: 1 files")
    before = await scrape(reactor, metrics)
    assert value(before, "p2p_peer_files_indexed") == 1
    assert value(before, "p2p_peer_transfers_total", outcome="sent") == 0
    assert value(before, "p2p_peer_upload_rate_limit_bytes") == 0

    result = await launcher.client("--relay", relay.address, "get", "sample1.txt")
    assert result.code == 0, result.stderr
    assert result.stdout == sample("sample1.txt")

    after = await scrape(reactor, metrics)
    assert value(after, "p2p_peer_transfers_total", outcome="sent") == 1
    assert value(after, "p2p_peer_sent_bytes_total") == len(sample("sample1.txt"))
    assert value(after, "p2p_peer_transfers_total", outcome="failed") == 0
