"""The library's exception hierarchy.

Everything amqp-batch raises on purpose derives from :class:`AMQPBatchError`.
Transport failures are translated at the transport edge (``raise ... from exc``);
above it only these types appear. Cancellation is never turned into one of them.
"""

from __future__ import annotations

import enum
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TypeVar

import anyio
import attrs

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

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
    "Phase",
    "ProtocolError",
    "TransportError",
    "UnknownVirtualHost",
    "Verdict",
    "classify",
    "connection_close_error",
    "first_library_error",
    "recording_phase",
    "unwrap_group",
]


class AMQPBatchError(Exception):
    """Root of every error amqp-batch raises on purpose."""


class Phase(enum.Enum):
    """Where in a consuming session a transport error happened (a fact the
    transport and the worker record on the error; :func:`classify` reads it)."""

    #: Connecting, declaring the topology, ``basic.qos``, ``basic.consume``.
    SETUP = "setup"
    #: After the consumer was registered (handling, settling, closing).
    CONSUMING = "consuming"


class TransportError(AMQPBatchError):
    """The connection to the broker, or a channel on it, failed.

    The transport records facts: the broker's ``reply_code`` and ``reply_text``,
    the ``class_id`` and ``method_id`` it names (0 when the close was not about
    one method), and the ``phase`` of the session (setup or consuming).
    ``retryable`` is computed from them by the library's one error policy.
    """

    def __init__(
        self,
        message: str,
        *,
        reply_code: int = 0,
        reply_text: str = "",
        class_id: int = 0,
        method_id: int = 0,
        phase: Phase | None = None,
    ) -> None:
        super().__init__(message)
        self.reply_code = reply_code
        self.reply_text = reply_text
        self.class_id = class_id
        self.method_id = method_id
        #: None until a session or worker records it.
        self.phase = phase

    @property
    def retryable(self) -> bool:
        """Whether opening a new session may succeed: a forced close or a network
        error is retryable, bad credentials are not."""
        return classify(self).retryable


class ConnectionLost(TransportError):
    """The connection ended: the broker closed it, the network broke, or the
    peer fell silent for two heartbeat intervals."""


class ConnectionRefused(ConnectionLost):
    """No AMQP broker accepted the connection (refused port, timeout, TLS failure,
    or a peer that does not speak AMQP 0-9-1)."""

    def __init__(self, message: str, *, certificate_rejected: bool = False) -> None:
        super().__init__(message)
        #: The broker's TLS certificate failed verification (not retried).
        self.certificate_rejected = certificate_rejected


class AuthenticationError(ConnectionLost):
    """The broker refused the credentials. Never retried."""


class UnknownVirtualHost(ConnectionLost):
    """The virtual host does not exist or the user may not use it. Never retried."""


class ProtocolError(ConnectionLost):
    """The peer sent something that is not valid AMQP 0-9-1, or broke its rules."""


class ChannelClosed(TransportError):
    """A channel was closed by the broker (e.g. 404 NOT_FOUND, 406
    PRECONDITION_FAILED) or by us; the connection itself may still be usable."""


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


# -- the error policy ---------------------------------------------------------------

#: ``connection.close`` reply codes after which reconnecting cannot help:
#: NOT_ALLOWED (530: vhost), ACCESS_REFUSED (403: login), and the protocol
#: errors (402, 501-506, 540). 320 CONNECTION_FORCED and 541 INTERNAL_ERROR are
#: retried.
FATAL_CONNECTION_CODES = frozenset({402, 403, 501, 502, 503, 504, 505, 506, 530, 540})
#: ``channel.close`` reply codes that recur on the same request:
#: ACCESS_REFUSED and PRECONDITION_FAILED (e.g. a queue redeclared with other
#: arguments).
NON_RETRYABLE_CHANNEL_CODES = frozenset({403, 406})
#: Channel errors that mean "the topology in the settings is wrong" when raised
#: during session setup: ACCESS_REFUSED, NOT_FOUND, PRECONDITION_FAILED.
FATAL_SETUP_CHANNEL_CODES = frozenset({403, 404, 406})

_NEVER_RETRIED = (AuthenticationError, UnknownVirtualHost, ProtocolError)


