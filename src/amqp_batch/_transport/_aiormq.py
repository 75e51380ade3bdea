"""The transport contract on raw aiormq (asyncio only).

An independent implementation of :class:`~amqp_batch._transport._base.Transport`:
the same sessions, publishers, guarantees and errors as the native transport, on
`aiormq <https://github.com/mosquito/aiormq>`_ (optional extra
``amqp-batch[aiormq]``). It serves users who trust aiormq, and the test suite,
which runs the same scripts on both and compares what the broker saw.

Tasks: aiormq creates its own asyncio tasks (a reader, a writer, a heartbeat, one
reader per channel, one short task per delivered message, and a closer when the
reader ends). Each connection is given an event loop proxy whose ``create_task``
records them, so a session or publisher owns every task its connection made: its
exit closes the connection and then waits for each of them to finish (cancelling
those that do not). None survives the ``async with``.

aiormq and pamqp exceptions are translated here, at the edge, into the library's
(:mod:`amqp_batch._exceptions`); nothing above sees an aiormq type.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import os
import ssl
import struct
import sys
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import anyio
import attrs
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from .._exceptions import (
    AuthenticationError,
    ChannelClosed,
    ConnectionLost,
    ConnectionRefused,
    MessageNacked,
    Phase,
    ProtocolError,
    TransportError,
    connection_close_error,
    recording_phase,
)
from ._base import (
    Delivery,
    Properties,
    PublishOptions,
    SessionSpec,
    publish_arguments,
)
from ._common import Declarable, SessionBase, declare_topology, returned_error, topology
from ._url import ConnectionParameters

if TYPE_CHECKING:
    from aiormq.abc import DeliveredMessage
    from pamqp.commands import Basic
    from typing_extensions import Unpack

__all__ = ["AiormqPublisher", "AiormqSession", "AiormqTransport"]

#: How long the exit of a session or publisher waits for the close handshake and
#: for aiormq's tasks, before it cancels what is left.
CLOSE_TIMEOUT = 5.0

#: The largest frame the handshake accepts (before ``connection.tune``), as the
#: native transport's.
HANDSHAKE_FRAME_MAX = 131072

_consumer_numbers = itertools.count(1)

logger = logging.getLogger("amqp_batch.transport")


class AsyncioOnly(RuntimeError):
    """The aiormq transport was selected on an event loop other than asyncio."""


def _running_library() -> str | None:
    """ "asyncio", "trio", or None outside async code."""
    try:
        asyncio.get_running_loop()
        return "asyncio"
    except RuntimeError:
        pass
    trio = sys.modules.get("trio")
    if trio is not None:
        try:
            trio.lowlevel.current_task()
            return "trio"
        except RuntimeError:
            pass
    return None


def _require_asyncio(where: str) -> None:
    library = _running_library()
    if library is None:
        return  # not in async code (construction): checked again at first use
    if library != "asyncio":
        raise AsyncioOnly(
            f"AiormqTransport runs on asyncio only (aiormq is asyncio-only), but "
            f"{where} runs on {library}; use NativeTransport (the default) there"
        )


def _import_aiormq() -> Any:
    try:
        import aiormq
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "AiormqTransport needs aiormq: pip install 'amqp-batch[aiormq]'"
        ) from exc
    from importlib.metadata import version

    found = version("aiormq")
    major, minor = (int(part) for part in found.split(".")[:2])
    if (major, minor) < (7, 2) or major >= 8:
        raise ImportError(
            f"AiormqTransport needs aiormq 7.2 or a later 7.x (found {found}): "
            "pip install 'amqp-batch[aiormq]'"
        )
    return aiormq


# -- error translation ----------------------------------------------------------------


def _reply(exc: BaseException, table: Any) -> tuple[int, str]:
    """(reply_code, reply_text) of an aiormq close exception: generic ones carry
    ``(code, text)``, the mapped subclasses only the text (their class names the
    code)."""
    args = exc.args
    if len(args) >= 2 and isinstance(args[0], int):
        return args[0], str(args[1])
    for code, kind in table.items():
        if type(exc) is kind:
            return int(code), str(args[0]) if args else ""
    return 0, str(args[0]) if args else ""


def _closed(
    message: str, reply: tuple[int, str], method: tuple[int, int] = (0, 0)
) -> ConnectionLost:
    """The error of a broker ``connection.close`` with ``reply`` (code, text),
    answering ``method`` (class id, method id) when known."""
    code, text = reply
    return connection_close_error(
        f"{message}: {code} {text}",
        reply_code=code,
        reply_text=text,
        class_id=method[0],
        method_id=method[1],
    )


def _refusing_close(exc: BaseException) -> Any:
    """The broker's ``connection.close`` behind a handshake failure, if any.

    aiormq reports a ``connection.close`` answering ``connection.open`` (e.g. 530
    for an unknown vhost) as an ``InvalidFrameError`` carrying only a text; the
    frame itself is still a local of the handshake step in the traceback.
    """
    from pamqp.commands import Connection

    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame.f_locals.get("frame")
        if isinstance(frame, Connection.Close):
            return frame
        tb = tb.tb_next
    return None


def _connect_error(
    exc: BaseException, parameters: ConnectionParameters
) -> TransportError:
    """A failure to connect (before the connection ran), translated."""
    from aiormq import exceptions as errors

    where = f"{parameters.host}:{parameters.port}"
    who = f"user {parameters.username!r} on vhost {parameters.virtual_host!r}"
    close = _refusing_close(exc)
    if close is not None:
        return _closed(
            f"the broker at {where} closed the connection of {who}",
            (close.reply_code, close.reply_text),
            (close.class_id, close.method_id),
        )
    if isinstance(exc, errors.ProbableAuthenticationError | errors.AuthenticationError):
        return AuthenticationError(
            f"the broker at {where} refused the login of {who}", reply_code=403
        )
    if isinstance(exc, errors.ConnectionClosed) and exc.args:
        return _closed(
            f"the broker at {where} closed the connection of {who}",
            _reply(exc, _connection_codes()),
        )
    if isinstance(exc, errors.IncompatibleProtocolError | errors.ProtocolSyntaxError):
        return ProtocolError(f"the peer at {where} does not speak AMQP 0-9-1")
    cause = exc.__cause__ if exc.__cause__ is not None else exc
    if isinstance(cause, ssl.SSLCertVerificationError):
        return ConnectionRefused(
            f"cannot connect to {where}: TLS certificate verification failed"
            f" ({cause.verify_message})",
            certificate_rejected=True,
        )
    if isinstance(exc, TimeoutError):
        return ConnectionRefused(f"connecting to {where} timed out")
    if (
        isinstance(cause, asyncio.IncompleteReadError)
        and (cause.expected or 0) > HANDSHAKE_FRAME_MAX + 1
    ):
        # a "frame" larger than any handshake frame: the peer is not a broker
        # (the native transport's parser refuses the same); an AMQP frame cut
        # short is a connection that ended, retried like any other.
        return ProtocolError(f"the peer at {where} does not speak AMQP 0-9-1")
    return ConnectionRefused(f"cannot connect to {where}: {cause}")


def _connection_codes() -> Any:
    from aiormq.connection import EXCEPTION_MAPPING

    return EXCEPTION_MAPPING


def _channel_error(exc: BaseException) -> TransportError:
    """A channel failure (a broker ``channel.close``, a closed channel), translated."""
    from aiormq import exceptions as errors
    from aiormq.channel import EXCEPTION_MAPPING

    if isinstance(exc, TransportError):
        return exc
    if isinstance(exc, errors.ChannelClosed) and exc.args and exc.args[0] is not None:
        code, text = _reply(exc, EXCEPTION_MAPPING)
        return ChannelClosed(
            f"the broker closed the channel: {code} {text}",
            reply_code=code,
            reply_text=text,
        )
    return ChannelClosed("the channel is closed")


def _lost_error(exc: BaseException | None, connection: Any) -> ConnectionLost:
    """Why a running connection ended, translated."""
    from aiormq import exceptions as errors

    if isinstance(exc, errors.ConnectionClosed) and exc.args:
        return _closed(
            "the broker closed the connection", _reply(exc, _connection_codes())
        )
    heartbeat = connection.heartbeat_timeout
    if heartbeat > 0 and connection.is_connection_was_stuck:
        return ConnectionLost(
            f"no frame from the broker for {2 * heartbeat} s (2 x heartbeat)"
        )
    if isinstance(exc, errors.ProtocolSyntaxError):
        return ProtocolError(f"the broker sent an invalid frame: {exc!r}")
    return ConnectionLost(f"the connection to the broker was lost: {exc!r}")


# -- connections and their tasks ------------------------------------------------------


class _TaskLoop:
    """The running loop, except that ``create_task`` records the task: a
    connection built on it owns every task aiormq makes for it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.tasks: set[asyncio.Task[Any]] = set()

    def create_task(
        self, coro: Coroutine[Any, Any, Any], **options: Any
    ) -> asyncio.Task[Any]:
        task = self._loop.create_task(coro, **options)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loop, name)

    async def finish(self, timeout: float) -> None:
        """Wait for every recorded task; cancel those still running at ``timeout``."""
        deadline = self._loop.time() + timeout
        while self.tasks:
            remaining = deadline - self._loop.time()
            if remaining <= 0:
                for task in self.tasks:
                    task.cancel()
            await asyncio.wait(set(self.tasks), timeout=max(remaining, 0.5))


