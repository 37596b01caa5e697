"""NodeSocket against a local anvil: connect+subscribe time, request RTT, burst push gaps.

    .venv/bin/python bench/ws_latency.py [--bursts 30] [--rtts 1000]

Push gaps are measured over ``anvil_mine 5`` bursts, with and without the TCP_QUICKACK
re-arm (HEADS.md 6.7); figures go in bench/README.md.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from twisted.internet import defer, reactor, task  # noqa: E402

from eth_twisted.client.ws import NodeSocket  # noqa: E402
from tests.support import anvil_binary  # noqa: E402


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(p / 100 * len(s)))] * 1000


def show(name: str, values: list[float]) -> None:
    print(
        f"{name:32} n={len(values):5}  p50 {pct(values, 50):7.3f} ms  "
        f"p90 {pct(values, 90):7.3f} ms  p99 {pct(values, 99):7.3f} ms"
    )


async def connect(url: str, quickack: bool) -> tuple[NodeSocket, list[float], float]:
    arrivals: list[float] = []
    ready: defer.Deferred[None] = defer.Deferred()
    t0 = time.perf_counter()
    ns = NodeSocket(
        url,
        reactor=reactor,
        quickack=quickack,
        on_head=lambda h: arrivals.append(time.perf_counter()),
        on_subscribed=lambda: ready.called or ready.callback(None),
    )
    ns.start()
    await ready
    return ns, arrivals, time.perf_counter() - t0


async def main(args: Any) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [anvil_binary(), "--port", str(port), "--silent"]
    node = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"ws://127.0.0.1:{port}"
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                await task.deferLater(reactor, 0.05)
        setups = []
        for _ in range(20):
            ns, _, took = await connect(url, True)
            setups.append(took)
            await ns.stop()
        show("connect + subscribe", setups)
        ns, arrivals, _ = await connect(url, True)
        rtts = []
        for _ in range(args.rtts):
            t = time.perf_counter()
            await ns.request("eth_blockNumber", [])
            rtts.append(time.perf_counter() - t)
        show("eth_blockNumber RTT", rtts)
        await ns.stop()
        for quickack in (False, True):
            ns, arrivals, _ = await connect(url, quickack)
            gaps: list[float] = []
            for _ in range(args.bursts):
                del arrivals[:]
                await ns.request("anvil_mine", ["0x5"])
                while len(arrivals) < 5:
                    await task.deferLater(reactor, 0.005)
                gaps += [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
                await task.deferLater(reactor, 0.1)  # idle between bursts
            show(f"push gap, quickack={quickack}", gaps)
            await ns.stop()
    finally:
        node.terminate()
        node.wait(5)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--bursts", type=int, default=30)
    parser.add_argument("--rtts", type=int, default=1000)
    ns = parser.parse_args()

    def run() -> None:
        d = defer.Deferred.fromCoroutine(main(ns))
        d.addErrback(lambda f: f.printTraceback())
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(run)
    reactor.run()
