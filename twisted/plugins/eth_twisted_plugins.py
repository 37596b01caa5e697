"""twistd plugins: ``twistd -n eth-server`` and ``twistd -n eth-client``.

Only ServiceMakers live here; the tap modules they name are imported when
twistd runs one of them, so ``twistd --help`` stays fast.
"""

from twisted.application.service import ServiceMaker

eth_server = ServiceMaker(
    "eth-server",
    "eth_twisted.server.tap",
    "Receive netstring messages, store them in SQL and Redis, acknowledge each",
    "eth-server",
)

eth_client = ServiceMaker(
    "eth-client",
    "eth_twisted.client.tap",
    "Watch the Ethereum chain head and deliver every block to an eth-server",
    "eth-client",
)
