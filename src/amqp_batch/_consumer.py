"""The consumer: N workers, hooks, stop/serve/run, health."""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from types import TracebackType
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

from ._exceptions import AMQPBatchError
from ._hooks import ConsumerHooks, HookDispatcher
from ._message import Message
from ._publisher import default_transport
from ._results import MessageResult
from ._settings import BatchConsumerSettings, ConsumerSettings
from ._transport._base import Transport
from ._worker import Worker, WorkerHealth, WorkerState, inside_consumer

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

__all__ = ["BatchConsumer", "Consumer", "batch_consumer"]

logger = logging.getLogger("amqp_batch.consumer")

SettingsT = TypeVar("SettingsT", bound=ConsumerSettings)


class BatchConsumer(Generic[SettingsT]):
    """Subclass and implement :meth:`process_messages` (an async generator yielding
    one :class:`MessageResult` per message, in order).

    Run it with :meth:`run` (handles SIGINT/SIGTERM), ``await nursery.start(
    consumer.serve)``, or ``async with consumer:``. A consumer runs once.
    ``hooks`` observe it (:class:`~amqp_batch.ConsumerHooks`: metrics, tracing).
    """

    def __init__(
        self,
        settings: SettingsT,
        *,
        transport: Transport | None = None,
        hooks: Sequence[ConsumerHooks] = (),
    ):
        self.settings: SettingsT = settings
        self._transport = transport
        self._hooks: list[ConsumerHooks] = list(HookDispatcher(hooks).hooks)
        self._workers: list[Worker] = []
        self._started = False
        self._running = False
        self._stop_early = False
        self._stop_requested: anyio.Event | None = None
        self._stopped: anyio.Event | None = None
        self._all_consuming: anyio.Event | None = None
        self._exit_stack: AsyncExitStack | None = None
        self._reported = False
        self._dispatcher = HookDispatcher()

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
        if self._started:
            raise RuntimeError("hooks must be added before the consumer starts")
        HookDispatcher(hooks)  # checks their types
        self._hooks.extend(hooks)

    # -- health --------------------------------------------------------------------

    @property
    def is_running(self) -> bool:
        """True from start until every worker has stopped."""
        return self._running

    @property
    def is_healthy(self) -> bool:
        """True only while every worker is consuming and no stop was requested."""
        return (
            self._running
            and not self._stop_is_requested()
            and all(w.state is WorkerState.CONSUMING for w in self._workers)
        )

    def health(self) -> tuple[WorkerHealth, ...]:
        """A snapshot per worker."""
        return tuple(worker.health() for worker in self._workers)

    # -- running ---------------------------------------------------------------------

    def _handler(self) -> Callable[[Sequence[Message]], Any]:
        return self.process_messages

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
            self._stop_requested is not None and self._stop_requested.is_set()
        )

    def _ensure_events(self) -> None:
        if self._stop_requested is None:
            self._stop_requested = anyio.Event()
            self._stopped = anyio.Event()
            self._all_consuming = anyio.Event()
            if self._stop_early:
                self._stop_requested.set()

    async def serve(
        self, *, task_status: TaskStatus[None] = TASK_STATUS_IGNORED
    ) -> None:
        """Consume until stopped. ``task_status.started()`` once every worker
        consumes. Raises the first non-retryable transport error (bad credentials,
        unknown vhost, a queue redeclared with other arguments) after stopping the
        other workers gracefully.
        """
        if self._started:
            raise RuntimeError("a consumer can only be started once")
        self._started = True
        self._ensure_events()
        assert self._stop_requested is not None
        assert self._stopped is not None
        settings = self._batch_settings()
        transport = self._transport or default_transport()
        self._dispatcher = HookDispatcher(self._hooks)
        self._running = True
        try:
            await self.on_start()
        except BaseException:
            self._running = False
            self._stopped.set()
            raise
        try:
            self._workers = [
                Worker(
                    index,
                    settings,
                    self._handler(),
                    transport,
                    self._stop_requested,
                    self._worker_consuming,
                    on_state_change=self._worker_state_changed,
                    hooks=self._dispatcher,
                )
                for index in range(settings.num_workers)
            ]
            async with create_task_group() as workers:
                workers.start_soon(self._report_started, task_status)
                for worker in self._workers:
                    workers.start_soon(self._run_worker, worker)
            fatal = next(
                (w.fatal_error for w in self._workers if w.fatal_error is not None),
                None,
            )
            if fatal is not None:
                raise fatal
            if not self._reported:
                self._reported = True
                task_status.started()
        finally:
            self._running = False
            try:
                # on_stop gets its chance even under a hard stop, bounded.
                with CancelScope(shield=True), move_on_after(settings.shutdown_timeout):
                    await self.on_stop()
            finally:
                self._stopped.set()

    async def _report_started(self, task_status: TaskStatus[None]) -> None:
        """``task_status.started()`` once every worker consumes (not if a stop
        comes first)."""
        all_consuming, stop_requested = self._all_consuming, self._stop_requested
        assert all_consuming is not None
        assert stop_requested is not None
        async with create_task_group() as waiter:

            async def wait_then_cancel(event: anyio.Event) -> None:
                await event.wait()
                waiter.cancel_scope.cancel()

            waiter.start_soon(wait_then_cancel, all_consuming)
            waiter.start_soon(wait_then_cancel, stop_requested)
        if all_consuming.is_set() and not self._reported:
            self._reported = True
            task_status.started()

    async def _run_worker(self, worker: Worker) -> None:
        assert self._stop_requested is not None
        try:
            await worker.run()
        finally:
            if worker.fatal_error is not None:
                self._stop_requested.set()

    def _worker_consuming(self, worker: Worker) -> None:
        assert self._all_consuming is not None
        if all(w.state is WorkerState.CONSUMING for w in self._workers):
            self._all_consuming.set()

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
        if self._stop_requested is None:
            self._stop_early = True
            return
        self._stop_requested.set()
        if self._stopped is not None and self._running and not inside_consumer.get():
            await self._stopped.wait()

    async def run(self) -> None:
        """Serve with SIGINT/SIGTERM handlers: the first signal stops gracefully,
        a second one stops at once (in-flight messages go back to the queue)."""
        self._ensure_events()
        async with create_task_group() as group:
            with open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                group.start_soon(self._watch_signals, signals, group.cancel_scope)
                await self.serve()
                group.cancel_scope.cancel()

    async def _watch_signals(
        self, signals: AsyncIterator[int], scope: CancelScope
    ) -> None:
        assert self._stop_requested is not None
        async for signum in signals:
            name = signal.Signals(signum).name
            if not self._stop_requested.is_set():
                logger.info("%s: stopping gracefully (again to stop at once)", name)
                self._stop_requested.set()
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
        self._exit_stack = stack
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        stack, self._exit_stack = self._exit_stack, None
        assert stack is not None
        assert self._stop_requested is not None
        assert self._stopped is not None
        self._stop_requested.set()
        try:
            try:
                await self._stopped.wait()
            except BaseException:
                # E.g. the body was cancelled because a worker failed: the task
                # group raises that failure (or this exception again).
                await stack.__aexit__(*sys.exc_info())
                raise
            await stack.aclose()
        except BaseExceptionGroup as group:
            # A worker's non-retryable error after start: raise it as itself.
            (error, *others) = group.exceptions
            if not others and isinstance(error, AMQPBatchError):
                error.__suppress_context__ = True  # keep its own __cause__
                raise error  # noqa: B904 - the group only wrapped it
            raise


