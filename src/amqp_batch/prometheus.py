"""Prometheus metrics for a consumer: ``pip install 'amqp-batch[prometheus]'``.

::

    from amqp_batch.prometheus import PrometheusHooks, serve_http

    metrics = PrometheusHooks()
    consumer = MyConsumer(settings, hooks=[metrics])
    async with anyio.create_task_group() as tg:
        await tg.start(serve_http, consumer, "127.0.0.1", 9464, metrics.registry)
        tg.start_soon(metrics.sample_consumer, consumer)
        await consumer.run()

Every metric is updated once per batch (counters are incremented by the batch's
count), except the end-to-end delay, observed per message that carries a
``timestamp`` property. The broker-side gauges come from a sampler task (a
passive ``queue.declare`` every 15 s on a connection of its own), never from the
hot path. Labels are queue names, result names, worker states and error type
names: never URLs, hosts or credentials. ``docs/how-to/monitoring.md`` has the
table.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from contextlib import suppress
from typing import TYPE_CHECKING, Any

import anyio
import attrs
from anyio import TASK_STATUS_IGNORED
from anyio.abc import TaskStatus
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from ._exceptions import ChannelClosed, TransportError
from ._exports import set_public_module
from ._hooks import BatchInfo, ConsumerHooks, HandledBatch, Settlement, Settlements
from ._http import HTTPServerError, serve_http
from ._message import Message
from ._publisher import default_transport
from ._transport._base import Transport
from ._transport._url import ConnectionParameters
from ._worker import WorkerHealth, WorkerState

if TYPE_CHECKING:
    from ._consumer import BatchConsumer

__all__ = [
    "METRIC_NAMES",
    "HTTPServerError",
    "PrometheusHooks",
    "serve_http",
]

logger = logging.getLogger("amqp_batch.prometheus")

#: Default seconds between two samples of the broker's queue counts.
SAMPLE_INTERVAL = 15.0

_BATCH_SIZE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
_DURATION_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
)
_CONFIRM_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5)
_DELAY_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 86400)

#: The name each metric is exposed under (counters get ``_total``).
METRIC_NAMES = (
    "amqp_batch_messages_total",
    "amqp_batch_batch_size",
    "amqp_batch_handler_duration_seconds",
    "amqp_batch_copy_confirm_seconds",
    "amqp_batch_end_to_end_delay_seconds",
    "amqp_batch_batches_in_handler",
    "amqp_batch_unsettled_deliveries",
    "amqp_batch_workers",
    "amqp_batch_reconnects_total",
    "amqp_batch_hook_errors_total",
    "amqp_batch_queue_messages",
    "amqp_batch_queue_consumers",
    "amqp_batch_dead_letter_queue_messages",
)


def _tally(
    settlements: Sequence[Settlement],
) -> tuple[dict[str, int], list[Message]]:
    """:meth:`Settlements.tally` for any sequence of settlements."""
    counts: dict[str, int] = {}
    for settlement in settlements:
        result = settlement.result
        label = "dead_letter" if result is None else result._value_
        counts[label] = counts.get(label, 0) + 1
    stamped = [s.message for s in settlements if s.message.timestamp is not None]
    return counts, stamped


class PrometheusHooks(ConsumerHooks):
    """Consumer hooks that keep Prometheus metrics in ``registry``.

    ``registry`` defaults to prometheus_client's global ``REGISTRY``. Use one
    instance per consumer, and one registry per instance: several consumers in
    one process each get a ``CollectorRegistry`` of their own (and a server, or a
    collector that merges them). The metrics are in ``self.registry``; give it
    to :func:`serve_http`.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry: CollectorRegistry = REGISTRY if registry is None else registry
        try:
            self._define(self.registry)
        except ValueError as exc:  # "Duplicated timeseries in CollectorRegistry"
            raise ValueError(
                f"{exc}: one PrometheusHooks per registry (give each consumer "
                "its own CollectorRegistry)"
            ) from None
        self._children: dict[tuple[str, str], Any] = {}
        #: Each worker's last known state, and deliveries in its handler.
        self._states: dict[int, WorkerState] = {}
        self._unsettled: dict[tuple[int, str], int] = {}
        for state in WorkerState:
            self.workers.labels(state=state.value).set(0)

    def _define(self, registry: CollectorRegistry) -> None:
        def counter(name: str, doc: str, labels: Sequence[str]) -> Counter:
            return Counter(name, doc, labels, registry=registry)

        def gauge(name: str, doc: str, labels: Sequence[str]) -> Gauge:
            return Gauge(name, doc, labels, registry=registry)

        def histogram(name: str, doc: str, buckets: Sequence[float]) -> Histogram:
            return Histogram(name, doc, ["queue"], buckets=buckets, registry=registry)

        p = "amqp_batch_"
        self.messages = counter(
            p + "messages", "Results applied, by queue and result.", ["queue", "result"]
        )
        self.batch_size = histogram(
            p + "batch_size",
            "Messages per batch handed to the handler.",
            _BATCH_SIZE_BUCKETS,
        )
        self.handler_duration = histogram(
            p + "handler_duration_seconds",
            "Time the handler took per batch.",
            _DURATION_BUCKETS,
        )
        self.copy_confirm = histogram(
            p + "copy_confirm_seconds",
            "From publishing a copy (REQUEUE, dead-letter) to its confirm.",
            _CONFIRM_BUCKETS,
        )
        self.end_to_end_delay = histogram(
            p + "end_to_end_delay_seconds",
            "From a message's timestamp property to its settlement.",
            _DELAY_BUCKETS,
        )
        self._define_gauges(gauge, counter)

    def _define_gauges(self, gauge: Any, counter: Any) -> None:
        p = "amqp_batch_"
        self.batches_in_handler = gauge(
            p + "batches_in_handler", "Batches in the handler now.", ["queue"]
        )
        self.unsettled = gauge(
            p + "unsettled_deliveries",
            "Deliveries handed to the handler and not settled yet.",
            ["queue"],
        )
        self.workers = gauge(p + "workers", "Workers by state.", ["state"])
        self.reconnects = counter(
            p + "reconnects",
            "Sessions that ended and were reopened, by reason.",
            ["reason"],
        )
        self.hook_errors = counter(
            p + "hook_errors",
            "Hook calls that raised (logged and ignored).",
            ["hook", "method"],
        )
        self.queue_messages = gauge(
            p + "queue_messages",
            "Messages ready in the queue (broker sample).",
            ["queue"],
        )
        self.queue_consumers = gauge(
            p + "queue_consumers", "Consumers on the queue (broker sample).", ["queue"]
        )
        self.dead_letter_messages = gauge(
            p + "dead_letter_queue_messages",
            "Messages ready in the dead-letter queue (broker sample).",
            ["queue"],
        )

    def _child(self, metric: Any, key: str, **labels: str) -> Any:
        """``metric.labels(**labels)``, cached (labels() costs a lock and a dict)."""
        cache_key = (key, "\x00".join(labels.values()))
        child = self._children.get(cache_key)
        if child is None:
            child = self._children[cache_key] = metric.labels(**labels)
        return child

    # -- hooks --------------------------------------------------------------------

    def batch_started(self, batch: BatchInfo) -> None:
        """Batch size; one more batch in the handler; its deliveries unsettled."""
        queue = batch.queue
        size = len(batch.messages)
        self._child(self.batch_size, "size", queue=queue).observe(size)
        self._child(self.batches_in_handler, "inh", queue=queue).inc()
        key = (batch.worker, queue)
        self._unsettled[key] = self._unsettled.get(key, 0) + size
        self._child(self.unsettled, "uns", queue=queue).inc(size)

    def batch_handled(self, handled: HandledBatch) -> None:
        """Handler duration; one batch less in the handler."""
        queue = handled.batch.queue
        self._child(self.handler_duration, "dur", queue=queue).observe(handled.duration)
        self._child(self.batches_in_handler, "inh", queue=queue).dec()

    def settled(
        self, worker: int, queue: str, settlements: Sequence[Settlement]
    ) -> None:
        """Results applied (one ``inc`` per result kind), end-to-end delays."""
        if isinstance(settlements, Settlements):
            # The consumer's own: counted from its records, no Settlement made.
            counts, stamped = settlements.tally()
        else:
            counts, stamped = _tally(settlements)
        if stamped:
            now = time.time()
            delay = self._child(self.end_to_end_delay, "e2e", queue=queue)
            for message in stamped:
                stamp = message.timestamp
                assert stamp is not None
                delay.observe(max(0.0, now - stamp.timestamp()))
        for label, count in counts.items():
            self._child(self.messages, "msg", queue=queue, result=label).inc(count)
        self._release(worker, queue, len(settlements))

    def _release(self, worker: int, queue: str, count: int) -> None:
        key = (worker, queue)
        held = self._unsettled.get(key, 0)
        count = min(count, held)
        if count:
            self._unsettled[key] = held - count
            self._child(self.unsettled, "uns", queue=queue).dec(count)

    def copy_confirmed(self, worker: int, queue: str, latency: float) -> None:
        """Copy confirm latency."""
        self._child(self.copy_confirm, "cc", queue=queue).observe(latency)

    def worker_state_changed(self, health: WorkerHealth, previous: WorkerState) -> None:
        """Workers by state; a worker that stops consuming holds no deliveries."""
        self._states[health.index] = health.state
        for state in WorkerState:
            count = sum(1 for known in self._states.values() if known is state)
            self._child(self.workers, "wk", state=state.value).set(count)
        if previous is WorkerState.CONSUMING or health.state is WorkerState.STOPPED:
            # Its session's unsettled deliveries go back to the queue with it.
            for key, held in list(self._unsettled.items()):
                if key[0] == health.index and held:
                    self._release(health.index, key[1], held)

    def reconnecting(
        self, health: WorkerHealth, reason: str, error: BaseException | None
    ) -> None:
        """One more reconnect for ``reason``."""
        self._child(self.reconnects, "rc", reason=reason).inc()

    def hook_failed(self, hook: str, method: str, error: Exception) -> None:
        """One more hook error."""
        self._child(self.hook_errors, "he", hook=hook, method=method).inc()

    # -- the broker sampler -------------------------------------------------------

    async def sample_broker(
        self,
        transport: Transport,
        parameters: ConnectionParameters,
        queues: Sequence[str],
        dead_letter_queues: Sequence[str] = (),
        *,
        interval: float = SAMPLE_INTERVAL,
        task_status: TaskStatus[None] = TASK_STATUS_IGNORED,
    ) -> None:
        """Every ``interval`` seconds, read each queue's ready messages and
        consumers with a passive ``queue.declare``, until cancelled;
        ``task_status.started()`` after the first round.

        Each round runs on a short connection of its own (none is held between
        rounds, so nothing breaks while it waits). A missing queue (its gauges
        are removed) closes the channel: the round goes on with the next queue
        on a new connection. Failures are logged and retried at the next round,
        never raised.
        """
        targets = [(name, False) for name in queues] + [
            (name, True) for name in dead_letter_queues
        ]
        while True:
            remaining = list(targets)
            while remaining:
                name, dead_letter = remaining[0]
                try:
                    async with transport.open_publisher(parameters) as session:
                        while remaining:
                            name, dead_letter = remaining[0]
                            await self._sample(session, name, dead_letter)
                            remaining.pop(0)
                except TransportError as exc:
                    logger.warning(
                        "broker sample of %r failed: %s",
                        name,
                        exc,
                        extra={"queue": name, "reason": type(exc).__name__},
                    )
                    missing = isinstance(exc, ChannelClosed) and exc.reply_code == 404
                    if not missing:
                        break  # the connection failed: try again next round
                    self._forget(name, dead_letter)
                    remaining.pop(0)
            task_status.started()
            task_status = TASK_STATUS_IGNORED
            await anyio.sleep(interval)

    async def _sample(self, session: Any, name: str, dead_letter: bool) -> None:
        messages, consumers = await session.queue_counts(name)
        if dead_letter:
            self.dead_letter_messages.labels(queue=name).set(messages)
        else:
            self.queue_messages.labels(queue=name).set(messages)
            self.queue_consumers.labels(queue=name).set(consumers)

    def _forget(self, name: str, dead_letter: bool) -> None:
        gauges = (
            [self.dead_letter_messages]
            if dead_letter
            else [self.queue_messages, self.queue_consumers]
        )
        for gauge in gauges:
            with suppress(KeyError):
                gauge.remove(name)

    async def sample_consumer(
        self,
        consumer: BatchConsumer[Any],
        *,
        transport: Transport | None = None,
        interval: float = SAMPLE_INTERVAL,
        task_status: TaskStatus[None] = TASK_STATUS_IGNORED,
    ) -> None:
        """:meth:`sample_broker` for ``consumer``'s queue and dead-letter queue,
        on its first broker URL, through ``transport`` (default: the native
        transport; pass the consumer's own if you gave it one)."""
        settings = consumer.settings
        first = settings.connection_parameters(0)
        name = first.connection_name or f"amqp-batch:{settings.queue_name}"
        parameters = attrs.evolve(first, connection_name=f"{name}-metrics")
        dead_letter = [settings.dead_letter_queue] if settings.dead_letter_queue else []
        await self.sample_broker(
            transport or default_transport(),
            parameters,
            [settings.queue_name],
            dead_letter,
            interval=interval,
            task_status=task_status,
        )


# The server's names, re-exported here, say where users find them.
set_public_module(__name__, globals(), ["HTTPServerError", "serve_http"])
