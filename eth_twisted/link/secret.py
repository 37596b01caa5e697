"""The link's shared secret: where it is read from, and the rule that it never travels in plaintext."""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path

from twisted.logger import Logger

from eth_twisted.errors import ConfigError

MIN_SECRET_BYTES = 16
CREDENTIALS_NAME = "link-secret"
SECRET_ENV = "ETH_SECRET"

# -- secrets -------------------------------------------------------------------


_log = Logger(namespace="eth_twisted.link.secret")


def load_secret(
    value: str | bytes | None = None,
    file: str | None = None,
    credentials_name: str = CREDENTIALS_NAME,
    environ: Mapping[str, str] | None = None,
) -> bytes | None:
    """The link's shared secret, or None when none is configured.

    Looked up in this order: ``value`` (an option's value), the file
    ``file`` (``--secret-file``), ``$ETH_SECRET``, then
    ``$CREDENTIALS_DIRECTORY/<credentials_name>`` (systemd
    ``LoadCredential=``). Trailing newlines of a file are dropped. A secret
    shorter than 16 bytes, or a file that cannot be read, is a ConfigError; a
    secret file readable by group or others is logged as a warning.
    """
    environ = os.environ if environ is None else environ
    secret: bytes | None = None
    source = ""
    if value:
        secret = value if isinstance(value, bytes) else value.encode("utf-8")
        source = "the --secret option"
    elif file:
        secret = _read_secret_file(Path(file))
        source = f"secret file {file}"
    elif environ.get(SECRET_ENV):
        secret = environ[SECRET_ENV].encode("utf-8")
        source = f"${SECRET_ENV}"
    else:
        creds = environ.get("CREDENTIALS_DIRECTORY", "")
        if creds and (Path(creds) / credentials_name).exists():
            path = Path(creds) / credentials_name
            secret = _read_secret_file(path)
            source = f"credential {credentials_name}"
    if secret is None:
        return None
    if len(secret) < MIN_SECRET_BYTES:
        raise ConfigError(
            f"the link secret from {source} is {len(secret)} bytes; it must be at least "
            f"{MIN_SECRET_BYTES} (e.g. `openssl rand -hex 32`)"
        )
    return secret


def _read_secret_file(path: Path) -> bytes:
    try:
        data = path.read_bytes()
        mode = path.stat().st_mode
    except OSError as e:
        raise ConfigError(f"cannot read the secret file {path}: {e.strerror}")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        _log.warn(
            "The secret file {path} is readable by other users (mode {mode}); chmod 600 it",
            path=str(path),
            mode=oct(stat.S_IMODE(mode)),
        )
    return data.rstrip(b"\r\n")


def check_secret_transport(secret: bytes | None, tls: bool, allow_plaintext: bool = False) -> None:
    """Refuse to run the shared-secret handshake over plaintext TCP.

    Call it at start-up on both sides: ``tls`` says whether the link is TLS.
    Raises ConfigError when a secret is set, the link is plaintext and
    ``allow_plaintext`` (``--allow-plaintext-secret``) is not given.
    """
    if secret is not None and not tls and not allow_plaintext:
        raise ConfigError(
            "a link secret over plaintext TCP can be attacked offline and does not protect the "
            "connection after the handshake: enable TLS, or pass --allow-plaintext-secret"
        )


def check_secret_bytes(secret: bytes) -> None:
    """Raise ConfigError unless ``secret`` is bytes, at least :data:`MIN_SECRET_BYTES` long."""
    if not isinstance(secret, bytes) or len(secret) < MIN_SECRET_BYTES:
        raise ConfigError(f"the link secret must be at least {MIN_SECRET_BYTES} bytes")
