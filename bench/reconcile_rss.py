"""Peak RSS of one Redis reconciliation against a MariaDB record of large rows.

Usage::

    .venv/bin/python bench/reconcile_rss.py [--rows 5000] [--size 65536] [--code DIR ...]

It creates a database of its own (``eth_test_rss_<hex>``, as the test account,
``ETH_TEST_MYSQL_*``), fills ``ethereum_data`` with ``--rows`` distinct payloads
of ``--size`` bytes, then runs each measurement in a fresh child process, so
every child's peak RSS (``VmHWM``) is its own:

* ``payloads``: the baseline, measured in the same run: reading every row with
  its payload once (``fetch_records``), what a reconciliation cost when it read
  whole records;
* ``reconcile``: ``RedisSink.reconcile(record)`` into an empty Redis prefix of
  its own (``ethbench:<hex>:``) on 127.0.0.1:6379 (``ETH_TEST_REDIS_*``), with
  the code of each ``--code DIR`` (default: this tree; pass an older checkout
  to measure before and after in one run).

Each child reports its RSS once the sinks are started and its peak after the
work; the growth is the difference. The database and the Redis keys are
dropped afterwards. ``tests/sinks/test_reconcile.py`` runs the same children.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from eth_twisted.sinks.redis import RedisSettings
from eth_twisted.sinks.sql.pool import MySQLSettings

ROOT = Path(__file__).resolve().parent.parent

MYSQL = {
    "host": os.environ.get("ETH_TEST_MYSQL_HOST", "127.0.0.1"),
    "port": int(os.environ.get("ETH_TEST_MYSQL_PORT", "3306")),
    "user": os.environ.get("ETH_TEST_MYSQL_USER", "eth_test"),
    "password": os.environ.get("ETH_TEST_MYSQL_PASS", "eth-test-password"),
}
REDIS = {
    "host": os.environ.get("ETH_TEST_REDIS_HOST", "127.0.0.1"),
    "port": int(os.environ.get("ETH_TEST_REDIS_PORT", "6379")),
}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _rss_kib() -> int:
    """The current resident set (VmRSS), KiB."""
    return _status_kib("VmRSS")


def _peak_kib() -> int:
    """The peak resident set of this process image so far (VmHWM), KiB.

    Not ``ru_maxrss``: Linux carries that across fork and exec, so a child of a
    large parent (pytest) would start at the parent's peak.
    """
    return _status_kib("VmHWM")


def fill(db: dict[str, Any], rows: int, size: int) -> None:
    """Create the schema in ``db`` and insert ``rows`` distinct payloads of ``size`` bytes."""
    import hashlib

    import pymysql

    from eth_twisted.sinks.sql.migrations import migrate_mysql
    from eth_twisted.sinks.sql.pool import MySQLSettings

    migrate_mysql(
        MySQLSettings(
            mysql_host=db["host"],
            mysql_port=db["port"],
            mysql_user=db["user"],
            mysql_pass=db["password"],
            mysql_db=db["database"],
        )
    )
    conn = pymysql.connect(
        host=db["host"],
        port=db["port"],
        user=db["user"],
        password=db["password"],
        database=db["database"],
        autocommit=False,
    )
    try:
        with conn.cursor() as c:
            batch: list[tuple[Any, ...]] = []
            for i in range(rows):
                payload = i.to_bytes(8, "big") * (size // 8) + b"x" * (size % 8)
                batch.append(
                    (
                        hashlib.sha256(payload).hexdigest(),
                        payload,
                        i,
                        f"10.{i % 200}.0.1",
                        1_700_000_000 + i,
                    )
                )
                if len(batch) == 40 or i == rows - 1:
                    c.executemany(
                        "INSERT INTO ethereum_data (hash, payload, block_number, client_ip, "
                        "received_at) VALUES (%s, %s, %s, %s, FROM_UNIXTIME(%s))",
                        batch,
                    )
                    conn.commit()
                    batch = []
    finally:
        conn.close()


def create_database() -> dict[str, Any]:
    """A fresh database of this run's own (the test account may create ``eth_test_*``)."""
    import pymysql

    name = "eth_test_rss_" + secrets.token_hex(5)
    conn = pymysql.connect(**MYSQL, autocommit=True)
    try:
        with conn.cursor() as c:
            c.execute(f"CREATE DATABASE `{name}`")
    finally:
        conn.close()
    return dict(MYSQL, database=name)


