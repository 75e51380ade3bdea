"""The hook dispatcher: only what is overridden is called; a failing hook is
logged, counted and ignored; cancellation and other BaseExceptions pass."""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import anyio
import pytest

from amqp_batch import MessageResult, WorkerHealth, WorkerState
from amqp_batch._actors.handler import handle_batch, run_handler_runner
from amqp_batch._actors.planner import Applied, DeadLetter, Fate
from amqp_batch._hooks import (
    EVENTS,
    BatchInfo,
    ConsumerHooks,
    HandledBatch,
    HookDispatcher,
    Settlement,
    SettleOutcome,
    settlement_reporter,
)
from amqp_batch._message import Message
from amqp_batch._transport._base import Delivery


def message(tag: int = 1) -> Message:
    return Message(
        Delivery(
            delivery_tag=tag,
            redelivered=False,
            exchange="",
            routing_key="orders",
            consumer_tag="c",
            body=b"x",
        )
    )


def health(state: WorkerState = WorkerState.CONSUMING) -> WorkerHealth:
    return WorkerHealth(
        index=0,
        state=state,
        reconnect_count=0,
        last_error=None,
        results={},
        url="amqp://guest:***@localhost:5672/",
    )


class Recorder(ConsumerHooks):
    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[object, ...]]] = []

    def settled(
        self, worker: int, queue: str, settlements: Sequence[Settlement]
    ) -> None:
        self.calls.append(("settled", (worker, queue, tuple(settlements))))

    def hook_failed(self, hook: str, method: str, error: Exception) -> None:
        self.calls.append(("hook_failed", (hook, method, type(error).__name__)))


class Failing(ConsumerHooks):
    def settled(
        self, worker: int, queue: str, settlements: Sequence[Settlement]
    ) -> None:
        raise ValueError("boom")


def test_no_hooks_means_nothing_to_call() -> None:
    dispatcher = HookDispatcher()
    assert all(getattr(dispatcher, event) is None for event in EVENTS)
    assert not dispatcher.active


def test_base_instances_listen_to_nothing() -> None:
    dispatcher = HookDispatcher([ConsumerHooks(), ConsumerHooks()])
    assert not dispatcher.active


def test_only_overridden_events_are_dispatched() -> None:
    recorder = Recorder()
    dispatcher = HookDispatcher([recorder])
    assert dispatcher.settled is not None
    for event in EVENTS:
        if event != "settled":
            assert getattr(dispatcher, event) is None, event
    settlement = Settlement(message(), MessageResult.ACK, SettleOutcome.ACKED)
    dispatcher.settled(2, "orders", [settlement])
    assert recorder.calls == [("settled", (2, "orders", (settlement,)))]


def test_the_acker_reports_each_record_as_a_settlement() -> None:
    """What the acker applied reaches ``settled`` as a read-only sequence of
    settlements: one per record, in order, the same objects on every read."""
    recorder = Recorder()
    report = settlement_reporter(HookDispatcher([recorder]), 1, "orders")
    assert report is not None
    messages = [message(tag) for tag in (1, 2, 3, 4)]
    records = [
        Applied(messages[0], MessageResult.ACK, Fate.ACKED),
        Applied(messages[1], MessageResult.NACK, Fate.DEAD_LETTERED, "rejected"),
        Applied(messages[2], MessageResult.REQUEUE, Fate.REPUBLISHED),
        Applied(
            messages[3],
            DeadLetter("invalid-retry-count: x"),
            Fate.REJECTED,
            "invalid-retry-count: x",
        ),
    ]
    report(records)
    [(event, (worker, queue, seen))] = recorder.calls
    assert (event, worker, queue) == ("settled", 1, "orders")
    assert seen == (
        Settlement(messages[0], MessageResult.ACK, SettleOutcome.ACKED),
        Settlement(
            messages[1], MessageResult.NACK, SettleOutcome.DEAD_LETTERED, "rejected"
        ),
        Settlement(messages[2], MessageResult.REQUEUE, SettleOutcome.REPUBLISHED),
        Settlement(messages[3], None, SettleOutcome.REJECTED, "invalid-retry-count: x"),
    )


