"""The consumer: N workers, hooks, stop/serve/run, health."""

from __future__ import annotations

import inspect
import logging
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from functools import partial
from typing import Any, Generic, TypeVar

import anyio
import attrs
from anyio import (
    TASK_STATUS_IGNORED,
    CancelScope,
    create_task_group,
    move_on_after,
    open_signal_receiver,
)
from anyio.abc import TaskStatus

from ._bodies import Decoder
from ._exceptions import AMQPBatchError, unwrap_group
from ._hooks import ConsumerHooks, HookDispatcher
from ._lifecycle import AsyncContext
from ._message import Message
from ._publisher import default_transport
from ._ratelimit import RateLimiter
from ._results import BatchHandler, MessageResult
from ._settings import BatchConsumerSettings, ConsumerSettings
from ._transport._base import Transport
from ._worker import Worker, WorkerHealth, WorkerState, inside_consumer
from .idempotency import IdempotencyStore

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

__all__ = ["BatchConsumer", "Consumer", "batch_consumer"]

logger = logging.getLogger("amqp_batch.consumer")

SettingsT = TypeVar("SettingsT", bound=ConsumerSettings)


@attrs.define(eq=False)
class _Run:
    """The one run of a consumer, created by :meth:`BatchConsumer.serve`."""

    #: Set to stop every worker gracefully.
    stop_requested: anyio.Event = attrs.field(factory=anyio.Event)
    #: Set once every worker stopped and ``on_stop`` ran.
    stopped: anyio.Event = attrs.field(factory=anyio.Event)
    #: Set once every worker consumes.
    all_consuming: anyio.Event = attrs.field(factory=anyio.Event)
    #: From start until every worker stopped.
    running: bool = True
    #: ``serve``'s ``task_status.started()`` was called.
    reported: bool = False
    #: The task group of ``async with consumer:`` (None under serve and run).
    context: AsyncExitStack | None = None

    def report_started(self, task_status: TaskStatus[None]) -> None:
        """``task_status.started()``, once."""
        if not self.reported:
            self.reported = True
            task_status.started()


