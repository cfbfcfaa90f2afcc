"""twistd plugins for p2p-relay: ``twistd relay`` and ``twistd peer``.

Only ServiceMaker objects live here: they import their tap modules lazily, so
the plugin scanner (which imports every plugin module) stays fast and cannot
be broken by our import-time errors.
"""

from twisted.application.service import ServiceMaker

relay = ServiceMaker(
    "p2p relay",
    "p2p.relay_tap",
    "Keep the list of active peers (leases) and hand it to clients.",
    "relay",
)

peer = ServiceMaker(
    "p2p peer",
    "p2p.peer_tap",
    "Serve a share folder to clients and keep a lease at a relay.",
    "peer",
)
