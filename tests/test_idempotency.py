"""Idempotency: the store protocol, the in-memory TTL store, the handler wrapper,
and the Redis example against the machine's Redis (asyncio and trio)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from types import ModuleType

import anyio
import pytest

from amqp_batch import Message, MessageResult
from amqp_batch._transport._base import Delivery, Properties
from amqp_batch.idempotency import (
    IdempotencyStore,
    MemoryIdempotencyStore,
    deduplicated,
)
from consumer_support import cleanup, unique_name

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "idempotency_redis.py"


def _message(tag: int, message_id: str | None) -> Message:
    return Message(
        Delivery(
            delivery_tag=tag,
            redelivered=False,
            exchange="",
            routing_key="q",
            consumer_tag="c",
            body=b"",
            properties=Properties(message_id=message_id),
        )
    )


def _redis_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("idempotency_redis", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_memory_store_forgets_after_ttl_and_beyond_max_keys() -> None:
    now = [0.0]
    store = MemoryIdempotencyStore(ttl=10, max_keys=3, clock=lambda: now[0])
    assert isinstance(store, IdempotencyStore)
    await store.remember(["a", "b"])
    assert await store.seen(["a", "b", "c"]) == {"a", "b"}
    now[0] = 9.9
    await store.remember(["c"])
    assert await store.seen(["a", "c"]) == {"a", "c"}
    now[0] = 10.0  # a and b expire; c (remembered at 9.9) stays
    assert await store.seen(["a", "b", "c"]) == {"c"}
    await store.remember(["d", "e", "f"])  # only the 3 newest are kept
    assert await store.seen(["c", "d", "e", "f"]) == {"d", "e", "f"}
    assert len(store) == 3


async def test_seen_messages_are_acked_without_reaching_the_handler() -> None:
    store = MemoryIdempotencyStore()
    await store.remember(["done"])
    reached: list[str | None] = []
    skipped: list[str | None] = []

    async def handler(messages: Sequence[Message]) -> AsyncIterator[MessageResult]:
        for message in messages:
            reached.append(message.message_id)
            yield (
                MessageResult.REQUEUE
                if message.message_id == "retry"
                else MessageResult.ACK
            )

    wrapped = deduplicated(
        handler, store, on_skip=lambda ms: skipped.extend(m.message_id for m in ms)
    )
    batch = [_message(1, "new"), _message(2, "done"), _message(3, None)]
    batch.append(_message(4, "retry"))
    results = [result async for result in wrapped(batch)]
    assert results == [
        MessageResult.ACK,
        MessageResult.ACK,
        MessageResult.ACK,
        MessageResult.REQUEUE,
    ]
    assert reached == ["new", None, "retry"]
    assert skipped == ["done"]
    # Only what the handler ACKed is remembered; a REQUEUEd message is not done.
    assert await store.seen(["new", "retry"]) == {"new"}


async def test_results_given_before_a_handler_error_still_apply() -> None:
    store = MemoryIdempotencyStore()

    async def handler(messages: Sequence[Message]) -> list[MessageResult]:
        raise RuntimeError("boom")

    async def partial(messages: Sequence[Message]) -> AsyncIterator[MessageResult]:
        yield MessageResult.ACK
        raise RuntimeError("boom")

    results: list[MessageResult] = []
    with pytest.raises(RuntimeError):
        async for result in deduplicated(partial, store)(
            [_message(1, "a"), _message(2, "b")]
        ):
            results.append(result)
    assert results == [MessageResult.ACK]
    assert await store.seen(["a", "b"]) == {"a"}
    with pytest.raises(RuntimeError):
        async for _ in deduplicated(handler, store)([_message(3, "c")]):
            pass


async def test_redis_store_round_trip() -> None:
    module = _redis_example()
    prefix = f"amqp-batch-test:{uuid.uuid4().hex}:"
    async with module.RedisIdempotencyStore(ttl=60, prefix=prefix) as store:
        assert isinstance(store, IdempotencyStore)
        assert await store.seen(["a", "b"]) == set()
        await store.remember(["a"])
        assert await store.seen(["a", "b"]) == {"a"}
        # The key expires in Redis: its TTL is set, not left forever.
        ((ttl,),) = [await store.execute([("TTL", prefix + "a")])]
        assert 0 < ttl <= 60
        await store.execute([("DEL", prefix + "a")])
        with pytest.raises(module.RedisError):
            await store.execute([("NO-SUCH-COMMAND",)])


async def test_redis_example_handles_a_duplicate_once(
    broker_url: str, anyio_backend: str
) -> None:
    queue = unique_name("idem")
    environ = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(sys.path),
        AMQP_BATCH_URL=broker_url,
        EXAMPLE_QUEUE=queue,
        EXAMPLE_BACKEND=anyio_backend,
        EXAMPLE_REDIS_PREFIX=f"amqp-batch-test:{queue}:",
    )
    try:
        with anyio.fail_after(60):
            result = await anyio.run_process(
                [sys.executable, str(EXAMPLE)],
                env=environ,
                check=False,
                stderr=subprocess.STDOUT,
            )
    finally:
        await cleanup(broker_url, queues=[queue])
        async with _redis_example().RedisIdempotencyStore() as store:
            prefix = environ["EXAMPLE_REDIS_PREFIX"]
            await store.execute([("DEL", prefix + "order-1", prefix + "order-2")])
    lines = result.stdout.decode().splitlines()
    assert result.returncode == 0, lines
    assert sorted(line for line in lines if line.startswith("handled")) == [
        "handled order-1",
        "handled order-2",
    ]
    assert [line for line in lines if line.startswith("skipped")] == ["skipped order-1"]
    assert lines[-1] == "stopped"
