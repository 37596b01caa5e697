"""The benchmark suite: ingest per sink set, the machine's own limits, latency, connections, client cost.

Run it with ``bench/run`` (``--quick`` for a fast check). It starts real ``eth
server`` subprocesses (and the seed-design baseline), drives them with
``bench/loadgen.py`` in a process of its own, measures CPU from
``/proc/<pid>/stat`` (utime + stime) for the server, MariaDB, Redis and the load
generator, verifies counts afterwards (rows == messages, every reply OK for the
right hash), prints a table and writes ``bench/results/results{-label}.md``,
``.json`` and ``ingest.png``.

It uses a MariaDB database of its own (``eth_test_bench_<hex>``, created and
dropped as the test user), a Redis key prefix of its own (deleted afterwards),
temporary files for SQLite, and stops every process it started.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
PYTHON = sys.executable
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))

import pymysql  # noqa: E402
from resp import Resp, encode  # noqa: E402

MYSQL = {
    "host": os.environ.get("ETH_TEST_MYSQL_HOST", "127.0.0.1"),
    "port": int(os.environ.get("ETH_TEST_MYSQL_PORT", "3306")),
    "user": os.environ.get("ETH_TEST_MYSQL_USER", "eth_test"),
    "password": os.environ.get("ETH_TEST_MYSQL_PASS", "eth-test-password"),
}
REDIS_HOST = os.environ.get("ETH_TEST_REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("ETH_TEST_REDIS_PORT", "6379"))
CLK_TCK = os.sysconf("SC_CLK_TCK")
SINK_SETS = ("sqlite", "mysql", "redis+sqlite", "mysql+redis")


RAW_INSERT_SQL = (
    "INSERT INTO ethereum_data (hash, payload, block_number, client_ip, client_id, received_at) "
    "VALUES (%s, %s, %s, %s, %s, %s) ON DUPLICATE KEY UPDATE hash = hash"
)
"""The raw limits' INSERT: the sink's columns that a block row fills, PyMySQL's own escaping
(``executemany`` makes one multi-row statement of it); the sink builds literals instead."""


# -- /proc ---------------------------------------------------------------------------


def cpu_of(pid: int | None, part: str = "both") -> float:
    """utime + stime of ``pid`` in seconds (0 when unknown or gone); ``part`` "user" or "system" for one."""
    if not pid:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    user, system = int(fields[11]), int(fields[12])
    return {"user": user, "system": system}.get(part, user + system) / CLK_TCK


def rss_mb(pid: int) -> float:
    """Resident set size of ``pid`` in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def open_sockets(pid: int) -> int:
    """How many sockets ``pid`` holds open."""
    n = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            n += os.readlink(fd).startswith("socket:")
        except OSError:
            pass
    return n


def find_pid(comm: str, needle: str = "") -> int | None:
    """The pid of the process named ``comm`` whose command line contains ``needle``."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if (d / "comm").read_text().strip() != comm:
                continue
            if needle and needle not in (d / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                continue
            return int(d.name)
        except OSError:
            continue
    return None


def service_pids() -> dict[str, int | None]:
    """MariaDB's and Redis's pids, for the CPU split."""
    return {
        "mariadbd": find_pid("mariadbd") or find_pid("mysqld"),
        "redis": find_pid("redis-server", f":{REDIS_PORT}"),
    }


def load_average() -> float:
    """The one-minute load average."""
    return os.getloadavg()[0]


# -- resources of our own -------------------------------------------------------------


def free_port() -> int:
    """A TCP port free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mysql_conn(database: str | None = None) -> Any:
    """A connection as the test user."""
    return pymysql.connect(**MYSQL, database=database, autocommit=True, charset="utf8mb4")


def ensure_mysql_account() -> None:
    """Log in as the test user; on a fresh machine create it first, as the tests do."""
    try:
        mysql_conn().close()
        return
    except pymysql.err.OperationalError as e:
        if e.args[0] != 1045:  # not "access denied": MariaDB is not answering
            raise SystemExit(
                f"bench: MariaDB at {MYSQL['host']}:{MYSQL['port']}: {e}; "
                "start it with scripts/services"
            ) from e
    from tests.support import provision_mysql_user  # only on a fresh machine

    provision_mysql_user(
        os.environ.get("ETH_TEST_MYSQL_SOCKET", "/run/mysqld/mysqld.sock"),
        MYSQL["user"],
        MYSQL["password"],
    )
    mysql_conn().close()


@contextmanager
def bench_database() -> Iterator[str]:
    """A fresh ``eth_test_bench_<hex>`` database, dropped afterwards."""
    name = "eth_test_bench_" + secrets.token_hex(4)
    conn = mysql_conn()
    with conn.cursor() as c:
        c.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci")
    try:
        yield name
    finally:
        with conn.cursor() as c:
            c.execute(f"DROP DATABASE IF EXISTS `{name}`")
        conn.close()


@contextmanager
def bench_prefix() -> Iterator[str]:
    """A Redis key prefix of our own, deleted afterwards."""
    prefix = f"ethbench:{secrets.token_hex(4)}:"
    try:
        yield prefix
    finally:
        r = Resp(REDIS_HOST, REDIS_PORT)
        r.delete_prefix(prefix)
        r.close()


def migrate(database: str) -> None:
    """Create the schema (the same migrations the server applies)."""
    from eth_twisted.sinks.sql.migrations import migrate_mysql
    from eth_twisted.sinks.sql.pool import MySQLSettings

    migrate_mysql(
        MySQLSettings(
            mysql_host=MYSQL["host"],
            mysql_port=MYSQL["port"],
            mysql_user=MYSQL["user"],
            mysql_pass=MYSQL["password"],
            mysql_db=database,
        ),
        create_database=False,
    )


def count_rows(database: str | None, sqlite: str | None) -> int:
    """Rows in ethereum_data."""
    if sqlite:
        import sqlite3

        conn = sqlite3.connect(sqlite)
        try:
            return int(conn.execute("SELECT COUNT(*) FROM ethereum_data").fetchone()[0])
        finally:
            conn.close()
    conn = mysql_conn(database)
    try:
        with conn.cursor() as c:
            c.execute("SELECT COUNT(*) FROM ethereum_data")
            return int(c.fetchone()[0])
    finally:
        conn.close()


