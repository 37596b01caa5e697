"""Where the link secret comes from, and never over plaintext."""

from __future__ import annotations

from pathlib import Path

import pytest

from eth_twisted.errors import ConfigError
from eth_twisted.link.secret import check_secret_transport, load_secret
from tests.support.link import SECRET


def test_load_secret_sources(tmp_path: Path) -> None:
    """load_secret reads the value, a file, $ETH_SECRET, then $CREDENTIALS_DIRECTORY, in that order."""
    secret_file = tmp_path / "secret"
    secret_file.write_bytes(b"file-secret-0123456789\n")
    secret_file.chmod(0o600)
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "link-secret").write_bytes(b"credential-secret-0123\r\n")
    env = {"ETH_SECRET": "env-secret-0123456789", "CREDENTIALS_DIRECTORY": str(creds)}
    assert (
        load_secret("value-secret-0123456", str(secret_file), environ=env)
        == b"value-secret-0123456"
    )
    assert load_secret(None, str(secret_file), environ=env) == b"file-secret-0123456789"
    assert load_secret(environ=env) == b"env-secret-0123456789"
    assert load_secret(environ={"CREDENTIALS_DIRECTORY": str(creds)}) == b"credential-secret-0123"
    assert load_secret(environ={}) is None


def test_load_secret_rejects_short_and_unreadable(tmp_path: Path) -> None:
    """A secret under 16 bytes or an unreadable file is a ConfigError that says why."""
    with pytest.raises(ConfigError, match="at least 16"):
        load_secret("too-short", environ={})
    short = tmp_path / "s"
    short.write_bytes(b"0123456789abcde\n")
    with pytest.raises(ConfigError, match="15 bytes"):
        load_secret(file=str(short), environ={})
    with pytest.raises(ConfigError, match="cannot read"):
        load_secret(file=str(tmp_path / "missing"), environ={})


def test_check_secret_transport() -> None:
    """A secret over plaintext is a ConfigError unless allowed; TLS or no secret is fine."""
    with pytest.raises(ConfigError, match="allow-plaintext-secret"):
        check_secret_transport(SECRET, tls=False)
    check_secret_transport(SECRET, tls=False, allow_plaintext=True)
    check_secret_transport(SECRET, tls=True)
    check_secret_transport(None, tls=False)