class _FunctionConsumer(BatchConsumer[BatchConsumerSettings]):
    def __init__(
        self,
        settings: BatchConsumerSettings,
        handler: Callable[[Sequence[Message]], Any],
        *,
        transport: Transport | None = None,
        hooks: Sequence[ConsumerHooks] = (),
    ) -> None:
        super().__init__(settings, transport=transport, hooks=hooks)
        self._function = handler

    def _handler(self) -> Callable[[Sequence[Message]], Any]:
        return self._function


@asynccontextmanager
async def batch_consumer(
    settings: BatchConsumerSettings,
    handler: Callable[[Sequence[Message]], Any],
    *,
    transport: Transport | None = None,
    hooks: Sequence[ConsumerHooks] = (),
) -> AsyncIterator[BatchConsumer[BatchConsumerSettings]]:
    """Consume with ``handler`` while the ``async with`` body runs.

    Every worker consumes when the body starts; leaving the body (normally or by
    an exception) drains gracefully: no new deliveries, the current batches finish
    and settle, prefetched messages go back to the queue, within
    ``shutdown_timeout``. ``hooks`` observe it (:class:`~amqp_batch.ConsumerHooks`).
    """
    consumer = _FunctionConsumer(settings, handler, transport=transport, hooks=hooks)
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
