"""The scenario rig: anvil + private MariaDB/Redis + fault proxies + the real eth server and client.

Topology (every arrow through a :class:`~tests.faults.proxy.ProxyProcess`
that can be told to misbehave; the client<->server one also records every
reply on the wire)::

    anvil <-(rpc fault node, optional)- eth client ==proxy==> eth server --proxy--> MariaDB
                                                                        --proxy--> Redis

A scenario calls :meth:`Rig.start`, :meth:`Rig.warm_up`, injects and heals
its fault, then :meth:`Rig.finish`, which freezes the chain, waits for every
block to be stored and Redis to agree, asks the oracle, and records the row
for docs/faults.md.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass

from tests.faults.oracle import Oracle, Verdict, read_outbox
from tests.faults.proxy import ProxyProcess
from tests.faults.results import ResultLog, ScenarioResult
from tests.faults.rpcfault import RPCFaultProcess
from tests.faults.services import EthProcess, FaultRedis, PrivateMariaDB
from tests.support import Anvil, free_port, wait_until

REDIS_PREFIX = "eth:"


@dataclass
class RigOptions:
    """Knobs of one scenario's rig."""

    mysql_proxy: bool = False
    redis_proxy: bool = False
    rpc_fault: bool = False
    healthy_rpc: bool = False
    """With ``rpc_fault``: list anvil itself as a second, healthy --rpc endpoint."""
    server_args: Sequence[str] = ()
    client_args: Sequence[str] = ()
    client_interval: float = 0.5
    mysql_read_timeout: float = 5.0
    deadline: float = 10.0
    reconcile_interval: float = 2.0
    spool_dir: str | None = None
    block_time: int = 1


