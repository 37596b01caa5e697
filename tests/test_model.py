"""The shared data helpers: bounded metadata and address normalisation."""

from __future__ import annotations

import pytest

from eth_twisted.model import MAX_CLIENT_ID, bounded, normalise_ip


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