def _url(parameters: ConnectionParameters) -> str:
    scheme = "amqps" if parameters.tls else "amqp"
    user = quote(parameters.username, safe="")
    password = quote(parameters.password, safe="")
    host = f"[{parameters.host}]" if ":" in parameters.host else parameters.host
    vhost = quote(parameters.virtual_host, safe="")
    query = f"heartbeat={parameters.heartbeat}"
    if parameters.connection_name:
        query += f"&name={quote(parameters.connection_name, safe='')}"
    return f"{scheme}://{user}:{password}@{host}:{parameters.port}/{vhost}?{query}"


def _ssl_context(parameters: ConnectionParameters) -> ssl.SSLContext | None:
    # the native transport's TLS policy (and its warning when verification is off)
    from ._native._connection import _tls_context

    return _tls_context(parameters) if parameters.tls else None


@functools.cache
def _connection_class(aiormq: Any) -> Any:
    """aiormq's Connection, tuned like the native transport's.

    aiormq answers ``connection.tune`` with our heartbeat and the broker's
    ``channel_max`` and ``frame_max``, and declares the peer dead after
    3 x (heartbeat + 1) s of silence. This one takes, for each of the three, the
    smaller non-zero of ours (the URL) and the broker's, as the native transport
    does, and declares the peer dead after 2 x heartbeat.
    """
    from pamqp.commands import Connection as Methods

    from ._native._connection import _negotiate

    class TunedConnection(aiormq.Connection):  # type: ignore[misc]
        #: What the URL asks for (set before ``connect``).
        wanted: ConnectionParameters

        async def _rpc(
            self,
            request: Any,
            writer: Any,
            frame_receiver: Any,
            wait_response: bool = True,
        ) -> Any:
            # the handshake's request/response step; the answer to start-ok is
            # the broker's tune, which aiormq then echoes in tune-ok
            frame = await super()._rpc(
                request,
                writer=writer,
                frame_receiver=frame_receiver,
                wait_response=wait_response,
            )
            if isinstance(frame, Methods.Tune):
                wanted = self.wanted
                frame.channel_max = (
                    _negotiate(wanted.channel_max, frame.channel_max) or 65535
                )
                frame.frame_max = (
                    _negotiate(wanted.frame_max, frame.frame_max) or 131072
                )
                # aiormq sends tune-ok with ``heartbeat_timeout``, and reads it
                # again when it starts the heartbeat task after open-ok
                self.heartbeat_timeout = _negotiate(wanted.heartbeat, frame.heartbeat)
                self._Connection__heartbeat_grace_timeout = 2 * self.heartbeat_timeout
            return frame

    return TunedConnection