class Rig:
    """Everything one scenario runs, started and stopped together."""

    def __init__(
        self,
        scratch: str,
        mariadb: PrivateMariaDB,
        redis: FaultRedis,
        options: RigOptions | None = None,
    ) -> None:
        self.dir = scratch
        self.opts = options or RigOptions()
        self.mariadb = mariadb
        self.redis = redis
        self.db = mariadb.info
        self.anvil = Anvil(block_time=None)
        self.server_port = free_port()
        self.stats_port = free_port()
        self.link = ProxyProcess(
            self.server_port,
            record=self.path("wire-replies.txt"),
            log_path=self.path("proxy-link.log"),
        )
        self.mysql_link: ProxyProcess | None = None
        self.redis_link: ProxyProcess | None = None
        self.rpc_fault: RPCFaultProcess | None = None
        self.spool = os.path.join(self.opts.spool_dir or self.dir, "spool.sqlite3")
        self.server: EthProcess | None = None
        self.client: EthProcess | None = None
        self.oracle: Oracle | None = None
        self.began = time.monotonic()
        self.notes: list[str] = []

    def path(self, name: str) -> str:
        """A file in the scenario's scratch directory."""
        return os.path.join(self.dir, name)

    # -- start

    def server_command(self) -> list[str]:
        """The ``eth server`` arguments."""
        o = self.opts
        mysql_port = self.mysql_link.listen_port if self.mysql_link else self.mariadb.port
        redis_port = self.redis_link.listen_port if self.redis_link else self.redis.port
        return [
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.server_port),
            "--stats",
            f"tcp:{self.stats_port}:interface=127.0.0.1",
            "--use-mysql",
            "--mysql-host",
            "127.0.0.1",
            "--mysql-port",
            str(mysql_port),
            "--mysql-user",
            self.db["user"],
            "--mysql-db",
            self.db["database"],
            "--mysql-read-timeout",
            str(o.mysql_read_timeout),
            "--use-redis",
            "--redis-host",
            "127.0.0.1",
            "--redis-port",
            str(redis_port),
            "--redis-prefix",
            REDIS_PREFIX,
            "--redis-timeout",
            "2",
            "--deadline",
            str(o.deadline),
            "--reconcile-interval",
            str(o.reconcile_interval),
            *o.server_args,
        ]

    def client_command(self) -> list[str]:
        """The ``eth client`` arguments."""
        o = self.opts
        rpc = self.rpc_fault.url if self.rpc_fault else self.anvil.url
        urls = [rpc, self.anvil.url] if (self.rpc_fault and o.healthy_rpc) else [rpc]
        return [
            "client",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.link.listen_port),
            "--rpc",
            ",".join(urls),
            "--interval",
            str(o.client_interval),
            "--spool",
            self.spool,
            "--stats",
            "none",
            "--rpc-timeout",
            "3",
            *o.client_args,
        ]

    def start(self) -> None:
        """Start anvil (mining every ``block_time`` s), the proxies, the server and the client."""
        self.anvil.start()
        self.anvil.mine(5)
        self.link.start()
        if self.opts.mysql_proxy:
            self.mysql_link = ProxyProcess(self.mariadb.port, log_path=self.path("proxy-mysql.log"))
            self.mysql_link.start()
        if self.opts.redis_proxy:
            self.redis_link = ProxyProcess(self.redis.port, log_path=self.path("proxy-redis.log"))
            self.redis_link.start()
        if self.opts.rpc_fault:
            self.rpc_fault = RPCFaultProcess(self.anvil.url, log_path=self.path("rpc-fault.log"))
            self.rpc_fault.start()
        env = {"ETH_MYSQL_PASS": self.db["password"]}
        self.server = EthProcess(
            self.server_command(), self.path("server.log"), env=env, cwd=self.dir
        )
        self.client = EthProcess(self.client_command(), self.path("client.log"), cwd=self.dir)
        self.start_server()
        self.client.start()
        self.oracle = Oracle(
            self.anvil, self.db, redis=("127.0.0.1", self.redis.port, REDIS_PREFIX)
        )
        self.anvil.rpc("evm_setIntervalMining", self.opts.block_time)

    def start_server(self, timeout: float = 60.0) -> None:
        """(Re)start the server and wait until it accepts connections."""
        assert self.server is not None
        self.server.start()
        self.server.wait_port(self.server_port, timeout)

    def warm_up(self, timeout: float = 60.0) -> int:
        """Wait for the first stored block and start the oracle's range there."""
        assert self.oracle is not None
        oracle = self.oracle

        def first() -> int | None:
            self.check_alive()
            return oracle.newest_stored()

        try:
            wait_until(first, timeout, interval=0.2, what="the first block in SQL")
        except AssertionError as e:
            raise AssertionError(
                f"{e}\n--- server:\n{self.tail('server')}\n--- client:\n{self.tail('client')}"
            ) from None
        return oracle.begin()

    def check_alive(self) -> None:
        """Raise (with the log tail) if the server or the client exited."""
        for name, proc in (("server", self.server), ("client", self.client)):
            if proc is not None and proc.proc is not None and not proc.running():
                raise RuntimeError(
                    f"eth {name} exited with {proc.returncode}:\n{proc.log_tail(15)}"
                )

    def during(self, blocks: int, timeout: float = 120.0) -> None:
        """Let a fault last while the node mines ``blocks`` more blocks (at ``block_time``)."""
        target = self.anvil.head() + blocks
        wait_until(
            lambda: self.anvil.head() >= target,
            timeout,
            interval=0.1,
            what=f"{blocks} blocks mined during the fault",
        )

    # -- helpers for the scenarios

    def rows(self) -> int:
        """Rows in SQL now (0 if the table is not there or MariaDB does not answer)."""
        try:
            return int(self.mariadb.query("SELECT COUNT(*) FROM ethereum_data")[0][0])
        except Exception:  # noqa: BLE001 - during outages
            return 0

    def burst(self, blocks: int) -> int:
        """Mine ``blocks`` at once; return the new head."""
        self.anvil.mine(blocks)
        return self.anvil.head()

    def wait_rows(self, at_least: int, timeout: float = 60.0) -> int:
        """Wait until SQL has ``at_least`` rows."""
        return int(
            wait_until(
                lambda: self.rows() >= at_least and self.rows(),
                timeout,
                interval=0.02,
                what=f"{at_least} rows in SQL",
            )
        )

    def tail(self, which: str, lines: int = 40) -> str:
        """The last log lines of ``server`` or ``client``."""
        proc = self.server if which == "server" else self.client
        return proc.log_tail(lines) if proc is not None else ""

    # -- the end

    def finish(
        self,
        result_log: ResultLog,
        scenario: str,
        injected: str,
        healed_at: float | None,
        store_timeout: float = 90.0,
        redis_timeout: float = 60.0,
    ) -> Verdict:
        """Freeze the chain, wait for storage and Redis, ask the oracle, record the row, return the verdict.

        Records the row even when waiting times out (as a failure), then raises.
        """
        assert self.oracle is not None and self.client is not None
        oracle = self.oracle
        oracle.freeze()
        problems: list[str] = []
        recover: float | None = None
        try:
            stored_at = oracle.wait_stored(store_timeout)
            drained_at = self.wait_drained(store_timeout)
            if healed_at is not None:
                recover = max(0.0, max(stored_at, drained_at) - healed_at)
        except AssertionError as e:
            problems.append(str(e).splitlines()[0][:300])
        try:
            oracle.wait_redis(redis_timeout)
        except AssertionError as e:
            problems.append("Redis did not converge: " + str(e).splitlines()[0][:200])
        self.client.kill(signal.SIGTERM)
        verdict = oracle.check(wire_replies=self.link.replies(), outbox=self.spool)
        verdict.problems[:0] = problems
        result_log.record(
            ScenarioResult(
                scenario=scenario,
                injected=injected,
                produced=verdict.produced,
                stored=verdict.stored,
                lost=verdict.lost,
                duplicated=verdict.duplicates,
                recover_seconds=recover,
                passed=verdict.ok,
                acked=verdict.wire_ok,
                dup_replies=verdict.wire_dup,
                acked_not_stored=len(verdict.acked_not_stored),
                duration_seconds=time.monotonic() - self.began,
                notes="; ".join(self.notes),
                problems=verdict.problems,
            )
        )
        return verdict

    def finish_notes(self, result_log: ResultLog, scenario: str) -> None:
        """Rewrite the notes of an already recorded row (for facts known only after :meth:`finish`)."""
        result_log.update_notes(scenario, "; ".join(self.notes))

    def outbox_depth(self) -> int:
        """Messages waiting in the client's outbox (read-only look at its file)."""
        return len(read_outbox(self.spool)["pending"])

    def wait_drained(self, timeout: float = 60.0) -> float:
        """Block until the client holds nothing unacknowledged; return the monotonic time it did."""

        def drained() -> bool:
            self.check_alive()
            return self.outbox_depth() == 0

        try:
            wait_until(
                drained,
                timeout,
                interval=0.2,
                what="the client's outbox to drain (every message acked)",
            )
        except AssertionError as e:
            raise AssertionError(f"{e}; {self.outbox_depth()} still waiting") from None
        return time.monotonic()

    def explain(self, verdict: Verdict) -> str:
        """An assertion message with the verdict and the daemons' last log lines."""
        return (
            f"{verdict.summary()}\nfiles in {self.dir}\n--- server:\n{self.tail('server', 60)}"
            f"\n--- client:\n{self.tail('client', 60)}"
        )

    def stop(self) -> None:
        """Stop everything this rig started (never raises)."""
        for proc in (self.client, self.server):
            if proc is not None:
                proc.stop()
        for ctl in (self.rpc_fault, self.redis_link, self.mysql_link, self.link):
            if ctl is not None:
                ctl.stop()
        self.anvil.stop()