def redis_counts(prefix: str) -> tuple[int, int]:
    """ZCARD of hashes and the sum of ip_addresses under ``prefix``."""
    r = Resp(REDIS_HOST, REDIS_PORT)
    try:
        hashes = int(r.call("ZCARD", prefix + "hashes"))
        flat = r.call("HGETALL", prefix + "ip_addresses") or []
        return hashes, sum(int(v) for v in flat[1::2])
    finally:
        r.close()


# -- processes -------------------------------------------------------------------------


def _raise_nofile() -> None:
    """preexec_fn: the child may hold as many files as the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Proc:
    """A subprocess we started, logging to a file, stopped (and waited for) on exit."""

    def __init__(
        self,
        args: list[str],
        log: Path,
        env: dict[str, str] | None = None,
        ready: Callable[[], bool] | None = None,
        timeout: float = 60.0,
    ) -> None:
        self.log = log
        self.args = args
        with open(log, "wb") as out:
            self.popen = subprocess.Popen(
                args,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
                preexec_fn=_raise_nofile,
            )
        self.pid = self.popen.pid
        if ready is not None:
            deadline = time.monotonic() + timeout
            while not ready():
                if self.popen.poll() is not None:
                    raise RuntimeError(f"{args[:3]} exited: {log.read_text()[-2000:]}")
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"{args[:3]} not ready in {timeout}s: {log.read_text()[-2000:]}"
                    )
                time.sleep(0.1)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 30 s; always reaped."""
        if self.popen.poll() is None:
            if "py-spy" in self.args[0]:
                # Stop the profiled server, not py-spy, which then writes its profile.
                os.kill(server_pid(self), signal.SIGTERM)
            else:
                self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()

    def __enter__(self) -> Proc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


ETH_MAIN = (
    "try:\n"
    "    from eth_twisted.cli.main import main\n"
    "except ImportError:  # a tree from before the role folders (eth_twisted/cli.py)\n"
    "    from eth_twisted.cli import main\n"
)
"""Imports ``eth``'s main function from any tree ``--code`` names, old layout or new."""


def server_command(code: Path, port: int, storage: list[str], extra: list[str]) -> list[str]:
    """``eth server`` from the source tree ``code`` (the checkout, or an older copy)."""
    prelude = (
        os.environ.get("ETH_BENCH_PRELUDE") or "pass"
    )  # e.g. "import gc; gc.disable()", for experiments
    boot = (
        f"import sys; sys.path.insert(0, {str(code)!r}); sys.argv[0] = 'eth'; {prelude}\n"
        + ETH_MAIN
        + "sys.exit(main())"
    )
    return [
        PYTHON,
        "-c",
        boot,
        "server",
        "--port",
        str(port),
        "--stats",
        "none",
        "--reconcile-interval",
        "3600",
        *storage,
        *extra,
    ]


def storage_args(sinks: str, workdir: Path, database: str | None, prefix: str | None) -> list[str]:
    """Command-line storage options for one sink set."""
    args: list[str] = []
    if "mysql" in sinks:
        args += [
            "--use-mysql",
            "--mysql-host",
            MYSQL["host"],
            "--mysql-port",
            str(MYSQL["port"]),
            "--mysql-user",
            MYSQL["user"],
            "--mysql-db",
            str(database),
        ]
    else:
        args += ["--sqlite", str(workdir / "bench.sqlite3")]
    if "redis" in sinks:
        args += [
            "--use-redis",
            "--redis-host",
            REDIS_HOST,
            "--redis-port",
            str(REDIS_PORT),
            "--redis-prefix",
            str(prefix),
        ]
    return args


def start_server(
    code: Path,
    port: int,
    storage: list[str],
    log: Path,
    extra: list[str] = (),
    profile: Path | None = None,
) -> Proc:
    """An ``eth server`` subprocess, returned once its sinks are ready."""
    cmd = server_command(code, port, storage, list(extra))
    if profile is not None:
        cmd = [
            str(Path(PYTHON).parent / "py-spy"),
            "record",
            "--format",
            "raw",
            "-r",
            "250",
            "--gil",
            "-o",
            str(profile),
            "--",
            *cmd,
        ]
    return Proc(
        cmd,
        log,
        env={"ETH_MYSQL_PASS": MYSQL["password"]},
        ready=lambda: b"Sinks ready" in log.read_bytes(),
    )


def server_pid(proc: Proc) -> int:
    """The Python process of the server (py-spy's child when profiling)."""
    if "py-spy" not in proc.args[0]:
        return proc.pid
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    return int(children[0]) if children else proc.pid


def loadgen(
    port: int,
    *,
    mode: str = "flood",
    clients: int,
    messages: int,
    start_block: int,
    extra: list[str] = (),
    timeout: float = 1800,
) -> dict[str, Any]:
    """Run the load generator to completion; its JSON result."""
    cmd = [
        PYTHON,
        str(BENCH / "loadgen.py"),
        "--port",
        str(port),
        "--mode",
        mode,
        "--clients",
        str(clients),
        "--messages",
        str(messages),
        "--start-block",
        str(start_block),
        *extra,
    ]
    out = subprocess.run(cmd, capture_output=True, timeout=timeout, preexec_fn=_raise_nofile)
    if out.returncode != 0:
        raise RuntimeError(f"loadgen failed: {out.stderr.decode()[-2000:]}")
    return json.loads(out.stdout)


# -- the measurements --------------------------------------------------------------------


def cpu_split(
    pids: dict[str, int | None], before: dict[str, float], n: int, elapsed: float
) -> dict[str, dict[str, float]]:
    """CPU per process over a run: seconds, µs per message, share of one core."""
    out = {}
    for name, pid in pids.items():
        secs = cpu_of(pid) - before[name]
        out[name] = {
            "seconds": secs,
            "us_per_msg": 1e6 * secs / max(1, n),
            "cores": secs / elapsed if elapsed else 0.0,
        }
        if f"{name}.system" in before:
            out[name]["system_seconds"] = cpu_of(pid, "system") - before[f"{name}.system"]
    return out