def test_the_reported_sequence_reads_like_a_list() -> None:
    seen: list[Sequence[Settlement]] = []

    class Keeper(ConsumerHooks):
        def settled(
            self, worker: int, queue: str, settlements: Sequence[Settlement]
        ) -> None:
            seen.append(settlements)

    report = settlement_reporter(HookDispatcher([Keeper()]), 0, "q")
    assert report is not None
    messages = [message(tag) for tag in (1, 2, 3)]
    report([Applied(m, MessageResult.ACK, Fate.ACKED) for m in messages])
    [settlements] = seen
    assert len(settlements) == 3
    assert [s.message for s in settlements] == messages
    assert settlements[0] is settlements[0] and settlements[-1] is list(settlements)[2]
    assert [s.message for s in settlements[1:]] == messages[1:]
    assert "3 settlements" in repr(settlements)


def test_a_failing_hook_is_logged_counted_and_ignored(
    caplog: pytest.LogCaptureFixture,
) -> None:
    before, after = Recorder(), Recorder()
    dispatcher = HookDispatcher([before, Failing(), after])
    assert dispatcher.settled is not None
    with caplog.at_level(logging.ERROR, logger="amqp_batch.hooks"):
        dispatcher.settled(0, "orders", [])
        dispatcher.settled(0, "orders", [])
    assert dispatcher.hook_errors == 2
    # The hooks after the failing one still ran, every time.
    assert [name for name, _ in after.calls].count("settled") == 2
    assert ("hook_failed", ("Failing", "settled", "ValueError")) in after.calls
    records = [r for r in caplog.records if r.name == "amqp_batch.hooks"]
    assert len(records) == 2
    assert records[0].hook == "Failing"  # type: ignore[attr-defined]
    assert records[0].hook_method == "settled"  # type: ignore[attr-defined]
    assert records[0].exc_info is not None


def test_a_failing_hook_failed_is_only_logged(caplog: pytest.LogCaptureFixture) -> None:
    class BadListener(ConsumerHooks):
        def hook_failed(self, hook: str, method: str, error: Exception) -> None:
            raise RuntimeError("listener broken")

    dispatcher = HookDispatcher([Failing(), BadListener()])
    assert dispatcher.settled is not None
    with caplog.at_level(logging.ERROR, logger="amqp_batch.hooks"):
        dispatcher.settled(0, "orders", [])
    assert dispatcher.hook_errors == 2
    assert len(caplog.records) == 2


@pytest.mark.parametrize("error", [KeyboardInterrupt, SystemExit, GeneratorExit])
def test_base_exceptions_are_never_caught(error: type[BaseException]) -> None:
    class Raising(ConsumerHooks):
        def worker_state_changed(
            self, health: WorkerHealth, previous: WorkerState
        ) -> None:
            raise error

    dispatcher = HookDispatcher([Raising()])
    assert dispatcher.worker_state_changed is not None
    with pytest.raises(error):
        dispatcher.worker_state_changed(health(), WorkerState.CONNECTING)
    assert dispatcher.hook_errors == 0


async def test_cancellation_raised_through_a_hook_is_not_swallowed() -> None:
    """A hook that re-raises the cancellation it caught (e.g. from a helper that
    checks for it) must not have it turned into a logged hook error."""
    cancelled = anyio.get_cancelled_exc_class()
    seen: list[BaseException] = []

    class Passes(ConsumerHooks):
        def batch_started(self, batch: BatchInfo) -> None:
            raise seen[0]

    dispatcher = HookDispatcher([Passes()])
    assert dispatcher.batch_started is not None
    batch = BatchInfo(worker=0, queue="orders", messages=[message()])
    with anyio.CancelScope() as scope:
        scope.cancel()
        try:
            await anyio.sleep(1)
        except cancelled as exc:
            seen.append(exc)
            dispatcher.batch_started(batch)  # must re-raise the cancellation
        pytest.fail("the cancellation was swallowed")  # pragma: no cover
    assert scope.cancelled_caught
    assert dispatcher.hook_errors == 0


def test_hooks_must_be_hook_instances() -> None:
    with pytest.raises(TypeError, match="ConsumerHooks"):
        HookDispatcher([object()])  # type: ignore[list-item]