class _Link:
    """One aiormq connection, its task registry, and why it ended."""

    def __init__(self, connection: Any, tasks: _TaskLoop) -> None:
        self.connection = connection
        self.tasks = tasks
        self.closing_by_us = False
        self.scope: anyio.CancelScope | None = None
        self.error: TransportError | None = None

    def fail(self, error: TransportError) -> None:
        """Record the first error and end the session body."""
        if self.error is None and not self.closing_by_us:
            self.error = error
        if self.scope is not None and not self.closing_by_us:
            self.scope.cancel()

    def watch(self, channel: Any) -> None:
        """Fail the link when the connection or ``channel`` ends without us."""

        def connection_done(future: asyncio.Future[Any]) -> None:
            exc = None if future.cancelled() else future.exception()
            self.fail(_lost_error(exc, self.connection))

        def channel_done(future: asyncio.Future[Any]) -> None:
            exc = None if future.cancelled() else future.exception()
            if not self.connection.is_closed:
                self.fail(_channel_error(exc or ChannelClosed("channel closed")))

        self.connection.closing.add_done_callback(connection_done)
        channel.closing.add_done_callback(channel_done)

    def channel_failure(self, channel: Any, exc: BaseException) -> TransportError:
        """The library error for an operation that failed on ``channel``."""
        if self.connection.is_closed:
            future = self.connection.closing
            cause = None if future.cancelled() else future.exception()
            return self.error or _lost_error(cause, self.connection)
        if channel.is_closed and not channel.closing.cancelled():
            return _channel_error(channel.closing.exception() or exc)
        return _channel_error(exc)

    async def close(self, channel: Any | None) -> None:
        """Close ``channel`` (gracefully, when not cancelled) and the connection,
        then wait for every task of the connection; bounded, shielded."""
        self.closing_by_us = True
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(CLOSE_TIMEOUT):
                if channel is not None and not channel.is_closed and self.error is None:
                    with contextlib.suppress(Exception):  # the connection close follows
                        await channel.close()
                await self.connection.close(None)
            await self.tasks.finish(CLOSE_TIMEOUT)


