"""Confirmed publishing on a connection of its own."""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Any

import attrs

from ._settings import ConsumerSettings
from ._transport._base import Properties, PublisherSession, Transport
from ._transport._url import parse_url

__all__ = ["Publisher", "default_transport"]


def default_transport() -> Transport:
    """The native pamqp-over-anyio transport."""
    from ._transport._native import NativeTransport

    transport: Transport = NativeTransport()
    return transport


class Publisher:
    """Publishes with broker confirms on its own connection.

    Use it from handlers to chain consumers (N source consumers -> a staging
    exchange -> a writer consumer). A separate connection matters: a broker memory
    alarm blocks publishing connections, and a consumer's acks must keep flowing.
    ``publish`` returns once the broker confirmed the message; it raises
    :class:`~amqp_batch.MessageNacked`, or :class:`~amqp_batch.MessageReturned` for
    an unroutable ``mandatory`` message.
    """

    def __init__(
        self,
        url: str = "amqp://guest:guest@localhost:5672/",
        *,
        ssl_context: Any = None,
        connection_name: str | None = "amqp-batch-publisher",
        transport: Transport | None = None,
    ) -> None:
        parameters = parse_url(url, ssl_context=ssl_context)
        if connection_name is not None:
            parameters = attrs.evolve(parameters, connection_name=connection_name)
        self._parameters = parameters
        self._transport = transport
        self._session: PublisherSession | None = None
        self._stack: AsyncExitStack | None = None

    @classmethod
    def from_settings(
        cls, settings: ConsumerSettings, *, transport: Transport | None = None
    ) -> Publisher:
        """A publisher to the broker of ``settings`` (same URL and TLS context)."""
        return cls(
            settings.url,
            ssl_context=settings.ssl_context,
            connection_name=f"{settings.connection_name or 'amqp-batch'}-publisher",
            transport=transport,
        )

    async def __aenter__(self) -> Publisher:
        if self._stack is not None:
            raise RuntimeError("this Publisher is already open")
        transport = self._transport or default_transport()
        stack = AsyncExitStack()
        self._session = await stack.enter_async_context(
            transport.open_publisher(self._parameters)
        )
        self._stack = stack
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool | None:
        stack, self._stack, self._session = self._stack, None, None
        if stack is None:
            return None
        return await stack.__aexit__(exc_type, exc, traceback)

    async def publish(
        self,
        body: bytes,
        *,
        exchange: str = "",
        routing_key: str = "",
        headers: Mapping[str, Any] | None = None,
        content_type: str | None = None,
        content_encoding: str | None = None,
        delivery_mode: int | None = 2,
        priority: int | None = None,
        correlation_id: str | None = None,
        reply_to: str | None = None,
        expiration: str | None = None,
        message_id: str | None = None,
        timestamp: datetime.datetime | None = None,
        type: str | None = None,
        app_id: str | None = None,
        mandatory: bool = False,
    ) -> None:
        """Publish ``body`` and return after the broker's confirm.

        ``delivery_mode`` defaults to 2 (persistent).
        """
        if self._session is None:
            raise RuntimeError("use 'async with Publisher(...)' before publishing")
        if not isinstance(body, (bytes, bytearray, memoryview)):
            raise TypeError(f"body must be bytes, not {type(body).__name__}")
        properties = Properties(
            content_type=content_type,
            content_encoding=content_encoding,
            headers=dict(headers) if headers is not None else None,
            delivery_mode=delivery_mode,
            priority=priority,
            correlation_id=correlation_id,
            reply_to=reply_to,
            expiration=expiration,
            message_id=message_id,
            timestamp=timestamp,
            type=type,
            app_id=app_id,
        )
        await self._session.publish(
            bytes(body),
            exchange=exchange,
            routing_key=routing_key,
            properties=properties,
            mandatory=mandatory,
        )
