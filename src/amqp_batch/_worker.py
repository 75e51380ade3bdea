"""One worker: a supervised actor owning one connection, with a session loop.

Each session runs receiver -> batcher -> handler runner(s) -> acker in a task
group. A retryable transport error ends the session; the worker backs off
(exponential, full jitter) and opens a new one, on the next broker URL. A
non-retryable error stops the consumer with that error.
"""

from __future__ import annotations

import enum
import logging
import random
import sys
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from typing import Any

import anyio
import attrs
from anyio import (
    CancelScope,
    create_memory_object_stream,
    create_task_group,
    current_time,
    move_on_after,
)

from ._actors.acker import Acker, Outcome
from ._actors.batcher import Intake, run_batcher
from ._actors.handler import run_handler_runner
from ._actors.ledger import AckLedger
from ._exceptions import ChannelClosed, ConsumerCancelled, TransportError
from ._hooks import HookDispatcher
from ._logging import set_log_context
from ._message import Message
from ._retry import RetryPolicy
from ._settings import BatchConsumerSettings
from ._transport._base import (
    BindingSpec,
    ExchangeSpec,
    QueueSpec,
    Session,
    SessionSpec,
    Transport,
)
from ._transport._url import ConnectionParameters

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

__all__ = ["Worker", "WorkerHealth", "WorkerState", "inside_consumer"]

logger = logging.getLogger("amqp_batch.worker")

#: True in the tasks of a running consumer (so ``stop()`` from a handler does not
#: wait for its own batch to finish).
inside_consumer: ContextVar[bool] = ContextVar("amqp_batch_inside", default=False)

#: Channel errors that mean "the topology in the settings is wrong", when raised
#: while the session is being set up: ACCESS_REFUSED, NOT_FOUND, PRECONDITION_FAILED.
_SETUP_ERRORS = frozenset({403, 404, 406})


class WorkerState(enum.Enum):
    """Where a worker is in its life."""

    CONNECTING = "connecting"
    CONSUMING = "consuming"
    BACKING_OFF = "backing_off"
    STOPPING = "stopping"
    STOPPED = "stopped"


@attrs.frozen(kw_only=True)
class WorkerHealth:
    """A snapshot of one worker."""

    #: The worker's number, from 0.
    index: int
    state: WorkerState
    #: How often the worker entered ``backing_off`` (failed or ended sessions).
    reconnect_count: int
    #: The last transport error, as ``Type: message`` (never contains a password).
    last_error: str | None
    #: Results applied so far, by name (``ack``, ``nack``, ``requeue``,
    #: ``requeue_immediate``) plus ``dead_lettered``.
    results: Mapping[str, int]
    #: The broker URL in use, password redacted.
    url: str


def topology(
    settings: BatchConsumerSettings,
) -> tuple[list[ExchangeSpec], list[QueueSpec], list[BindingSpec]]:
    """What every session declares for ``settings``."""
    exchanges: list[ExchangeSpec] = []
    queues: list[QueueSpec] = []
    bindings: list[BindingSpec] = []
    arguments: dict[str, Any] = dict(settings.queue_arguments or {})
    if settings.dead_letter_exchange:
        arguments.setdefault("x-dead-letter-exchange", settings.dead_letter_exchange)
        exchanges.append(
            ExchangeSpec(
                name=settings.dead_letter_exchange,
                type=settings.dead_letter_exchange_type,
                durable=settings.exchange_durable,
            )
        )
        if settings.dead_letter_queue:
            queues.append(
                QueueSpec(
                    name=settings.dead_letter_queue, durable=settings.queue_durable
                )
            )
            bindings.append(
                BindingSpec(
                    queue=settings.dead_letter_queue,
                    exchange=settings.dead_letter_exchange,
                    routing_key="#"
                    if settings.dead_letter_exchange_type == "topic"
                    else "",
                )
            )
    if settings.exchange_name:
        exchanges.append(
            ExchangeSpec(
                name=settings.exchange_name,
                type=settings.exchange_type,
                durable=settings.exchange_durable,
            )
        )
    queues.append(
        QueueSpec(
            name=settings.queue_name,
            durable=settings.queue_durable,
            arguments=arguments or None,
        )
    )
    if settings.exchange_name:
        routing_key = settings.routing_key
        bindings.append(
            BindingSpec(
                queue=settings.queue_name,
                exchange=settings.exchange_name,
                # aio-pika binds with the queue's name when no key is given.
                routing_key=settings.queue_name if routing_key is None else routing_key,
            )
        )
    return exchanges, queues, bindings


def retry_policy(settings: BatchConsumerSettings) -> RetryPolicy:
    """The acker's retry and dead-letter rules for ``settings``."""
    arguments = settings.queue_arguments or {}
    exchange = settings.dead_letter_exchange or arguments.get("x-dead-letter-exchange")
    routing_key = arguments.get("x-dead-letter-routing-key")
    return RetryPolicy(
        queue=settings.queue_name,
        max_requeue_attempts=settings.max_requeue_attempts,
        dead_letter_exchange=exchange if isinstance(exchange, str) else None,
        dead_letter_routing_key=routing_key if isinstance(routing_key, str) else None,
    )