@asynccontextmanager
async def _connect(parameters: ConnectionParameters) -> AsyncIterator[_Link]:
    _require_asyncio("this session")
    aiormq = _import_aiormq()
    tasks = _TaskLoop(asyncio.get_running_loop())
    connection = _connection_class(aiormq)(
        _url(parameters), loop=tasks, context=_ssl_context(parameters)
    )
    connection.wanted = parameters
    link = _Link(connection, tasks)
    try:
        try:
            with anyio.fail_after(parameters.connection_timeout):
                await connection.connect()
        except Exception as exc:
            raise _connect_error(exc, parameters) from exc
        tune = connection.connection_tune
        logger.debug(
            "connected to %s (heartbeat %s s, frame_max %s)",
            parameters.redacted_url,
            tune.heartbeat,
            tune.frame_max,
        )
        yield link
    finally:
        await link.close(None)


async def _open_channel(link: _Link, *, confirms: bool) -> Any:
    try:
        return await link.connection.channel(
            publisher_confirms=confirms, on_return_raises=True
        )
    except Exception as exc:
        raise _lost_error(exc, link.connection) from exc


async def declare(link: _Link, channel: Any, items: Sequence[Declarable]) -> None:
    """Declare exchanges, queues and bindings on an aiormq channel, in order."""
    try:
        await declare_topology(channel, items)
    except Exception as exc:
        raise link.channel_failure(channel, exc) from exc


# -- properties ------------------------------------------------------------------------


@functools.cache
def _library_encoded() -> type[Basic.Properties]:
    from pamqp.commands import Basic

    from ._native._framing import _encode_properties

    class LibraryEncoded(Basic.Properties):
        """pamqp properties marshalled like the native transport: a float keeps
        its 64 bits and a long header key its whole name (pamqp sends 32-bit
        floats and cuts keys at 128 bytes), bytes travel as a byte array. aiormq
        may set ``message_id`` (it does when none is given)."""

        source: Properties

        def marshal(self) -> bytes:
            final = self.source
            if self.message_id != final.message_id:
                final = attrs.evolve(final, message_id=self.message_id)
            flags, payload = _encode_properties(final)
            return struct.pack(">H", flags) + payload

    return LibraryEncoded