def test_batch_info_is_compared_by_identity() -> None:
    messages = [message()]
    first = BatchInfo(worker=0, queue="q", messages=messages)
    second = BatchInfo(worker=0, queue="q", messages=messages)
    assert first != second
    assert first == first


class BatchRecorder(ConsumerHooks):
    def __init__(self) -> None:
        self.started: list[BatchInfo] = []
        self.handled: list[HandledBatch] = []

    def batch_started(self, batch: BatchInfo) -> None:
        self.started.append(batch)

    def batch_handled(self, handled: HandledBatch) -> None:
        assert handled.duration >= 0
        self.handled.append(handled)


async def run_one_batch(
    handler: Callable[[Sequence[Message]], Any], hooks: HookDispatcher
) -> list[Any]:
    """One batch of two messages through a handler runner; what reached the
    acker."""
    to_runner, batches = anyio.create_memory_object_stream[list[Message]](1)
    to_acker, outcomes = anyio.create_memory_object_stream[list[Any]](1)
    async with anyio.create_task_group() as group, outcomes:
        group.start_soon(
            functools.partial(
                run_handler_runner,
                batches,
                to_acker,
                handler,
                fallback=MessageResult.NACK,
                hooks=hooks,
                worker=3,
                queue="orders",
            )
        )
        async with to_runner:
            await to_runner.send([message(1), message(2)])
        return [outcome async for outcome in outcomes]


async def test_the_runner_reports_each_batch_around_the_handler() -> None:
    recorder = BatchRecorder()

    async def handler(messages: Sequence[Message]) -> AsyncIterator[MessageResult]:
        # The handler runs between the two calls.
        assert len(recorder.started) == 1 and not recorder.handled
        for _ in messages:
            yield MessageResult.ACK

    sent = await run_one_batch(handler, HookDispatcher([recorder]))
    assert len(sent) == 1
    (batch,) = recorder.started
    assert (batch.worker, batch.queue, len(batch.messages)) == (3, "orders", 2)
    (handled,) = recorder.handled
    assert handled.batch is batch
    assert list(handled.results) == [MessageResult.ACK] * 2
    assert handled.error is None


async def test_the_runner_reports_what_the_handler_raised() -> None:
    recorder = BatchRecorder()
    boom = ValueError("boom")

    async def handler(messages: Sequence[Message]) -> list[MessageResult]:
        raise boom

    sent = await run_one_batch(handler, HookDispatcher([recorder]))
    assert [result for _, result in sent[0]] == [MessageResult.NACK] * 2
    (handled,) = recorder.handled
    assert handled.batch is recorder.started[0]
    assert list(handled.results) == [MessageResult.NACK] * 2
    assert handled.error is boom


async def test_a_cancelled_handler_is_reported_and_stays_cancelled() -> None:
    recorder = BatchRecorder()
    scope = anyio.CancelScope()

    async def handler(messages: Sequence[Message]) -> list[MessageResult]:
        scope.cancel()
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    with scope:
        await run_one_batch(handler, HookDispatcher([recorder]))
    assert scope.cancelled_caught
    (handled,) = recorder.handled
    assert handled.batch is recorder.started[0]
    assert list(handled.results) == []
    assert isinstance(handled.error, anyio.get_cancelled_exc_class())


async def test_a_failing_hook_does_not_change_the_results() -> None:
    class Broken(ConsumerHooks):
        def batch_started(self, batch: BatchInfo) -> None:
            raise RuntimeError("observer bug")

    async def handler(messages: Sequence[Message]) -> list[MessageResult]:
        return [MessageResult.ACK] * len(messages)

    dispatcher = HookDispatcher([Broken()])
    sent = await run_one_batch(handler, dispatcher)
    assert [result for _, result in sent[0]] == [MessageResult.ACK] * 2
    assert dispatcher.hook_errors == 1


async def test_a_handler_timeout_is_reported_as_the_batch_error() -> None:
    async def handler(messages: Sequence[Message]) -> list[MessageResult]:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    results, error = await handle_batch(
        handler, [message(1)], fallback=MessageResult.NACK, timeout=0.01
    )
    assert results == [MessageResult.NACK]
    assert isinstance(error, TimeoutError)
