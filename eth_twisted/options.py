"""Command-line options with environment fallbacks, and secrets.

Every option of the taps can also come from the environment as ``ETH_<OPTION>``
(``--redis-host`` -> ``ETH_REDIS_HOST``): :class:`EnvOptions`, with the README's
"Configuration rules" (precedence, flag values, lists). Secrets come from the environment,
a ``*-file`` option, or systemd's ``$CREDENTIALS_DIRECTORY``; on argv they still work but
log a warning. A settings dataclass field made with :func:`setting` is an option.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from twisted.python import reflect, usage

TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off"})

PRECEDENCE = (
    "Every option can also be set in the environment as ETH_<OPTION> "
    "(--redis-host -> ETH_REDIS_HOST); flags take 1/true/yes/on or "
    "0/false/no/off, repeatable options a comma-separated list. Precedence: "
    "command line, then environment, then default."
)


def env_name(option: str) -> str:
    """The environment variable for a long option name."""
    return "ETH_" + option.upper().replace("-", "_")


def parse_bool(value: str, name: str) -> bool:
    """A true/false word, or a UsageError naming ``name``."""
    word = value.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise usage.UsageError(
        f"{name}: expected one of 1/true/yes/on or 0/false/no/off, got {value!r}"
    )


def split_list(value: str) -> list[str]:
    """Items of a comma-separated list, stripped, empties dropped."""
    return [item.strip() for item in value.split(",") if item.strip()]


def state_path(filename: str, environ: Mapping[str, str] | None = None) -> str:
    """``filename`` in ``$STATE_DIRECTORY`` when set, else the working directory."""
    environ = os.environ if environ is None else environ
    state = environ.get("STATE_DIRECTORY", "").split(":")[0]
    return str(Path(state) / filename) if state else filename


def int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    """A coerce function for integers in ``low..high``."""

    def coerce(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise ValueError(f"expected an integer, got {value!r}")
        if number < low or (high is not None and number > high):
            bound = f"{low}..{high}" if high is not None else f">= {low}"
            raise ValueError(f"expected an integer {bound}, got {number}")
        return number

    coerce.coerceDoc = ""  # type: ignore[attr-defined]
    return coerce


def positive_float(value: str) -> float:
    """A coerce function for a positive number of seconds."""
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"expected a number, got {value!r}")
    if not number > 0:
        raise ValueError(f"expected a positive number, got {value!r}")
    return number


positive_float.coerceDoc = ""  # type: ignore[attr-defined]


def non_negative_float(value: str) -> float:
    """A coerce function for a number of seconds that may be zero."""
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"expected a number, got {value!r}")
    if number < 0:
        raise ValueError(f"expected a number >= 0, got {value!r}")
    return number


non_negative_float.coerceDoc = ""  # type: ignore[attr-defined]


def optional_positive_int(value: str) -> int | None:
    """A coerce function: ``off``/``none`` for None, else an integer >= 1."""
    if value.strip().lower() in ("off", "none", ""):
        return None
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"expected an integer >= 1 or 'off', got {value!r}")
    if number < 1:
        raise ValueError(f"expected an integer >= 1 or 'off', got {number}")
    return number


optional_positive_int.coerceDoc = ""  # type: ignore[attr-defined]


class EnvOptions(usage.Options):
    """``usage.Options`` that also reads ``ETH_*`` environment variables.

    Precedence: the command line, then the environment, then the default. Flags take
    ``1/true/yes/on`` and ``0/false/no/off``; repeatable options take comma-separated
    values, and a repeatable option on the command line replaces the environment's list.

    Subclasses declare ``optFlags``/``optParameters`` as usual. Options named
    in ``repeatable`` collect every occurrence into a list (``opt_<name>``
    methods are generated); ``secrets`` names parameters that must not be on
    argv without a warning.
    """

    repeatable: ClassVar[tuple[str, ...]] = ()
    secrets: ClassVar[tuple[str, ...]] = ()

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self.environ = dict(os.environ if environ is None else environ)
        self.warnings: list[str] = []
        for name in self.repeatable:
            self._make_repeatable(name)
        super().__init__()
        for name in self.repeatable:
            self[name] = []
        for long in list(self.docs):
            if long not in ("help", "version"):
                self.docs[long] = f"{self.docs[long] or ''} [env {env_name(long)}]".strip()
        self._from_argv: set[str] = set()
        self._replaced: set[str] = set()
        for name, handler in list(self._dispatch.items()):
            if isinstance(handler, usage.CoerceParameter):
                self._dispatch[name] = _NamedCoerce(self, handler.coerce)

    def _make_repeatable(self, name: str) -> None:
        attr = "opt_" + name.replace("-", "_")

        def opt(self: EnvOptions, value: str) -> None:
            if name not in self._replaced:
                self[name] = []  # the command line replaces the environment's list
                self._replaced.add(name)
            self[name].extend(split_list(value))

        opt.__doc__ = getattr(type(self), f"doc_{name.replace('-', '_')}", f"--{name} (repeatable)")
        setattr(type(self), attr, opt)

    def parseOptions(self, options: list[str] | None = None) -> None:  # noqa: N802
        """Apply the environment, then argv, then run ``postOptions``."""
        self._apply_environment()
        argv_values = self._argv_long_names(options)
        self._from_argv |= argv_values
        for name in self.secrets:
            if name in argv_values:
                self.warnings.append(
                    f"--{name} on the command line is visible to every local user (ps, "
                    f"/proc); use {env_name(name)}, --{name}-file or "
                    f"$CREDENTIALS_DIRECTORY/{name} instead"
                )
        super().parseOptions(options)

    def _argv_long_names(self, options: list[str] | None) -> set[str]:
        names = set()
        for arg in options or []:
            if arg == "--":
                break
            if arg.startswith("--"):
                names.add(arg[2:].split("=", 1)[0])
        return names

    def _apply_environment(self) -> None:
        """Set every option whose ETH_* variable is present, coercing and checking it."""
        flag_specs: list[list[Any]] = []
        reflect.accumulateClassList(type(self), "optFlags", flag_specs)
        param_specs: list[list[Any]] = []
        reflect.accumulateClassList(type(self), "optParameters", param_specs)
        flags = {spec[0] for spec in flag_specs}
        for long in self.repeatable:
            raw = self.environ.get(env_name(long))
            if raw is not None:
                self[long] = split_list(raw)
        for long in flags:
            raw = self.environ.get(env_name(long))
            if raw is not None:
                self[long] = parse_bool(raw, env_name(long))
        for spec in param_specs:
            long = spec[0]
            raw = self.environ.get(env_name(long))
            if raw is None or long in self.repeatable:
                continue
            coerce = spec[4] if len(spec) > 4 and spec[4] is not None else None
            if coerce is not None:
                try:
                    self[long] = coerce(raw)
                except ValueError as e:
                    raise usage.UsageError(f"{env_name(long)}: {e}")
            else:
                self[long] = raw

    def from_argv(self, name: str) -> bool:
        """True when ``--name`` was given on the command line."""
        return name in self._from_argv

    def resolve_secret(self, name: str) -> str | None:
        """The secret ``name`` from argv/env, ``--<name>-file``, or the credentials dir.

        The file forms win over an empty value; a file that cannot be read is
        a UsageError naming it.
        """
        value = self.get(name)
        if value:
            return str(value)
        path = self.get(f"{name}-file")
        if not path:
            creds = self.environ.get("CREDENTIALS_DIRECTORY")
            if creds and (Path(creds) / name).exists():
                path = str(Path(creds) / name)
        if path:
            try:
                return Path(path).read_text(encoding="utf-8").rstrip("\r\n")
            except OSError as e:
                raise usage.UsageError(f"--{name}-file: cannot read {path}: {e.strerror}")
        return None


class _NamedCoerce(usage.CoerceParameter):
    """A CoerceParameter whose error names the option (``--port: expected an integer``)."""

    def dispatch(self, parameterName: str, value: str | None) -> None:  # noqa: N803
        if value is None:
            raise usage.UsageError(f"--{parameterName} requires an argument")
        try:
            self.options.opts[parameterName] = self.coerce(value)
        except ValueError as e:
            raise usage.UsageError(f"--{parameterName}: {e}")


# -- settings dataclasses and their Options rows --------------------------------------
#
# Each component takes one settings dataclass. A field that is also an option is
# declared with :func:`setting`: its default and help are written there once, and
# the tap's Options rows come from it (:func:`option_rows`, :func:`flag_rows`), so
# the option ``--batch-delay`` is the field ``batch_delay`` all the way down.

S = TypeVar("S")


def setting(
    default: Any,
    help: str,
    coerce: Callable[[str], Any] | None = None,
    *,
    option: str | None = None,
) -> Any:
    """A dataclass field that is also a command-line option (``--<name-with-dashes>``).

    ``coerce`` turns the command-line or environment text into the field's
    type (flags, whose default is a bool, need none); ``option`` names the
    option when it is not the field's name with dashes.
    """
    metadata = {"help": help, "coerce": coerce, "option": option}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def option_name(f: dataclasses.Field[Any]) -> str:
    """The long option a settings field is set by."""
    return str(f.metadata.get("option") or f.name.replace("_", "-"))


def _option_fields(cls: type, names: tuple[str, ...]) -> list[dataclasses.Field[Any]]:
    fields = {f.name: f for f in dataclasses.fields(cls) if "help" in f.metadata}
    unknown = [n for n in names if n not in fields]
    if unknown:
        raise AttributeError(f"{cls.__name__} has no option field {unknown[0]!r}")
    return [fields[n] for n in names] if names else list(fields.values())


def _default_of(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def option_rows(cls: type, *names: str) -> list[list[Any]]:
    """``optParameters`` rows for the option fields of ``cls`` (all, or ``names``), bool ones left out."""
    return [
        [option_name(f), None, _default_of(f), f.metadata["help"], f.metadata["coerce"]]
        for f in _option_fields(cls, names)
        if not isinstance(_default_of(f), bool)
    ]


def flag_rows(cls: type, *names: str) -> list[list[Any]]:
    """``optFlags`` rows for the bool option fields of ``cls`` (all of them, or ``names``)."""
    return [
        [option_name(f), None, f.metadata["help"]]
        for f in _option_fields(cls, names)
        if isinstance(_default_of(f), bool)
    ]


def settings_from(cls: type[S], config: Mapping[str, Any], **given: Any) -> S:
    """An instance of the settings dataclass ``cls`` from parsed options; ``given`` fields win."""
    values = dict(given)
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in values or "help" not in f.metadata:
            continue
        name = option_name(f)
        if name in config:
            value = config[name]
            values[f.name] = bool(value) if isinstance(_default_of(f), bool) else value
    return cls(**values)


def mask(value: Any) -> str:
    """Replace a secret with a fixed mask for logs."""
    return "***" if value else ""