class BatchConsumer(AsyncContext, Generic[SettingsT]):
    """Subclass and implement :meth:`process_messages` (an async generator yielding
    one :class:`MessageResult` per message, in order).

    Run it with :meth:`run` (handles SIGINT/SIGTERM), ``await nursery.start(
    consumer.serve)``, or ``async with consumer:``. A consumer runs once.
    ``hooks`` observe it (:class:`~amqp_batch.ConsumerHooks`: metrics, tracing).

    Set :attr:`decoder` (e.g. ``decoder = msgspec_decoder(Order)``) to receive
    ``Message[Order]`` with ``message.value`` decoded.
    """

    #: Decodes each body before :meth:`process_messages` sees it (``None``: no
    #: decoding); a body that fails is dead-lettered with a reason header.
    decoder: Decoder[Any] | None = None

    def __init__(
        self,
        settings: SettingsT,
        *,
        transport: Transport | None = None,
        hooks: Sequence[ConsumerHooks] = (),
        idempotency: IdempotencyStore | None = None,
    ):
        self.settings: SettingsT = settings
        self._transport = transport
        self._hooks: list[ConsumerHooks] = list(HookDispatcher(hooks).hooks)
        #: Built from the hooks when serve() starts.
        self._dispatcher = HookDispatcher()
        #: Messages whose key this store has seen are acked without reaching
        #: the handler (see :mod:`amqp_batch.idempotency`).
        self.idempotency = idempotency
        self._workers: list[Worker] = []
        #: None until serve() starts.
        self._run: _Run | None = None
        #: stop() was called before serve() started.
        self._stop_early = False

    # -- what subclasses provide -------------------------------------------------

    def process_messages(
        self, messages: Sequence[Message]
    ) -> AsyncIterator[MessageResult]:
        """Yield one result per message, in order. Override this."""
        raise NotImplementedError(
            f"{type(self).__name__} must implement process_messages()"
        )

    async def on_start(self) -> None:
        """Runs once, before the first worker consumes."""

    async def on_stop(self) -> None:
        """Runs once, after every worker has stopped (if :meth:`on_start` ran)."""

    def on_worker_state_change(
        self, health: WorkerHealth, previous: WorkerState
    ) -> None:
        """Called when a worker changes state (``health.state``, from ``previous``).

        ``health`` is the worker's snapshot just after the change (its
        ``reconnect_count`` and ``last_error`` are already updated when it enters
        ``backing_off``). Called synchronously inside the worker, so it must be
        quick and must not block; an exception it raises is logged and ignored.
        Override it to log or export state changes; the default does nothing.
        """

    def add_hooks(self, *hooks: ConsumerHooks) -> None:
        """Add observers (see :class:`~amqp_batch.ConsumerHooks`); before the
        consumer starts only."""
        if self._run is not None:
            raise RuntimeError("hooks must be added before the consumer starts")
        self._hooks.extend(HookDispatcher(hooks).hooks)

    # -- health --------------------------------------------------------------------

    @property
    def is_running(self) -> bool:
        """True from start until every worker has stopped."""
        return self._run is not None and self._run.running

    @property
    def is_healthy(self) -> bool:
        """True only while every worker is consuming and no stop was requested."""
        return (
            self.is_running
            and not self._stop_is_requested()
            and all(w.state is WorkerState.CONSUMING for w in self._workers)
        )

    @property
    def hook_errors(self) -> int:
        """How many hook calls raised so far (each was logged and ignored)."""
        return self._dispatcher.hook_errors

    def health(self) -> tuple[WorkerHealth, ...]:
        """A snapshot per worker."""
        return tuple(worker.health() for worker in self._workers)

    # -- running ---------------------------------------------------------------------

    def _handler(self) -> BatchHandler:
        return self.process_messages

    def _decoder(self) -> Decoder[Any] | None:
        # As stored: a function set as a class attribute is not a method here.
        decoder = inspect.getattr_static(self, "decoder")
        if isinstance(decoder, staticmethod):
            decoder = decoder.__func__
        return decoder  # type: ignore[no-any-return]

    def _batch_settings(self) -> BatchConsumerSettings:
        settings = self.settings
        if isinstance(settings, BatchConsumerSettings):
            return settings
        fields = {
            field.name: getattr(settings, field.name)
            for field in attrs.fields(type(settings))
            if field.init
        }
        return BatchConsumerSettings(**fields, batch_size=1, batch_timeout=1.0)

    def _stop_is_requested(self) -> bool:
        return self._stop_early or (
            self._run is not None and self._run.stop_requested.is_set()
        )

    def _request_stop(self) -> None:
        if self._run is None:
            self._stop_early = True
        else:
            self._run.stop_requested.set()

    def _started_run(self) -> _Run:
        if self._run is None:
            raise RuntimeError("the consumer has not started")
        return self._run

    async def serve(
        self, *, task_status: TaskStatus[None] = TASK_STATUS_IGNORED
    ) -> None:
        """Consume until stopped. ``task_status.started()`` once every worker
        consumes. Raises the first non-retryable transport error (bad credentials,
        unknown vhost, a queue redeclared with other arguments) after stopping the
        other workers gracefully.
        """
        if self._run is not None:
            raise RuntimeError("a consumer can only be started once")
        run = self._run = _Run()
        if self._stop_early:
            run.stop_requested.set()
        settings = self._batch_settings()
        transport = self._transport or default_transport()
        self._dispatcher = HookDispatcher(self._hooks)
        try:
            await self.on_start()
        except BaseException:
            run.running = False
            run.stopped.set()
            raise
        try:
            await self._serve_workers(run, settings, transport, task_status)
        finally:
            run.running = False
            try:
                # on_stop gets its chance even under a hard stop, bounded.
                with CancelScope(shield=True), move_on_after(settings.shutdown_timeout):
                    await self.on_stop()
            finally:
                run.stopped.set()

    async def _serve_workers(
        self,
        run: _Run,
        settings: BatchConsumerSettings,
        transport: Transport,
        task_status: TaskStatus[None],
    ) -> None:
        """Run every worker until all stopped; raise the first fatal error."""
        limiter = _shared_limiter(settings)
        self._workers = [
            Worker(
                index,
                settings,
                self._handler(),
                transport,
                run.stop_requested,
                partial(self._worker_consuming, run),
                on_state_change=self._worker_state_changed,
                hooks=self._dispatcher,
                limiter=limiter,
                idempotency=self.idempotency,
                decoder=self._decoder(),
            )
            for index in range(settings.num_workers)
        ]
        async with create_task_group() as workers:
            workers.start_soon(self._report_started, run, task_status)
            for worker in self._workers:
                workers.start_soon(self._run_worker, run, worker)
        fatal = next(
            (w.fatal_error for w in self._workers if w.fatal_error is not None),
            None,
        )
        if fatal is not None:
            raise fatal
        run.report_started(task_status)

    async def _report_started(self, run: _Run, task_status: TaskStatus[None]) -> None:
        """``task_status.started()`` once every worker consumes (not if a stop
        comes first)."""
        async with create_task_group() as waiter:

            async def wait_then_cancel(event: anyio.Event) -> None:
                await event.wait()
                waiter.cancel_scope.cancel()

            waiter.start_soon(wait_then_cancel, run.all_consuming)
            waiter.start_soon(wait_then_cancel, run.stop_requested)
        if run.all_consuming.is_set():
            run.report_started(task_status)

    async def _run_worker(self, run: _Run, worker: Worker) -> None:
        try:
            await worker.run()
        finally:
            if worker.fatal_error is not None:
                run.stop_requested.set()

    def _worker_consuming(self, run: _Run, worker: Worker) -> None:
        if all(w.state is WorkerState.CONSUMING for w in self._workers):
            run.all_consuming.set()

    def _worker_state_changed(self, worker: Worker, previous: WorkerState) -> None:
        health = worker.health()
        try:
            self.on_worker_state_change(health, previous)
        except Exception:
            logger.exception("on_worker_state_change raised; ignored")
        changed = self._dispatcher.worker_state_changed
        if changed is not None:
            changed(health, previous)

    async def start(self) -> None:
        """Consume until stopped (aio-pika-batch's name for :meth:`serve`)."""
        await self.serve()

    async def stop(self) -> None:
        """Request a graceful stop.

        Called from outside the consumer it also waits until every worker stopped
        and ``on_stop`` ran; called from a handler it only requests (the handler's
        own batch has to finish first).
        """
        run = self._run
        if run is None:
            self._stop_early = True
            return
        run.stop_requested.set()
        if run.running and not inside_consumer.get():
            await run.stopped.wait()

    async def run(self) -> None:
        """Serve with SIGINT/SIGTERM handlers: the first signal stops gracefully,
        a second one stops at once (in-flight messages go back to the queue)."""
        async with create_task_group() as group:
            with open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                group.start_soon(self._watch_signals, signals, group.cancel_scope)
                await self.serve()
                group.cancel_scope.cancel()

    async def _watch_signals(
        self, signals: AsyncIterator[int], scope: CancelScope
    ) -> None:
        async for signum in signals:
            name = signal.Signals(signum).name
            if not self._stop_is_requested():
                logger.info("%s: stopping gracefully (again to stop at once)", name)
                self._request_stop()
            else:
                logger.warning("%s again: stopping at once", name)
                scope.cancel()
                return

    async def __aenter__(self) -> BatchConsumer[SettingsT]:
        stack = AsyncExitStack()
        group = await stack.enter_async_context(create_task_group())
        try:
            await group.start(self.serve)
        except BaseException:
            # serve() failed before every worker consumed (e.g. bad credentials):
            # its error is raised here; the task group only repeats it.
            with suppress(BaseExceptionGroup):
                await stack.aclose()
            raise
        self._started_run().context = stack
        return self

    async def _aexit(self) -> None:
        """Stop gracefully, wait until every worker stopped; a worker's
        non-retryable error is raised as itself."""
        run = self._started_run()
        stack, run.context = run.context, None
        if stack is None:
            raise RuntimeError("__aexit__ without __aenter__")
        run.stop_requested.set()
        try:
            try:
                await run.stopped.wait()
            except BaseException:
                # E.g. the body was cancelled because a worker failed: the task
                # group raises that failure (or this exception again).
                await stack.__aexit__(*sys.exc_info())
                raise
            await stack.aclose()
        except BaseExceptionGroup as group:
            # A worker's non-retryable error after start: raise it as itself.
            error = unwrap_group(group)
            if isinstance(error, AMQPBatchError):
                error.__suppress_context__ = True  # keep its own __cause__
                raise error  # noqa: B904 - the group only wrapped it
            raise


