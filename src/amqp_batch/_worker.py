"""One worker: a supervised actor owning one connection, with a session loop.

Each session runs receiver -> batcher -> handler runner(s) -> acker in a task
group. A retryable transport error ends the session; the worker backs off
(exponential, full jitter) and opens a new one, on the next broker URL. A
non-retryable error stops the consumer with that error.
"""

from __future__ import annotations

import enum
import logging
import math
import random
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
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
from ._actors.guards import HandlerGuards
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
from ._hooks import HookDispatcher, confirm_reporter, settlement_reporter
from ._killswitch import KillSwitch
from ._logging import set_log_context
from ._message import Message
from ._ratelimit import RateLimiter
from ._results import BatchHandler, MessageResult
from ._settings import BatchConsumerSettings
from ._topology import retry_policy, topology
from ._transport._base import Session, SessionSpec, Transport
from ._transport._url import ConnectionParameters
from .idempotency import IdempotencyStore

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
    #: The kill switch is open: not consuming until its cooldown is over.
    PAUSED = "paused"
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
    #: The kill switch's state (``closed``, ``open``, ``half_open``); ``None``
    #: when it is off.
    kill_switch: str | None = None
    #: The kill switch's transitions so far, oldest first, as
    #: ``"<old> -> <new>: <reason>"``.
    kill_switch_transitions: tuple[str, ...] = ()


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
        hooks: HookDispatcher | None = None,
        limiter: RateLimiter | None = None,
        idempotency: IdempotencyStore | None = None,
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
        self._hooks = hooks or HookDispatcher()
        #: The error that ended the last session (for the ``reconnecting`` hook).
        self._last_exception: BaseException | None = None
        self._policy = retry_policy(settings)
        self._exchanges, self._queues, self._bindings = topology(settings)
        self._state = WorkerState.CONNECTING
        self._reconnect_count = 0
        self._last_error: str | None = None
        self._counts: Counter[str] = Counter()
        first = index if settings.url_order == "spread" else 0
        self._url = settings.connection_parameters(first).redacted_url
        #: URL index -> when a session on it last failed (to skip it for a while).
        self._url_failed_at: dict[int, float] = {}
        self.fatal_error: TransportError | None = None
        #: Whether the last session got as far as consuming (resets the backoff).
        self._consumed_last = False
        self._kill_switch = _kill_switch(settings)
        self._tripped = anyio.Event()
        self._switch_changed = anyio.Event()
        self._guards = self._make_guards(limiter, idempotency)

    def _make_guards(
        self, limiter: RateLimiter | None, idempotency: IdempotencyStore | None
    ) -> HandlerGuards | None:
        settings = self._settings
        if (
            limiter is None
            and idempotency is None
            and settings.handler_timeout is None
            and self._kill_switch is None
        ):
            return None  # the plain path, exactly as without these settings
        return HandlerGuards(
            timeout=settings.handler_timeout,
            limiter=limiter,
            idempotency=idempotency,
            on_results=self._record_results if self._kill_switch else None,
            on_duplicates=self._count_duplicates,
        )

    def _count_duplicates(self, count: int) -> None:
        self._counts["duplicate"] += count

    def _record_results(self, results: Sequence[MessageResult]) -> None:
        """Feed the kill switch; trip the session when it opens."""
        switch = self._kill_switch
        assert switch is not None
        failed = sum(1 for result in results if result in _FAILED)
        transition = switch.record(current_time(), len(results) - failed, failed)
        self._switch_changed.set()
        self._switch_changed = anyio.Event()
        if transition is None:
            return
        logger.warning(
            "worker %d: kill switch %s -> %s (%s)",
            self.index,
            transition.old,
            transition.new,
            transition.reason,
        )
        if transition.new == "open":
            self._tripped.set()

    async def _gate(self) -> None:
        """Wait until the kill switch lets the next batch start."""
        switch = self._kill_switch
        assert switch is not None
        while True:
            now = current_time()
            if switch.allows(now):
                switch.begin_batch(now)
                return
            if switch.state == "open":
                await anyio.sleep_forever()  # the session is ending
            await self._switch_changed.wait()  # the probe's result decides

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
        switch = self._kill_switch
        return WorkerHealth(
            index=self.index,
            state=self._state,
            reconnect_count=self._reconnect_count,
            last_error=self._last_error,
            results=dict(self._counts),
            url=self._url,
            kill_switch=None if switch is None else switch.state,
            kill_switch_transitions=()
            if switch is None
            else tuple(f"{t.old} -> {t.new}: {t.reason}" for t in switch.transitions),
        )

    def _next_url(self) -> int:
        """The index of the URL to connect to: the first in the worker's order
        (``url_order``) where no session failed in the last
        ``reconnect_backoff_cap`` seconds, else the one that failed longest ago.
        (A consuming session that the broker closed, e.g. 320 CONNECTION_FORCED,
        does not count: that node answered.)"""
        count = len(self._settings.urls)
        start = self.index % count if self._settings.url_order == "spread" else 0
        order = [(start + offset) % count for offset in range(count)]
        failed_at = self._url_failed_at
        since = current_time() - self._settings.reconnect_backoff_cap
        for index in order:
            if failed_at.get(index, -math.inf) < since:
                return index
        return min(order, key=lambda index: failed_at[index])

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
                url_index = self._next_url()
                parameters = self._settings.connection_parameters(url_index)
                self._url = parameters.redacted_url
                self._set_state(WorkerState.CONNECTING)
                try:
                    paused = await self._run_session(parameters)
                except Exception as exc:
                    error = first_library_error(exc, TransportError)
                    if error is None:
                        raise
                    if not (self._consumed_last and error.reply_code):
                        # It failed to connect or set up, or the node went
                        # silent or away (not a close the broker sent).
                        self._url_failed_at[url_index] = current_time()
                    if self._stop_requested.is_set():
                        break
                    self._last_error = f"{type(error).__name__}: {error}"
                    self._last_exception = error
                    if classify(error).fatal:
                        logger.exception("worker %d: not retrying", self.index)
                        self.fatal_error = error
                        return
                else:
                    if not paused:
                        break
                    await self._pause()
                    continue
                failures = 0 if self._consumed_last else failures + 1
                await self._back_off(failures)
        finally:
            self._set_state(WorkerState.STOPPED)

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

    async def _pause(self) -> None:
        """The kill switch is open: stay away from the queue for its cooldown."""
        switch = self._kill_switch
        assert switch is not None
        self._set_state(WorkerState.PAUSED)
        delay = switch.wait_time(current_time())
        logger.warning(
            "worker %d: kill switch open; not consuming for %.1f s", self.index, delay
        )
        with move_on_after(delay):
            await self._stop_requested.wait()

    async def _run_session(self, parameters: ConnectionParameters) -> bool:
        """One session: open it, run the pipeline, close it; True when it ended
        because the kill switch opened. Transport errors leave with the
        :class:`Phase` they happened in recorded on them."""
        self._consumed_last = False
        self._tripped = anyio.Event()
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
        if self._tripped.is_set() and not self._stop_requested.is_set():
            return True
        if not self._stop_requested.is_set():
            # Deliveries ended without a stop: the broker cancelled the consumer
            # (e.g. the queue was deleted). Back off and redeclare.
            raise ConsumerCancelled(
                "the broker cancelled the consumer"
                if cancelled_by_broker
                else "the delivery stream ended"
            )
        return False

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
            on_applied=settlement_reporter(
                self._hooks, self.index, self._settings.queue_name
            ),
            on_copy_confirmed=confirm_reporter(
                self._hooks, self.index, self._settings.queue_name
            ),
        )
        # Every stream end, clones included, closes when the pipeline ends.
        async with AsyncExitStack() as ends, create_task_group() as supervisor:
            with CancelScope() as pipeline_scope:
                async with create_task_group() as pipeline:
                    intake = await self._start_actors(
                        pipeline, ends, session, ledger, acker
                    )
                    self._watch(supervisor, session, intake, pipeline_scope)
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
            hooks=self._hooks,
            worker=self.index,
            queue=settings.queue_name,
            guards=self._guards,
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
            gate=self._gate if self._kill_switch else None,
        )
        intake: Intake = await pipeline.start(batcher)
        handler_input.close()
        to_acker.close()
        return intake

    def _watch(
        self,
        group: TaskGroup,
        session: Session,
        intake: Intake,
        pipeline_scope: CancelScope,
    ) -> None:
        """Start the tasks that end the pipeline on a stop or a kill-switch trip."""
        group.start_soon(self._stop_when_requested, session, intake, pipeline_scope)
        if self._kill_switch is not None:
            group.start_soon(self._stop_when_tripped, session, intake)

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

    async def _stop_when_tripped(self, session: Session, intake: Intake) -> None:
        """The kill switch opened: stop taking deliveries and cancel the
        consumer; the batches already taken finish and settle, and what is
        prefetched goes back to the queue, in order, when the channel closes."""
        await self._tripped.wait()
        intake.cancel()
        with move_on_after(self._settings.shutdown_timeout):
            await session.cancel()


#: Results the kill switch counts as failures (the dependency did not work).
_FAILED = frozenset({MessageResult.REQUEUE, MessageResult.REQUEUE_IMMEDIATE})


def _kill_switch(settings: BatchConsumerSettings) -> KillSwitch | None:
    if settings.kill_switch_threshold is None:
        return None
    return KillSwitch(
        threshold=settings.kill_switch_threshold,
        window=settings.kill_switch_window,
        min_samples=settings.kill_switch_min_samples,
        cooldown=settings.kill_switch_cooldown,
    )
