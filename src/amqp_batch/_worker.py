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
from collections import Counter
from collections.abc import Callable, Mapping
from contextlib import AsyncExitStack
from contextvars import ContextVar
from functools import partial

import anyio
import attrs
from anyio import (
    CancelScope,
    create_memory_object_stream,
    create_task_group,
    current_time,
    move_on_after,
)
from anyio.abc import TaskGroup

from ._actors.acker import Acker, Outcome
from ._actors.batcher import Intake, run_batcher
from ._actors.handler import run_handler_runner
from ._actors.ledger import AckLedger
from ._bodies import Decoder
from ._exceptions import (
    ConsumerCancelled,
    Phase,
    TransportError,
    classify,
    first_library_error,
    recording_phase,
)
from ._message import Message
from ._results import BatchHandler
from ._settings import BatchConsumerSettings
from ._topology import retry_policy, topology
from ._transport._base import Session, SessionSpec, Transport
from ._transport._url import ConnectionParameters

__all__ = ["Worker", "WorkerHealth", "WorkerState", "inside_consumer"]

logger = logging.getLogger("amqp_batch.worker")

#: True in the tasks of a running consumer (so ``stop()`` from a handler does not
#: wait for its own batch to finish).
inside_consumer: ContextVar[bool] = ContextVar("amqp_batch_inside", default=False)


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
    #: ``requeue_immediate``) plus ``dead_lettered`` and ``decode_error`` (bodies
    #: the decoder refused, dead-lettered without reaching the handler).
    results: Mapping[str, int]
    #: The broker URL in use, password redacted.
    url: str


class Worker:
    """One consuming actor with its own connection."""

    def __init__(
        self,
        index: int,
        settings: BatchConsumerSettings,
        handler: BatchHandler,
        transport: Transport,
        stop_requested: anyio.Event,
        on_consuming: Callable[[Worker], None],
        *,
        rng: random.Random | None = None,
        on_state_change: Callable[[Worker, WorkerState], None] | None = None,
        decoder: Decoder[object] | None = None,
    ) -> None:
        self.index = index
        self._decoder = decoder
        self._settings = settings
        self._handler = handler
        self._transport = transport
        self._stop_requested = stop_requested
        self._on_consuming = on_consuming
        self._on_state_change = on_state_change
        self._rng = rng or random.Random()
        self._policy = retry_policy(settings)
        self._exchanges, self._queues, self._bindings = topology(settings)
        self._state = WorkerState.CONNECTING
        self._reconnect_count = 0
        self._last_error: str | None = None
        self._counts: Counter[str] = Counter()
        self._url = settings.connection_parameters(index).redacted_url
        self.fatal_error: TransportError | None = None
        #: Whether the last session got as far as consuming (resets the backoff).
        self._consumed_last = False

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
                    error = first_library_error(exc, TransportError)
                    if error is None:
                        raise
                    if self._stop_requested.is_set():
                        break
                    self._last_error = f"{type(error).__name__}: {error}"
                    if classify(error).fatal:
                        logger.exception("worker %d: not retrying", self.index)
                        self.fatal_error = error
                        return
                else:
                    break
                failures = 0 if self._consumed_last else failures + 1
                await self._back_off(failures)
        finally:
            self._set_state(WorkerState.STOPPED)

    async def _back_off(self, failures: int) -> None:
        self._reconnect_count += 1
        self._set_state(WorkerState.BACKING_OFF)
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
        """One session: open it, run the pipeline, close it. Transport errors
        leave with the :class:`Phase` they happened in recorded on them."""
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
        with recording_phase(Phase.CONSUMING):
            async with AsyncExitStack() as stack:
                with recording_phase(Phase.SETUP):
                    session = await stack.enter_async_context(
                        self._transport.open_session(spec)
                    )
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

    async def _run_pipeline(
        self, session: Session, publisher_parameters: ConnectionParameters
    ) -> None:
        """Run batcher -> handler runners -> acker until the deliveries end or a
        stop drains them (cancelling the handlers after ``shutdown_timeout``)."""
        ledger = AckLedger()
        acker = Acker(
            session,
            ledger,
            self._policy,
            partial(self._transport.open_publisher, publisher_parameters),
            self._counts,
        )
        # Every stream end, clones included, closes when the pipeline ends.
        async with AsyncExitStack() as ends, create_task_group() as supervisor:
            with CancelScope() as pipeline_scope:
                async with create_task_group() as pipeline:
                    intake = await self._start_actors(
                        pipeline, ends, session, ledger, acker
                    )
                    supervisor.start_soon(
                        self._stop_when_requested, session, intake, pipeline_scope
                    )
            if pipeline_scope.cancelled_caught:
                logger.warning(
                    "worker %d: shutdown_timeout (%s s) passed; cancelled the "
                    "handler, its unsettled messages go back to the queue",
                    self.index,
                    self._settings.shutdown_timeout,
                )
                # Batches that did finish are settled even if they wait
                # behind the cancelled one in tag order.
                await acker.settle_decided()
            supervisor.cancel_scope.cancel()

    async def _start_actors(
        self,
        pipeline: TaskGroup,
        ends: AsyncExitStack,
        session: Session,
        ledger: AckLedger,
        acker: Acker,
    ) -> Intake:
        """Start the acker, the handler runners and the batcher in ``pipeline``;
        the batcher's intake. Each actor gets its own clone of the ends it uses
        (registered in ``ends``); the originals close once cloned."""
        settings = self._settings
        to_handlers, handler_input = create_memory_object_stream[list[Message]](0)
        to_acker, acker_input = create_memory_object_stream[list[Outcome]](
            settings.max_concurrent_batches
        )
        for end in (to_handlers, handler_input, to_acker, acker_input):
            ends.enter_context(end)
        pipeline.start_soon(acker.run, acker_input)
        runner = partial(
            run_handler_runner,
            handler=self._handler,
            fallback=settings.unhandled_exception_action,
            decoder=self._decoder,
        )
        for _ in range(settings.max_concurrent_batches):
            pipeline.start_soon(
                runner,
                ends.enter_context(handler_input.clone()),
                ends.enter_context(to_acker.clone()),
            )
        batcher = partial(
            run_batcher,
            session.deliveries,
            ledger,
            to_handlers,
            ends.enter_context(to_acker.clone()),
            batch_size=settings.batch_size,
            batch_timeout=settings.batch_timeout,
            max_batch_bytes=settings.max_batch_bytes,
        )
        intake: Intake = await pipeline.start(batcher)
        handler_input.close()
        to_acker.close()
        return intake

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