def drop_database(db: dict[str, Any]) -> None:
    """Drop what :func:`create_database` made."""
    import pymysql

    conn = pymysql.connect(**MYSQL, autocommit=True)
    try:
        with conn.cursor() as c:
            c.execute(f"DROP DATABASE IF EXISTS `{db['database']}`")
    finally:
        conn.close()


def measure(mode: str, db: dict[str, Any], code: str | None = None) -> dict[str, Any]:
    """Run one child (``payloads`` or ``reconcile``) with ``code`` first on its path; its report."""
    env = dict(os.environ)
    if code:
        env["PYTHONPATH"] = os.pathsep.join([code, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--db", json.dumps(db)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=code or str(ROOT),
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} child failed:\n{proc.stdout}\n{proc.stderr}")
    report: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    report["growth_kib"] = report["peak_kib"] - report["base_kib"]
    return report


def _child(mode: str, db: dict[str, Any]) -> None:
    from twisted.internet import defer, task

    import eth_twisted
    from eth_twisted.sinks.redis import make_redis_sink
    from eth_twisted.sinks.sql.mysql import make_mysql_sink

    out: dict[str, Any] = {
        "mode": mode,
        "code": str(Path(eth_twisted.__file__).resolve().parent.parent),
    }

    async def run() -> None:
        record = make_mysql_sink(
            MySQLSettings(
                mysql_host=db["host"],
                mysql_port=db["port"],
                mysql_user=db["user"],
                mysql_pass=db["password"],
                mysql_db=db["database"],
            ),
            migrate=False,
        )
        await record.start()
        prefix = f"ethbench:{secrets.token_hex(5)}:"
        redis = make_redis_sink(
            RedisSettings(
                redis_host=REDIS["host"],
                redis_port=REDIS["port"],
                redis_prefix=prefix,
                redis_timeout=30,
            )
        )
        try:
            await redis.start()
            out["base_kib"], out["base_peak_kib"] = _rss_kib(), _peak_kib()
            started = time.perf_counter()
            if mode == "reconcile":
                result = await redis.reconcile(record)
                out["records"], out["hashes_added"] = result.records, result.hashes_added
            else:
                rows = await record.fetch_records(0, 10**9)
                out["records"] = len(rows)
                out["payload_bytes"] = sum(len(r.payload) for r in rows)
                del rows
            out["seconds"] = round(time.perf_counter() - started, 3)
            out["peak_kib"] = _peak_kib()
            out["after_kib"] = _rss_kib()
            script = "for _,k in ipairs(redis.call('KEYS', ARGV[1])) do redis.call('DEL', k) end return 1"
            await redis._call("cleanup", "EVAL", script, 0, prefix + "*")
        finally:
            await redis.stop()
            await record.stop()
        print(json.dumps(out), flush=True)

    def main(_: Any) -> Any:
        return defer.ensureDeferred(run())

    task.react(main, [])  # exits the process with the outcome


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--size", type=int, default=65536)
    parser.add_argument(
        "--code",
        action="append",
        default=[],
        help="a source tree to run the reconcile child from (repeatable; default: this tree)",
    )
    parser.add_argument("--child", choices=["payloads", "reconcile"], help=argparse.SUPPRESS)
    parser.add_argument("--db", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, json.loads(args.db))
        return
    sys.path.insert(0, str(ROOT))
    db = create_database()
    try:
        print(f"filling {args.rows} rows of {args.size} bytes ...", flush=True)
        fill(db, args.rows, args.size)
        reports = [measure("payloads", db)]
        for code in args.code or [None]:
            reports.append(measure("reconcile", db, code))
    finally:
        drop_database(db)
    print(
        f"\n{'child':<10} {'code':<28} {'records':>8} {'base MiB':>9} "
        f"{'peak MiB':>9} {'growth MiB':>11} {'s':>7}"
    )
    for r in reports:
        print(
            f"{r['mode']:<10} {r['code'][-28:]:<28} {r['records']:>8} {r['base_kib'] / 1024:>9.1f} "
            f"{r['peak_kib'] / 1024:>9.1f} {r['growth_kib'] / 1024:>11.1f} {r['seconds']:>7.2f}"
        )
    print(json.dumps(reports))


if __name__ == "__main__":
    main()