def _properties_out(properties: Properties | None) -> Basic.Properties:
    """Properties for aiormq's ``basic_publish``, encoded by the library's codec."""
    source = properties or Properties()
    encoded = _library_encoded()(message_id=source.message_id)
    encoded.source = source  # type: ignore[attr-defined]
    return encoded


def _properties_in(p: Basic.Properties) -> Properties:
    return Properties(
        content_type=p.content_type,
        content_encoding=p.content_encoding,
        headers=p.headers,
        delivery_mode=p.delivery_mode,
        priority=p.priority,
        correlation_id=p.correlation_id,
        reply_to=p.reply_to,
        expiration=p.expiration,
        message_id=p.message_id,
        timestamp=p.timestamp,
        type=p.message_type,
        user_id=p.user_id,
        app_id=p.app_id,
    )


# -- consuming -------------------------------------------------------------------------

#: The fields of a ``basic.deliver`` a :class:`Delivery` keeps, by the same names.
_DELIVER_FIELDS = (
    "delivery_tag",
    "redelivered",
    "exchange",
    "routing_key",
    "consumer_tag",
)


class AiormqSession(SessionBase):
    """A consuming session on aiormq: one connection, one channel, one consumer."""

    def __init__(
        self,
        link: _Link,
        channel: Any,
        consumer_tag: str,
        streams: tuple[
            MemoryObjectSendStream[Delivery], MemoryObjectReceiveStream[Delivery]
        ],
    ) -> None:
        self._link = link
        self._channel = channel
        self._send, deliveries = streams
        super().__init__(consumer_tag, deliveries)
        self._cancelled_by_broker = False
        self._ended = False

    @property
    def consumer_cancelled_by_broker(self) -> bool:
        """True once the broker sent ``basic.cancel`` for our consumer."""
        return self._cancelled_by_broker

    def on_message(self, message: DeliveredMessage) -> None:
        """aiormq's consumer callback: hand the delivery on without blocking."""
        method: Any = message.delivery  # a Basic.Deliver for a consumer
        delivery = Delivery(
            body=message.body,
            properties=_properties_in(message.header.properties),
            **{name: getattr(method, name) for name in _DELIVER_FIELDS},
        )
        try:
            self._send.send_nowait(delivery)
        except anyio.WouldBlock:
            self._link.fail(
                ProtocolError(
                    "the broker delivered more unacknowledged messages than the "
                    "prefetch count allows"
                )
            )
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass  # nobody reads any more; it is requeued on channel close

    def on_broker_cancel(self, _frame: object) -> None:
        """aiormq's consumer-cancel callback."""
        self._cancelled_by_broker = True
        self._send.close()
        logger.warning("the broker cancelled consumer %s", self.consumer_tag)

    def end(self) -> None:
        """The session is over: its tags are never sent again."""
        self._ended = True
        self._send.close()

    async def _settle(self, call: Callable[[], Coroutine[Any, Any, Any]]) -> None:
        if self._ended:
            raise ChannelClosed("the session has ended; its delivery tags are void")
        try:
            await call()
        except Exception as exc:
            raise self._link.channel_failure(self._channel, exc) from exc

    async def ack(self, delivery_tag: int, *, multiple: bool = False) -> None:
        """``basic.ack``; returns once the frame is written."""
        await self._settle(lambda: self._channel.basic_ack(delivery_tag, multiple))

    async def nack(
        self, delivery_tag: int, *, multiple: bool = False, requeue: bool = True
    ) -> None:
        """``basic.nack``; returns once the frame is written."""
        await self._settle(
            lambda: self._channel.basic_nack(delivery_tag, multiple, requeue)
        )

    async def reject(self, delivery_tag: int, *, requeue: bool = True) -> None:
        """``basic.reject``; returns once the frame is written."""
        await self._settle(
            lambda: self._channel.basic_reject(delivery_tag, requeue=requeue)
        )

    async def cancel(self) -> None:
        """Stop deliveries: ``basic.cancel`` and wait for ``cancel-ok``."""
        if not self._cancelled_by_broker:
            await self._settle(lambda: self._channel.basic_cancel(self.consumer_tag))
        self._send.close()


