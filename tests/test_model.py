"""The shared data helpers: bounded metadata and address normalisation."""

from __future__ import annotations

import pytest

from eth_twisted.model import (
    MAX_CLIENT_ID,
    MAX_CLIENT_IP,
    ascii_metadata,
    bounded,
    normalise_ip,
    printable,
    storable_client_id,
    storable_client_ip,
)


def test_bounded_keeps_a_value_that_fits() -> None:
    """A value within the limit is returned unchanged."""
    subject = "CN=client-1,O=eth"
    assert bounded(subject, MAX_CLIENT_ID) is subject
    assert bounded("x" * MAX_CLIENT_ID, MAX_CLIENT_ID) == "x" * MAX_CLIENT_ID


def test_bounded_shortens_a_long_value_to_exactly_the_limit() -> None:
    """A longer value becomes a prefix, '~' and a digest: exactly ``limit`` characters."""
    subject = "CN=" + "a" * 300 + ",O=Example Corporation,C=DE"
    short = bounded(subject, MAX_CLIENT_ID)
    assert len(short) == MAX_CLIENT_ID
    prefix, _, digest = short.rpartition("~")
    assert subject.startswith(prefix)
    assert len(digest) == 64 and int(digest, 16) >= 0


def test_bounded_values_stay_distinct() -> None:
    """Two long values that share their prefix still differ after bounding."""
    a = "CN=" + "a" * 300 + ",OU=one"
    b = "CN=" + "a" * 300 + ",OU=two"
    assert bounded(a, 45) != bounded(b, 45)
    assert len(bounded(a, 45)) == 45


def test_bounded_handles_non_ascii_and_lone_surrogates() -> None:
    """The digest covers any str, even one holding a lone surrogate."""
    value = "CN=Jürgen \udc80" + "ß" * 300
    assert len(bounded(value, MAX_CLIENT_ID)) == MAX_CLIENT_ID


def test_bounded_refuses_a_limit_too_small_for_a_digest() -> None:
    """Limits below 16 cannot hold a useful digest."""
    with pytest.raises(ValueError):
        bounded("x" * 40, 8)


def test_normalise_ip_unmaps_ipv4_mapped_addresses() -> None:
    """``::ffff:1.2.3.4`` is stored as ``1.2.3.4``; other addresses are unchanged."""
    assert normalise_ip("::ffff:10.0.0.1") == "10.0.0.1"
    assert normalise_ip("2001:db8::1") == "2001:db8::1"


def test_printable_escapes_what_no_column_or_log_line_should_hold() -> None:
    """NUL, newline, lone surrogates and format characters become backslash escapes; the rest stays."""
    assert printable("CN=J\u00fcrgen \U0001f600") == "CN=J\u00fcrgen \U0001f600"
    assert printable("a\x00b\nc\udc80d\u202e") == "a\\x00b\\x0ac\\udc80d\\u202e"
    assert printable("a b", also=" ") == "a\\x20b"


def test_storable_client_ip_is_printable_spaceless_and_bounded() -> None:
    """Real addresses are kept (unmapped); others are escaped, '-' when empty, bounded to 45."""
    assert storable_client_ip("::ffff:10.0.0.1") == "10.0.0.1"
    assert storable_client_ip("2001:db8::1") == "2001:db8::1"
    assert storable_client_ip("") == "-"
    assert storable_client_ip("a b\n") == "a\\x20b\\x0a"
    long = storable_client_ip("1.2.3.4 " * 20)
    assert len(long) == MAX_CLIENT_IP and " " not in long
    storable_client_ip("fe80::1%\udc80").encode("utf-8")


def test_storable_client_id_keeps_ordinary_subjects() -> None:
    """An ordinary subject (spaces, commas, umlauts, non-BMP) is kept; a long or unprintable one is not."""
    assert storable_client_id(None) is None
    subject = "CN=J\u00fcrgen M\u00fcller \U0001f600,O=Example GmbH,C=DE"
    assert storable_client_id(subject) == subject
    assert len(storable_client_id("CN=" + "x" * 400) or "") == MAX_CLIENT_ID
    assert storable_client_id("CN=\udcff") == "CN=\\udcff"


def test_ascii_metadata_fits_any_charset() -> None:
    """The last-resort form is ASCII only and bounded."""
    value = ascii_metadata("CN=\U0001f600 \u03b1" * 40, MAX_CLIENT_ID)
    assert value.isascii() and len(value) == MAX_CLIENT_ID
    assert ascii_metadata("fe80::\u03b1", MAX_CLIENT_IP) == "fe80::\\u03b1"
