"""The public face of the in-memory broker."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from contextlib import AbstractAsyncContextManager

import anyio
import anyio.lowlevel

from ..._exceptions import ConnectionLost
from .._base import BindingSpec, ExchangeSpec, Properties, QueueSpec, SessionSpec
from .._url import ConnectionParameters
from ._core import BrokerCore
from ._gate import Gate
from ._model import BrokerMessage, Published, Queue
from ._session import MemoryPublisher, MemorySession, open_publisher, open_session

__all__ = ["MemoryBroker"]


class MemoryBroker:
    """An in-memory RabbitMQ for tests, implementing the transport contract.

    Pass it as ``transport=`` to a consumer or publisher and the real consumer
    actors run on it, on asyncio or trio, with no network. It models
    the four exchange types with bindings, the default and ``amq.*`` exchanges,
    queues with dead-lettering (``x-death``), ``x-max-length``, TTL, prefetch,
    redelivery, publisher confirms and returns, broker-side consumer cancellation
    and forced disconnects.

    ``users`` (name → password) turns on credential checks; ``virtual_hosts``
    restricts the accepted vhosts (all vhosts share one namespace). ``clock``
    returns seconds for message TTLs (default: the event loop's clock).

    The inspection helpers (``queue_messages``, ``message_count``, ...) raise
    ``KeyError`` for a queue that does not exist.
    """

    def __init__(
        self,
        *,
        users: Mapping[str, str] | None = None,
        virtual_hosts: Collection[str] | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._core = BrokerCore(clock, Gate(users, virtual_hosts))

    def __repr__(self) -> str:
        return (
            f"<MemoryBroker queues={len(self._core.queues)} "
            f"connections={len(self._core.channels)}>"
        )

    @property
    def published(self) -> list[Published]:
        """Every publish a client made, in order."""
        return self._core.published

    @property
    def refuse_connections(self) -> bool:
        """While True, every new connection fails with ``ConnectionRefused``."""
        return self._core.gate.refuse_connections

    @refuse_connections.setter
    def refuse_connections(self, refuse: bool) -> None:
        self._core.gate.refuse_connections = refuse

    # The transport contract

    def open_session(
        self, spec: SessionSpec
    ) -> AbstractAsyncContextManager[MemorySession]:
        """Connect, declare ``spec``'s topology, consume ``spec.queue``; yield the
        session (see the transport contract)."""
        return open_session(self._core, spec)

    def open_publisher(
        self,
        parameters: ConnectionParameters,
        *,
        declare: Sequence[ExchangeSpec | QueueSpec | BindingSpec] = (),
    ) -> AbstractAsyncContextManager[MemoryPublisher]:
        """Connect, declare ``declare`` in order; yield a confirm-mode publisher."""
        return open_publisher(self._core, parameters, declare)

    # Topology

    def declare(self, *items: ExchangeSpec | QueueSpec | BindingSpec) -> None:
        """Declare exchanges, queues and bindings in the order given, with the
        same rules as a session (idempotent; a 406 on different arguments)."""
        self._core.declare(items)

    def _inspect(self, name: str) -> Queue:
        queue = self._core.queues.get(name)
        if queue is None:
            raise KeyError(f"no queue {name!r} on this MemoryBroker")
        return queue

    def delete_queue(self, name: str) -> int:
        """Delete a queue and its messages; its consumers are cancelled by the
        broker (their stream ends, ``consumer_cancelled_by_broker`` is True).
        Returns how many ready messages were deleted (0 if there was no queue)."""
        queue = self._core.queues.get(name)
        return self._core.delete_queue(queue) if queue is not None else 0

    def delete_exchange(self, name: str) -> None:
        """Delete an exchange and its bindings (nothing if there is none)."""
        self._core.exchanges.pop(name, None)
        self._core.notify()

    def purge(self, name: str) -> int:
        """Remove a queue's ready messages; returns how many."""
        queue = self._inspect(name)
        count = len(queue.ready)
        queue.ready.clear()
        self._core.notify()
        return count

    def cancel_consumers(self, name: str) -> int:
        """Cancel every consumer of a queue from the broker side (as when a
        queue's leader moves), keeping the queue; returns how many."""
        consumers = list(self._inspect(name).consumers)
        for consumer in consumers:
            self._core.remove_consumer(consumer, by_broker=True)
        return len(consumers)

    def has_queue(self, name: str) -> bool:
        """Whether the queue exists."""
        return name in self._core.queues

    def has_exchange(self, name: str) -> bool:
        """Whether the exchange exists (``""`` is the default exchange)."""
        return name == "" or name in self._core.exchanges

    # Messages

    async def publish(
        self,
        body: bytes,
        *,
        exchange: str = "",
        routing_key: str = "",
        properties: Properties | None = None,
        mandatory: bool = False,
    ) -> None:
        """Publish without opening a connection (same routing and errors as a
        publisher session)."""
        await anyio.lowlevel.checkpoint()
        self._core.publish(body, exchange, routing_key, properties, mandatory)

    def queue_messages(self, name: str) -> list[BrokerMessage]:
        """The queue's ready messages, head first (expired ones are applied)."""
        queue = self._inspect(name)
        self._core.expire(queue)
        return [m.snapshot() for m in queue.in_order()]

    def unacked_messages(self, name: str) -> list[BrokerMessage]:
        """The queue's delivered, unsettled messages, in queue order."""
        queue = self._inspect(name)
        return [m.snapshot() for m in sorted(queue.unacked.values())]

    def get(self, name: str) -> BrokerMessage | None:
        """Take the head of the queue (``basic.get`` with auto-ack), or None."""
        queue = self._inspect(name)
        self._core.expire(queue)
        if not queue.ready:
            return None
        message = queue.pop()
        self._core.notify()
        return message.snapshot()

    def bodies(self, name: str) -> list[bytes]:
        """The bodies of the queue's ready messages, head first."""
        return [m.body for m in self.queue_messages(name)]

    def message_count(self, name: str) -> int:
        """How many messages are ready in the queue."""
        queue = self._inspect(name)
        self._core.expire(queue)
        return len(queue.ready)

    def unacked_count(self, name: str) -> int:
        """How many of the queue's messages are delivered and not yet settled."""
        return len(self._inspect(name).unacked)

    def consumer_count(self, name: str) -> int:
        """How many consumers the queue has."""
        return len(self._inspect(name).consumers)

    # Connections

    def connection_names(self) -> list[str]:
        """Names of the open connections (``connection_name`` or ``memory-N``)."""
        return list(self._core.connection_names())

    def disconnect(self, name: str | None = None) -> int:
        """Force-close connections (all, or those named ``name``) as RabbitMQ's
        ``close_connection`` does: each session raises a retryable
        :class:`~amqp_batch.ConnectionLost` (320) out of its ``async with`` and
        its unacknowledged messages go back to their queues, redelivered.
        Returns how many connections were closed."""
        victims = [
            c
            for c in list(self._core.channels.values())
            if name is None or c.connection_name == name
        ]
        for channel in victims:
            text = "CONNECTION_FORCED - closed by MemoryBroker.disconnect"
            self._core.fail(
                channel,
                ConnectionLost(
                    f"connection {channel.connection_name!r} lost: the broker closed "
                    f"it: 320 {text}",
                    reply_code=320,
                    reply_text=text,
                ),
            )
        return len(victims)

    def disconnect_all(self) -> int:
        """Force-close every connection; see :meth:`disconnect`."""
        return self.disconnect()

    def block_publishers(self) -> None:
        """Make publishes wait, as under a RabbitMQ memory alarm
        (``connection.blocked``)."""
        self._core.gate.blocked = True

    def unblock_publishers(self) -> None:
        """Let waiting and new publishes through again."""
        self._core.gate.unblock()

    # Waiting (no sleeps in tests)

    async def wait_until(
        self, predicate: Callable[[], bool], *, timeout: float | None = None
    ) -> None:
        """Wait until ``predicate()`` is true; it is re-checked after every change
        of the broker's state. Raises ``TimeoutError`` after ``timeout`` seconds."""
        with anyio.fail_after(timeout):
            while not predicate():
                await self._core.wait_for_change()

    async def wait_drained(self, name: str, *, timeout: float | None = None) -> None:
        """Wait until the queue has no ready and no unacknowledged messages."""
        await self.wait_until(
            lambda: self.message_count(name) == 0 and self.unacked_count(name) == 0,
            timeout=timeout,
        )