def ingest(
    sinks: str, opts: argparse.Namespace, code: Path, block0: int, profile: Path | None = None
) -> dict[str, Any]:
    """One ingest run against a real server with ``sinks``; verified afterwards."""
    with (
        tempfile.TemporaryDirectory(prefix="ethbench-") as tmp,
        bench_database() as database,
        bench_prefix() as prefix,
    ):
        work = Path(tmp)
        port = free_port()
        storage = storage_args(sinks, work, database, prefix)
        with start_server(
            code, port, storage, work / "server.log", opts.server_args, profile
        ) as srv:
            pid = server_pid(srv)
            pids = {"server": pid, **service_pids()}
            before = {k: cpu_of(v) for k, v in pids.items()}
            before["server.system"] = cpu_of(pid, "system")
            t0 = time.perf_counter()
            result = loadgen(port, clients=opts.clients, messages=opts.messages, start_block=block0)
            wall = time.perf_counter() - t0
            split = cpu_split(pids, before, opts.messages, result["elapsed"])
            result["server_rss_mb"] = rss_mb(pid)
        rows = count_rows(
            database if "mysql" in sinks else None,
            None if "mysql" in sinks else str(work / "bench.sqlite3"),
        )
        result.update(sinks=sinks, rows=rows, wall=wall, load=load_average())
        result["cpu"] = split
        result["cpu"]["loadgen"] = {
            "seconds": result["cpu_seconds"],
            "us_per_msg": 1e6 * result["cpu_seconds"] / opts.messages,
            "cores": result["cpu_seconds"] / result["elapsed"],
        }
        problems = []
        if rows != opts.messages:
            problems.append(f"rows {rows} != {opts.messages}")
        if result["counts"].get("OK") != opts.messages or result["wrong"]:
            problems.append(f"replies {result['counts']} wrong={result['wrong']}")
        if "redis" in sinks:
            zcard, firsts = redis_counts(prefix)
            result["redis_hashes"] = zcard
            if zcard != opts.messages or firsts != opts.messages:
                problems.append(
                    f"redis hashes {zcard}, ip_addresses sum {firsts} != {opts.messages}"
                )
        result["verified"] = not problems
        result["problems"] = problems
        return result


def seed_baseline(opts: argparse.Namespace, block0: int) -> dict[str, Any]:
    """The seed's design (one INSERT + COMMIT per message through adbapi) under the same load."""
    n = opts.seed_messages
    with tempfile.TemporaryDirectory(prefix="ethbench-") as tmp, bench_database() as database:
        migrate(database)
        port = free_port()
        log = Path(tmp) / "seed.log"
        cmd = [
            PYTHON,
            str(BENCH / "seed_server.py"),
            "--port",
            str(port),
            "--mysql-db",
            database,
            "--mysql-host",
            MYSQL["host"],
            "--mysql-port",
            str(MYSQL["port"]),
            "--mysql-user",
            MYSQL["user"],
        ]
        with Proc(
            cmd,
            log,
            env={"ETH_MYSQL_PASS": MYSQL["password"]},
            ready=lambda: b"seed server ready" in log.read_bytes(),
        ) as srv:
            pids = {"server": srv.pid, **service_pids()}
            before = {k: cpu_of(v) for k, v in pids.items()}
            result = loadgen(port, clients=opts.clients, messages=n, start_block=block0)
            result["cpu"] = cpu_split(pids, before, n, result["elapsed"])
            result["cpu"]["loadgen"] = {
                "seconds": result["cpu_seconds"],
                "us_per_msg": 1e6 * result["cpu_seconds"] / n,
                "cores": result["cpu_seconds"] / result["elapsed"],
            }
        result["rows"] = count_rows(database, None)
        result["verified"] = (
            result["rows"] == n and result["counts"].get("OK") == n and not result["wrong"]
        )
        return result


def raw_mysql(rows_total: int, batch: int = 1000) -> dict[str, Any]:
    """Raw PyMySQL executemany, ``batch`` rows per transaction, into an identical table."""
    from eth_twisted.link.payload import render_html
    from eth_twisted.model import sha256_hex
    from eth_twisted.sinks.sql.migrations import to_utc_datetime

    with bench_database() as database:
        migrate(database)
        conn = pymysql.connect(**MYSQL, database=database, autocommit=False, charset="utf8mb4")
        rows = []
        now = time.time()
        for n in range(rows_total):
            p = render_html(50_000_000 + n)
            rows.append((sha256_hex(p), p, 50_000_000 + n, "127.0.0.1", None, to_utc_datetime(now)))
        mariadbd = service_pids()["mariadbd"]
        cpu0, db0 = time.process_time(), cpu_of(mariadbd)
        t0 = time.perf_counter()
        with conn.cursor() as c:
            for i in range(0, rows_total, batch):
                c.executemany(RAW_INSERT_SQL, rows[i : i + batch])
                conn.commit()
        elapsed = time.perf_counter() - t0
        client_cpu, db_cpu = time.process_time() - cpu0, cpu_of(mariadbd) - db0
        conn.close()
        stored = count_rows(database, None)
    return {
        "rows": stored,
        "elapsed": elapsed,
        "rate": rows_total / elapsed,
        "client_us_per_row": 1e6 * client_cpu / rows_total,
        "mariadbd_us_per_row": 1e6 * db_cpu / rows_total,
        "verified": stored == rows_total,
    }