def transport_error(exc: BaseException) -> TransportError | None:
    """The transport error ``exc`` stands for, if it (or every non-cancellation
    leaf of its group) is one; otherwise None (a bug: let it propagate)."""
    if isinstance(exc, TransportError):
        return exc
    if not isinstance(exc, BaseExceptionGroup):
        return None
    found: TransportError | None = None
    cancelled = anyio.get_cancelled_exc_class()
    for leaf in _leaves(exc):
        if isinstance(leaf, TransportError):
            found = found or leaf
        elif not isinstance(leaf, cancelled):
            return None
    return found


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    leaves: list[BaseException] = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            leaves.extend(_leaves(exc))
        else:
            leaves.append(exc)
    return leaves


class Worker:
    """One consuming actor with its own connection."""

    def __init__(
        self,
        index: int,
        settings: BatchConsumerSettings,
        handler: Callable[[Sequence[Message]], Any],
        transport: Transport,
        stop_requested: anyio.Event,
        on_consuming: Callable[[Worker], None],
        *,
        rng: random.Random | None = None,
        on_state_change: Callable[[Worker, WorkerState], None] | None = None,
        hooks: HookDispatcher | None = None,
    ) -> None:
        self.index = index
        self._settings = settings
        self._handler = handler
        self._transport = transport
        self._stop_requested = stop_requested
        self._on_consuming = on_consuming
        self._on_state_change = on_state_change
        self._rng = rng or random.Random()
        self._hooks = hooks or HookDispatcher()
        #: The error that ended the last session (for the ``reconnecting`` hook).
        self._last_exception: BaseException | None = None
        self._policy = retry_policy(settings)
        self._exchanges, self._queues, self._bindings = topology(settings)
        self._state = WorkerState.CONNECTING
        self._reconnect_count = 0
        self._last_error: str | None = None
        self._counts: Counter[str] = Counter()
        self._url = settings.connection_parameters(index).redacted_url
        self.fatal_error: TransportError | None = None

    @property
    def state(self) -> WorkerState:
        """The worker's current state."""
        return self._state

    def _set_state(self, state: WorkerState) -> None:
        """Move to ``state``; on a change, call ``on_state_change(self, previous)``
        (synchronously, after the state is set)."""
        previous, self._state = self._state, state
        if previous is not state and self._on_state_change is not None:
            self._on_state_change(self, previous)

    def health(self) -> WorkerHealth:
        """A snapshot of this worker."""
        return WorkerHealth(
            index=self.index,
            state=self._state,
            reconnect_count=self._reconnect_count,
            last_error=self._last_error,
            results=dict(self._counts),
            url=self._url,
        )

    def _connection_name(self) -> str:
        base = (
            self._settings.connection_name or f"amqp-batch:{self._settings.queue_name}"
        )
        return f"{base}-w{self.index}"

    async def run(self) -> None:
        """Consume until a stop is requested or a non-retryable error occurs.

        A non-retryable error is stored in :attr:`fatal_error` (the consumer stops
        all workers and raises it); anything that is not a transport error is a
        bug and propagates.
        """
        inside_consumer.set(True)
        # This task's context (and its children's, the handler's) logs these.
        set_log_context(queue=self._settings.queue_name, worker=self.index)
        failures = 0
        try:
            while not self._stop_requested.is_set():
                parameters = self._settings.connection_parameters(
                    self.index + self._reconnect_count
                )
                self._url = parameters.redacted_url
                self._set_state(WorkerState.CONNECTING)
                try:
                    await self._run_session(parameters)
                except Exception as exc:
                    error = transport_error(exc)
                    if error is None:
                        raise
                    if self._stop_requested.is_set():
                        break
                    self._last_error = f"{type(error).__name__}: {error}"
                    self._last_exception = error
                    if not self._is_retryable(error):
                        logger.exception("worker %d: not retrying", self.index)
                        self.fatal_error = error
                        return
                else:
                    break
                failures = 0 if self._consumed_last else failures + 1
                await self._back_off(failures)
        finally:
            self._set_state(WorkerState.STOPPED)

    def _is_retryable(self, error: TransportError) -> bool:
        if isinstance(error, ChannelClosed):
            # A channel error while declaring (bad arguments, refused access)
            # would recur on every attempt: fail fast instead of looping.
            if not self._consumed_last:
                return error.retryable and error.reply_code not in _SETUP_ERRORS
            # Once consuming, a closed channel (e.g. 406 after the broker's
            # consumer_timeout) is that channel's end: open a new one.
            return True
        return error.retryable

    async def _back_off(self, failures: int) -> None:
        self._reconnect_count += 1
        self._set_state(WorkerState.BACKING_OFF)
        reconnecting = self._hooks.reconnecting
        if reconnecting is not None:
            error, self._last_exception = self._last_exception, None
            reason = type(error).__name__ if error is not None else "SessionEnded"
            reconnecting(self.health(), reason, error)
        ceiling = min(
            self._settings.reconnect_backoff_cap,
            self._settings.reconnect_backoff_base * 2 ** min(failures, 32),
        )
        delay = self._rng.uniform(0, ceiling)
        logger.warning(
            "worker %d: %s; reconnecting in %.2f s", self.index, self._last_error, delay
        )
        with move_on_after(delay):
            await self._stop_requested.wait()

    async def _run_session(self, parameters: ConnectionParameters) -> None:
        self._consumed_last = False
        name = self._connection_name()
        spec = SessionSpec(
            parameters=attrs.evolve(parameters, connection_name=name),
            queue=self._settings.queue_name,
            prefetch_count=self._settings.prefetch_count,
            exchanges=self._exchanges,
            queues=self._queues,
            bindings=self._bindings,
        )
        publisher_parameters = attrs.evolve(
            parameters, connection_name=f"{name}-publisher"
        )
        async with self._transport.open_session(spec) as session:
            self._consumed_last = True
            self._set_state(WorkerState.CONSUMING)
            self._on_consuming(self)
            await self._run_pipeline(session, publisher_parameters)
            cancelled_by_broker = session.consumer_cancelled_by_broker
        if not self._stop_requested.is_set():
            # Deliveries ended without a stop: the broker cancelled the consumer
            # (e.g. the queue was deleted). Back off and redeclare.
            raise ConsumerCancelled(
                "the broker cancelled the consumer"
                if cancelled_by_broker
                else "the delivery stream ended"
            )

    _consumed_last = False

    async def _run_pipeline(
        self, session: Session, publisher_parameters: ConnectionParameters
    ) -> None:
        settings = self._settings
        ledger = AckLedger()
        to_handlers, handler_input = create_memory_object_stream[list[Message]](0)
        to_acker, acker_input = create_memory_object_stream[list[Outcome]](
            settings.max_concurrent_batches
        )
        ends: list[Any] = [
            to_handlers,
            handler_input,
            to_acker,
            acker_input,
        ]
        acker = Acker(
            session,
            ledger,
            self._policy,
            lambda: self._transport.open_publisher(publisher_parameters),
            self._counts,
            hooks=self._hooks,
            worker=self.index,
        )
        try:
            async with create_task_group() as supervisor:
                with CancelScope() as pipeline_scope:
                    async with create_task_group() as pipeline:
                        pipeline.start_soon(acker.run, acker_input)
                        for _ in range(settings.max_concurrent_batches):
                            pipeline.start_soon(
                                lambda b, a: run_handler_runner(
                                    b,
                                    a,
                                    self._handler,
                                    fallback=settings.unhandled_exception_action,
                                    hooks=self._hooks,
                                    worker=self.index,
                                    queue=settings.queue_name,
                                ),
                                _track(ends, handler_input.clone()),
                                _track(ends, to_acker.clone()),
                            )
                        intake = await pipeline.start(
                            lambda task_status: run_batcher(
                                session.deliveries,
                                ledger,
                                to_handlers,
                                _track(ends, to_acker.clone()),
                                batch_size=settings.batch_size,
                                batch_timeout=settings.batch_timeout,
                                max_batch_bytes=settings.max_batch_bytes,
                                task_status=task_status,
                            )
                        )
                        handler_input.close()
                        to_acker.close()
                        supervisor.start_soon(
                            self._stop_when_requested,
                            session,
                            intake,
                            pipeline_scope,
                        )
                if pipeline_scope.cancelled_caught:
                    logger.warning(
                        "worker %d: shutdown_timeout (%s s) passed; cancelled the "
                        "handler, its unsettled messages go back to the queue",
                        self.index,
                        settings.shutdown_timeout,
                    )
                    # Batches that did finish are settled even if they wait
                    # behind the cancelled one in tag order.
                    await acker.settle_decided()
                supervisor.cancel_scope.cancel()
        finally:
            for end in ends:
                end.close()

    async def _stop_when_requested(
        self, session: Session, intake: Intake, pipeline_scope: CancelScope
    ) -> None:
        await self._stop_requested.wait()
        self._set_state(WorkerState.STOPPING)
        timeout = self._settings.shutdown_timeout
        pipeline_scope.deadline = min(pipeline_scope.deadline, current_time() + timeout)
        # Stop taking deliveries at once: what is prefetched but not in a batch
        # stays unsettled and goes back to the queue when the channel closes.
        intake.cancel()
        with move_on_after(timeout):
            await session.cancel()


def _track(ends: list[Any], end: Any) -> Any:
    ends.append(end)
    return end
