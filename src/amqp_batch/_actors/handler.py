"""Handler runner: calls the user's handler and turns what it gives into results."""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterable, Iterable, Sequence
from contextlib import aclosing
from typing import Any

from anyio import move_on_after
from anyio.abc import ObjectReceiveStream
from anyio.streams.memory import MemoryObjectSendStream

from .._bodies import Decoder, decode_batch
from .._hooks import BatchInfo, HandledBatch, HookDispatcher
from .._message import Message
from .._results import BatchHandler, MessageResult
from .acker import Outcome
from .guards import Collect, HandlerGuards, run_guarded
from .streams import send

__all__ = ["collect_results", "handle_batch", "run_handler_runner"]

logger = logging.getLogger("amqp_batch.handler")


async def collect_results(
    handler: BatchHandler,
    messages: Sequence[Message],
    *,
    fallback: MessageResult,
    timeout: float | None = None,
) -> list[MessageResult]:
    """Run ``handler`` on ``messages`` and return exactly one result per message.

    Fewer results than messages, a value that is not a :class:`MessageResult`,
    or an exception (``Exception`` only: cancellation and other
    ``BaseException`` s propagate) give the unsettled messages ``fallback``.
    Extra results are logged and never applied. An async generator is run to its
    end (code after its loop runs) unless it yields a non-result. Past
    ``timeout`` seconds (``handler_timeout``) the handler is cancelled; the
    results it gave still apply and the rest get ``fallback``.
    """
    results, _ = await handle_batch(
        handler, messages, fallback=fallback, timeout=timeout
    )
    return results


async def handle_batch(
    handler: BatchHandler,
    messages: Sequence[Message],
    *,
    fallback: MessageResult,
    timeout: float | None = None,
) -> tuple[list[MessageResult], BaseException | None]:
    """:func:`collect_results`, and what made the handler fail: the exception
    it raised (logged), or a :class:`TimeoutError` past ``timeout``; None when
    it did not fail."""
    results: list[MessageResult] = []
    extra, error = 0, None
    with move_on_after(timeout) as scope:
        extra, error = await _run_handler(handler, messages, results, fallback)
    if scope.cancelled_caught:
        error = TimeoutError(f"handler_timeout ({timeout} s) passed")
        logger.error(
            "handler_timeout (%s s) passed after %d of %d result(s); cancelled "
            "the handler, applying %s to the rest",
            timeout,
            len(results),
            len(messages),
            fallback.name,
        )
    if extra:
        logger.error(
            "handler gave %d result(s) more than the %d message(s); ignored them",
            extra,
            len(messages),
        )
    missing = len(messages) - len(results)
    if missing > 0:
        logger.warning(
            "handler gave %d result(s) for %d message(s); applying %s to %d",
            len(results),
            len(messages),
            fallback.name,
            missing,
        )
        results.extend([fallback] * missing)
    return results, error


async def _run_handler(
    handler: BatchHandler,
    messages: Sequence[Message],
    results: list[MessageResult],
    fallback: MessageResult,
) -> tuple[int, BaseException | None]:
    """Run the handler, appending its results; how many extra it gave, and the
    exception it raised (logged), if any."""
    extra = 0
    try:
        # object: a handler that breaks its type still gets its messages settled.
        produced: object = handler(messages)
        if inspect.isawaitable(produced):
            produced = await produced
        if isinstance(produced, AsyncIterable):
            extra = await _consume_async(produced, results, len(messages))
        elif isinstance(produced, Iterable) and not isinstance(produced, (str, bytes)):
            extra = _consume(produced, results, len(messages))
        else:
            logger.error(
                "handler returned %s, not results; applying %s to %d message(s)",
                type(produced).__name__,
                fallback.name,
                len(messages),
            )
    except Exception as exc:
        logger.exception(
            "handler raised after %d of %d result(s); applying %s to %d message(s)",
            len(results),
            len(messages),
            fallback.name,
            len(messages) - len(results),
        )
        return extra, exc
    except asyncio.CancelledError as exc:
        if not _stray_cancellation(exc):
            raise
        # Not a cancellation of ours: letting it through would silently end the
        # session, and the batch would come back (and do it again) forever.
        logger.error(
            "handler raised CancelledError without being cancelled (did it await "
            "a future that something else cancelled?); applying %s to %d "
            "message(s)",
            fallback.name,
            len(messages) - len(results),
            exc_info=True,
        )
        return extra, exc
    return extra, None


def _stray_cancellation(exc: BaseException) -> bool:
    """True for an asyncio ``CancelledError`` raised in a task that nobody is
    cancelling (Python 3.11+; anyio cancels through ``Task.cancel``)."""
    if not isinstance(exc, asyncio.CancelledError):
        return False
    try:
        task = asyncio.current_task()
    except RuntimeError:  # not running on asyncio
        return False
    cancelling = getattr(task, "cancelling", None)
    return cancelling is not None and cancelling() == 0