@attrs.frozen
class Verdict:
    """What :func:`classify` decided about one transport error."""

    #: A new session may succeed (the public ``TransportError.retryable``).
    retryable: bool
    #: A worker must stop on it; the consumer raises it.
    fatal: bool


def classify(error: TransportError) -> Verdict:
    """The one place that decides, from the facts on ``error``, whether it is
    retryable and whether it stops a worker.

    - Credentials, unknown vhost, protocol errors, a rejected TLS certificate and
      a ``connection.close`` with a code in :data:`FATAL_CONNECTION_CODES` are
      fatal; every other connection error (refused, lost, forced close 320,
      internal error 541, a silent peer) is retried.
    - A channel error is retryable unless its code is 403 or 406. During setup
      403, 404 and 406 are fatal (the topology is wrong and would fail again);
      once consuming, any channel error is that channel's end: the worker opens
      a new one.
    - Everything else (a cancelled consumer, a blocked-connection timeout) is
      retried.
    """
    if isinstance(error, ChannelClosed):
        retryable = error.reply_code not in NON_RETRYABLE_CHANNEL_CODES
        if error.phase is Phase.SETUP:
            return Verdict(retryable, error.reply_code in FATAL_SETUP_CHANNEL_CODES)
        if error.phase is Phase.CONSUMING:
            return Verdict(retryable, fatal=False)
        return Verdict(retryable, fatal=not retryable)
    if isinstance(error, ConnectionLost):
        fatal = (
            isinstance(error, _NEVER_RETRIED)
            or (isinstance(error, ConnectionRefused) and error.certificate_rejected)
            or error.reply_code in FATAL_CONNECTION_CODES
        )
        return Verdict(retryable=not fatal, fatal=fatal)
    return Verdict(retryable=True, fatal=False)


def connection_close_error(
    message: str,
    *,
    reply_code: int,
    reply_text: str,
    class_id: int = 0,
    method_id: int = 0,
) -> ConnectionLost:
    """The error a ``connection.close`` from the broker stands for (its type names
    the reason; :func:`classify` decides from the code)."""
    kind: type[ConnectionLost] = ConnectionLost
    if reply_code == 403:
        kind = AuthenticationError
    elif reply_code == 530:
        kind = UnknownVirtualHost
    elif reply_code in FATAL_CONNECTION_CODES:
        kind = ProtocolError
    return kind(
        message,
        reply_code=reply_code,
        reply_text=reply_text,
        class_id=class_id,
        method_id=method_id,
    )


@contextmanager
def recording_phase(phase: Phase) -> Iterator[None]:
    """Record ``phase`` on a transport error leaving the block (also inside an
    exception group), unless an inner block recorded one already."""
    try:
        yield
    except BaseException as exc:
        for leaf in _leaves(exc):
            if isinstance(leaf, TransportError) and leaf.phase is None:
                leaf.phase = phase
        raise


# -- exception groups ---------------------------------------------------------------

ErrorT = TypeVar("ErrorT", bound=AMQPBatchError)


def _leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions in ``exc`` (itself if not a group), groups flattened, each
    once."""
    if not isinstance(exc, BaseExceptionGroup):
        return [exc]
    leaves: list[BaseException] = []
    for member in exc.exceptions:
        leaves.extend(leaf for leaf in _leaves(member) if leaf not in leaves)
    return leaves


def _holds_cancellation(leaves: list[BaseException]) -> bool:
    cancelled = anyio.get_cancelled_exc_class()
    return any(isinstance(leaf, cancelled) for leaf in leaves)


def unwrap_group(exc: BaseException) -> BaseException:
    """The one exception ``exc`` stands for: ``exc`` itself, or the only exception
    in a (nested) group. A group that holds several, or any cancellation, is
    returned unchanged: cancellation is never swallowed nor converted."""
    leaves = _leaves(exc)
    if len(leaves) == 1 and not _holds_cancellation(leaves):
        return leaves[0]
    return exc


def first_library_error(exc: BaseException, kind: type[ErrorT]) -> ErrorT | None:
    """The first ``kind`` error in ``exc`` when every exception in it (groups
    flattened) is one; else None (a bug, or a cancellation: let it propagate)."""
    leaves = _leaves(exc)
    if _holds_cancellation(leaves) or not all(isinstance(e, kind) for e in leaves):
        return None
    first = leaves[0]
    assert isinstance(first, kind)
    return first