def raw_mysql_per_row(rows_total: int) -> dict[str, Any]:
    """Raw PyMySQL, one INSERT and one COMMIT per row (the seed's cost at the driver).

    Each row's INSERT+COMMIT time is kept too: no acknowledgement that waits for a
    commit can be faster than this, so its p99 is the floor of the server's ack p99.
    """
    from eth_twisted.link.payload import render_html
    from eth_twisted.model import sha256_hex
    from eth_twisted.sinks.sql.migrations import to_utc_datetime

    with bench_database() as database:
        migrate(database)
        conn = pymysql.connect(**MYSQL, database=database, autocommit=False, charset="utf8mb4")
        times = []
        t0 = time.perf_counter()
        with conn.cursor() as c:
            for n in range(rows_total):
                p = render_html(60_000_000 + n)
                t = time.perf_counter()
                c.execute(
                    RAW_INSERT_SQL,
                    (sha256_hex(p), p, n, "127.0.0.1", None, to_utc_datetime(time.time())),
                )
                conn.commit()
                times.append(time.perf_counter() - t)
        elapsed = time.perf_counter() - t0
        conn.close()
        stored = count_rows(database, None)
    times.sort()
    return {
        "rows": stored,
        "elapsed": elapsed,
        "rate": rows_total / elapsed,
        "verified": stored == rows_total,
        "p50_ms": 1000 * times[len(times) // 2],
        "p99_ms": 1000 * times[int(len(times) * 0.99)],
    }


def raw_redis(messages: int, per_script: int = 500, depth: int = 4) -> dict[str, Any]:
    """EVALSHA of the sink's own store script per ``per_script`` messages, ``depth`` in flight."""
    from eth_twisted.model import sha256_hex
    from eth_twisted.sinks.redis_scripts import STORE_SCRIPT, pack_store_entries

    with bench_prefix() as prefix:
        r = Resp(REDIS_HOST, REDIS_PORT)
        sha = r.call("SCRIPT", "LOAD", STORE_SCRIPT.strip())
        sha = sha.decode() if isinstance(sha, bytes) else sha
        keys = [prefix + "hashes", prefix + "ip_addresses", prefix + "ip_messages"]
        commands = []
        now = time.time()
        for i in range(0, messages, per_script):
            entries = [
                (sha256_hex(b"raw-redis-%d" % n), now, f"10.0.{n % 50}.1", "1")
                for n in range(i, min(messages, i + per_script))
            ]
            commands.append(
                encode("EVALSHA", sha, 3, *keys, len(entries), pack_store_entries(entries))
            )
        redis_pid = service_pids()["redis"]
        cpu0, r0 = time.process_time(), cpu_of(redis_pid)
        t0 = time.perf_counter()
        pending = 0
        for cmd in commands:
            r.send(cmd)
            pending += 1
            if pending >= depth:
                reply = r.read()
                pending -= 1
                if isinstance(reply, RuntimeError):
                    raise reply
        for _ in range(pending):
            r.read()
        elapsed = time.perf_counter() - t0
        client_cpu, redis_cpu = time.process_time() - cpu0, cpu_of(redis_pid) - r0
        zcard = int(r.call("ZCARD", keys[0]))
        r.close()
    return {
        "messages": messages,
        "elapsed": elapsed,
        "rate": messages / elapsed,
        "client_us_per_msg": 1e6 * client_cpu / messages,
        "redis_us_per_msg": 1e6 * redis_cpu / messages,
        "verified": zcard == messages,
    }


def server_metrics(port: int) -> dict[str, float]:
    """The server's Prometheus samples (name{labels} -> value), read from its stats port."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def paced_messages(opts: argparse.Namespace, rate: float) -> int:
    """Messages of one paced run at ``rate``: ``paced_seconds`` of it, and never fewer than 1,000."""
    return max(1000, int(rate * opts.paced_seconds))


def paced_once(
    opts: argparse.Namespace, code: Path, rate: float, block0: int, profile: Path | None = None
) -> dict[str, Any]:
    """One paced run at ``rate`` against a fresh MySQL+Redis server, with its own stage breakdown."""
    n = paced_messages(opts, rate)
    with (
        tempfile.TemporaryDirectory(prefix="ethbench-") as tmp,
        bench_database() as database,
        bench_prefix() as prefix,
    ):
        port, stats_port = free_port(), free_port()
        storage = storage_args("mysql+redis", Path(tmp), database, prefix)
        extra = [*opts.server_args, "--stats", f"tcp:{stats_port}:interface=127.0.0.1"]
        with start_server(code, port, storage, Path(tmp) / "server.log", extra, profile) as srv:
            pids = {"server": server_pid(srv), **service_pids()}
            before = {k: cpu_of(v) for k, v in pids.items()}
            before["server.system"] = cpu_of(pids["server"], "system")
            result = loadgen(
                port,
                mode="paced",
                clients=opts.clients,
                messages=n,
                start_block=block0,
                extra=["--rate", str(rate)],
            )
            result["cpu"] = cpu_split(pids, before, n, result["elapsed"])
            m = server_metrics(stats_port)
        stages = {}
        for sink in ("mysql", "redis"):
            batches = m.get(f'eth_server_sink_latency_seconds_count{{sink="{sink}"}}', 0.0)
            seconds = m.get(f'eth_server_sink_latency_seconds_sum{{sink="{sink}"}}', 0.0)
            stages[sink] = {
                "batches": batches,
                "mean_ms": 1000 * seconds / batches if batches else float("nan"),
                "busy": seconds / result["elapsed"],
            }
        result["stages"] = stages
        result["batch_mean"] = (
            n / stages["mysql"]["batches"] if stages["mysql"]["batches"] else float("nan")
        )
        result["rows"] = count_rows(database, None)
        result["offered"] = rate
        result["verified"] = result["rows"] == n and result["counts"].get("OK") == n
        return result


def paced_floor(opts: argparse.Namespace, rate: float, delay: float, block0: int) -> dict[str, Any]:
    """The same paced load against ``bench/echo_server.py``: what the machine adds with no sink at all."""
    n = paced_messages(opts, rate)
    with tempfile.TemporaryDirectory(prefix="ethbench-") as tmp:
        port = free_port()
        log = Path(tmp) / "echo.log"
        with Proc(
            [PYTHON, str(BENCH / "echo_server.py"), str(port), str(delay)],
            log,
            ready=lambda: b"Sinks ready" in log.read_bytes(),
        ):
            result = loadgen(
                port,
                mode="paced",
                clients=opts.clients,
                messages=n,
                start_block=block0,
                extra=["--rate", str(rate)],
            )
    result["delay_ms"] = delay * 1000
    result["offered"] = rate
    result["verified"] = result["counts"].get("OK") == n
    return result


def paced_latency(
    opts: argparse.Namespace, code: Path, rate: float, block0: int, profile: Path | None = None
) -> dict[str, Any]:
    """Ack latency at ``rate`` msgs/s offered (MySQL+Redis, K clients), ``opts.repeat`` runs.

    The run with the median p99 is reported, the range of all runs beside it, and
    the floor: the same load against a server that stores nothing, answering at
    once (and, with ``--echo-delay``, after a fixed timer too).
    """
    n = paced_messages(opts, rate)
    runs = []
    for i in range(opts.repeat):
        runs.append(paced_once(opts, code, rate, block0 + i * n, profile if i == 0 else None))
    runs.sort(key=lambda r: r["p99_ms"])
    result = runs[
        len(runs) // 2
    ]  # the median; of an even count, the middle run with the higher p99
    result["runs"] = [(r["p50_ms"], r["p99_ms"]) for r in runs]
    result["verified"] = all(r["verified"] for r in runs)
    result["floor"] = [paced_floor(opts, rate, delay, block0) for delay in opts.echo_delays]
    # The commit floor right beside the runs it is compared with: storage speed wanders.
    result["commit"] = raw_mysql_per_row(opts.commit_rows)
    return result


def idle_connections(opts: argparse.Namespace, code: Path, block0: int) -> dict[str, Any]:
    """Hold ``opts.idle`` idle connections from several loopback addresses; RSS; ingest beside them."""
    sources = [f"127.0.0.{i}" for i in range(2, 2 + max(1, -(-opts.idle // 4000)))]
    with tempfile.TemporaryDirectory(prefix="ethbench-") as tmp:
        work = Path(tmp)
        port = free_port()
        extra = ["--max-connections", "20000", "--max-per-ip", "5000", "--idle-timeout", "600"]
        with start_server(
            code, port, storage_args("sqlite", work, None, None), work / "server.log", extra
        ) as srv:
            rss_before = rss_mb(srv.pid)
            hold = work / "hold.json"
            cmd = [
                PYTHON,
                str(BENCH / "loadgen.py"),
                "--port",
                str(port),
                "--mode",
                "idle",
                "--idle",
                str(opts.idle),
                "--source-ips",
                ",".join(sources),
                "--clients",
                "5",
                "--messages",
                str(opts.idle_messages),
                "--start-block",
                str(block0),
                "--hold-file",
                str(hold),
            ]
            gen = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_raise_nofile
            )
            try:
                deadline = time.monotonic() + 300
                held: dict[str, Any] | None = None
                while held is None:
                    if gen.poll() is not None:
                        raise RuntimeError(
                            f"idle loadgen exited: {gen.stderr.read().decode()[-2000:]}"
                        )
                    if time.monotonic() > deadline:
                        raise RuntimeError("idle loadgen did not report in 300 s")
                    try:
                        held = json.loads(hold.read_text())
                    except (OSError, ValueError):
                        time.sleep(0.2)
                sockets = open_sockets(srv.pid)
                rss_held = rss_mb(srv.pid)
                cpu0 = cpu_of(srv.pid)
                time.sleep(5)
                idle_cpu = (cpu_of(srv.pid) - cpu0) / 5
                hold.unlink()
                gen.communicate(timeout=120)
            finally:
                if gen.poll() is None:
                    gen.kill()
                    gen.wait()
        rows = count_rows(None, str(work / "bench.sqlite3"))
    held.update(
        server_sockets=sockets,
        rss_mb=rss_held,
        rss_before_mb=rss_before,
        kb_per_connection=1024 * (rss_held - rss_before) / max(1, opts.idle),
        idle_cpu_cores=idle_cpu,
        rows=rows,
        sources=sources,
    )
    held["verified"] = (
        held["idle_alive"] == opts.idle
        and held["counts"].get("OK") == opts.idle_messages
        and rows == opts.idle_messages
    )
    return held


def client_cost(opts: argparse.Namespace, code: Path) -> dict[str, Any]:
    """CPU and RSS of an idle ``eth client`` polling anvil every second."""
    sys.path.insert(0, str(ROOT / "tests"))
    anvil = ROOT / "node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil"
    with tempfile.TemporaryDirectory(prefix="ethbench-") as tmp:
        work = Path(tmp)
        aport, sport = free_port(), free_port()
        url = f"http://127.0.0.1:{aport}"

        def anvil_up() -> bool:
            try:
                body = b'{"jsonrpc":"2.0","id":1,"method":"eth_chainId","params":[]}'
                req = urllib.request.Request(url, body, {"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=2) as r:
                    return b"result" in r.read()
            except OSError:
                return False

        with (
            Proc(
                [
                    str(anvil),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(aport),
                    "--silent",
                    "--block-time",
                    "1",
                ],
                work / "anvil.log",
                ready=anvil_up,
            ),
            start_server(
                code, sport, storage_args("sqlite", work, None, None), work / "server.log"
            ),
        ):
            boot = (
                f"import sys; sys.path.insert(0, {str(code)!r}); sys.argv[0] = 'eth'\n"
                + ETH_MAIN
                + "sys.exit(main())"
            )
            cmd = [
                PYTHON,
                "-c",
                boot,
                "client",
                "--host",
                "127.0.0.1",
                "--port",
                str(sport),
                "--rpc",
                url,
                "--interval",
                "1",
                "--spool",
                str(work / "spool.sqlite3"),
                "--stats",
                "none",
            ]
            log = work / "client.log"
            with Proc(cmd, log) as client:
                time.sleep(opts.client_warmup)
                cpu0, t0 = cpu_of(client.pid), time.monotonic()
                time.sleep(opts.client_seconds)
                secs = cpu_of(client.pid) - cpu0
                wall = time.monotonic() - t0
                rss = rss_mb(client.pid)
        rows = count_rows(None, str(work / "bench.sqlite3"))
    return {
        "seconds": wall,
        "cpu_seconds": secs,
        "cores": secs / wall,
        "rss_mb": rss,
        "rows": rows,
        "verified": rows >= opts.client_seconds / 2,
    }


# -- report ------------------------------------------------------------------------------


def fmt_ingest_row(name: str, r: dict[str, Any]) -> str:
    """One markdown row of the ingest table."""
    cpu = r.get("cpu", {})

    def us(k: str) -> str:
        return f"{cpu[k]['us_per_msg']:.0f}" if k in cpu else "-"

    runs = r.get("runs")
    spread = f" ({min(runs):,.0f}-{max(runs):,.0f})" if runs and len(runs) > 1 else ""
    return (
        f"| {name} | {r['rate']:,.0f}{spread} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['max_ms']:.0f} "
        f"| {us('server')} | {us('mariadbd')} | {us('redis')} | {us('loadgen')} "
        f"| {'yes' if r.get('verified') else 'NO ' + '; '.join(r.get('problems', []))} |"
    )


def report(res: dict[str, Any]) -> str:
    """The results as markdown."""
    m = res["meta"]
    lines = [
        f"# eth-twisted benchmark ({m['label']})",
        "",
        f"{m['when']} on {m['host']} ({m['cpus']} CPUs, Python {m['python']}), "
        f"load average at start {m['load_start']:.2f}; {m['messages']:,} messages, "
        f"{m['clients']} clients, window 256, the seed's HTML payload"
        + (f"; server started with `{m['server_prelude']}`" if m.get("server_prelude") else "")
        + (f"; server options {' '.join(m['server_args'])}" if m.get("server_args") else "")
        + ".",
        "",
        "## Ingest (acknowledged messages/s; latency under full load, window-bound)",
        "",
        "| sinks | msgs/s | p50 ms | p99 ms | max ms | server µs/msg | mariadbd µs/msg | "
        "redis µs/msg | loadgen µs/msg | verified |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in res.get("ingest", {}).items():
        lines.append(fmt_ingest_row(name, r))
    if "seed" in res:
        lines.append(
            fmt_ingest_row(
                f"seed design (MySQL, 1 commit/msg, {res['seed']['messages']:,} msgs)", res["seed"]
            )
        )
    lim = res.get("limits", {})
    if lim:
        lines += ["", "## Limits measured in the same run", ""]
        if "raw_mysql" in lim:
            r = lim["raw_mysql"]
            lines.append(
                f"- raw PyMySQL executemany, 1,000-row transactions: **{r['rate']:,.0f} rows/s** "
                f"(client {r['client_us_per_row']:.1f} µs/row, "
                f"mariadbd {r['mariadbd_us_per_row']:.1f} µs/row)"
            )
        if "raw_mysql_per_row" in lim:
            r1 = lim["raw_mysql_per_row"]
            lines.append(
                f"- raw PyMySQL, one COMMIT per row: {r1['rate']:,.0f} rows/s; one INSERT+COMMIT took "
                f"p50 {r1.get('p50_ms', float('nan')):.2f} ms, p99 {r1.get('p99_ms', float('nan')):.2f} ms "
                "(no acknowledgement after a commit can beat this)"
            )
        if "raw_redis" in lim:
            r = lim["raw_redis"]
            lines.append(
                f"- raw Redis, EVALSHA of the store script per 500 messages, 4 in flight: "
                f"**{r['rate']:,.0f} msgs/s** (redis-server {r['redis_us_per_msg']:.1f} µs/msg)"
            )
    ratios = res.get("ratios", {})
    if ratios:
        lines += ["", "## Ratios", ""]
        for k, v in ratios.items():
            lines.append(f"- {k}: **{v:.2f}**")
    paced = res.get("paced_rates") or ([res["paced"]] if "paced" in res else [])
    if paced:
        commit = lim.get("raw_mysql_per_row")
        clients = paced[0]["clients"]
        lines += [
            "",
            f"## Paced latency (MySQL+Redis, {clients} clients) beside the floors",
            "",
            "Each rate: the run with the median p99 of its runs (every run's p50/p99 beside); the "
            "floors measured beside them: the same load against `bench/echo_server.py` (stores "
            "nothing, answers at once) and one raw INSERT+COMMIT, a row at a time, right after "
            "the rate's runs (no acknowledgement after a commit can beat it).",
            "",
            "| offered msgs/s | p50 ms | p99 ms | max ms | commit p50 / p99 ms | p50 / commit p50 "
            "| p99 / commit p99 | echo p50 / p99 / max ms | msgs a batch | MySQL / Redis ms a batch "
            "| server cores | runs p50/p99 | verified |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in paced:
            st = r.get("stages", {})
            echo = next((f for f in r.get("floor", []) if not f["delay_ms"]), None)
            ratio50 = f"{r['p50_vs_commit']:.2f}x" if "p50_vs_commit" in r else "-"
            ratio99 = f"{r['p99_vs_commit']:.2f}x" if "p99_vs_commit" in r else "-"
            lines.append(
                f"| {r['offered']:,.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['max_ms']:.1f} "
                + (
                    f"| {r['commit']['p50_ms']:.2f} / {r['commit']['p99_ms']:.2f} "
                    if "commit" in r
                    else "| - "
                )
                + f"| {ratio50} | {ratio99} | "
                + (
                    f"{echo['p50_ms']:.2f} / {echo['p99_ms']:.2f} / {echo['max_ms']:.1f}"
                    if echo
                    else "-"
                )
                + f" | {r.get('batch_mean', float('nan')):.1f} | "
                + (f"{st['mysql']['mean_ms']:.2f} / {st['redis']['mean_ms']:.2f}" if st else "-")
                + f" | {r['cpu']['server']['cores']:.2f} | "
                + ", ".join(f"{a:.1f}/{b:.1f}" for a, b in r.get("runs", []))
                + f" | {'yes' if r['verified'] else 'NO'} |"
            )
        if commit:
            lines.append(
                f"\nOne raw INSERT+COMMIT in the limits section of this run: p50 "
                f"{commit['p50_ms']:.2f} ms, p99 {commit['p99_ms']:.2f} ms."
            )
        for r in paced:
            for f in r.get("floor", []):
                if f["delay_ms"]:
                    lines.append(
                        f"- echo floor at {r['offered']:,.0f} msgs/s answering after a "
                        f"{f['delay_ms']:.0f} ms timer: p50 {f['p50_ms']:.2f} ms, "
                        f"p99 {f['p99_ms']:.2f} ms, max {f['max_ms']:.1f} ms"
                    )
        head = res.get("paced")
        if head and "p50_vs_commit" in head and head.get("offered") == 1000:
            goals = [
                f"p99 at 1,000 msgs/s {head['p99_vs_commit']:.2f}x the raw commit p99 (goal <= 3x)",
                f"p50 {head['p50_vs_commit']:.2f}x the raw commit p50 (goal <= 2x)",
            ]
            full = res.get("ingest", {}).get("mysql+redis")
            if full and "raw_mysql" in lim:
                goals.append(
                    f"saturated MySQL+Redis {full['rate']:,.0f} msgs/s = "
                    f"{full['rate'] / lim['raw_mysql']['rate']:.2f} of raw batched inserts "
                    f"({lim['raw_mysql']['rate']:,.0f} rows/s; goal >= 0.9)"
                )
            lines += ["", "Goals (issue 19): " + "; ".join(goals) + "."]
    if "idle" in res:
        r = res["idle"]
        lines += [
            "",
            "## Idle connections",
            "",
            f"{r['idle_alive']:,} of {r['idle_opened']:,} idle connections held (server holds "
            f"{r['server_sockets']:,} sockets, from {', '.join(r['sources'])}), opened in "
            f"{r['idle_open_seconds']:.1f} s; server RSS **{r['rss_mb']:.0f} MB** "
            f"({r['rss_before_mb']:.0f} MB before, {r['kb_per_connection']:.1f} KB per connection); "
            f"idle CPU {100 * r['idle_cpu_cores']:.1f}% of a core; {r['counts'].get('OK', 0):,} messages "
            f"acked meanwhile (p99 {r['p99_ms']:.0f} ms); verified: {'yes' if r['verified'] else 'NO'}",
        ]
    if "client" in res:
        r = res["client"]
        lines += [
            "",
            "## Idle client",
            "",
            f"`eth client` polling anvil every second for {r['seconds']:.0f} s: "
            f"CPU **{100 * r['cores']:.2f}%** "
            f"of a core, RSS **{r['rss_mb']:.0f} MB**, {r['rows']} blocks stored; "
            f"verified: {'yes' if r['verified'] else 'NO'}",
        ]
    return "\n".join(lines) + "\n"


def comparison(before: dict[str, Any], after: dict[str, Any]) -> str:
    """A markdown table of the key numbers of an earlier run beside this one."""
    b, a = before["meta"]["label"], after["meta"]["label"]
    rows = [
        f"| {name} msgs/s | {before['ingest'][name]['rate']:,.0f} | {r['rate']:,.0f} | "
        f"{r['rate'] / before['ingest'][name]['rate']:.2f}x |"
        for name, r in after.get("ingest", {}).items()
        if name in before.get("ingest", {})
    ]
    for name, key in (
        ("MySQL+Redis server CPU µs/msg", "server"),
        ("MySQL+Redis mariadbd CPU µs/msg", "mariadbd"),
    ):
        try:
            x = before["ingest"]["mysql+redis"]["cpu"][key]["us_per_msg"]
            y = after["ingest"]["mysql+redis"]["cpu"][key]["us_per_msg"]
            rows.append(f"| {name} | {x:.0f} | {y:.0f} | {y / x:.2f}x |")
        except KeyError:
            pass
    for k in ("p50_ms", "p99_ms"):
        if "paced" in before and "paced" in after:
            rows.append(
                f"| {k[:3]} at 1,000 msgs/s (ms) | {before['paced'][k]:.1f} | {after['paced'][k]:.1f} | |"
            )
    if "idle" in before and "idle" in after:
        rows.append(
            f"| RSS with {after['idle']['idle_opened']:,} idle connections (MB) | "
            f"{before['idle']['rss_mb']:.0f} | {after['idle']['rss_mb']:.0f} | |"
        )
    return (
        "\n".join(["", f"## {b} → {a}", "", f"| | {b} | {a} | |", "|---|---|---|---|", *rows])
        + "\n"
    )


def plot(res: dict[str, Any], path: Path, before: dict[str, Any] | None) -> None:
    """Bar chart of acknowledged msgs/s per sink set (before/after), with the limits as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(res.get("ingest", {}))
    fig, ax = plt.subplots(figsize=(9, 5))
    width = 0.38 if before else 0.6
    xs = range(len(names))
    if before:
        ax.bar(
            [x - width / 2 for x in xs],
            [before.get("ingest", {}).get(n, {}).get("rate", 0) for n in names],
            width,
            label=before["meta"]["label"],
            color="#bbbbbb",
        )
        ax.bar(
            [x + width / 2 for x in xs],
            [res["ingest"][n]["rate"] for n in names],
            width,
            label=res["meta"]["label"],
            color="#3b6ea5",
        )
    else:
        ax.bar(
            list(xs),
            [res["ingest"][n]["rate"] for n in names],
            width,
            label=res["meta"]["label"],
            color="#3b6ea5",
        )
    lim = res.get("limits", {})
    if "raw_mysql" in lim:
        ax.axhline(
            lim["raw_mysql"]["rate"], color="#c0392b", ls="--", label="raw PyMySQL executemany"
        )
    if "seed" in res:
        ax.axhline(res["seed"]["rate"], color="#7f8c8d", ls=":", label="seed design (1 commit/msg)")
    ax.set_xticks(list(xs), names)
    ax.set_ylabel("acknowledged messages / s")
    ax.set_title(
        f"eth server ingest, {res['meta']['clients']} clients, {res['meta']['messages']:,} messages"
    )
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main --------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Run the selected sections; print and write the results."""
    p = argparse.ArgumentParser(prog="bench/run", description=__doc__.splitlines()[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help="smaller runs (20,000 messages, 20 clients, short waits)",
    )
    p.add_argument("--messages", type=int)
    p.add_argument("--clients", type=int)
    p.add_argument(
        "--repeat",
        type=int,
        help="runs of each ingest row and of the paced latency (the median is reported)",
    )
    p.add_argument(
        "--sinks", default=",".join(SINK_SETS), help="comma list of " + ", ".join(SINK_SETS)
    )
    p.add_argument(
        "--only",
        default="ingest,seed,limits,paced,idle,client",
        help="comma list of sections: ingest, seed, limits, paced, idle, client",
    )
    p.add_argument("--label", default="current", help="names the results files (results-LABEL.*)")
    p.add_argument("--compare", help="label of an earlier run to plot beside this one")
    p.add_argument(
        "--code",
        default=str(ROOT),
        help="source tree the server runs from (default: this checkout)",
    )
    p.add_argument(
        "--profile", action="store_true", help="record a py-spy profile of the MySQL+Redis server"
    )
    p.add_argument(
        "--paced-rates",
        default="100,1000,5000",
        help="comma list of the offered rates (msgs/s) of the paced latency section",
    )
    p.add_argument(
        "--echo-delay",
        action="append",
        type=float,
        default=[],
        help="also measure the echo floor answering after this many seconds (repeatable)",
    )
    p.add_argument(
        "--server-arg",
        action="append",
        default=[],
        dest="server_args",
        help="extra option for every `eth server` (repeatable)",
    )
    opts = p.parse_args(argv)
    q = opts.quick
    opts.messages = opts.messages or (20_000 if q else 200_000)
    opts.clients = opts.clients or (20 if q else 50)
    opts.repeat = opts.repeat or (1 if q else 2)
    opts.seed_messages = 5_000 if q else 20_000
    opts.paced_rates = [float(r) for r in opts.paced_rates.split(",") if r]
    opts.paced_seconds = 5 if q else 20
    opts.echo_delays = [0.0, *opts.echo_delay]
    opts.commit_rows = 2_000 if q else 5_000
    opts.idle = 2_000 if q else 10_000
    opts.idle_messages = 1_000
    opts.client_seconds = 15 if q else 60
    opts.client_warmup = 5
    sections = set(opts.only.split(","))
    code = Path(opts.code).resolve()
    ensure_mysql_account()
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = "" if opts.label == "current" else f"-{opts.label}"

    res: dict[str, Any] = {
        "meta": {
            "label": opts.label,
            "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "host": platform.node(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "messages": opts.messages,
            "clients": opts.clients,
            "load_start": load_average(),
            "code": str(code),
            "server_args": opts.server_args,
            "server_prelude": os.environ.get("ETH_BENCH_PRELUDE", ""),
        }
    }
    block = 10_000_000

    def step(what: str) -> None:
        print(f"[bench] {time.strftime('%H:%M:%S')} load {load_average():.2f}: {what}", flush=True)

    if "paced" in sections:
        # First, on a rested machine: after minutes of saturation this VM's host slows
        # it down (steal time), and the paced numbers then measure the benchmark's own
        # preceding load rather than the server (bench/README.md, second round).
        res["paced_rates"] = []
        for rate in opts.paced_rates:
            step(f"latency at {rate:,.0f} msgs/s")
            profile = (
                RESULTS / f"profile-paced{suffix}.txt" if opts.profile and rate == 1000 else None
            )
            r = paced_latency(opts, code, rate, block, profile)
            res["paced_rates"].append(r)
            if rate == 1000 or "paced" not in res:
                res["paced"] = r  # the headline row (and what --compare reads)
            block += paced_messages(opts, rate) * opts.repeat
    if "limits" in sections:
        res["limits"] = {}
        step("raw PyMySQL executemany")
        res["limits"]["raw_mysql"] = raw_mysql(opts.messages)
        step("raw PyMySQL one commit per row")
        res["limits"]["raw_mysql_per_row"] = raw_mysql_per_row(2_000 if q else 5_000)
        step("raw Redis EVALSHA per 500")
        res["limits"]["raw_redis"] = raw_redis(opts.messages)
    if "ingest" in sections:
        res["ingest"] = {}
        for sinks in opts.sinks.split(","):
            runs = []
            for i in range(opts.repeat):
                step(f"ingest {sinks} run {i + 1}/{opts.repeat}")
                profile = (
                    RESULTS / f"profile{suffix}.txt"
                    if opts.profile and sinks == "mysql+redis" and i == 0
                    else None
                )
                runs.append(ingest(sinks, opts, code, block, profile))
                block += opts.messages
            runs.sort(key=lambda r: r["rate"])
            best = runs[(len(runs) - 1) // 2]  # the median; of an even count, the slower middle run
            best["runs"] = [r["rate"] for r in runs]
            best["verified"] = all(r["verified"] for r in runs)
            best["problems"] = sum((r["problems"] for r in runs), [])
            res["ingest"][sinks] = best
            print("  " + fmt_ingest_row(sinks, best), flush=True)
    if "seed" in sections:
        step("seed-design baseline")
        res["seed"] = seed_baseline(opts, block)
        block += opts.seed_messages
    if "idle" in sections:
        step(f"{opts.idle} idle connections")
        res["idle"] = idle_connections(opts, code, block)
        block += opts.idle_messages
    if "client" in sections:
        step("idle client")
        res["client"] = client_cost(opts, code)

    full = res.get("ingest", {}).get("mysql+redis")
    lim = res.get("limits", {})
    ratios = {}
    if full and "raw_mysql" in lim:
        ratios["MySQL+Redis / raw batched insert"] = full["rate"] / lim["raw_mysql"]["rate"]
    if full and "seed" in res:
        ratios["MySQL+Redis / seed design"] = full["rate"] / res["seed"]["rate"]
    if "mysql" in res.get("ingest", {}) and "raw_mysql" in lim:
        ratios["MySQL / raw batched insert"] = (
            res["ingest"]["mysql"]["rate"] / lim["raw_mysql"]["rate"]
        )
    if full and "raw_redis" in lim:
        ratios["MySQL+Redis / raw Redis script rate"] = full["rate"] / lim["raw_redis"]["rate"]
    for r in res.get("paced_rates", []):
        commit = r.get("commit") or lim.get("raw_mysql_per_row")
        if commit:
            r["p50_vs_commit"] = r["p50_ms"] / commit["p50_ms"]
            r["p99_vs_commit"] = r["p99_ms"] / commit["p99_ms"]
    res["ratios"] = ratios
    res["meta"]["load_end"] = load_average()
    if len(res.get("ingest", {}).get("mysql+redis", {}).get("runs", [])) > 1:
        runs = res["ingest"]["mysql+redis"]["runs"]
        res["meta"]["mysql_redis_spread"] = (max(runs) - min(runs)) / statistics.median(runs)

    text = report(res)
    before = None
    if opts.compare and (RESULTS / f"results-{opts.compare}.json").exists():
        before = json.loads((RESULTS / f"results-{opts.compare}.json").read_text())
        text += comparison(before, res)
    print()
    print(text)
    (RESULTS / f"results{suffix}.json").write_text(json.dumps(res, indent=1, default=str))
    (RESULTS / f"results{suffix}.md").write_text(text)
    try:
        import matplotlib  # noqa: F401  (the bench extra; without it, no plot)
    except ImportError:
        print("[bench] no matplotlib (bench/run installs it): no plot")
    else:
        if res.get("ingest"):
            plot(res, RESULTS / f"ingest{suffix}.png", before)
    print(f"[bench] wrote {RESULTS}/results{suffix}.md, .json, ingest{suffix}.png")
    return 0 if all(r.get("verified", True) for r in _checked(res)) else 1


def _checked(res: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from res.get("ingest", {}).values()
    for k in ("seed", "idle", "client"):
        if k in res:
            yield res[k]
    for r in res.get("paced_rates", [res["paced"]] if "paced" in res else []):
        yield r
        yield from r.get("floor", [])
    yield from res.get("limits", {}).values()


if __name__ == "__main__":
    raise SystemExit(main())