def _consumer_tag(prefix: str) -> str:
    return f"{prefix or 'amqp-batch'}.{os.getpid()}.aiormq.{next(_consumer_numbers)}"


@asynccontextmanager
async def open_session(spec: SessionSpec) -> AsyncIterator[AiormqSession]:
    """Connect, declare the topology, set qos, consume; yield the session.

    A broker-side channel close is raised out of the ``async with`` as
    :class:`~amqp_batch.ChannelClosed`; a lost connection as
    :class:`~amqp_batch.ConnectionLost`.
    """
    buffer = spec.delivery_buffer or max(spec.prefetch_count, 1) + 16
    async with _connect(spec.parameters) as link:
        channel = await _open_channel(link, confirms=False)
        with recording_phase(Phase.SETUP):
            await declare(link, channel, topology(spec))
        tag = spec.consumer_tag or _consumer_tag("amqp-batch")
        session = AiormqSession(
            link, channel, tag, anyio.create_memory_object_stream[Delivery](buffer)
        )
        try:
            with session.deliveries:
                await _consume(link, channel, spec, session)
                with anyio.CancelScope() as scope:
                    link.scope = scope
                    link.watch(channel)
                    yield session
        finally:
            session.end()
            await link.close(channel)
        if link.error is not None:
            raise link.error


async def _consume(
    link: _Link, channel: Any, spec: SessionSpec, session: AiormqSession
) -> None:
    try:
        await channel.basic_qos(prefetch_count=spec.prefetch_count)
        channel.on_consumer_cancel_callbacks.add(session.on_broker_cancel)
        # aiormq registers the callback before it sends basic.consume, so the
        # deliveries right behind consume-ok find it.
        await channel.basic_consume(
            spec.queue, session.on_message, consumer_tag=session.consumer_tag
        )
    except Exception as exc:
        raise link.channel_failure(channel, exc) from exc


# -- publishing ------------------------------------------------------------------------


class AiormqConfirmation:
    """The broker's answer to one publish (see
    :class:`~amqp_batch._transport._base.Confirmation`)."""

    __slots__ = ("_done", "_error")

    def __init__(self) -> None:
        self._done = anyio.Event()
        self._error: BaseException | None = None

    def settle(self, error: BaseException | None) -> None:
        """Record the outcome (the first one counts)."""
        if not self._done.is_set():
            self._error = error
            self._done.set()

    @property
    def done(self) -> bool:
        """True once the outcome is recorded."""
        return self._done.is_set()

    async def wait(self) -> None:
        """Return once confirmed; raise on a nack, a return or a lost connection."""
        await self._done.wait()
        if self._error is not None:
            raise self._error


