"""Private services the fault suite may SIGKILL, SIGSTOP and restart, and the eth daemons as subprocesses.

Never the machine's shared MariaDB or Redis: each instance here runs on a
free loopback port with its own data directory under /tmp.

- :class:`PrivateMariaDB`: ``mariadb-install-db`` into a temporary datadir,
  then ``mariadbd --no-defaults`` on a free port; a user with a password is
  created over the private socket and tests connect over TCP as that user.
- :class:`FaultRedis`: :class:`tests.support.PrivateRedis` plus SIGSTOP/SIGCONT,
  down/up on the same port, and a tiny blocking RESP client.
- :class:`EthProcess`: ``eth server`` / ``eth client`` (or anything) as a
  subprocess logging to a file, with kill/stop/restart and log tails.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pymysql

from tests.support import (
    VENV_BIN,
    PrivateRedis,
    free_port,
    redis_command,
    stop_process,
    wait_until,
)

ROOT = Path(__file__).resolve().parent.parent.parent


def _which(*names: str) -> str:
    for name in names:
        for candidate in (shutil.which(name), f"/usr/sbin/{name}", f"/usr/bin/{name}"):
            if candidate and os.access(candidate, os.X_OK):
                return candidate
    raise AssertionError(f"none of {names} is installed (apt-get install mariadb-server)")


def _tail(path: str | os.PathLike[str], lines: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""
    return "\n".join(data.splitlines()[-lines:])


class PrivateMariaDB:
    """A mariadbd of the suite's own on a free loopback port.

    The datadir is created once (``mariadb-install-db``, ~1.2 s here) and kept
    across :meth:`kill`/:meth:`start`, so a restart finds the data (InnoDB
    crash recovery after SIGKILL). Start to ready takes ~0.3 s. Tests connect
    over TCP as ``user``/``password``; root is used only over the socket, to
    provision and to set globals.
    """

    def __init__(
        self,
        base_dir: str | None = None,
        *,
        database: str = "eth_fault",
        user: str = "eth_fault",
        wait_timeout: int | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.base = base_dir or tempfile.mkdtemp(prefix="eth-mariadb-")
        self.datadir = os.path.join(self.base, "data")
        self.socket = os.path.join(self.base, "mysqld.sock")
        self.pidfile = os.path.join(self.base, "mysqld.pid")
        self.log_path = os.path.join(self.base, "error.log")
        self.port = free_port()
        self.database = database
        self.user = user
        self.password = "pw-" + secrets.token_hex(8)
        self.wait_timeout = wait_timeout
        self.extra_args = list(extra_args)
        self.proc: subprocess.Popen[bytes] | None = None
        self.provisioned = False
        self.start_seconds: list[float] = []
        self.install_seconds: float | None = None
        self._as_root = os.geteuid() == 0

    # -- facts

    @property
    def info(self) -> dict[str, Any]:
        """Connection facts in the shape of the ``mysql_db`` fixture."""
        return {
            "host": "127.0.0.1",
            "port": self.port,
            "user": self.user,
            "password": self.password,
            "database": self.database,
        }

    @property
    def pid(self) -> int | None:
        """The running mariadbd's pid, if any."""
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def running(self) -> bool:
        """True while the process exists (stopped counts as running)."""
        return self.pid is not None

    # -- life cycle

    def install(self) -> None:
        """Create the datadir (once)."""
        if os.path.isdir(os.path.join(self.datadir, "mysql")):
            return
        os.makedirs(self.base, exist_ok=True)
        args = [
            _which("mariadb-install-db", "mysql_install_db"),
            "--no-defaults",
            f"--datadir={self.datadir}",
            "--auth-root-authentication-method=normal",
            "--skip-test-db",
            "--skip-name-resolve",
        ]
        if self._as_root:
            shutil.chown(self.base, "mysql", "mysql")
            args.append("--user=mysql")
        begun = time.monotonic()
        out = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
        self.install_seconds = time.monotonic() - begun
        if out.returncode != 0:
            raise AssertionError(
                f"mariadb-install-db failed: {out.stdout.decode(errors='replace')[-2000:]}"
            )

    def command_line(self) -> list[str]:
        """The mariadbd command line."""
        args = [
            _which("mariadbd", "mysqld"),
            "--no-defaults",
            f"--datadir={self.datadir}",
            f"--port={self.port}",
            "--bind-address=127.0.0.1",
            f"--socket={self.socket}",
            f"--pid-file={self.pidfile}",
            f"--log-error={self.log_path}",
            "--skip-name-resolve",
            "--skip-log-bin",
            "--innodb-buffer-pool-size=32M",
            "--max-connections=200",
        ]
        if self.wait_timeout is not None:
            args.append(f"--wait-timeout={self.wait_timeout}")
        if self._as_root:
            args.append("--user=mysql")
        return args + self.extra_args

    def start(self, timeout: float = 60.0) -> float:
        """Start it (installing first if needed), wait until ready, return the seconds it took."""
        if self.running():
            raise AssertionError("PrivateMariaDB is already running")
        self.install()
        begun = time.monotonic()
        self.proc = subprocess.Popen(
            self.command_line(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self.wait_ready(timeout)
        if not self.provisioned:
            self._provision()
        took = time.monotonic() - begun
        self.start_seconds.append(took)
        return took

    def _root(self) -> pymysql.connections.Connection:
        return pymysql.connect(
            unix_socket=self.socket, user="root", connect_timeout=2, autocommit=True
        )

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Block until mariadbd answers over its socket; fail early if it died."""

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(
                    f"mariadbd exited with {self.proc.returncode}:\n{self.log_tail(30)}"
                )
            conn = self._root()
            conn.close()
            return True

        try:
            wait_until(ready, timeout, interval=0.05, what=f"private MariaDB on {self.port}")
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.log_tail(30)}") from None

    def _provision(self) -> None:
        conn = self._root()
        try:
            with conn.cursor() as c:
                c.execute(f"CREATE DATABASE IF NOT EXISTS `{self.database}`")
                for host in ("127.0.0.1", "localhost"):
                    c.execute(
                        "CREATE USER IF NOT EXISTS %s@%s IDENTIFIED BY %s",
                        (self.user, host, self.password),
                    )
                    # its own database and every eth_f_* one new_database() makes
                    c.execute(
                        f"GRANT ALL PRIVILEGES ON `{self.database}`.* TO %s@%s", (self.user, host)
                    )
                    c.execute(
                        "GRANT ALL PRIVILEGES ON `eth\\_f\\_%%`.* TO %s@%s", (self.user, host)
                    )
        finally:
            conn.close()
        self.provisioned = True

    def kill(self, sig: int = signal.SIGKILL, wait: float = 30.0) -> None:
        """Send ``sig``; for SIGKILL/SIGTERM wait until the process is gone."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        if sig in (signal.SIGKILL, signal.SIGTERM):
            self.proc.wait(wait)

    def pause(self) -> None:
        """SIGSTOP: connections stay open, nothing answers (returns once the process is stopped)."""
        self.kill(signal.SIGSTOP)
        pid = self.proc.pid if self.proc is not None else None
        if pid is not None:
            wait_until(
                lambda: _proc_state(pid) in ("T", "t"), 5, interval=0.01, what="mariadbd to stop"
            )

    def resume(self) -> None:
        """SIGCONT."""
        self.kill(signal.SIGCONT)

    def stop(self) -> None:
        """Graceful shutdown (SIGCONT first in case it is stopped, then SIGTERM)."""
        if self.running():
            self.resume()
            self.kill(signal.SIGTERM)

    def restart(self, sig: int = signal.SIGKILL) -> float:
        """Kill with ``sig`` and start again on the same port and datadir; return start seconds."""
        if self.running():
            self.resume()
            self.kill(sig)
        return self.start()

    def destroy(self) -> None:
        """Stop (hard) and delete the datadir."""
        if self.running():
            self.resume()
            self.kill(signal.SIGKILL)
        shutil.rmtree(self.base, ignore_errors=True)

    # -- reading and tuning

    def connect(self, database: str | None = None, **kwargs: Any) -> pymysql.connections.Connection:
        """A new TCP connection as the test user."""
        return pymysql.connect(
            host="127.0.0.1",
            port=self.port,
            user=self.user,
            password=self.password,
            database=database or self.database,
            autocommit=True,
            connect_timeout=kwargs.pop("connect_timeout", 5),
            read_timeout=kwargs.pop("read_timeout", 30),
            **kwargs,
        )

    def query(self, sql: str, args: Any = None) -> list[tuple[Any, ...]]:
        """Run one statement as the test user and return every row."""
        conn = self.connect()
        try:
            with conn.cursor() as c:
                c.execute(sql, args)
                return list(c.fetchall())
        finally:
            conn.close()

    def new_database(self) -> dict[str, Any]:
        """Create a fresh empty database, make it the default for :meth:`query`, return :attr:`info`."""
        name = "eth_f_" + secrets.token_hex(5)
        conn = self._root()
        try:
            with conn.cursor() as c:
                c.execute(f"CREATE DATABASE `{name}`")
        finally:
            conn.close()
        self.database = name
        return self.info

    def set_global(self, name: str, value: int | str) -> None:
        """``SET GLOBAL name = value`` as root (affects new sessions only)."""
        if not name.replace("_", "").isalnum():
            raise ValueError(name)
        conn = self._root()
        try:
            with conn.cursor() as c:
                c.execute(f"SET GLOBAL {name} = %s", (value,))
        finally:
            conn.close()

    def processlist(self) -> list[tuple[Any, ...]]:
        """The test user's sessions (id, host, command, time)."""
        conn = self._root()
        try:
            with conn.cursor() as c:
                c.execute(
                    "SELECT id, host, command, time FROM information_schema.processlist WHERE user = %s",
                    (self.user,),
                )
                return list(c.fetchall())
        finally:
            conn.close()

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of mariadbd's error log."""
        return _tail(self.log_path, lines)


# -- Redis


class FaultRedis(PrivateRedis):
    """A private Redis the suite may SIGKILL, SIGSTOP, or keep down for a while, on a fixed port."""

    def command(self, *args: Any) -> Any:
        """One blocking command against it."""
        return redis_command("127.0.0.1", self.port, *args)

    def pause(self) -> None:
        """SIGSTOP."""
        self.kill(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT."""
        self.kill(signal.SIGCONT)

    def down(self) -> None:
        """SIGKILL and stay down (the port refuses connections) until :meth:`start`."""
        self.kill(signal.SIGKILL)

    def running(self) -> bool:
        """True while the process exists."""
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of its log."""
        return _tail(self.logfile, lines)


# -- the daemons


class EthProcess:
    """One ``eth`` subcommand (or any command) as a subprocess logging to a file.

    ``args`` follow the executable; ``env`` adds to the environment (use it for
    secrets such as ``ETH_MYSQL_PASS``: never on argv). Each start appends to
    the same log, preceded by a marker line.
    """

    def __init__(
        self,
        args: Sequence[str],
        log_path: str,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        executable: str | None = None,
        preexec_fn: Any = None,
    ) -> None:
        self.executable = executable or str(VENV_BIN / "eth")
        self.args = list(args)
        self.log_path = log_path
        self.env = dict(env or {})
        self.cwd = cwd
        self.preexec_fn = preexec_fn
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        """Start it (no waiting: see :meth:`wait_port` / :meth:`wait_log`)."""
        if self.running():
            raise AssertionError(f"{self.args[:1]} is already running")
        env = dict(os.environ, **self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== start {self.starts + 1}: {' '.join(self.args)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [self.executable, *self.args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.cwd,
                preexec_fn=self.preexec_fn,
            )
        self.starts += 1

    def running(self) -> bool:
        """True while the process exists."""
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        """Exit status of the last run, None while running."""
        return None if self.proc is None else self.proc.poll()

    def kill(self, sig: int = signal.SIGKILL, wait: float = 30.0) -> int | None:
        """Send ``sig``; for SIGKILL/SIGTERM/SIGINT wait until it is gone and return its status."""
        if not self.running():
            return self.returncode
        assert self.proc is not None
        self.proc.send_signal(sig)
        if sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT):
            try:
                return self.proc.wait(wait)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                raise AssertionError(
                    f"{self.args[:1]} did not exit within {wait}s of signal {sig}"
                ) from None
        return None

    def stop(self) -> None:
        """SIGCONT (in case) then SIGTERM, SIGKILL after 15 s; never raises."""
        if self.running():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGCONT)
            stop_process(self.proc, grace=15)

    def restart(self, sig: int = signal.SIGKILL) -> None:
        """Kill with ``sig`` and start again."""
        self.kill(sig)
        self.start()

    def log_tail(self, lines: int = 40) -> str:
        """The last lines it logged."""
        return _tail(self.log_path, lines)

    def log_text(self) -> str:
        """Everything it logged."""
        try:
            return Path(self.log_path).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_port(self, port: int, timeout: float = 30.0) -> None:
        """Block until ``port`` accepts connections, failing early if the process exits."""

        def up() -> bool:
            if not self.running():
                raise AssertionError(
                    f"{self.args[:1]} exited with {self.returncode}:\n{self.log_tail()}"
                )
            with socket.socket() as s:
                s.settimeout(0.3)
                return s.connect_ex(("127.0.0.1", port)) == 0

        try:
            wait_until(up, timeout, interval=0.05, what=f"port {port}")
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.log_tail()}") from None

    def wait_log(self, text: str, timeout: float = 30.0, after: int = 0) -> None:
        """Block until ``text`` appears in the log (after character ``after``)."""
        wait_until(
            lambda: text in self.log_text()[after:],
            timeout,
            interval=0.1,
            what=f"log line {text!r}",
        )


def _proc_state(pid: int) -> str:
    """The one-letter state of a process (R, S, T, ...) from /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "?"
    return stat.rsplit(")", 1)[1].split()[0]
