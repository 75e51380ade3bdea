"""The byte-stream seam under the native transport.

A :class:`NetworkBackend` opens the byte stream a connection runs on. The default,
:class:`TCPNetwork`, is TCP (and TLS) through anyio; tests pass a backend whose
``open`` returns one end of an in-memory stream pair and script the broker on the
other end, so the whole AMQP client (handshake, reader, writer, heartbeats, channels)
runs without a socket.

The backend only opens the stream. Mapping failures to
:class:`~amqp_batch.ConnectionRefused` and the overall connection timeout stay in
:func:`~amqp_batch._transport._native.connect`, so every backend gets the same
errors for the same failures.
"""

from __future__ import annotations

import ssl
from typing import Protocol, runtime_checkable

import anyio
from anyio.abc import ByteStream

__all__ = ["NetworkBackend", "TCPNetwork"]


@runtime_checkable
class NetworkBackend(Protocol):
    """Opens the byte stream an AMQP connection runs on."""

    async def open(
        self, host: str, port: int, *, ssl_context: ssl.SSLContext | None
    ) -> ByteStream:
        """Open a stream to ``host:port``; TLS when ``ssl_context`` is given, with
        the certificate verified against ``host``.

        Raise :class:`OSError` (or :class:`ssl.SSLError`) when the peer cannot be
        reached. No timeout of its own: ``connect()`` bounds the whole connect
        with ``connection_timeout``.
        """
        ...


class TCPNetwork:
    """The default backend: ``anyio.connect_tcp``, TLS wrapped by anyio.

    TLS runs with ``tls_standard_compatible=False``: AMQP has its own close
    handshake, and the standard-compatible mode makes ``aclose()`` raise
    ``APPLICATION_DATA_AFTER_CLOSE_NOTIFY`` against RabbitMQ.
    """

    def __repr__(self) -> str:
        return "TCPNetwork()"

    async def open(
        self, host: str, port: int, *, ssl_context: ssl.SSLContext | None
    ) -> ByteStream:
        """See :meth:`NetworkBackend.open`."""
        if ssl_context is not None:
            return await anyio.connect_tcp(
                host,
                port,
                ssl_context=ssl_context,
                tls_hostname=host,
                tls_standard_compatible=False,
            )
        return await anyio.connect_tcp(host, port)
