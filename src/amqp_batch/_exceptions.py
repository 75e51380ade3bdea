"""The library's exception hierarchy.

Everything amqp-batch raises on purpose derives from :class:`AMQPBatchError`.
Transport failures are translated at the transport edge (``raise ... from exc``);
above it only these types appear. Cancellation is never turned into one of them.
"""

from __future__ import annotations

__all__ = [
    "AMQPBatchError",
    "AuthenticationError",
    "ChannelClosed",
    "ConnectionBlockedTimeout",
    "ConnectionLost",
    "ConnectionRefused",
    "ConsumerCancelled",
    "MessageNacked",
    "MessageReturned",
    "ProtocolError",
    "TransportError",
    "UnknownVirtualHost",
]


class AMQPBatchError(Exception):
    """Root of every error amqp-batch raises on purpose."""


class TransportError(AMQPBatchError):
    """The connection to the broker, or a channel on it, failed.

    ``retryable`` says whether opening a new session may succeed: a forced close or
    a network error is retryable, bad credentials are not.
    """

    retryable: bool = True

    def __init__(self, message: str, *, retryable: bool | None = None) -> None:
        super().__init__(message)
        if retryable is not None:
            self.retryable = retryable


class ConnectionLost(TransportError):
    """The connection ended: the broker closed it, the network broke, or the
    peer fell silent for two heartbeat intervals."""

    def __init__(
        self,
        message: str,
        *,
        reply_code: int = 0,
        reply_text: str = "",
        retryable: bool | None = None,
    ) -> None:
        super().__init__(message, retryable=retryable)
        self.reply_code = reply_code
        self.reply_text = reply_text


class ConnectionRefused(ConnectionLost):
    """No AMQP broker accepted the connection (refused port, timeout, TLS failure,
    or a peer that does not speak AMQP 0-9-1)."""


class AuthenticationError(ConnectionLost):
    """The broker refused the credentials. Never retried."""

    retryable = False


class UnknownVirtualHost(ConnectionLost):
    """The virtual host does not exist or the user may not use it. Never retried."""

    retryable = False


class ProtocolError(ConnectionLost):
    """The peer sent something that is not valid AMQP 0-9-1, or broke its rules."""

    retryable = False


class ChannelClosed(TransportError):
    """A channel was closed by the broker (e.g. 404 NOT_FOUND, 406
    PRECONDITION_FAILED) or by us; the connection itself may still be usable."""

    def __init__(
        self,
        message: str,
        *,
        reply_code: int = 0,
        reply_text: str = "",
        retryable: bool | None = None,
    ) -> None:
        super().__init__(message, retryable=retryable)
        self.reply_code = reply_code
        self.reply_text = reply_text


class ConsumerCancelled(TransportError):
    """The broker cancelled our consumer (``basic.cancel``), e.g. because the queue
    was deleted."""


class MessageReturned(AMQPBatchError):
    """A ``mandatory`` publish could not be routed and the broker returned it."""

    def __init__(
        self,
        message: str,
        *,
        reply_code: int,
        reply_text: str,
        exchange: str,
        routing_key: str,
    ) -> None:
        super().__init__(message)
        self.reply_code = reply_code
        self.reply_text = reply_text
        self.exchange = exchange
        self.routing_key = routing_key


class MessageNacked(AMQPBatchError):
    """The broker refused to take responsibility for a published message."""


class ConnectionBlockedTimeout(TransportError):
    """A publish waited longer than allowed while the broker blocked the
    connection (``connection.blocked``, e.g. a memory alarm)."""
