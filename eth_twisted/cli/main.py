"""The ``eth`` console script: ``eth [--verbose] [--wait N] server|client|run|stats|migrate``.

``eth server`` and ``eth client`` take the same options as the twistd
plugins and run the same services, logging to standard output. ``eth run``
runs both in one process on the embedded defaults.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any

from twisted.logger import LogLevel, globalLogBeginner
from twisted.python import usage

from eth_twisted import __version__
from eth_twisted.cli import migrate as migrate_cli
from eth_twisted.interfaces import maybe_global_reactor
from eth_twisted.logs import (
    QUIET_NAMESPACES,
    drop_chatter,
    observer_for,
    parse_log_format,
    split_log_format,
)
from eth_twisted.options import PRECEDENCE, EnvOptions, non_negative_float
from eth_twisted.server import tap as server_tap


def _client_options() -> usage.Options:
    from eth_twisted.client import tap as client_tap

    return client_tap.Options()


def _run_options() -> usage.Options:
    from eth_twisted.cli.run import RunOptions

    return RunOptions()


def _stats_options() -> usage.Options:
    from eth_twisted.cli import stats as stats_cli

    return stats_cli.Options()


def _status_options() -> usage.Options:
    from eth_twisted.cli import status as status_cli

    return status_cli.Options()


class Options(EnvOptions):
    """The ``eth`` command line."""

    synopsis = (
        "eth [--verbose] [--wait SECONDS] [--log-format text|json] "
        "server|client|run|stats|status|migrate [options]"
    )
    longdesc = (
        "Ethereum chain-head relay. `eth COMMAND --help` lists each command's options. "
        + PRECEDENCE
    )
    optFlags = [["verbose", "v", "Log at debug level (every message received, every poll)"]]
    optParameters = [
        ["wait", None, 0.0, "Sleep this many seconds before starting", non_negative_float],
        [
            "log-format",
            None,
            "text",
            "Log lines as text, or json (one object per line); accepted after the command too",
            parse_log_format,
        ],
    ]
    subCommands = [
        ["server", None, server_tap.Options, "Run the eth-server"],
        ["client", None, _client_options, "Run the eth-client"],
        [
            "run",
            None,
            _run_options,
            "Run server and client in one process on the embedded defaults",
        ],
        ["stats", None, _stats_options, "Print the server's stats as a table"],
        ["status", None, _status_options, "Print the client's status as a table"],
        ["migrate", None, migrate_cli.MigrateOptions, "Apply schema migrations"],
    ]

    def opt_version(self) -> None:
        """Print the version and exit."""
        print(f"eth-twisted {__version__}")
        sys.exit(0)

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError(
                "a command is required: server, client, run, stats, status or migrate"
            )


_drop_chatter = drop_chatter
"""The chatter filter (:func:`eth_twisted.logs.drop_chatter`), under its old name."""


def start_logging(
    verbose: bool, stream: Any = None, quiet: bool = False, log_format: str = "text"
) -> None:
    """Log to standard output as ``log_format`` (text or json lines).

    Info level, debug with ``--verbose`` (chatter included), warnings only when ``quiet``.
    """
    level = LogLevel.debug if verbose else (LogLevel.warn if quiet else LogLevel.info)
    observer = observer_for(log_format, stream or sys.stdout, level, quiet_namespaces=not verbose)
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


def run_service(build: Callable[[Any], Any], reactor: Any = None) -> int:
    """Start the service ``build(reactor)`` returns, run the reactor, and return the exit code."""
    reactor = maybe_global_reactor(reactor)
    try:
        service = build(reactor)
        service.startService()
    except Exception as e:  # a bind failure or a bad file: loud, and exit 1
        print(f"eth: cannot start: {e}", file=sys.stderr)
        return 1
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()
    return int(getattr(service, "exit_code", 0) or 0)


EXIT_BROKEN_PIPE = 128 + 13
"""Exit status when standard output was closed under us (``eth server --help | head``):
128 + SIGPIPE, what a shell reports for a command killed by a closed pipe."""


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``eth`` console script.

    A reader that closes the pipe early (``eth server --help | head``) ends the command
    quietly with :data:`EXIT_BROKEN_PIPE` instead of a ``BrokenPipeError`` traceback.
    """
    try:
        try:
            return _main(sys.argv[1:] if argv is None else argv)
        finally:
            # Also on SystemExit (--help, --version): a failed flush is caught below.
            sys.stdout.flush()
    except BrokenPipeError:
        # Python's advice (signal module docs): point stdout at /dev/null, so the
        # interpreter's final flush at exit does not fail a second time.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_BROKEN_PIPE


def _main(argv: list[str]) -> int:
    config = Options()
    try:
        given_format, argv = split_log_format(argv, default="")
        config.parseOptions(argv)
    except (usage.UsageError, ValueError) as e:
        where = f"eth {config.subCommand}" if config.subCommand else "eth"
        print(f"{where}: {e}", file=sys.stderr)
        print(f"Try '{where} --help'.", file=sys.stderr)
        return 2
    sub = config.subOptions
    verbose = bool(config["verbose"] or sub.get("verbose", False))
    if config["wait"]:
        time.sleep(config["wait"])
    command = config.subCommand
    log_format = given_format or config["log-format"]
    if log_format == "json" and command in ("stats", "status", "migrate"):
        start_logging(verbose, quiet=True, log_format=log_format)
    if command == "stats":
        from eth_twisted.cli import stats as stats_cli

        return int(stats_cli.run(sub))
    if command == "status":
        from eth_twisted.cli import status as status_cli

        return int(status_cli.run(sub))
    if command == "migrate":
        return migrate_cli.migrate(sub)
    start_logging(verbose, quiet=command == "run", log_format=log_format)
    if command == "server":
        sub["verbose"] = verbose
        return run_service(lambda reactor: server_tap.makeService(sub, reactor))
    if command == "client":
        from eth_twisted.client import tap as client_tap

        sub["verbose"] = verbose
        return run_service(lambda reactor: client_tap.makeService(sub, reactor))
    if command == "run":
        from eth_twisted.cli.run import make_run_service

        return run_service(lambda reactor: make_run_service(sub, reactor, verbose=verbose))
    raise AssertionError(command)  # pragma: no cover - postOptions rejects others


__all__ = ["QUIET_NAMESPACES", "main", "start_logging"]

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
