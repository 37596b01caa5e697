"""The seed's design, as a baseline: one INSERT and one COMMIT per message through adbapi.

A tiny Twisted netstring server, the shape the project started from: every
frame becomes its own ``runInteraction`` (one transaction, one commit), and the
reply (``OK``/``DUP <sha256>``) is written when that commit returns. Replies
keep frame order per connection, so the bench's load generator can drive it
exactly like the real server. No batching, no Redis, no limits: it only exists
so that "N times the seed" is measured rather than guessed.

Run: ``python bench/seed_server.py --port P --mysql-db D`` (password in
``ETH_MYSQL_PASS``); the table must exist (``eth migrate``).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from collections import deque
from typing import Any

import pymysql
from twisted.enterprise import adbapi
from twisted.internet import reactor
from twisted.internet.protocol import Factory
from twisted.logger import Logger, globalLogBeginner, textFileLogObserver
from twisted.protocols.basic import NetstringReceiver

log = Logger()

INSERT = (
    "INSERT INTO ethereum_data (hash, payload, block_number, client_ip, received_at) "
    "VALUES (%s, %s, NULL, %s, UTC_TIMESTAMP(6))"
)


def store_one(txn: Any, sha: str, payload: bytes, ip: str) -> str:
    """One message, one transaction (adbapi commits when this returns)."""
    try:
        txn.execute(INSERT, (sha, payload, ip))
    except pymysql.err.IntegrityError:
        return "DUP"
    return "OK"


class SeedReceiver(NetstringReceiver):
    """Stores every frame on its own and answers in frame order."""

    MAX_LENGTH = 65536

    def connectionMade(self) -> None:
        self.slots: deque[list[bytes | None]] = deque()
        self.ip = self.transport.getPeer().host

    def stringReceived(self, payload: bytes) -> None:
        sha = hashlib.sha256(payload).hexdigest()
        slot: list[bytes | None] = [None]
        self.slots.append(slot)
        d = self.factory.pool.runInteraction(store_one, sha, payload, self.ip)

        def answered(code: str) -> None:
            slot[0] = f"{code} {sha}".encode()
            self.flush()

        def failed(reason: Any) -> None:
            log.error("store failed: {r}", r=reason.getErrorMessage())
            slot[0] = f"ERR {sha} unavailable".encode()
            self.flush()

        d.addCallbacks(answered, failed)

    def flush(self) -> None:
        while self.slots and self.slots[0][0] is not None:
            self.sendString(self.slots.popleft()[0])  # type: ignore[arg-type]


def main() -> None:
    """Parse arguments and serve until SIGTERM."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--mysql-host", default="127.0.0.1")
    p.add_argument("--mysql-port", type=int, default=3306)
    p.add_argument("--mysql-user", default="eth_test")
    p.add_argument("--mysql-db", required=True)
    p.add_argument(
        "--pool", type=int, default=5, help="adbapi cp_max (the seed used the default, 5)"
    )
    args = p.parse_args()
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)])
    factory = Factory.forProtocol(SeedReceiver)
    factory.pool = adbapi.ConnectionPool(  # type: ignore[attr-defined]
        "pymysql",
        host=args.mysql_host,
        port=args.mysql_port,
        user=args.mysql_user,
        password=os.environ.get("ETH_MYSQL_PASS", ""),
        database=args.mysql_db,
        charset="utf8mb4",
        cp_min=1,
        cp_max=args.pool,
        cp_reconnect=True,
    )
    reactor.listenTCP(args.port, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
    log.info("seed server ready on {port}", port=args.port)
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
