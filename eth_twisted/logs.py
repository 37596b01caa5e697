"""Log output: Twisted's text lines, or one JSON object per line (``--log-format json``).

A JSON line has ``time`` (ISO 8601, UTC), ``level``, ``namespace`` and ``message``, then the
event's own fields made JSON-safe; a failure becomes ``exception`` and ``traceback`` fields.
Secrets never reach the output: a field whose name says it holds one (password, secret,
token, authorization, ...) is masked with :func:`eth_twisted.options.mask`, and
``user:password@`` in any URL, in fields and in the message, becomes ``user:***@``.

Under twistd: ``twistd --logger=eth_twisted.logs.json_observer eth-server ...``.
"""

from __future__ import annotations

import datetime
import json
import math
import re
import sys
from collections.abc import Iterable, Mapping
from typing import IO, Any

from constantly import NamedConstant
from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    PredicateResult,
    formatEvent,
    textFileLogObserver,
)

from eth_twisted.options import mask

FORMATS = ("text", "json")
"""The values of ``--log-format``."""

QUIET_NAMESPACES = (
    "twisted.web.client._HTTP11ClientFactory",
    "eth_twisted.web.limits.GuardedSite",
    "twisted.application._client_service._Core",
    "twisted.application._client_service.ClientService",
)
"""Namespaces whose info-level chatter is dropped unless --verbose: factory start and stop,
and ClientService's "Scheduling retry" line per attempt (outages are logged once per episode)."""

SECRET_KEY = re.compile(r"pass|secret|token|authori[sz]ation|credential|api_?key|private", re.I)
"""Field names whose values are secrets (``mysql_pass``, ``shared_secret``, ``api_token``...)."""

URL_CREDENTIALS = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*):[^@/\s]*@")
"""``scheme://user:password@`` in any text: the password is replaced."""

RESERVED = ("time", "level", "namespace", "message", "exception", "traceback")
"""Keys of every JSON line; an event field with one of these names is written as ``field_<name>``."""

_SKIPPED = {"format", "message", "isError", "failure", "why", "log_logger", "log_source"}
"""Event keys that are Twisted's bookkeeping (their content is in ``message``/``traceback``)."""

MAX_TEXT = 10_000
"""Longest string value written (payload text in an event stays bounded)."""


def redact_text(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@`` replaced by ``***``."""
    return URL_CREDENTIALS.sub(r"\1:***@", text)


def json_safe(value: Any, depth: int = 0) -> Any:
    """``value`` as something :func:`json.dumps` writes, with URL credentials redacted."""
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str):
        return redact_text(value[:MAX_TEXT])
    if isinstance(value, NamedConstant):
        return value.name
    if depth < 4 and isinstance(value, Mapping):
        return {str(k): safe_field(str(k), v, depth + 1) for k, v in value.items()}
    if depth < 4 and isinstance(value, list | tuple | set | frozenset):
        return [json_safe(v, depth + 1) for v in value]
    return redact_text(repr(value)[:MAX_TEXT])


def safe_field(name: str, value: Any, depth: int = 0) -> Any:
    """One field's value: masked when its name says it is a secret, else :func:`json_safe`."""
    if SECRET_KEY.search(name) and not isinstance(value, bool):
        return mask(value)
    return json_safe(value, depth)


def event_as_dict(event: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON object one Twisted log event is written as."""
    when = datetime.datetime.fromtimestamp(
        float(event.get("log_time") or 0.0), tz=datetime.timezone.utc
    )
    level = event.get("log_level")
    if level is None:
        level = LogLevel.error if event.get("isError") else LogLevel.info
    try:
        message = formatEvent(dict(event))
    except Exception as e:  # formatEvent reports its own failures; never lose the line
        message = f"unformattable event: {e!r}"
    out: dict[str, Any] = {
        "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "level": str(getattr(level, "name", level)),
        "namespace": str(event.get("log_namespace") or "log_legacy"),
        "message": redact_text(message or ""),
    }
    for key, value in event.items():
        if key in _SKIPPED or (key.startswith("log_") and key != "log_system"):
            continue
        if key == "time" and value == event.get("log_time"):
            continue  # a legacy event's copy of log_time
        name = "system" if key == "log_system" else key
        if name in RESERVED:
            name = f"field_{name}"
        out[name] = safe_field(name, value)
    failure = event.get("log_failure") or event.get("failure")
    if failure is not None:
        try:
            out["exception"] = redact_text(f"{failure.type.__name__}: {failure.getErrorMessage()}")
            out["traceback"] = redact_text(failure.getTraceback())
        except Exception:  # a malformed failure object: keep what repr gives
            out["exception"] = redact_text(repr(failure)[:MAX_TEXT])
    return out


def format_json(event: Mapping[str, Any]) -> str:
    """One event as a JSON line (with its newline)."""
    return json.dumps(event_as_dict(event), ensure_ascii=False, default=str) + "\n"


def drop_chatter(event: Mapping[str, Any]) -> PredicateResult:
    """Drop the info-level lines of :data:`QUIET_NAMESPACES`."""
    level = event.get("log_level")
    if (
        event.get("log_namespace") in QUIET_NAMESPACES
        and level is not None
        and level < LogLevel.warn
    ):
        return PredicateResult.no  # type: ignore[no-any-return]  # Twisted's constant, untyped
    return PredicateResult.maybe  # type: ignore[no-any-return]


def observer_for(
    log_format: str,
    stream: IO[str] | None = None,
    level: LogLevel = LogLevel.info,
    quiet_namespaces: bool = True,
) -> ILogObserver:
    """A filtering observer writing ``log_format`` (text or json) lines to ``stream`` (stdout)."""
    out = stream or sys.stdout
    if log_format == "json":
        base: ILogObserver = FileLogObserver(out, format_json)
    elif log_format == "text":
        base = textFileLogObserver(out)
    else:
        raise ValueError(f"--log-format: text or json, got {log_format!r}")
    predicates: list[Any] = [LogLevelFilterPredicate(defaultLogLevel=level)]
    if quiet_namespaces:
        predicates.insert(0, drop_chatter)
    return FilteringLogObserver(base, predicates)


def json_observer() -> ILogObserver:
    """JSON lines on standard output at info level: ``twistd --logger=eth_twisted.logs.json_observer``."""
    return observer_for("json")


def parse_log_format(value: str) -> str:
    """The ``--log-format`` coercer: ``text`` or ``json``."""
    chosen = value.strip().lower()
    if chosen not in FORMATS:
        raise ValueError(f"text or json, got {value!r}")
    return chosen


def _checked(value: str) -> str:
    try:
        return parse_log_format(value)
    except ValueError as e:
        raise ValueError(f"--log-format: {e}") from None


def split_log_format(argv: Iterable[str], default: str = "text") -> tuple[str, list[str]]:
    """``(format, the other arguments)``: takes ``--log-format X`` from anywhere in ``argv``."""
    rest: list[str] = []
    chosen = default
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            rest += args[i:]
            break
        if arg == "--log-format" and i + 1 < len(args):
            chosen = _checked(args[i + 1])
            i += 2
            continue
        if arg.startswith("--log-format="):
            chosen = _checked(arg.partition("=")[2])
        else:
            rest.append(arg)
        i += 1
    return chosen, rest
