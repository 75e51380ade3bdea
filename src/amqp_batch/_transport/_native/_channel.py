"""One AMQP channel: synchronous methods, consumers, publisher confirms.

Frames are handed in by the connection's reader (``handle_frame``, never blocking);
frames go out through the connection's ordered write queue (``send``, synchronous).
Because the state check and the enqueue happen together with no ``await`` between
them, no frame is ever queued for a channel after it closed (a frame behind our
``close-ok`` makes RabbitMQ close the whole connection with 504).
"""

from __future__ import annotations

import contextlib
import enum
import logging
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import anyio
from anyio.streams.memory import MemoryObjectSendStream
from pamqp import commands
from pamqp.base import Frame as MethodFrame
from pamqp.body import ContentBody

from ..._exceptions import (
    ChannelClosed,
    MessageNacked,
    MessageReturned,
    ProtocolError,
    TransportError,
)
from .._base import (
    Delivery,
    FieldTable,
    PublishOptions,
    publish_arguments,
)
from .._common import returned_error
from ._framing import (
    ContentHeaderFrame,
    IncomingContent,
    PendingContent,
    encode_ack,
    encode_nack,
    encode_publish,
    encode_reject,
    marshal_method,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from ._framing import IncomingFrame

__all__ = ["Channel", "QueueInfo"]

#: Replies that are ignored, with a warning, when no call waits for them.
_HARMLESS_REPLIES = (commands.Basic.ConsumeOk, commands.Basic.CancelOk)

logger = logging.getLogger("amqp_batch.transport")


class _ConnectionLink(Protocol):
    """What a channel needs from its connection."""

    frame_max: int

    def send(self, data: bytes) -> None: ...

    async def wait_writable(self) -> None: ...

    async def wait_unblocked(self) -> None: ...

    def release_channel(self, channel_id: int) -> None: ...


class QueueInfo(NamedTuple):
    """The broker's answer to ``queue.declare``."""

    queue: str
    message_count: int
    consumer_count: int


class _State(enum.Enum):
    OPENING = "opening"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


class Waiter:
    """A one-shot result slot that a task can wait for (an anyio-neutral future).

    Its event is made only if somebody waits before the result is in: most
    publish confirms arrive before anyone asks, and ``wait`` then returns at once.
    """

    __slots__ = ("_error", "_event", "_value", "done")

    def __init__(self) -> None:
        self._event: anyio.Event | None = None
        self._value: Any = None
        self._error: BaseException | None = None
        self.done = False

    def set_result(self, value: Any) -> None:
        if not self.done:
            self.done = True
            self._value = value
            if self._event is not None:
                self._event.set()

    def set_error(self, error: BaseException) -> None:
        if not self.done:
            self.done = True
            self._error = error
            if self._event is not None:
                self._event.set()

    async def wait(self) -> Any:
        if not self.done:
            if self._event is None:
                self._event = anyio.Event()
            await self._event.wait()
        if self._error is not None:
            raise self._error
        return self._value


class _Call:
    __slots__ = ("reply_types", "waiter")

    def __init__(self, reply_types: tuple[type[MethodFrame], ...]) -> None:
        self.reply_types = reply_types
        self.waiter = Waiter()


class _PendingPublish:
    __slots__ = ("body", "exchange", "returned", "routing_key", "waiter")

    def __init__(self, exchange: str, routing_key: str, body: bytes) -> None:
        self.exchange = exchange
        self.routing_key = routing_key
        self.body = body
        self.returned: MessageReturned | None = None
        self.waiter = Waiter()


class Channel:
    """An AMQP channel on a native :class:`~._connection.Connection`."""

    def __init__(self, connection: _ConnectionLink, channel_id: int) -> None:
        self._connection = connection
        self.channel_id = channel_id
        self._state = _State.OPENING
        self._error: TransportError | None = None
        self._calls: deque[_Call] = deque()
        self._consumers: dict[str, MemoryObjectSendStream[Delivery]] = {}
        self._content: PendingContent | None = None
        self._confirm_mode = False
        self._publish_seq = 0
        self._unconfirmed: dict[int, _PendingPublish] = {}
        self._unconfirmed_order: deque[int] = deque()
        self._close_callbacks: list[Callable[[TransportError], None]] = []
        #: consumer tags the broker cancelled (``basic.cancel`` from the broker)
        self.cancelled_by_broker: set[str] = set()

    def __repr__(self) -> str:
        return f"<Channel {self.channel_id} {self._state.value}>"

    # State

    @property
    def is_open(self) -> bool:
        """True until the channel starts closing, from either side."""
        return self._state is _State.OPEN

    @property
    def close_error(self) -> TransportError | None:
        """Why the channel closed, if it was not a normal close by us."""
        return self._error

    def on_close(self, callback: Callable[[TransportError], None]) -> None:
        """Call ``callback(error)`` once if the channel or its connection fails."""
        self._close_callbacks.append(callback)

    def _check_open(self) -> None:
        if self._state is not _State.OPEN:
            raise self._error or ChannelClosed(f"channel {self.channel_id} is closed")

    def _send_method(self, method: MethodFrame) -> None:
        self._check_open()
        self._connection.send(marshal_method(method, self.channel_id))

    async def _call(self, method: MethodFrame, *reply_types: type[MethodFrame]) -> Any:
        if self._state is _State.OPENING and isinstance(method, commands.Channel.Open):
            self._connection.send(marshal_method(method, self.channel_id))
        else:
            self._send_method(method)
        call = _Call(reply_types)
        self._calls.append(call)
        # If the caller is cancelled, the call stays queued so that its reply is
        # consumed in order and not matched to the next call.
        return await call.waiter.wait()

    # Frames from the reader

    def handle_frame(self, frame: IncomingFrame) -> None:
        """Process one incoming frame. Never blocks."""
        if frame.__class__ is Delivery:  # a whole message (FrameParser)
            if self._content is not None:
                raise ProtocolError("a new message started before the last one ended")
            self._send_delivery(frame)
        elif isinstance(frame, ContentBody):
            self._content_body(frame)
        elif isinstance(frame, ContentHeaderFrame):
            self._content_header(frame)
        elif isinstance(frame, commands.Basic.Deliver | commands.Basic.Return):
            self._start_content(frame)
        elif self._state is _State.CLOSING and not isinstance(
            frame, commands.Channel.Close | commands.Channel.CloseOk
        ):
            return  # after our channel.close, only close/close-ok matter
        elif isinstance(frame, commands.Basic.Ack | commands.Basic.Nack):
            self._confirm(frame)
        elif isinstance(frame, commands.Basic.Cancel):
            self._broker_cancel(frame)
        elif isinstance(frame, commands.Channel.Close):
            self._broker_close(frame)
        elif isinstance(frame, commands.Basic.GetOk):
            self._start_content(frame)
        elif isinstance(frame, commands.Channel.Flow):
            self._connection.send(
                marshal_method(commands.Channel.FlowOk(frame.active), self.channel_id)
            )
        else:
            self._reply(frame)

    def _reply(self, frame: Any) -> None:
        calls = self._calls
        if not calls or not isinstance(frame, calls[0].reply_types):
            if isinstance(frame, _HARMLESS_REPLIES):
                # Seen from RabbitMQ 3.10 during a rolling restart of a cluster
                # (a consume-ok nothing waited for): it carries no state we
                # need (consumers are registered before basic.consume is sent),
                # so it is not worth the connection.
                logger.warning(
                    "ignoring an unexpected %s on channel %d",
                    frame.name,
                    self.channel_id,
                )
                return
            if not calls:
                raise ProtocolError(
                    f"unexpected {frame.name} on channel {self.channel_id}"
                )
            expected = ", ".join(t.name for t in calls[0].reply_types)
            raise ProtocolError(
                f"expected {expected} on channel {self.channel_id}, got {frame.name}"
            )
        calls.popleft().waiter.set_result(frame)

    def _start_content(
        self,
        method: commands.Basic.Deliver | commands.Basic.Return | commands.Basic.GetOk,
    ) -> None:
        if self._content is not None:
            raise ProtocolError("a new message started before the last one ended")
        self._content = PendingContent(method)

    def _content_header(self, frame: ContentHeaderFrame) -> None:
        if self._content is None:
            raise ProtocolError("content header without a method")
        message = self._content.add_header(frame)
        if message is not None:
            self._content = None
            self._content_complete(message)

    def _content_body(self, frame: ContentBody) -> None:
        if self._content is None:
            raise ProtocolError("content body without a method")
        message = self._content.add_body(frame)
        if message is not None:
            self._content = None
            self._content_complete(message)

    def _content_complete(self, message: IncomingContent) -> None:
        method: Any = message.method  # pamqp types every field as optional
        if isinstance(method, commands.Basic.Deliver):
            self._deliver(message.method, message)
        elif isinstance(method, commands.Basic.Return):
            self._returned(method, message)
        else:
            call = self._calls.popleft()
            call.waiter.set_result(
                Delivery(
                    delivery_tag=method.delivery_tag,
                    redelivered=method.redelivered,
                    exchange=method.exchange,
                    routing_key=method.routing_key,
                    consumer_tag="",
                    body=message.body,
                    properties=message.properties,
                )
            )

    def _deliver(self, method: Any, message: IncomingContent) -> None:
        self._send_delivery(
            Delivery(
                delivery_tag=method.delivery_tag,
                redelivered=method.redelivered,
                exchange=method.exchange,
                routing_key=method.routing_key,
                consumer_tag=method.consumer_tag,
                body=message.body,
                properties=message.properties,
            )
        )

    def _send_delivery(self, delivery: Delivery) -> None:
        if self._state is not _State.OPEN:
            return  # the broker requeues it when the channel closes
        sink = self._consumers.get(delivery.consumer_tag)
        if sink is None:
            return  # a consumer we cancelled; the broker requeues it
        try:
            sink.send_nowait(delivery)
        except anyio.WouldBlock:
            raise ProtocolError(
                "the broker delivered more unacknowledged messages than the "
                "prefetch count allows"
            ) from None
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass  # nobody reads any more; it is requeued on channel close

    def _returned(self, method: Any, message: IncomingContent) -> None:
        # RabbitMQ sends basic.return before the confirm of the same message, and
        # returns in publish order: the oldest unconfirmed publish that matches is it.
        for seq in self._unconfirmed_order:
            pending = self._unconfirmed.get(seq)
            if (
                pending is not None
                and pending.returned is None
                and pending.exchange == method.exchange
                and pending.routing_key == method.routing_key
                and pending.body == message.body
            ):
                pending.returned = returned_error(method)
                return
        logger.debug("basic.return for a message we no longer track")

    def _confirm(self, frame: commands.Basic.Ack | commands.Basic.Nack) -> None:
        tag = frame.delivery_tag
        if frame.multiple:
            order = self._unconfirmed_order
            while order and order[0] <= tag:
                pending = self._unconfirmed.pop(order.popleft(), None)
                if pending is not None:
                    self._settle_publish(pending, frame)
        else:
            pending = self._unconfirmed.pop(tag, None)
            if pending is not None:
                self._settle_publish(pending, frame)
            order = self._unconfirmed_order
            while order and order[0] not in self._unconfirmed:
                order.popleft()

    @staticmethod
    def _settle_publish(
        pending: _PendingPublish, frame: commands.Basic.Ack | commands.Basic.Nack
    ) -> None:
        if isinstance(frame, commands.Basic.Nack):
            pending.waiter.set_error(
                MessageNacked("the broker nacked the published message")
            )
        elif pending.returned is not None:
            pending.waiter.set_error(pending.returned)
        else:
            pending.waiter.set_result(None)

    def _broker_cancel(self, frame: commands.Basic.Cancel) -> None:
        tag = str(frame.consumer_tag)
        self.cancelled_by_broker.add(tag)
        sink = self._consumers.pop(tag, None)
        if sink is not None:
            sink.close()
        logger.warning("the broker cancelled consumer %s", tag)
        if not frame.nowait:
            self._connection.send(
                marshal_method(commands.Basic.CancelOk(tag), self.channel_id)
            )

    def _broker_close(self, frame: Any) -> None:
        error = ChannelClosed(
            f"the broker closed channel {self.channel_id}: "
            f"{frame.reply_code} {frame.reply_text}",
            reply_code=frame.reply_code,
            reply_text=frame.reply_text,
            class_id=frame.class_id,
            method_id=frame.method_id,
        )
        if self._state is not _State.CLOSED:
            # close-ok goes out after every frame queued so far; nothing can be
            # queued for this channel afterwards because the state is CLOSED first.
            self._state = _State.CLOSED
            self._connection.send(
                marshal_method(commands.Channel.CloseOk(), self.channel_id)
            )
        self._finish(error)

    def _finish(self, error: TransportError | None) -> None:
        """Mark closed, fail everything waiting, release the channel number."""
        self._state = _State.CLOSED
        self._error = error
        self.replies_gone(
            error or ChannelClosed(f"channel {self.channel_id} was closed")
        )
        consumers, self._consumers = self._consumers, {}
        for sink in consumers.values():
            sink.close()
        self._connection.release_channel(self.channel_id)
        if error is not None:
            for callback in self._close_callbacks:
                callback(error)
        self._close_callbacks.clear()

    def replies_gone(self, error: TransportError) -> None:
        """Nothing more will be read on this connection (its tasks were cancelled
        with our caller): fail whoever waits for a reply or a confirm. Frames may
        still be queued; they are flushed when the connection closes."""
        calls, self._calls = self._calls, deque()
        for call in calls:
            call.waiter.set_error(error)
        pending, self._unconfirmed = self._unconfirmed, {}
        self._unconfirmed_order.clear()
        for publish in pending.values():
            publish.waiter.set_error(error)

    def connection_lost(self, error: TransportError) -> None:
        """The connection died: this channel is gone with it."""
        if self._state is not _State.CLOSED:
            self._finish(error)

    # Opening and closing

    async def open(self) -> None:
        """Send ``channel.open`` and wait for ``open-ok``."""
        await self._call(commands.Channel.Open(), commands.Channel.OpenOk)
        if self._state is _State.OPENING:
            self._state = _State.OPEN

    async def close(self, timeout: float = 5.0) -> None:
        """Close the channel; best effort and bounded, safe when cancelled."""
        if self._state is not _State.OPEN:
            if self._state is _State.OPENING:
                self._finish(None)
            return
        self._connection.send(
            marshal_method(
                commands.Channel.Close(200, "Normal shutdown", 0, 0), self.channel_id
            )
        )
        self._state = _State.CLOSING
        call = _Call((commands.Channel.CloseOk,))
        # Drop calls still waiting: after channel.close their replies never come.
        for pending_call in self._calls:
            pending_call.waiter.set_error(
                ChannelClosed(f"channel {self.channel_id} is closing")
            )
        self._calls.clear()
        self._calls.append(call)
        with anyio.move_on_after(timeout, shield=True):
            # if the connection goes away, the channel is gone with it
            with contextlib.suppress(TransportError):
                await call.waiter.wait()
        if self._state is not _State.CLOSED:
            self._finish(None)

    # Synchronous methods

    async def exchange_declare(
        self,
        exchange: str,
        exchange_type: str = "direct",
        *,
        passive: bool = False,
        durable: bool = False,
        auto_delete: bool = False,
        internal: bool = False,
        arguments: FieldTable | None = None,
    ) -> None:
        """``exchange.declare``."""
        await self._call(
            commands.Exchange.Declare(
                exchange=exchange,
                exchange_type=exchange_type,
                passive=passive,
                durable=durable,
                auto_delete=auto_delete,
                internal=internal,
                arguments=dict(arguments) if arguments else None,
            ),
            commands.Exchange.DeclareOk,
        )

    async def exchange_delete(self, exchange: str, *, if_unused: bool = False) -> None:
        """``exchange.delete``."""
        await self._call(
            commands.Exchange.Delete(exchange=exchange, if_unused=if_unused),
            commands.Exchange.DeleteOk,
        )

    async def exchange_bind(
        self,
        destination: str,
        source: str,
        routing_key: str = "",
        arguments: FieldTable | None = None,
    ) -> None:
        """``exchange.bind``: route messages from ``source`` to ``destination``."""
        await self._call(
            commands.Exchange.Bind(
                destination=destination,
                source=source,
                routing_key=routing_key,
                arguments=dict(arguments) if arguments else None,
            ),
            commands.Exchange.BindOk,
        )

    async def queue_declare(
        self,
        queue: str = "",
        *,
        passive: bool = False,
        durable: bool = False,
        exclusive: bool = False,
        auto_delete: bool = False,
        arguments: FieldTable | None = None,
    ) -> QueueInfo:
        """``queue.declare``; with ``passive=True`` only checks that it exists."""
        reply = await self._call(
            commands.Queue.Declare(
                queue=queue,
                passive=passive,
                durable=durable,
                exclusive=exclusive,
                auto_delete=auto_delete,
                arguments=dict(arguments) if arguments else None,
            ),
            commands.Queue.DeclareOk,
        )
        return QueueInfo(reply.queue, reply.message_count, reply.consumer_count)

    async def queue_bind(
        self,
        queue: str,
        exchange: str,
        routing_key: str = "",
        arguments: FieldTable | None = None,
    ) -> None:
        """``queue.bind``."""
        await self._call(
            commands.Queue.Bind(
                queue=queue,
                exchange=exchange,
                routing_key=routing_key,
                arguments=dict(arguments) if arguments else None,
            ),
            commands.Queue.BindOk,
        )

    async def queue_purge(self, queue: str) -> int:
        """``queue.purge``; returns how many messages were removed."""
        reply = await self._call(
            commands.Queue.Purge(queue=queue), commands.Queue.PurgeOk
        )
        return int(reply.message_count)

    async def queue_delete(
        self, queue: str, *, if_unused: bool = False, if_empty: bool = False
    ) -> int:
        """``queue.delete``; returns how many messages were deleted with it."""
        reply = await self._call(
            commands.Queue.Delete(queue=queue, if_unused=if_unused, if_empty=if_empty),
            commands.Queue.DeleteOk,
        )
        return int(reply.message_count)

    async def basic_qos(self, prefetch_count: int, *, global_: bool = False) -> None:
        """``basic.qos`` (per consumer unless ``global_``)."""
        await self._call(
            commands.Basic.Qos(prefetch_count=prefetch_count, global_=global_),
            commands.Basic.QosOk,
        )

    async def confirm_select(self) -> None:
        """Put the channel into publisher-confirm mode."""
        await self._call(commands.Confirm.Select(), commands.Confirm.SelectOk)
        self._confirm_mode = True

    async def basic_consume(
        self,
        queue: str,
        consumer_tag: str,
        sink: MemoryObjectSendStream[Delivery],
        *,
        exclusive: bool = False,
        arguments: FieldTable | None = None,
    ) -> None:
        """Start consuming ``queue`` into ``sink``.

        The consumer is registered *before* ``basic.consume`` is sent, so deliveries
        that arrive right behind ``consume-ok`` are never dropped.
        """
        if not consumer_tag:
            raise ValueError("a consumer tag is required (the client chooses it)")
        self._check_open()
        self._consumers[consumer_tag] = sink
        try:
            await self._call(
                commands.Basic.Consume(
                    queue=queue,
                    consumer_tag=consumer_tag,
                    exclusive=exclusive,
                    arguments=dict(arguments) if arguments else None,
                ),
                commands.Basic.ConsumeOk,
            )
        except BaseException:
            self._consumers.pop(consumer_tag, None)
            raise

    async def basic_cancel(self, consumer_tag: str) -> None:
        """Cancel our consumer; its sink closes after ``cancel-ok``."""
        if consumer_tag in self._consumers and self.is_open:
            await self._call(
                commands.Basic.Cancel(consumer_tag=consumer_tag),
                commands.Basic.CancelOk,
            )
        sink = self._consumers.pop(consumer_tag, None)
        if sink is not None:
            sink.close()

    async def basic_get(self, queue: str, *, no_ack: bool = True) -> Delivery | None:
        """``basic.get``: one message, or ``None`` when the queue is empty."""
        reply = await self._call(
            commands.Basic.Get(queue=queue, no_ack=no_ack),
            commands.Basic.GetOk,
            commands.Basic.GetEmpty,
        )
        return reply if isinstance(reply, Delivery) else None

    # Acknowledgements

    def ack(self, delivery_tag: int, *, multiple: bool = False) -> None:
        """Queue ``basic.ack``. Raises :class:`ChannelClosed` if the channel closed,
        so a tag from a dead channel is never sent."""
        self._check_open()
        self._connection.send(encode_ack(self.channel_id, delivery_tag, multiple))

    def nack(
        self, delivery_tag: int, *, multiple: bool = False, requeue: bool = True
    ) -> None:
        """Queue ``basic.nack``."""
        self._check_open()
        self._connection.send(
            encode_nack(self.channel_id, delivery_tag, multiple, requeue)
        )

    def reject(self, delivery_tag: int, *, requeue: bool = True) -> None:
        """Queue ``basic.reject``."""
        self._check_open()
        self._connection.send(encode_reject(self.channel_id, delivery_tag, requeue))

    # Publishing

    async def publish(self, body: bytes, **options: Unpack[PublishOptions]) -> None:
        """Publish a message; in confirm mode, return after the broker's confirm.

        Waits while the connection is blocked. Raises :class:`MessageNacked` or
        :class:`MessageReturned` (``mandatory`` and unroutable).
        """
        await self._connection.wait_unblocked()
        pending = self.start_publish(body, **options)
        if pending is None:
            return
        await self._connection.wait_writable()
        await pending.wait()

    def start_publish(
        self, body: bytes, **options: Unpack[PublishOptions]
    ) -> Waiter | None:
        """Queue a publish now; return a :class:`Waiter` for its confirm (``None``
        outside confirm mode). Lets callers pipeline many publishes."""
        if not isinstance(body, bytes | bytearray | memoryview):
            raise TypeError(f"body must be bytes, not {type(body).__name__}")
        exchange, routing_key, properties, mandatory = publish_arguments(options)
        data = encode_publish(
            self.channel_id,
            bytes(body),
            exchange,
            routing_key,
            properties,
            mandatory,
            self._connection.frame_max,
        )
        self._check_open()
        self._connection.send(data)
        if not self._confirm_mode:
            return None
        self._publish_seq += 1
        pending = _PendingPublish(exchange, routing_key, bytes(body))
        self._unconfirmed[self._publish_seq] = pending
        self._unconfirmed_order.append(self._publish_seq)
        return pending.waiter
