"""The memory broker's rules: declare, route, enqueue, dispatch, settle, close.

Everything here is synchronous and runs to completion between two checkpoints of
the calling task, so the broker's state never changes under a task's feet and
runs are deterministic. Deliveries are pushed into each consumer's stream with
``send_nowait`` while it has prefetch credit and buffer space.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, TypeVar

import anyio
import anyio.lowlevel
import attrs

from ..._exceptions import (
    ChannelClosed,
    MessageNacked,
    MessageReturned,
    ProtocolError,
    TransportError,
)
from .._base import (
    BindingSpec,
    ExchangeSpec,
    Properties,
    QueueSpec,
)
from .._url import ConnectionParameters
from ._deadletter import dead_letter_properties, is_cycle
from ._declare import (
    channel_error,
    check_exchange_equivalent,
    check_queue_arguments,
    check_queue_equivalent,
)
from ._gate import Gate
from ._model import (
    Binding,
    Channel,
    Consumer,
    Exchange,
    Published,
    Queue,
    StoredMessage,
    Unacked,
)
from ._routing import EXCHANGE_TYPES, matches
from ._wire import through_the_wire

__all__ = ["BrokerCore", "Settle"]

Settle = Literal["ack", "requeue", "reject"]

_PREDEFINED = {
    "amq.direct": "direct",
    "amq.fanout": "fanout",
    "amq.topic": "topic",
    "amq.headers": "headers",
    "amq.match": "headers",
}


def _default_clock() -> float:
    try:
        return anyio.current_time()
    except Exception:  # no event loop running (a synchronous caller)
        return time.monotonic()


_Spec = TypeVar("_Spec", ExchangeSpec, QueueSpec)


def _with_own_arguments(spec: _Spec) -> _Spec:
    # A copy of the arguments: the caller's mapping may change after declaring.
    arguments = dict(spec.arguments) if spec.arguments else None
    return attrs.evolve(spec, arguments=arguments)


def _not_found(kind: str, name: str) -> ChannelClosed:
    return channel_error(404, f"NOT_FOUND - no {kind} '{name}' in vhost '/'")


class BrokerCore:
    """The broker's state and rules, held by the public broker and its sessions.

    Its methods are the broker's side of the AMQP methods a session sends; every
    change of state ends with :meth:`notify`.
    """

    def __init__(self, clock: Callable[[], float] | None, gate: Gate) -> None:
        self._clock = clock or _default_clock
        self.gate = gate
        self.exchanges: dict[str, Exchange] = {
            name: Exchange(spec=ExchangeSpec(name=name, type=kind))
            for name, kind in _PREDEFINED.items()
        }
        self.queues: dict[str, Queue] = {}
        self.channels: dict[int, Channel] = {}
        self._seq = itertools.count(1)
        self._connection_ids = itertools.count(1)
        self._changed: anyio.Event | None = None
        #: Queues that held a message with a TTL (the expiry timer looks there).
        self._timed: dict[str, Queue] = {}
        #: Every publish a client made, in order.
        self.published: list[Published] = []

    # Change notification (for waiting helpers)

    def notify(self) -> None:
        """Wake every :meth:`wait_for_change` waiter."""
        event, self._changed = self._changed, None
        if event is not None:
            event.set()

    async def wait_for_change(self) -> None:
        """Return after the next change of the broker's state."""
        if self._changed is None:
            self._changed = anyio.Event()
        await self._changed.wait()

    # Lookups

    def queue_named(self, name: str) -> Queue:
        """The queue, or the 404 channel error RabbitMQ gives for a missing one."""
        queue = self.queues.get(name)
        if queue is None:
            raise _not_found("queue", name)
        return queue

    def exchange_named(self, name: str) -> Exchange:
        """The exchange, or the 404 channel error for a missing one."""
        exchange = self.exchanges.get(name)
        if exchange is None:
            raise _not_found("exchange", name)
        return exchange

    # Declarations

    def declare(
        self,
        items: Iterable[ExchangeSpec | QueueSpec | BindingSpec],
        owner: int | None = None,
    ) -> None:
        """Declare ``items`` in order; exclusive queues belong to ``owner``."""
        try:
            for item in items:
                if isinstance(item, ExchangeSpec):
                    self._declare_exchange(item)
                elif isinstance(item, QueueSpec):
                    self._declare_queue(item, owner)
                else:
                    self._bind(item)
        finally:
            self.notify()

    def _declare_exchange(self, spec: ExchangeSpec) -> None:
        if not spec.name or spec.name.startswith("amq."):
            return  # predefined: the native transport does not declare them either
        if spec.type not in EXCHANGE_TYPES:
            raise ProtocolError(
                f"the broker closed the connection: 503 COMMAND_INVALID - invalid "
                f"exchange type '{spec.type}'",
                reply_code=503,
                reply_text=f"COMMAND_INVALID - invalid exchange type '{spec.type}'",
            )
        existing = self.exchanges.get(spec.name)
        if existing is not None:
            check_exchange_equivalent(existing.spec, spec)
            return
        self.exchanges[spec.name] = Exchange(spec=_with_own_arguments(spec))

    def _declare_queue(self, spec: QueueSpec, owner: int | None) -> None:
        if not spec.name:
            spec = attrs.evolve(spec, name=f"amq.gen-{next(self._seq)}")
        elif spec.name.startswith("amq."):
            raise channel_error(
                403,
                f"ACCESS_REFUSED - queue name '{spec.name}' contains reserved "
                "prefix 'amq.*'",
            )
        existing = self.queues.get(spec.name)
        if existing is not None:
            self._check_exclusive(existing, owner)
            check_queue_equivalent(existing.spec, spec)
            return
        check_queue_arguments(spec)
        self.queues[spec.name] = Queue(
            spec=_with_own_arguments(spec), owner=owner if spec.exclusive else None
        )

    @staticmethod
    def _check_exclusive(queue: Queue, connection_id: int | None) -> None:
        if queue.owner is not None and queue.owner != connection_id:
            raise channel_error(
                405,
                f"RESOURCE_LOCKED - cannot obtain exclusive access to locked queue "
                f"'{queue.name}' in vhost '/'",
            )

    def _bind(self, spec: BindingSpec) -> None:
        if not spec.exchange:
            raise channel_error(
                403, "ACCESS_REFUSED - operation not permitted on the default exchange"
            )
        self.queue_named(spec.queue)
        exchange = self.exchange_named(spec.exchange)
        arguments = dict(spec.arguments) if spec.arguments else None
        for binding in exchange.bindings:
            if (binding.queue, binding.routing_key, binding.arguments) == (
                spec.queue,
                spec.routing_key,
                arguments,
            ):
                return
        exchange.bindings.append(
            Binding(queue=spec.queue, routing_key=spec.routing_key, arguments=arguments)
        )

    def delete_queue(self, queue: Queue) -> int:
        """Delete ``queue``, cancelling its consumers; how many ready messages went."""
        count = len(queue.ready)
        queue.deleted = True
        queue.ready.clear()
        self.queues.pop(queue.name, None)
        for exchange in self.exchanges.values():
            exchange.bindings = [b for b in exchange.bindings if b.queue != queue.name]
        for consumer in list(queue.consumers):
            self.remove_consumer(consumer, by_broker=True)
        self.notify()
        return count

    # Routing and enqueueing

    def _route(
        self, exchange: Exchange, routing_key: str, headers: Mapping[str, Any] | None
    ) -> list[Queue]:
        seen: set[str] = set()
        current: Exchange | None = exchange
        while current is not None and current.spec.name not in seen:
            seen.add(current.spec.name)
            names = dict.fromkeys(
                b.queue
                for b in current.bindings
                if matches(
                    current.spec.type, b.routing_key, b.arguments, routing_key, headers
                )
            )
            if names:
                return [self.queues[name] for name in names]
            alternate = (current.spec.arguments or {}).get("alternate-exchange")
            current = self.exchanges.get(alternate) if alternate else None
        return []

    def _targets(
        self, exchange: str, routing_key: str, headers: Mapping[str, Any] | None
    ) -> list[Queue]:
        if exchange == "":
            queue = self.queues.get(routing_key)
            return [queue] if queue is not None else []
        return self._route(self.exchange_named(exchange), routing_key, headers)

    def publish(
        self,
        body: bytes,
        exchange: str,
        routing_key: str,
        properties: Properties | None,
        mandatory: bool,
    ) -> None:
        """Route and enqueue one client publish; raise as a confirm would."""
        if not isinstance(body, bytes | bytearray | memoryview):
            raise TypeError(f"body must be bytes, not {type(body).__name__}")
        properties = through_the_wire(properties)
        expiration = properties.expiration
        if expiration is not None and not (
            expiration.isdigit() and expiration.isascii()
        ):
            raise channel_error(
                406, f"PRECONDITION_FAILED - invalid expiration '{expiration}'"
            )
        if exchange and self.exchange_named(exchange).spec.internal:
            raise channel_error(
                403,
                f"ACCESS_REFUSED - cannot publish to internal exchange '{exchange}' "
                "in vhost '/'",
            )
        queues = self._targets(exchange, routing_key, properties.headers)
        body = bytes(body)
        self.published.append(
            Published(
                body=body,
                properties=properties,
                exchange=exchange,
                routing_key=routing_key,
                mandatory=mandatory,
                queues=tuple(q.name for q in queues),
            )
        )
        accepted = [
            self._enqueue(q, body, properties, exchange, routing_key) for q in queues
        ]
        self.notify()
        if mandatory and not queues:
            raise MessageReturned(
                "message returned by the broker: 312 NO_ROUTE "
                f"(exchange={exchange!r}, routing_key={routing_key!r})",
                reply_code=312,
                reply_text="NO_ROUTE",
                exchange=exchange,
                routing_key=routing_key,
            )
        if not all(accepted):
            raise MessageNacked("the broker nacked the published message")

    def _enqueue(
        self,
        queue: Queue,
        body: bytes,
        properties: Properties,
        exchange: str,
        routing_key: str,
    ) -> bool:
        """Add a message to ``queue``; False when its length limit refused it."""
        now = self._clock()
        message = StoredMessage(
            seq=next(self._seq),
            body=body,
            properties=properties,
            exchange=exchange,
            routing_key=routing_key,
            expires_at=self._expiry(queue, properties, now),
        )
        if message.expires_at is not None:
            self._timed[queue.name] = queue
        overflow = queue.argument("x-overflow") or "drop-head"
        if overflow != "drop-head" and self._over_limit(queue, len(body), 1):
            if overflow == "reject-publish-dlx":
                self._dead_letter(queue, message, "maxlen")
            return False
        queue.push(message)
        self._dispatch(queue)
        while queue.ready and self._over_limit(queue, 0, 0):
            self._dead_letter(queue, queue.pop(), "maxlen")
        return True

    @staticmethod
    def _expiry(queue: Queue, properties: Properties, now: float) -> float | None:
        ttls = [queue.argument("x-message-ttl")]
        if properties.expiration is not None:
            ttls.append(int(properties.expiration))
        valid = [t for t in ttls if isinstance(t, int)]
        return now + min(valid) / 1000 if valid else None

    @staticmethod
    def _over_limit(queue: Queue, extra_bytes: int, extra_count: int) -> bool:
        max_length = queue.argument("x-max-length")
        max_bytes = queue.argument("x-max-length-bytes")
        return (
            isinstance(max_length, int) and len(queue.ready) + extra_count > max_length
        ) or (
            isinstance(max_bytes, int) and queue.ready_bytes() + extra_bytes > max_bytes
        )

    def _dead_letter(self, queue: Queue, message: StoredMessage, reason: str) -> None:
        arguments = queue.spec.arguments or {}
        if "x-dead-letter-exchange" not in arguments:
            return  # no DLX: the message is dropped
        exchange = str(arguments["x-dead-letter-exchange"])
        routing_key = str(
            arguments.get("x-dead-letter-routing-key", message.routing_key)
        )
        properties = dead_letter_properties(
            message.properties,
            reason=reason,
            queue=queue.name,
            exchange=message.exchange,
            routing_key=message.routing_key,
        )
        if exchange and exchange not in self.exchanges:
            return  # a missing DLX drops the message, as in RabbitMQ
        for target in self._targets(exchange, routing_key, properties.headers):
            if not is_cycle(properties, target.name):
                self._enqueue(target, message.body, properties, exchange, routing_key)

    async def expire_on_time(self) -> None:
        """Dead-letter every message when its TTL passes, whether or not its
        queue has a consumer (RabbitMQ expires on a timer too: a delay queue
        has no consumer). Runs while a session is open, on the event loop's
        clock; with a test's own clock expiry stays lazy (on inspection)."""
        if self._clock is not _default_clock:
            await anyio.sleep_forever()
        while True:
            due = min(
                (
                    m.expires_at
                    for queue in self._timed.values()
                    for m in queue.ready
                    if m.expires_at is not None
                ),
                default=math.inf,
            )
            with anyio.move_on_at(due):
                await self.wait_for_change()
            for queue in list(self._timed.values()):
                if queue.deleted or not queue.ready:
                    self._timed.pop(queue.name, None)
                else:
                    self.expire(queue)

    def expire(self, queue: Queue) -> None:
        """Dead-letter (or drop) the queue's ready messages whose TTL passed."""
        now = self._clock()
        expired = [
            m for m in queue.ready if m.expires_at is not None and m.expires_at <= now
        ]
        if not expired:
            return
        queue.ready[:] = [m for m in queue.ready if m not in expired]
        queue.ready.sort()
        for message in sorted(expired):
            self._dead_letter(queue, message, "expired")

    # Delivering

    def _dispatch(self, queue: Queue) -> None:
        """Deliver ready messages while some consumer has credit."""
        if queue.deleted:
            return
        now = self._clock()
        while queue.ready:
            consumer = self._next_consumer(queue)
            if consumer is None:
                break
            message = queue.pop()
            if message.expires_at is not None and message.expires_at < now:
                self._dead_letter(queue, message, "expired")
            else:
                self._deliver(consumer, queue, message)
        self.expire(queue)

    @staticmethod
    def _next_consumer(queue: Queue) -> Consumer | None:
        consumers = queue.consumers
        if queue.argument("x-single-active-consumer") is True:
            consumers = consumers[:1]
        for index, consumer in enumerate(consumers):
            if consumer.has_capacity():
                if len(consumers) > 1:  # round robin
                    queue.consumers.append(queue.consumers.pop(index))
                return consumer
        return None

    def _deliver(
        self, consumer: Consumer, queue: Queue, message: StoredMessage
    ) -> None:
        channel = consumer.channel
        tag = channel.next_tag()
        channel.unacked[tag] = Unacked(queue, message, consumer)
        consumer.unacked += 1
        queue.unacked[message.seq] = message
        delivery = message.delivery(tag, consumer.tag)
        # Nobody reading any more: like a client that dropped it, it stays unacked
        # until the channel closes and then goes back to the queue.
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
            consumer.sink.send_nowait(delivery)

    # Consumers

    def consume(self, channel: Channel, consumer: Consumer) -> None:
        """Add ``consumer`` (``basic.consume``) and deliver to it."""
        queue = consumer.queue
        self._check_exclusive(queue, channel.connection_id)
        queue.consumers.append(consumer)
        channel.consumers[consumer.tag] = consumer
        self._dispatch(queue)
        self.notify()

    def remove_consumer(self, consumer: Consumer, *, by_broker: bool = False) -> None:
        """End ``consumer``'s stream (``basic.cancel``, or the broker's own)."""
        if not consumer.active:
            return
        consumer.active = False
        consumer.cancelled_by_broker = by_broker
        queue = consumer.queue
        if consumer in queue.consumers:
            queue.consumers.remove(consumer)
        consumer.channel.consumers.pop(consumer.tag, None)
        consumer.sink.close()
        if queue.spec.auto_delete and not queue.consumers and not queue.deleted:
            self.delete_queue(queue)
        self.notify()

    # Settling

    def check_open(self, channel: Channel) -> None:
        """Raise why ``channel`` is closed, if it is."""
        error = channel.connection_error or channel.error
        if error is not None:
            raise error
        if channel.closed:
            raise ChannelClosed("channel 1 is closed")

    def settle(
        self, channel: Channel, tag: int, *, multiple: bool, how: Settle
    ) -> None:
        """Apply an ack (``how="ack"``), a requeue or a reject (dead-letter)."""
        self.check_open(channel)
        if tag == 0 and multiple:
            tags = list(channel.unacked)
        elif tag not in channel.unacked:
            self.fail(
                channel,
                channel_error(406, f"PRECONDITION_FAILED - unknown delivery tag {tag}"),
            )
            return
        else:
            tags = list(channel.tags_up_to(tag)) if multiple else [tag]
        touched: dict[str, Queue] = {}
        for settled in tags:
            queue, message, consumer = channel.unacked.pop(settled)
            consumer.unacked -= 1
            queue.unacked.pop(message.seq, None)
            touched[queue.name] = queue
            if queue.deleted or how == "ack":
                continue
            if how == "requeue":
                message.redelivered = True
                queue.push(message)
            else:
                self._dead_letter(queue, message, "rejected")
        for queue in touched.values():
            self._dispatch(queue)
        self.notify()

    # Closing

    def _requeue_all(self, channel: Channel) -> None:
        entries, channel.unacked = list(channel.unacked.values()), {}
        touched: dict[str, Queue] = {}
        for queue, message, consumer in entries:
            consumer.unacked -= 1
            queue.unacked.pop(message.seq, None)
            if not queue.deleted:
                message.redelivered = True
                queue.push(message)
                touched[queue.name] = queue
        for queue in touched.values():
            self._dispatch(queue)

    def close_channel(self, channel: Channel) -> None:
        """Close like ``channel.close``: consumers go, unacked messages go back to
        their queues in order (``redelivered``), exclusive queues are deleted."""
        if channel.closed:
            return
        channel.closed = True
        for consumer in list(channel.consumers.values()):
            self.remove_consumer(consumer)
        self._requeue_all(channel)
        for queue in list(self.queues.values()):
            if queue.owner == channel.connection_id:
                self.delete_queue(queue)
        self.channels.pop(channel.connection_id, None)
        self.notify()

    def fail(self, channel: Channel, error: TransportError) -> None:
        """The broker closes the channel (a ``ChannelClosed``) or the whole
        connection (a ``ConnectionLost``); the session's body is cancelled."""
        if channel.closed:
            return
        if isinstance(error, ChannelClosed):
            channel.error = error
        else:
            channel.connection_error = error
        self.close_channel(channel)
        if channel.on_failure is not None:
            channel.on_failure()

    async def connect(self, parameters: ConnectionParameters) -> Channel:
        """Open a connection (with its one channel) if the gate lets it in."""
        await anyio.lowlevel.checkpoint()
        self.gate.check(parameters)
        return self._open_channel(parameters.connection_name)

    def _open_channel(self, name: str | None) -> Channel:
        number = next(self._connection_ids)
        channel = Channel(
            connection_id=number, connection_name=name or f"memory-{number}"
        )
        self.channels[number] = channel
        self.notify()
        return channel

    def connection_names(self) -> Sequence[str]:
        """Names of the open connections."""
        return [c.connection_name for c in self.channels.values()]
