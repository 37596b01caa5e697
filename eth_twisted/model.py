"""The data that crosses module boundaries: messages, outcomes, records, their storable forms.

A :class:`Message` is one netstring frame as the server received it; a sink
(:class:`~eth_twisted.interfaces.ISink`) stores batches of them and answers with one
:class:`Outcome` per message, or fails the whole batch with a
:class:`~eth_twisted.errors.SinkError`.
"""

from __future__ import annotations

import enum
import hashlib
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()

MAX_BLOCK_NUMBER = 2**63 - 1
"""The largest block number any part accepts (a BIGINT's range; DESIGN: 0 <= n < 2**63)."""

MAX_CLIENT_ID = 255
"""Characters of ``client_id`` the record keeps (``VARCHAR(255)``); see :func:`bounded`."""
MAX_CLIENT_IP = 45
"""Characters of ``client_ip`` the record keeps (``VARCHAR(45)``); see :func:`bounded`."""


def bounded(value: str, limit: int) -> str:
    """``value`` when it fits in ``limit`` characters, else a prefix of it plus a digest of the whole.

    Server-side metadata (a certificate subject, an address) must never cost a
    payload its place in the record: a value too long for its column is stored
    in this bounded form, which stays distinct for distinct values (the digest
    covers every character) and readable (the prefix). ``limit`` is at least 16.
    """
    if len(value) <= limit:
        return value
    if limit < 16:
        raise ValueError("limit must be at least 16")
    digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[
        : min(64, limit // 3)
    ]
    return value[: limit - len(digest) - 1] + "~" + digest


def _escape(ch: str) -> str:
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def printable(value: str, also: str = "") -> str:
    """``value`` with every unprintable character (and each one in ``also``) as a backslash escape.

    Unprintable means what :meth:`str.isprintable` says: controls (NUL, newline,
    DEL, C1), lone surrogates (which no UTF-8 column can hold), format
    characters such as U+202E and separators other than the ASCII space. The
    common value has none and is returned as it is.
    """
    if value.isprintable() and (not also or not any(c in value for c in also)):
        return value
    return "".join(_escape(c) if not c.isprintable() or c in also else c for c in value)


def storable_client_ip(host: str) -> str:
    """A client address as every sink stores it: normalised, printable, without spaces, bounded.

    Real peer addresses come back unchanged (IPv4-mapped IPv6 unmapped); an
    address from elsewhere (a PROXY header, a test) that holds spaces, controls
    or lone surrogates is escaped, an empty one is ``-`` and a long one is
    bounded to :data:`MAX_CLIENT_IP`. SQL, Redis and the memory sink all store
    this same form, so the mirror's counts and the record agree.
    """
    ip = normalise_ip(host)
    if ip.isprintable() and " " not in ip and 0 < len(ip) <= MAX_CLIENT_IP:
        return ip  # every real peer address
    return bounded(printable(ip, " ") or "-", MAX_CLIENT_IP)


def storable_client_id(client_id: str | None) -> str | None:
    """A client identity as every record stores it: printable and bounded to :data:`MAX_CLIENT_ID`.

    The full subject stays in the server's logs; the record keeps a form no
    column can refuse (non-BMP characters are kept: the schema is utf8mb4).
    """
    if client_id is None:
        return None
    return bounded(printable(client_id), MAX_CLIENT_ID)


def ascii_metadata(value: str, limit: int) -> str:
    """``value`` as ASCII (backslash escapes) bounded to ``limit``: what any column charset holds.

    The last resort when a database refuses a row's metadata anyway (a column
    an operator made ``utf8mb3`` or ``latin1``): the payload is stored with
    this form rather than refused.
    """
    return bounded(printable(value).encode("ascii", "backslashreplace").decode("ascii"), limit)


def sha256_hex(payload: bytes) -> str:
    """Return the message id of ``payload``: its SHA-256 as lowercase hex."""
    return hashlib.sha256(payload).hexdigest()


class Outcome(str, enum.Enum):
    """What a sink did with one message."""

    STORED = "OK"
    """Committed now: the first time these bytes were seen."""

    DUPLICATE = "DUP"
    """Already held; nothing changed (mirrors still count the delivery)."""

    REJECTED = "rejected"
    """Can never be stored (a recognised field out of range): final."""


MAX_REORG_HASHES = 1024
"""Hashes of each list of a reorg record the record applies; the rest are logged and ignored."""

KIND_BLOCK, KIND_REORG, KIND_FINALIZED, KIND_OTHER = "block", "reorg", "finalized", "other"
"""The values of the record's ``kind`` column (docs/protocol.md, "Message kinds")."""


class ChainBlock(NamedTuple):
    """What a ``json`` block carries besides its number: the chain and the links."""

    chain_id: int
    block_hash: str
    parent_hash: str

    @property
    def kind(self) -> str:
        """``block``."""
        return KIND_BLOCK


class ReorgEvent(NamedTuple):
    """A reorg record: after ``fork_number``, ``old_hashes`` stopped and ``new_hashes`` became canonical.

    Both lists run from ``fork_number + 1`` upward and hold at most
    :data:`MAX_REORG_HASHES` hashes; ``dropped`` counts the ones past that bound
    (logged and ignored).
    """

    chain_id: int
    fork_number: int
    depth: int
    old_hashes: tuple[str, ...]
    new_hashes: tuple[str, ...]
    detected_at: int
    dropped: int = 0

    @property
    def kind(self) -> str:
        """``reorg``."""
        return KIND_REORG


class FinalityEvent(NamedTuple):
    """A finality record: the chain's finalized block and, when known, its safe block."""

    chain_id: int
    block_number: int
    block_hash: str
    safe_number: int | None
    safe_hash: str | None

    @property
    def kind(self) -> str:
        """``finalized``."""
        return KIND_FINALIZED


ChainEvent = ChainBlock | ReorgEvent | FinalityEvent
"""What the server recognised of a ``json`` payload's chain metadata."""


class Message(NamedTuple):
    """One received payload with what the server knows about its arrival.

    Immutable. A named tuple rather than a frozen dataclass: the receiver makes
    one per frame, and a frozen dataclass's ``__init__`` (one
    ``object.__setattr__`` per field) is several times slower, a visible share of
    the server's CPU per message under load (bench/README.md, "Third round").
    """

    payload: bytes
    hash: str
    client_ip: str
    received_at: float
    block_number: int | None = None
    client_id: str | None = None
    chain: ChainEvent | None = None
    """The chain metadata the server recognised (``json`` kinds), or None."""

    @classmethod
    def build(
        cls,
        payload: bytes,
        client_ip: str,
        received_at: float,
        block_number: int | None = None,
        client_id: str | None = None,
        chain: ChainEvent | None = None,
    ) -> Message:
        """Make a message, computing its hash."""
        return cls(
            payload, sha256_hex(payload), client_ip, received_at, block_number, client_id, chain
        )

    @property
    def kind(self) -> str:
        """The record's ``kind``: block, reorg or finalized as recognised, else other.

        A payload with a block number and no chain metadata (``html``, or JSON
        without valid links) is a ``block`` too, whose canonical status is unknown.
        """
        if self.chain is not None:
            return self.chain.kind
        return KIND_OTHER if self.block_number is None else KIND_BLOCK


@dataclass(frozen=True, slots=True)
class Record:
    """One stored row of ``ethereum_data``, as the read paths return it."""

    id: int
    hash: str
    payload: bytes
    block_number: int | None
    client_ip: str
    client_id: str | None
    received_at: float
    kind: str | None = None
    chain_id: int | None = None
    block_hash: str | None = None
    parent_hash: str | None = None
    canonical: bool | None = None
    """True on the canonical chain, False when not (orphaned), None when unknown (html)."""
    finalized: bool = False


@dataclass(frozen=True, slots=True)
class ChainRow:
    """One block of a chain's canonical chain (``/api/chains/<id>/blocks``)."""

    block_number: int
    block_hash: str
    parent_hash: str
    finalized: bool
    hash: str
    received_at: float


@dataclass(frozen=True, slots=True)
class ReorgRow:
    """One stored reorg record (``/api/chains/<id>/reorgs``)."""

    id: int
    chain_id: int
    fork_number: int
    depth: int
    replaced: int
    """How many new hashes the record named (it may be fewer or more than ``depth``)."""
    old_head: str | None
    new_head: str | None
    detected_at: int
    received_at: float
    client_ip: str
    hash: str
    below_finality: bool
    """A finality violation: the reorg reached at or below the chain's finalized height."""
    finalized_number: int | None
    """The chain's finalized height when the record was applied."""


@dataclass(frozen=True, slots=True)
class ChainSummary:
    """One chain as ``/api/chains`` shows it."""

    chain_id: int
    first_seen_at: float
    head_number: int | None
    head_hash: str | None
    finalized_number: int | None
    finalized_hash: str | None
    safe_number: int | None
    safe_hash: str | None
    reorgs: int
    violations: int
    """Reorgs at or below finality plus finality records contradicting the canonical chain."""
    last_reorg: ReorgRow | None


@dataclass(frozen=True, slots=True)
class ChainViolation:
    """A finality violation the record found, for the server's metric and log."""

    kind: str
    """``reorg`` (a reorg at or below the finalized height) or ``finalized`` (another hash)."""
    chain_id: int
    block_number: int
    detail: str


@dataclass(frozen=True, slots=True)
class RecordSummary:
    """One stored row without its payload: what reconciliation and the chart read.

    A payload is up to 16 MiB (64 KiB by default); a summary is a few hundred
    bytes at most, so a page of them is bounded by its row count and bytes.
    """

    id: int
    hash: str
    block_number: int | None
    client_ip: str
    received_at: float


SUMMARY_FIXED_BYTES = 32
"""What :func:`summary_bytes` counts for a summary's numbers (id, block, time) and framing."""

DEFAULT_SUMMARY_PAGE_BYTES = 1 << 20
"""Default byte bound of one page of summaries (``fetch_summaries``, ``recent_summaries``)."""


def summary_bytes(summary: RecordSummary) -> int:
    """The bytes a page of summaries is bounded by for ``summary``: its text fields as UTF-8, plus numbers."""
    ip = summary.client_ip
    ip_bytes = len(ip) if ip.isascii() else len(ip.encode("utf-8", "surrogatepass"))
    return SUMMARY_FIXED_BYTES + len(summary.hash) + ip_bytes


def take_page(
    summaries: Iterable[RecordSummary], limit: int, max_bytes: int
) -> list[RecordSummary]:
    """The first summaries of ``summaries`` that fit ``limit`` and ``max_bytes`` (at least one).

    Stops reading ``summaries`` as soon as the page is full, so a lazy source
    (a cursor) is never read past it.
    """
    page: list[RecordSummary] = []
    total = 0
    if limit <= 0:
        return page
    for summary in summaries:
        size = summary_bytes(summary)
        if page and total + size > max_bytes:
            break
        page.append(summary)
        total += size
        if len(page) >= limit:
            break
    return page


@dataclass(slots=True)
class Totals:
    """Aggregate counts over the record, for stats and for Redis reconciliation."""

    records: int = 0
    first_by_ip: dict[str, int] = field(default_factory=dict)
    first_received_at: float | None = None
    last_received_at: float | None = None
    latest_block: int | None = None
    latest_block_at: float | None = None
    latest_block_by_ip: dict[str, int] = field(default_factory=dict)


def peer_group(ip: str) -> str:
    """The key connections are capped by: the address, or its /64 for IPv6."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if address.version == 6:
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return ip


def normalise_ip(host: str) -> str:
    """A client address as stored: IPv4-mapped IPv6 (``::ffff:1.2.3.4``) becomes ``1.2.3.4``."""
    if host.lower().startswith("::ffff:") and "." in host:
        return host[7:]
    return host