def _shared_limiter(settings: BatchConsumerSettings) -> RateLimiter | None:
    """Log what cannot fit the broker's consumer_timeout; the rate limiter all
    workers share (``None``: no limit)."""
    for warning in settings.timing_warnings():
        logger.warning("%s", warning)
    rate = settings.max_messages_per_second
    return None if rate is None else RateLimiter(rate)


class _FunctionConsumer(BatchConsumer[BatchConsumerSettings]):
    def __init__(
        self,
        settings: BatchConsumerSettings,
        handler: BatchHandler,
        *,
        transport: Transport | None = None,
        hooks: Sequence[ConsumerHooks] = (),
        idempotency: IdempotencyStore | None = None,
    ) -> None:
        super().__init__(
            settings, transport=transport, hooks=hooks, idempotency=idempotency
        )
        self._function = handler

    def _handler(self) -> BatchHandler:
        return self._function


#: The body type a handler and its decoder agree on.
DecodedT = TypeVar("DecodedT")


@asynccontextmanager
async def batch_consumer(
    settings: BatchConsumerSettings,
    handler: BatchHandler[DecodedT],
    *,
    transport: Transport | None = None,
    hooks: Sequence[ConsumerHooks] = (),
    idempotency: IdempotencyStore | None = None,
    decoder: Decoder[DecodedT] | None = None,
) -> AsyncIterator[BatchConsumer[BatchConsumerSettings]]:
    """Consume with ``handler`` while the ``async with`` body runs.

    Every worker consumes when the body starts; leaving the body (normally or by
    an exception) drains gracefully: no new deliveries, the current batches finish
    and settle, prefetched messages go back to the queue, within
    ``shutdown_timeout``. With ``idempotency``, messages whose key the store has
    seen are acked without reaching ``handler``. ``hooks`` observe it
    (:class:`~amqp_batch.ConsumerHooks`).

    ``decoder`` decodes each body first (``message.value``); a handler of
    ``Message[Order]`` takes a ``Decoder[Order]``. A body that does not decode
    is dead-lettered (``x-dead-letter-reason: decode-error``) without reaching
    the handler.
    """
    consumer = _FunctionConsumer(
        settings, handler, transport=transport, hooks=hooks, idempotency=idempotency
    )
    consumer.decoder = decoder
    async with consumer:
        yield consumer


class Consumer(BatchConsumer[SettingsT]):
    """The single-message form: implement :meth:`process_message`."""

    async def process_message(self, message: Message) -> MessageResult:
        """Return the result for one message. Override this."""
        raise NotImplementedError(
            f"{type(self).__name__} must implement process_message()"
        )

    async def process_messages(
        self, messages: Sequence[Message]
    ) -> AsyncIterator[MessageResult]:
        """Calls :meth:`process_message` for each message."""
        for message in messages:
            yield await self.process_message(message)
