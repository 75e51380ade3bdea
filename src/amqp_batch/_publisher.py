"""Confirmed publishing on a connection of its own, across connection losses.

A :class:`Publisher` keeps one publisher session open in a background task that
lives in the task group of its ``async with``. When the connection dies, that task
reconnects (exponential back-off with full jitter, rotating through the broker
URLs), and every ``publish()`` whose confirm had not arrived publishes its message
again on the new connection: at least once, the copy carrying the same
``message_id``. A publish gives up only when its ``publish_timeout`` passes, with a
:class:`PublishTimeout` that names the (redacted) URLs and the last error.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import random
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import anyio
import anyio.abc
import attrs

from ._exceptions import ChannelClosed, ConnectionLost, MessageNacked, TransportError
from ._lifecycle import AsyncContext
from ._settings import ConsumerSettings
from ._transport._base import Properties, PublisherSession, Transport
from ._transport._url import ConnectionParameters, parse_url

__all__ = ["PublishTimeout", "Publisher", "default_transport"]

logger = logging.getLogger("amqp_batch.publisher")

_DEFAULT_URL = "amqp://guest:guest@localhost:5672/"


def default_transport() -> Transport:
    """The native pamqp-over-anyio transport."""
    from ._transport._native import NativeTransport

    transport: Transport = NativeTransport()
    return transport


class PublishTimeout(TransportError):
    """``publish()`` got no broker confirm within the publisher's
    ``publish_timeout``: the broker was unreachable all along, or did not confirm
    in time (e.g. a memory alarm blocked the connection).

    The message names the broker URLs (passwords redacted) and the last error
    seen; ``urls`` and ``last_error`` hold them too (``last_error`` is also the
    ``__cause__``). The message may still have reached the broker.
    """

    def __init__(
        self,
        message: str,
        *,
        urls: Sequence[str] = (),
        last_error: BaseException | None = None,
    ) -> None:
        """Record the redacted ``urls`` and the ``last_error``."""
        super().__init__(message)
        self.urls = tuple(urls)
        self.last_error = last_error


class _Link:
    """One open publisher session, as the publishing tasks see it."""

    __slots__ = ("ended", "session", "url")

    def __init__(self, session: PublisherSession, url: str) -> None:
        self.session = session
        self.url = url
        #: Set when the session must not be used any more (it failed, or the
        #: publisher is closing); the background task then lets it go.
        self.ended = anyio.Event()


def _check_positive(name: str, value: float | None) -> None:
    if value is not None and not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


class Publisher(AsyncContext):
    """Publishes with broker confirms on its own connection; survives broker blips.

    Use it from handlers to chain consumers (N source consumers -> a staging
    exchange -> a writer consumer), or from web endpoints. A separate connection
    matters: a broker memory alarm blocks publishing connections, and a
    consumer's acks must keep flowing.

    ``publish`` returns once the broker confirmed the message. If the connection
    is lost first, the publisher reconnects (to the next URL of ``url`` and
    ``failover_urls``, after an exponential back-off with full jitter) and
    publishes the message again: **at least once**. The copy carries the same
    ``message_id``; when the caller gives none, the publisher generates one (a
    random UUID, hex), so a consumer can recognise duplicates. After
    ``publish_timeout`` seconds without a confirm it raises
    :class:`PublishTimeout`. It raises :class:`~amqp_batch.MessageNacked` on a
    broker nack (and opens a new connection for the next publish: after a
    quorum queue lost its leader, RabbitMQ may go on nacking on the old
    channel) and :class:`~amqp_batch.MessageReturned` for an unroutable
    ``mandatory`` message; neither is retried.

    Opening (``async with``) connects before it returns, trying each URL once;
    if none accepts, it raises the last connection error, and bad credentials or
    an unknown vhost are raised at once. The reconnecting task lives in the task
    group of the ``async with``; leaving it closes the connection. Many tasks may
    publish concurrently.
    """

    def __init__(
        self,
        url: str | Sequence[str] = _DEFAULT_URL,
        *,
        failover_urls: Sequence[str] = (),
        ssl_context: Any = None,
        connection_name: str | None = "amqp-batch-publisher",
        transport: Transport | None = None,
        publish_timeout: float | None = 30.0,
        reconnect_backoff_base: float = 0.1,
        reconnect_backoff_cap: float = 5.0,
        heartbeat: int | None = None,
    ) -> None:
        """Prepare a publisher (``async with`` connects).

        ``url`` is one broker URL or a sequence of them; ``failover_urls`` are
        more. ``publish_timeout`` bounds one ``publish()`` in seconds, reconnects
        included (``None``: wait for ever). A reconnect sleeps
        ``uniform(0, min(cap, base * 2**attempt))`` seconds. ``heartbeat``
        overrides the URLs' (seconds; a dead peer is noticed after two).
        """
        urls = (url,) if isinstance(url, str) else tuple(url)
        urls += tuple(failover_urls)
        if not urls:
            raise ValueError("a Publisher needs at least one broker URL")
        _check_positive("publish_timeout", publish_timeout)
        _check_positive("reconnect_backoff_base", reconnect_backoff_base)
        if reconnect_backoff_cap < reconnect_backoff_base:
            raise ValueError("reconnect_backoff_cap must be >= reconnect_backoff_base")
        parameters = []
        for one in urls:
            params = parse_url(one, ssl_context=ssl_context)
            if connection_name is not None:
                params = attrs.evolve(params, connection_name=connection_name)
            if heartbeat is not None:
                params = attrs.evolve(params, heartbeat=heartbeat)
            parameters.append(params)
        self._parameters: tuple[ConnectionParameters, ...] = tuple(parameters)
        self._transport = transport
        self._publish_timeout = publish_timeout
        self._backoff = (reconnect_backoff_base, reconnect_backoff_cap)
        self._rng = random.Random()
        self._group: anyio.abc.TaskGroup | None = None
        self._reset()

    def _reset(self) -> None:
        """Forget the state of a previous ``async with``."""
        self._link: _Link | None = None
        self._changed: anyio.Event | None = None
        self._stop: anyio.Event | None = None
        self._closing = False
        self._started = False
        self._fatal: TransportError | None = None
        self._last_error: BaseException | None = None
        #: Connections opened, and messages published again after a loss.
        self.connections_opened = 0
        self.republished = 0

    @classmethod
    def from_settings(
        cls,
        settings: ConsumerSettings,
        *,
        transport: Transport | None = None,
        publish_timeout: float | None = 30.0,
    ) -> Publisher:
        """A publisher to the brokers of ``settings``: its ``urls`` (``url`` and
        ``failover_urls``), TLS context, heartbeat and reconnect back-off."""
        return cls(
            settings.urls,
            ssl_context=settings.ssl_context,
            connection_name=f"{settings.connection_name or 'amqp-batch'}-publisher",
            transport=transport,
            publish_timeout=publish_timeout,
            reconnect_backoff_base=settings.reconnect_backoff_base,
            reconnect_backoff_cap=settings.reconnect_backoff_cap,
            heartbeat=settings.heartbeat,
        )

    @property
    def urls(self) -> tuple[str, ...]:
        """The broker URLs, in the order tried, passwords redacted."""
        return tuple(p.redacted_url for p in self._parameters)

    def __repr__(self) -> str:
        """The redacted URLs and whether a connection is open."""
        state = "connected" if self._live_link() is not None else "not connected"
        return f"<Publisher {', '.join(self.urls)} ({state})>"

    # ------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Publisher:
        """Connect (each URL tried once) and start the reconnecting task."""
        if self._group is not None:
            raise RuntimeError("this Publisher is already open")
        self._reset()
        self._changed, self._stop = anyio.Event(), anyio.Event()
        group = anyio.create_task_group()
        await group.__aenter__()
        try:
            await group.start(self._run)
        except BaseException as exc:
            # The first connection failed: the task group only repeats it.
            group.cancel_scope.cancel()
            with contextlib.suppress(BaseException):
                await group.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        self._group = group
        return self

    async def _aexit(self) -> None:
        """Close the connection; publishes still waiting raise ConnectionLost."""
        group, self._group = self._group, None
        if group is None:
            return
        self._closing = True
        assert self._stop is not None
        self._stop.set()
        if self._link is not None:
            self._link.ended.set()
        self._notify()
        # Also ends a connection attempt in progress; an open connection is
        # still closed gracefully (the transport shields its close).
        group.cancel_scope.cancel()
        # Not passing the body's exception on: the task group would wrap it in an
        # exception group. A crash of the background task is raised by itself.
        await group.__aexit__(None, None, None)

    # ------------------------------------------------------------ background

    async def _run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Keep a session open; replace it after a failure until closing."""
        assert self._stop is not None
        failures, index = 0, 0
        while not self._stop.is_set():
            parameters = self._parameters[index % len(self._parameters)]
            opened = self.connections_opened
            try:
                await self._hold_session(parameters, task_status)
            except TransportError as exc:
                self._last_error = exc
                if not self._started and (
                    not exc.retryable or index + 1 >= len(self._parameters)
                ):
                    raise  # opening: no URL accepted, or a non-retryable error
                if not exc.retryable:
                    logger.exception("publisher: not reconnecting")
                    self._fatal = exc
                    self._notify()
                    return
            if self._stop.is_set():
                return
            failures = 0 if self.connections_opened > opened else failures + 1
            index += 1
            await self._back_off(
                failures, self._parameters[index % len(self._parameters)]
            )

    async def _hold_session(
        self,
        parameters: ConnectionParameters,
        task_status: anyio.abc.TaskStatus[None],
    ) -> None:
        """Open a session, offer it to the publishing tasks, hold it until it
        fails or the publisher closes."""
        transport = self._transport or default_transport()
        async with transport.open_publisher(parameters) as session:
            link = _Link(session, parameters.redacted_url)
            self.connections_opened += 1
            self._link, self._last_error = link, None
            if self.connections_opened > 1:
                logger.info("publisher: connected again, to %s", link.url)
            self._notify()
            if not self._started:
                self._started = True
                task_status.started()
            try:
                await link.ended.wait()
            finally:
                link.ended.set()
                if self._link is link:
                    self._link = None

    async def _back_off(self, failures: int, target: ConnectionParameters) -> None:
        base, cap = self._backoff
        delay = self._rng.uniform(0, min(cap, base * 2 ** min(failures, 32)))
        logger.warning(
            "publisher: %s; reconnecting to %s in %.2f s",
            self._describe_last_error(),
            target.redacted_url,
            delay,
        )
        assert self._stop is not None
        with anyio.move_on_after(delay):
            await self._stop.wait()

    def _notify(self) -> None:
        """Wake the tasks waiting for a session (or for the publisher's end)."""
        if self._changed is not None:
            self._changed.set()
            self._changed = anyio.Event()

    def _live_link(self) -> _Link | None:
        link = self._link
        return link if link is not None and not link.ended.is_set() else None

    def _describe_last_error(self) -> str:
        error = self._last_error
        return "none" if error is None else f"{type(error).__name__}: {error}"

    # ------------------------------------------------------------ publishing

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

        ``delivery_mode`` defaults to 2 (persistent). Without a ``message_id``,
        a random one (UUID hex) is set, so a copy published again after a
        connection loss is recognisable. Raises :class:`PublishTimeout` after
        ``publish_timeout`` seconds without a confirm.
        """
        if self._group is None or self._closing:
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
            message_id=message_id if message_id is not None else uuid.uuid4().hex,
            timestamp=timestamp,
            type=type,
            app_id=app_id,
        )
        message = (bytes(body), exchange, routing_key, properties, mandatory)
        if self._publish_timeout is None:
            await self._publish_until_confirmed(*message)
            return
        with anyio.move_on_after(self._publish_timeout):
            await self._publish_until_confirmed(*message)
            return
        raise self._timeout_error()

    async def _publish_until_confirmed(
        self,
        body: bytes,
        exchange: str,
        routing_key: str,
        properties: Properties,
        mandatory: bool,
    ) -> None:
        """Publish on the current session; after a connection loss, again on the
        next one. A channel error is retried once (it may have been caused by
        another task's publish on the same channel), a non-retryable one never.
        A nack is raised, and the next publish uses a new session."""
        channel_errors = 0
        while True:
            link = await self._wait_for_link()
            try:
                await link.session.publish(
                    body,
                    exchange=exchange,
                    routing_key=routing_key,
                    properties=properties,
                    mandatory=mandatory,
                )
                return
            except MessageNacked as exc:
                self._last_error = exc
                # RabbitMQ 3.10 may go on nacking on a channel whose quorum queue
                # lost its leader, while a new connection publishes at once
                # (row C2): the next publish gets a new session.
                link.ended.set()
                self._notify()
                raise
            except TransportError as exc:
                self._last_error = exc
                link.ended.set()  # the background task replaces the session
                self._notify()
                channel_errors += isinstance(exc, ChannelClosed)
                if not exc.retryable or channel_errors > 1:
                    raise
                self.republished += 1
                logger.info(
                    "publisher: message %s not confirmed (%s); publishing again",
                    properties.message_id,
                    exc,
                )

    async def _wait_for_link(self) -> _Link:
        """The open session, once there is one."""
        while True:
            if self._fatal is not None:
                raise self._fatal
            if self._closing:
                raise ConnectionLost(
                    "the Publisher closed before the broker confirmed the message"
                )
            link = self._live_link()
            if link is not None:
                return link
            assert self._changed is not None
            await self._changed.wait()

    def _timeout_error(self) -> PublishTimeout:
        link = self._live_link()
        state = f"connected to {link.url}" if link else "no connection"
        error = PublishTimeout(
            f"no broker confirm within {self._publish_timeout} s ({state}; broker "
            f"URLs: {', '.join(self.urls)}; last error: {self._describe_last_error()})",
            urls=self.urls,
            last_error=self._last_error,
        )
        error.__cause__ = self._last_error
        return error
