"""The latency floor: a Twisted netstring server that acknowledges at once and stores nothing.

``bench/bench.py`` drives it with the same paced load generator as the real server,
so the report can show what the machine itself (scheduler, loopback, the generator)
adds to every acknowledgement, before any sink is involved::

    python bench/echo_server.py PORT [DELAY_SECONDS]

With a delay, each reply is held that long on a reactor timer (a stand-in for a
sink that takes exactly that long). Prints ``Sinks ready`` once listening.
"""

from __future__ import annotations

import hashlib
import sys

from twisted.internet import protocol, reactor
from twisted.protocols.basic import NetstringReceiver


class Echo(NetstringReceiver):
    MAX_LENGTH = 16 * 1024 * 1024
    delay = 0.0

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)

    def stringReceived(self, string: bytes) -> None:
        reply = b"OK " + hashlib.sha256(string).hexdigest().encode()
        if self.delay:
            reactor.callLater(self.delay, self.sendString, reply)
        else:
            self.sendString(reply)


def main() -> None:
    Echo.delay = float(sys.argv[2]) if len(sys.argv) > 2 else 0.0
    reactor.listenTCP(int(sys.argv[1]), protocol.Factory.forProtocol(Echo), interface="127.0.0.1")
    print("Sinks ready", flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
