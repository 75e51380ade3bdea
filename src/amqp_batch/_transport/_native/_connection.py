"""An AMQP 0-9-1 connection on an anyio byte stream.

``connect(parameters)`` is an async context manager. Inside it a task group runs
the frame reader, the writer and the heartbeat; when any of them sees the
connection die it records the error and cancels the group, and the error is
raised out of ``connect`` as a :class:`~amqp_batch.ConnectionLost` (never as a
bare cancellation, never wrapped in an exception group).

Outgoing frames go through one ordered write queue: ``send`` appends whole
encoded frames synchronously, so a frame is never half-written when a caller is
cancelled, and the writer coalesces everything queued into one socket write.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import platform
import ssl
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, NoReturn

import anyio
from anyio.abc import ByteStream, TaskGroup
from pamqp import commands
from pamqp.base import Frame as MethodFrame
from pamqp.header import ProtocolHeader
from pamqp.heartbeat import Heartbeat

from ..._exceptions import (
    AuthenticationError,
    ConnectionLost,
    ConnectionRefused,
    ProtocolError,
    TransportError,
    UnknownVirtualHost,
    connection_close_error,
    unwrap_group,
)
from ..._version import __version__
from .._url import ConnectionParameters
from ._channel import Channel
from ._framing import FrameParser, IncomingFrame, marshal_method
from ._network import NetworkBackend, TCPNetwork

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

__all__ = ["Connection", "connect"]

logger = logging.getLogger("amqp_batch.transport")

_RECEIVE_SIZE = 65536
#: Above this many queued bytes, publishers wait for the writer to catch up.
_WRITE_HIGH_WATER = 1 << 20
_HEARTBEAT_FRAME = Heartbeat.marshal()
_TCP = TCPNetwork()


class Connection:
    """A live AMQP connection on a byte stream.

    :func:`connect` opens the stream, runs the handshake and then runs the
    connection with :meth:`running`; nothing else starts its tasks.
    """

    def __init__(
        self,
        parameters: ConnectionParameters,
        stream: ByteStream,
        parser: FrameParser,
    ) -> None:
        self.parameters = parameters
        self._stream = stream
        self._parser = parser
        self.frame_max = parameters.frame_max
        self.channel_max = parameters.channel_max
        self.heartbeat = 0
        self.server_properties: dict[str, Any] = {}
        self._channels: dict[int, Channel] = {}
        self._last_channel_id = 0
        self._outgoing: list[bytes] = []
        self._outgoing_size = 0
        self._has_outgoing = anyio.Event()
        self._drained = anyio.Event()
        self._drained.set()
        self._blocked_reason: str | None = None
        self._unblocked = anyio.Event()
        self._unblocked.set()
        self._error: TransportError | None = None
        self._closing = False
        self._failed_while_open = False
        self._tasks_alive = True
        self._close_ok = anyio.Event()
        self._task_group: TaskGroup | None = None
        self._last_received = anyio.current_time()

    def __repr__(self) -> str:
        state = "closed" if self._error or self._closing else "open"
        return f"<Connection {self.parameters.redacted_url} {state}>"

    # Introspection

    @property
    def is_open(self) -> bool:
        """True until the connection starts closing or fails."""
        return self._error is None and not self._closing

    @property
    def blocked(self) -> bool:
        """True while the broker blocks publishing (``connection.blocked``)."""
        return self._blocked_reason is not None

    # The write queue

    def send(self, data: bytes) -> None:
        """Queue whole frames for writing. Synchronous: never half-written."""
        if self._error is not None:
            raise self._error
        outgoing = self._outgoing
        outgoing.append(data)
        self._outgoing_size += len(data)
        if self._outgoing_size > _WRITE_HIGH_WATER and self._drained.is_set():
            self._drained = anyio.Event()
        if len(outgoing) == 1:
            # The first frame since the writer took the queue wakes it; behind
            # it the event is set already (one set per write, not per frame).
            self._has_outgoing.set()

    async def wait_writable(self) -> None:
        """Wait while more than the high-water mark of bytes waits to be written."""
        while not self._drained.is_set():
            await self._drained.wait()
            if self._error is not None:
                raise self._error

    async def wait_unblocked(self) -> None:
        """Wait while the broker blocks this connection (e.g. a memory alarm)."""
        while self._blocked_reason is not None:
            await self._unblocked.wait()
        if self._error is not None:
            raise self._error

    async def _writer(self) -> None:
        # What the writer takes out of the queue is written whole even if the
        # connection's tasks are cancelled meanwhile (shielded), so acks queued just
        # before a cancellation still reach the broker; the shield is bounded so a
        # peer that stopped reading cannot hold the close up for long.
        write_timeout = self.parameters.connection_timeout or 10.0
        while True:
            await self._has_outgoing.wait()
            self._has_outgoing = anyio.Event()
            if not self._outgoing:
                continue
            outgoing = self._outgoing
            data = b"".join(outgoing) if len(outgoing) > 1 else outgoing[0]
            self._outgoing = []
            self._outgoing_size = 0
            with anyio.move_on_after(write_timeout, shield=True) as scope:
                await self._stream.send(data)
            if scope.cancelled_caught:
                raise ConnectionLost(
                    f"writing to {self.parameters.redacted_url} timed out after "
                    f"{write_timeout} s"
                )
            if not self._drained.is_set() and self._outgoing_size <= _WRITE_HIGH_WATER:
                self._drained.set()

    # Reading

    async def _reader(self) -> None:
        parser = self._parser
        receive = self._stream.receive
        channels = self._channels
        while True:
            data = await receive(_RECEIVE_SIZE)
            self._last_received = anyio.current_time()
            for channel_id, frame in parser.feed(data):
                if channel_id:
                    channel = channels.get(channel_id)
                    if channel is not None:
                        channel.handle_frame(frame)
                else:
                    self._connection_frame(frame)

    def _connection_frame(self, frame: IncomingFrame) -> None:
        if isinstance(frame, Heartbeat):
            return
        if isinstance(frame, commands.Connection.Close):
            self.send(marshal_method(commands.Connection.CloseOk(), 0))
            self._has_outgoing.set()
            raise _close_error(frame)
        if isinstance(frame, commands.Connection.CloseOk):
            self._close_ok.set()
        elif isinstance(frame, commands.Connection.Blocked):
            self._blocked_reason = frame.reason or "blocked"
            self._unblocked = anyio.Event()
            logger.warning(
                "the broker blocked connection %s: %s",
                self.parameters.redacted_url,
                self._blocked_reason,
            )
        elif isinstance(frame, commands.Connection.Unblocked):
            self._blocked_reason = None
            self._unblocked.set()
            logger.info(
                "the broker unblocked connection %s", self.parameters.redacted_url
            )
        else:
            raise ProtocolError(f"unexpected {_frame_name(frame)} on channel 0")

    # Heartbeats

    async def _heartbeats(self) -> None:
        interval = self.heartbeat
        next_send = anyio.current_time() + interval / 2
        while True:
            now = anyio.current_time()
            silent_deadline = self._last_received + 2 * interval
            if now >= silent_deadline:
                raise ConnectionLost(
                    f"no data from the broker for {2 * interval} s "
                    f"(2 x heartbeat) on {self.parameters.redacted_url}"
                )
            if now >= next_send:
                self.send(_HEARTBEAT_FRAME)
                next_send = now + interval / 2
            await anyio.sleep_until(min(silent_deadline, next_send))

    # Supervision

    async def _supervise(self, job: Any) -> None:
        """Run a background job; on failure record why and tear everything down."""
        try:
            await job()
        except anyio.get_cancelled_exc_class():
            self._task_gone()
            raise
        except TransportError as exc:
            self._fail(exc)
        except (
            OSError,
            anyio.BrokenResourceError,
            anyio.EndOfStream,
            anyio.ClosedResourceError,
            ssl.SSLError,
        ) as exc:
            if self._closing and self._close_ok.is_set():
                return
            lost = ConnectionLost(
                f"connection to {self.parameters.redacted_url} lost: {_describe(exc)}"
            )
            lost.__cause__ = exc
            self._fail(lost)
        except Exception as exc:
            error = ProtocolError(f"internal error in the AMQP connection: {exc!r}")
            error.__cause__ = exc
            self._fail(error)

    def _task_gone(self) -> None:
        """A background task was cancelled (we are closing, or our caller was
        cancelled): nothing more will be read, so nobody may wait for a reply."""
        self._tasks_alive = False
        self._close_ok.set()
        gone = ConnectionLost(
            f"connection to {self.parameters.redacted_url} is closing"
        )
        for channel in list(self._channels.values()):
            channel.replies_gone(gone)

    def _fail(self, error: TransportError) -> None:
        if self._error is None:
            self._error = error
            if not self._closing:
                self._failed_while_open = True
                logger.warning("%s", error)
        for channel in list(self._channels.values()):
            channel.connection_lost(error)
        self._unblocked.set()
        self._drained.set()
        self._close_ok.set()
        if self._task_group is not None:
            self._task_group.cancel_scope.cancel()

    # Channels

    def release_channel(self, channel_id: int) -> None:
        """Forget a closed channel (called by the channel)."""
        self._channels.pop(channel_id, None)

    @asynccontextmanager
    async def channel(self) -> AsyncIterator[Channel]:
        """Open a channel; close it (bounded, shielded) on exit."""
        if self._error is not None:
            raise self._error
        # Numbers rotate instead of reusing the lowest free one: a frame still in
        # flight for a closed channel (a close-ok crossing the broker's own
        # channel.close) must never reach a new channel with the same number.
        last = self._last_channel_id
        channel_id = next(
            (
                n
                for n in itertools.chain(
                    range(last + 1, self.channel_max + 1), range(1, last + 1)
                )
                if n not in self._channels
            ),
            0,
        )
        if not channel_id:
            raise TransportError("no free channel numbers on this connection")
        self._last_channel_id = channel_id
        channel = Channel(self, channel_id)
        self._channels[channel_id] = channel
        try:
            await channel.open()
            yield channel
        finally:
            with anyio.CancelScope(shield=True):
                if self._error is None and self._tasks_alive:
                    await channel.close()
                else:
                    channel.connection_lost(
                        self._error or ConnectionLost("the connection is closing")
                    )

    # Lifecycle

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Connection]:
        """Run the reader, writer and heartbeat in a task group of its own.

        On exit the connection closes gracefully (``connection.close``, bounded by
        ``connection_timeout``, shielded) and its stream is closed. A failure of the
        connection is raised out of the ``async with`` as the
        :class:`~amqp_batch.TransportError` it recorded (``ConnectionLost``, ...),
        never as a bare cancellation or an exception group. Runs once.
        """
        if self._task_group is not None:
            raise RuntimeError("the connection is already running")
        try:
            async with anyio.create_task_group() as task_group:
                self._task_group = task_group
                task_group.start_soon(self._supervise, self._reader)
                task_group.start_soon(self._supervise, self._writer)
                if self.heartbeat:
                    task_group.start_soon(self._supervise, self._heartbeats)
                try:
                    yield self
                finally:
                    with anyio.CancelScope(shield=True):
                        await self._close(self.parameters.connection_timeout or 5.0)
                        self._closing = True
                        task_group.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            real = unwrap_group(group)
            if real is group:
                raise
            real.__suppress_context__ = True
            raise real  # noqa: B904 - the group only wrapped it
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.aclose_forcefully(self._stream)
        if self._error is not None and self._failed_while_open:
            raise self._error

    # Closing

    async def _close(self, timeout: float) -> None:
        """Graceful close: connection.close, wait for close-ok (bounded).

        If our caller was cancelled, the reader and writer are gone with it: then
        whatever is queued (acks included) and connection.close are written
        directly, best effort and briefly, and the socket is closed.
        """
        if self._error is not None or self._closing:
            return
        self._closing = True
        close = marshal_method(
            commands.Connection.Close(200, "Normal shutdown", 0, 0), 0
        )
        if self._tasks_alive:
            self.send(close)
            with anyio.move_on_after(timeout):
                await self._close_ok.wait()
            if self._tasks_alive:
                return
        data = b"".join([*self._outgoing, close])
        self._outgoing = []
        with anyio.move_on_after(min(timeout, 1.0)):
            # best effort: the socket is closed next in any case
            with contextlib.suppress(
                OSError,
                anyio.BrokenResourceError,
                anyio.ClosedResourceError,
                anyio.BusyResourceError,
                ssl.SSLError,
            ):
                await self._stream.send(data)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _close_error(frame: Any) -> TransportError:
    return connection_close_error(
        f"the broker closed the connection: {frame.reply_code} {frame.reply_text}",
        reply_code=frame.reply_code,
        reply_text=frame.reply_text,
        class_id=frame.class_id,
        method_id=frame.method_id,
    )


# Connecting and the handshake


def _client_properties(parameters: ConnectionParameters) -> dict[str, Any]:
    properties: dict[str, Any] = {
        "product": "amqp-batch",
        "version": __version__,
        "platform": f"Python {platform.python_version()}",
        "information": "https://pypi.org/project/amqp-batch/",
        "capabilities": {
            "publisher_confirms": True,
            "consumer_cancel_notify": True,
            "connection.blocked": True,
            "basic.nack": True,
            "authentication_failure_close": True,
            "exchange_exchange_bindings": True,
            "per_consumer_qos": True,
        },
    }
    if parameters.connection_name:
        properties["connection_name"] = parameters.connection_name
    return properties


def _tls_context(parameters: ConnectionParameters) -> ssl.SSLContext:
    if parameters.ssl_context is not None:
        context = parameters.ssl_context
        if context.verify_mode == ssl.CERT_NONE or not context.check_hostname:
            what = (
                "certificate and host name"
                if context.verify_mode == ssl.CERT_NONE
                else "host name"
            )
            logger.warning(
                "TLS %s verification is OFF for %s (the ssl_context given does "
                "not check it); the broker is not authenticated",
                what,
                parameters.redacted_url,
            )
        return context
    if not parameters.verify_tls:
        logger.warning(
            "TLS certificate and host name verification is OFF for %s; "
            "the connection is encrypted but the broker is not authenticated",
            parameters.redacted_url,
        )
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    return ssl.create_default_context(ssl.Purpose.SERVER_AUTH)


async def _open_stream(
    parameters: ConnectionParameters, network: NetworkBackend
) -> ByteStream:
    where = f"{parameters.host}:{parameters.port}"
    try:
        return await network.open(
            parameters.host,
            parameters.port,
            ssl_context=_tls_context(parameters) if parameters.tls else None,
        )
    except TimeoutError:
        raise  # an OSError too, but connect() reports it as a timeout
    except ssl.SSLCertVerificationError as exc:
        raise ConnectionRefused(
            f"TLS certificate verification failed for {where}: {exc.verify_message}",
            certificate_rejected=True,
        ) from exc
    except ssl.SSLError as exc:
        raise ConnectionRefused(f"TLS handshake with {where} failed: {exc}") from exc
    except OSError as exc:
        raise ConnectionRefused(
            f"cannot connect to {parameters.redacted_url}: {_describe(exc)}"
        ) from exc


class _Handshake:
    """Reads frames one by one on channel 0 during the opening handshake."""

    def __init__(self, stream: ByteStream, parameters: ConnectionParameters) -> None:
        self.stream = stream
        self.parameters = parameters
        self.parser = FrameParser(max_frame_size=131072)
        self.pending: list[tuple[int, IncomingFrame]] = []
        #: The broker answers bad credentials with connection.close 403 (it
        #: offered ``authentication_failure_close``), so a connection that ends
        #: during authentication is a network failure, retried like any other.
        self.closes_on_auth_failure = False

    def _not_amqp(self, detail: str) -> NoReturn:
        raise ProtocolError(
            f"{self.parameters.host}:{self.parameters.port} does not speak "
            f"AMQP 0-9-1 ({detail})"
        )

    async def expect(self, *types: type[MethodFrame], stage: str) -> Any:
        while not self.pending:
            try:
                data = await self.stream.receive(_RECEIVE_SIZE)
            except (anyio.EndOfStream, anyio.BrokenResourceError, OSError) as exc:
                if stage == "authentication" and not self.closes_on_auth_failure:
                    # Only a broker that cannot say "access refused" (no
                    # authentication_failure_close) hangs up on bad credentials.
                    raise AuthenticationError(
                        "the broker closed the connection during authentication of "
                        f"user {self.parameters.username!r} on vhost "
                        f"{self.parameters.virtual_host!r}"
                    ) from exc
                raise ConnectionRefused(
                    f"{self.parameters.redacted_url} closed the connection during "
                    f"the handshake ({stage})"
                ) from exc
            try:
                self.pending.extend(self.parser.feed(data))
            except ProtocolError as exc:
                self._not_amqp(str(exc))
        _, frame = self.pending.pop(0)
        if isinstance(frame, commands.Connection.Close):
            raise self._handshake_close(frame)
        if not isinstance(frame, types):
            self._not_amqp(f"expected {types[0].name}, got {_frame_name(frame)}")
        return frame

    def _handshake_close(self, frame: commands.Connection.Close) -> TransportError:
        code, text = frame.reply_code, frame.reply_text
        user, vhost = self.parameters.username, self.parameters.virtual_host
        if code == 403:
            return AuthenticationError(
                f"the broker refused user {user!r} on vhost {vhost!r}: {code} {text}",
                reply_code=code,
                reply_text=text,
            )
        if code == 530:
            return UnknownVirtualHost(
                f"vhost {vhost!r} does not exist or user {user!r} may not use it: "
                f"{code} {text}",
                reply_code=code,
                reply_text=text,
            )
        return _close_error(frame)


def _negotiate(client: int, server: int) -> int:
    """The smaller non-zero value of the two; zero only if both are zero."""
    if client and server:
        return min(client, server)
    return client or server


async def _handshake(
    stream: ByteStream, parameters: ConnectionParameters
) -> Connection:
    shake = _Handshake(stream, parameters)
    await stream.send(ProtocolHeader().marshal())
    start = await shake.expect(commands.Connection.Start, stage="start")
    if "PLAIN" not in str(start.mechanisms).split():
        raise ProtocolError("the broker does not offer PLAIN authentication")
    capabilities = (start.server_properties or {}).get("capabilities")
    shake.closes_on_auth_failure = isinstance(capabilities, dict) and bool(
        capabilities.get("authentication_failure_close")
    )
    response = f"\0{parameters.username}\0{parameters.password}"
    await stream.send(
        marshal_method(
            commands.Connection.StartOk(
                client_properties=_client_properties(parameters),
                mechanism="PLAIN",
                response=response,
                locale="en_US",
            ),
            0,
        )
    )
    tune = await shake.expect(commands.Connection.Tune, stage="authentication")
    channel_max = _negotiate(parameters.channel_max, tune.channel_max) or 65535
    frame_max = _negotiate(parameters.frame_max, tune.frame_max) or 131072
    heartbeat = _negotiate(parameters.heartbeat, tune.heartbeat)
    await stream.send(
        marshal_method(
            commands.Connection.TuneOk(
                channel_max=channel_max, frame_max=frame_max, heartbeat=heartbeat
            ),
            0,
        )
        + marshal_method(
            commands.Connection.Open(virtual_host=parameters.virtual_host), 0
        )
    )
    await shake.expect(commands.Connection.OpenOk, stage="vhost")
    parser = shake.parser
    parser.max_frame_size = frame_max
    connection = Connection(parameters, stream, parser)
    connection.frame_max = frame_max
    connection.channel_max = channel_max
    connection.heartbeat = heartbeat
    connection.server_properties = dict(start.server_properties or {})
    if shake.pending:  # pragma: no cover - the broker waits for us after open-ok
        raise ProtocolError("unexpected frames right after connection.open-ok")
    return connection


@asynccontextmanager
async def connect(
    parameters: ConnectionParameters, *, network: NetworkBackend | None = None
) -> AsyncIterator[Connection]:
    """Connect, authenticate, tune, open the vhost; close gracefully on exit.

    ``network`` opens the byte stream (default :class:`TCPNetwork`: TCP, and TLS
    for ``amqps``); the connection then runs in :meth:`Connection.running`.

    Raises :class:`~amqp_batch.ConnectionRefused`,
    :class:`~amqp_batch.AuthenticationError`, :class:`~amqp_batch.UnknownVirtualHost`
    or :class:`~amqp_batch.ProtocolError` if the connection cannot be made, and
    :class:`~amqp_batch.ConnectionLost` out of the ``async with`` when it dies.
    """
    try:
        with anyio.fail_after(parameters.connection_timeout or None):
            stream = await _open_stream(parameters, network or _TCP)
            try:
                connection = await _handshake(stream, parameters)
            except BaseException:
                await anyio.aclose_forcefully(stream)
                raise
    except TimeoutError as exc:
        raise ConnectionRefused(
            f"timed out after {parameters.connection_timeout} s connecting to "
            f"{parameters.redacted_url}"
        ) from exc
    logger.debug(
        "connected to %s (heartbeat %s s, frame_max %s)",
        parameters.redacted_url,
        connection.heartbeat,
        connection.frame_max,
    )
    async with connection.running():
        yield connection


def _frame_name(frame: IncomingFrame) -> str:
    """The AMQP name of a frame (a whole :class:`Delivery` has none)."""
    name: str = getattr(frame, "name", type(frame).__name__)
    return name
