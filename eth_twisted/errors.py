"""The project's exceptions, in one small hierarchy."""

from __future__ import annotations


class EthTwistedError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(EthTwistedError):
    """A configuration value is missing, malformed or contradictory."""


class SinkError(EthTwistedError):
    """A sink could not store a batch.

    ``code`` is the retryable ERR code the server answers with for every
    message of the batch (``unavailable``, ``timeout`` or ``busy``).
    """

    code = "unavailable"

    def __init__(self, sink: str, reason: str) -> None:
        super().__init__(f"{sink}: {reason}")
        self.sink = sink
        self.reason = reason


class SinkUnavailable(SinkError):
    """The sink's backend cannot be reached or lost the connection."""

    code = "unavailable"


class SinkTimeout(SinkError):
    """The sink did not answer within its deadline (the write may still land)."""

    code = "timeout"


class SinkBusy(SinkError):
    """The sink refused the batch for load (lock wait, deadlock, queue full)."""

    code = "busy"


class FrameError(EthTwistedError):
    """A peer sent bytes that are not a valid netstring.

    ``code`` is the wire code: ``bad-frame`` or ``too-long``.
    """

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


class RPCError(EthTwistedError):
    """A JSON-RPC call failed (transport, HTTP status, envelope or error object)."""


class ChainMismatch(EthTwistedError):
    """The RPC endpoints, or the stored cursor, disagree about which chain this is."""


class OutboxFull(EthTwistedError):
    """The client's outbox holds as many messages as it may; the poller must wait."""


class OutboxLocked(EthTwistedError):
    """Another process holds the outbox file."""


class HandshakeFailed(EthTwistedError):
    """A link handshake (TLS or the shared-secret exchange) did not complete.

    ``reason`` is a short machine word (``bad-proof``, ``timeout``, ``tls``,
    ...) used for metrics; the message says what happened, never the secret.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