class AiormqPublisher:
    """A confirm-mode aiormq channel on a connection of its own.

    Each publish runs ``basic_publish`` in a task of the publisher's task group;
    tasks start in the order the publishes were started and aiormq writes under a
    FIFO lock, so publishes reach the broker in that order.
    """

    def __init__(self, link: _Link, channel: Any, group: anyio.abc.TaskGroup) -> None:
        self._link = link
        self._channel = channel
        self._group = group

    @property
    def is_open(self) -> bool:
        """True while the channel and its connection are open."""
        return not (self._channel.is_closed or self._link.connection.is_closed)

    def start_publish(
        self, body: bytes, **options: Unpack[PublishOptions]
    ) -> AiormqConfirmation:
        """Queue a publish now; return its :class:`AiormqConfirmation`."""
        exchange, routing_key, properties, mandatory = publish_arguments(options)
        if not isinstance(body, bytes | bytearray | memoryview):
            raise TypeError(f"body must be bytes, not {type(body).__name__}")
        if self._link.error is not None:
            raise self._link.error
        if not self.is_open:
            raise self._link.channel_failure(self._channel, ChannelClosed("closed"))
        header_properties = _properties_out(properties)
        # Encoding happens in aiormq's task: encode once here, so a bad value
        # raises in the caller (ValueError/TypeError) instead of failing the confirm.
        header_properties.marshal()
        confirmation = AiormqConfirmation()
        self._group.start_soon(
            self._publish,
            bytes(body),
            {"exchange": exchange, "routing_key": routing_key, "mandatory": mandatory},
            header_properties,
            confirmation,
        )
        return confirmation

    async def _publish(
        self,
        body: bytes,
        where: dict[str, Any],
        properties: Basic.Properties,
        confirmation: AiormqConfirmation,
    ) -> None:
        from aiormq import exceptions as errors

        try:
            await self._channel.basic_publish(body, properties=properties, **where)
        except errors.PublishError as exc:
            returned: Any = exc.message  # the basic.return and its content
            confirmation.settle(returned_error(returned.delivery))
        except errors.DeliveryError:
            confirmation.settle(
                MessageNacked("the broker nacked the published message")
            )
        except Exception as exc:
            confirmation.settle(self._link.channel_failure(self._channel, exc))
        except BaseException:
            confirmation.settle(
                self._link.error
                or ChannelClosed("the publisher closed before the confirm")
            )
            raise
        else:
            confirmation.settle(None)

    async def publish(self, body: bytes, **options: Unpack[PublishOptions]) -> None:
        """Publish and return after the broker's confirm."""
        await self.start_publish(body, **options).wait()

    async def queue_counts(self, queue: str) -> tuple[int, int]:
        """A passive ``queue.declare``: (ready messages, consumers). A missing
        queue closes this channel (:class:`~amqp_batch.ChannelClosed`, 404)."""
        try:
            info = await self._channel.queue_declare(queue, passive=True)
        except Exception as exc:
            raise self._link.channel_failure(self._channel, exc) from exc
        return int(info.message_count), int(info.consumer_count)


@asynccontextmanager
async def open_publisher(
    parameters: ConnectionParameters, *, declare_items: Sequence[Declarable] = ()
) -> AsyncIterator[AiormqPublisher]:
    """Connect, open a confirm-mode channel, declare ``declare_items``."""
    async with _connect(parameters) as link:
        channel = await _open_channel(link, confirms=True)
        await declare(link, channel, declare_items)
        try:
            with anyio.CancelScope() as scope:
                link.scope = scope
                link.watch(channel)
                async with anyio.create_task_group() as group:
                    try:
                        yield AiormqPublisher(link, channel, group)
                    except BaseException:
                        group.cancel_scope.cancel()
                        raise
                    # publishes started but not awaited still go out, bounded
                    group.cancel_scope.deadline = anyio.current_time() + CLOSE_TIMEOUT
        finally:
            await link.close(channel)
        if link.error is not None:
            raise link.error


class AiormqTransport:
    """The transport contract on `aiormq <https://github.com/mosquito/aiormq>`_,
    for asyncio applications (``pip install 'amqp-batch[aiormq]'``).

    Same sessions, guarantees and errors as the native transport; the differences
    that remain are listed in ``docs/how-to/transports.md``. On trio it raises
    ``AsyncioOnly`` (a ``RuntimeError``): at construction when it is built
    inside trio, else when a session or publisher is first opened.
    """

    def __init__(self) -> None:
        _require_asyncio("AiormqTransport()")
        _import_aiormq()

    def __repr__(self) -> str:
        return "AiormqTransport()"

    def open_session(
        self, spec: SessionSpec
    ) -> AbstractAsyncContextManager[AiormqSession]:
        """See :func:`open_session`."""
        return open_session(spec)

    def open_publisher(
        self,
        parameters: ConnectionParameters,
        *,
        declare: Sequence[Declarable] = (),
    ) -> AbstractAsyncContextManager[AiormqPublisher]:
        """See :func:`open_publisher`."""
        return open_publisher(parameters, declare_items=declare)