def _accept(value: object, results: list[MessageResult], limit: int) -> bool:
    """Append ``value`` if it is a result; False on a non-result."""
    if not isinstance(value, MessageResult):
        logger.error(
            "handler gave %r (a %s) for message %d, not a MessageResult",
            value,
            type(value).__name__,
            len(results),
        )
        return False
    if len(results) < limit:
        results.append(value)
    return True


async def _consume_async(
    produced: AsyncIterable[object], results: list[MessageResult], limit: int
) -> int:
    seen = 0
    append = results.append
    iterator = aiter(produced)
    if hasattr(iterator, "aclose"):
        async with aclosing(iterator):  # type: ignore[type-var]
            async for value in iterator:
                if value.__class__ is MessageResult and seen < limit:
                    append(value)  # the common case, without a call
                elif not _accept(value, results, limit):
                    break
                seen += 1
    else:
        async for value in iterator:
            if not _accept(value, results, limit):
                break
            seen += 1
    return max(0, seen - limit)


def _consume(
    produced: Iterable[object], results: list[MessageResult], limit: int
) -> int:
    seen = 0
    for value in produced:
        if not _accept(value, results, limit):
            break
        seen += 1
    return max(0, seen - limit)


async def run_handler_runner(
    batches: ObjectReceiveStream[list[Message]],
    to_acker: MemoryObjectSendStream[list[Outcome]],
    handler: BatchHandler,
    *,
    fallback: MessageResult,
    guards: HandlerGuards | None = None,
    hooks: HookDispatcher | None = None,
    worker: int = 0,
    queue: str = "",
    decoder: Decoder[object] | None = None,
) -> None:
    """Take batches, run the handler, send one outcome per message to the acker.

    A worker starts ``max_concurrent_batches`` of these on clones of the same
    streams; the acker's input ends when the last clone closes. ``guards``
    (idempotency, rate limit, timeout, kill-switch feed) wrap each call.
    ``hooks`` hear ``batch_started``/``batch_handled`` in this task, around
    the handler; without listeners a batch costs nothing more. With a
    ``decoder``, bodies are decoded first; those that fail go to the acker to be
    dead-lettered and never reach the handler.
    """
    observed = hooks is not None and (
        hooks.batch_started is not None or hooks.batch_handled is not None
    )
    async with batches, to_acker:
        async for received in batches:
            batch, undecodable = decode_batch(received, decoder)
            if undecodable:
                await send(to_acker, undecodable)
            if not batch:
                continue
            if observed:
                assert hooks is not None
                info = BatchInfo(worker=worker, queue=queue, messages=batch)
                outcomes = await _observed(
                    hooks, info, batch, handler, fallback, guards
                )
            else:
                outcomes = await _outcomes(
                    batch, handler, fallback, guards, collect_results
                )
            await send(to_acker, outcomes)


async def _outcomes(
    batch: list[Message],
    handler: BatchHandler,
    fallback: MessageResult,
    guards: HandlerGuards | None,
    collect: Collect,
) -> list[Outcome]:
    """One outcome per message: through the guards when there are any."""
    if guards is not None:
        return await run_guarded(batch, handler, fallback, guards, collect)
    results = await collect(handler, batch, fallback=fallback)
    return list(zip(batch, results, strict=True))


async def _observed(
    hooks: HookDispatcher,
    info: BatchInfo,
    batch: list[Message],
    handler: BatchHandler,
    fallback: MessageResult,
    guards: HandlerGuards | None,
) -> list[Outcome]:
    """:func:`_outcomes` between ``batch_started`` and ``batch_handled``
    (which also hears a cancellation, with no results)."""
    errors: list[BaseException] = []

    async def collect(*arguments: Any, **options: Any) -> list[MessageResult]:
        # collect_results, keeping the handler's error for batch_handled
        results, error = await handle_batch(*arguments, **options)
        if error is not None:
            errors.append(error)
        return results

    started, handled = hooks.batch_started, hooks.batch_handled
    if started is not None:
        started(info)
    begin = time.perf_counter()
    try:
        outcomes = await _outcomes(batch, handler, fallback, guards, collect)
    except BaseException as exc:
        if handled is not None:
            handled(HandledBatch(info, (), time.perf_counter() - begin, exc))
        raise
    if handled is not None:
        results = [r for _, r in outcomes if isinstance(r, MessageResult)]
        error = errors[0] if errors else None
        handled(HandledBatch(info, results, time.perf_counter() - begin, error))
    return outcomes
