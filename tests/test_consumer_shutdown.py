"""Shutdown as docs/design.md has it, against a real broker, on asyncio and trio."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
from tests.support.transports import make_transport, over_transports

from amqp_batch import BatchConsumerSettings, Message, MessageResult, batch_consumer
from consumer_support import (
    admin_channel,
    cleanup,
    drain,
    ids_of,
    publish_ids,
    unique_name,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
def transport(transport_kind: str) -> Any:
    """The consumer's transport (rows: ``tests.support.transports.ROWS``)."""
    return make_transport(transport_kind)


@pytest.fixture
async def queue(broker_url: str) -> AsyncIterator[str]:
    name = unique_name()
    async with admin_channel(broker_url) as channel:
        await channel.queue_declare(name, durable=True)
    yield name
    await cleanup(broker_url, queues=[name])


def _settings(url: str, queue: str, **overrides: object) -> BatchConsumerSettings:
    values: dict[str, object] = {
        "url": url,
        "queue_name": queue,
        "prefetch_count": 50,
        "batch_size": 5,
        "batch_timeout": 30.0,
        "shutdown_timeout": 10.0,
    }
    values.update(overrides)
    return BatchConsumerSettings(**values)  # type: ignore[arg-type]


@over_transports
async def test_graceful_stop_finishes_batches_and_requeues_prefetched(
    broker_url: str, queue: str, transport: Any
) -> None:
    handled: list[str] = []
    entered = anyio.Event()
    release = anyio.Event()

    async def handle(messages: Sequence[Message]) -> AsyncIterator[MessageResult]:
        entered.set()
        await release.wait()  # the first batch is in the handler when stop comes
        for message in messages:
            handled.append(message.message_id or "")
            yield MessageResult.ACK

    async with admin_channel(broker_url) as channel:
        ids = await publish_ids(channel, range(50), routing_key=queue)
    async with (
        anyio.create_task_group() as group,
        batch_consumer(
            _settings(broker_url, queue), handle, transport=transport
        ) as consumer,
    ):
        with anyio.fail_after(10):
            await entered.wait()

        async def release_once_stopping() -> None:
            # Nothing public tells the moment stop() is requested: that moment
            # is what this test is about.
            run = consumer._run  # noqa: SLF001
            assert run is not None
            await run.stop_requested.wait()
            release.set()

        group.start_soon(release_once_stopping)
    async with admin_channel(broker_url) as channel:
        remaining = await drain(channel, queue)
    # The batch in the handler and the batch already collected finish and are
    # acked; nothing new is taken; everything else went back to the queue.
    assert 5 <= len(handled) <= 10
    assert handled == ids[: len(handled)]
    assert sorted(ids_of(remaining), key=int) == ids[len(handled) :]
    assert all(d.redelivered for d in remaining[:5])


@over_transports
async def test_shutdown_timeout_cancels_handler_and_requeues_never_acks(
    broker_url: str, queue: str, transport: Any
) -> None:
    entered = anyio.Event()
    cancelled = False

    async def handle(messages: Sequence[Message]) -> AsyncIterator[MessageResult]:
        nonlocal cancelled
        entered.set()
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            cancelled = True
            raise
        yield MessageResult.ACK

    async with admin_channel(broker_url) as channel:
        ids = await publish_ids(channel, range(20), routing_key=queue)
    settings = _settings(broker_url, queue, shutdown_timeout=0.5)
    started = anyio.current_time()
    with anyio.fail_after(15):
        async with batch_consumer(settings, handle, transport=transport) as consumer:
            await entered.wait()
            started = anyio.current_time()
    elapsed = anyio.current_time() - started
    assert cancelled
    assert 0.4 < elapsed < 5
    assert [h.state.value for h in consumer.health()] == ["stopped"]
    async with admin_channel(broker_url) as channel:
        remaining = await drain(channel, queue)
    assert sorted(ids_of(remaining), key=int) == ids


@over_transports
async def test_exception_in_body_still_drains(
    broker_url: str, queue: str, transport: Any
) -> None:
    handled: list[str] = []
    seen = anyio.Event()

    async def handle(messages: Sequence[Message]) -> list[MessageResult]:
        handled.extend(m.message_id or "" for m in messages)
        seen.set()
        return [MessageResult.ACK] * len(messages)

    async with admin_channel(broker_url) as channel:
        await publish_ids(channel, range(5), routing_key=queue)

    async def body() -> None:
        async with batch_consumer(
            _settings(broker_url, queue), handle, transport=transport
        ):
            with anyio.fail_after(10):
                await seen.wait()
            raise KeyError("body failed")

    with pytest.raises(KeyError, match="body failed"):
        await body()
    assert handled == [str(i) for i in range(5)]
    async with admin_channel(broker_url) as channel:
        assert await drain(channel, queue) == []


async def run_consumer_process(
    script: Path,
    args: Sequence[str],
    on_line: Callable[[str, list[str], anyio.abc.Process], None],
    *,
    timeout: float,
) -> tuple[int, list[str]]:
    """Run ``script`` with ``args`` in a real Python process; call ``on_line`` for
    each line it prints (stdout and stderr), until it exits. Returns its exit code
    and every line."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    lines: list[str] = []
    async with await anyio.open_process(
        [sys.executable, str(script), *args], env=env, stderr=subprocess.STDOUT
    ) as process:
        assert process.stdout is not None
        buffer = b""
        with anyio.fail_after(timeout):
            async for chunk in process.stdout:
                buffer += chunk
                *complete, buffer = buffer.split(b"\n")
                for line in complete:
                    lines.append(line.decode())
                    on_line(lines[-1], lines, process)
            code = await process.wait()
    return code, lines


SCRIPT = textwrap.dedent(
    """
    import sys, anyio
    from amqp_batch import BatchConsumer, BatchConsumerSettings, MessageResult
    from tests.support.transports import make_transport as make

    url, queue, backend, transport = sys.argv[1:5]

    class Slow(BatchConsumer):
        async def on_stop(self):
            print("on_stop", flush=True)

        async def process_messages(self, messages):
            print("batch " + " ".join(m.message_id for m in messages), flush=True)
            await anyio.sleep(0.5)
            for message in messages:
                yield MessageResult.ACK
            print("acked " + " ".join(m.message_id for m in messages), flush=True)

    settings = BatchConsumerSettings(
        url=url, queue_name=queue, prefetch_count=40, batch_size=5,
        batch_timeout=60, shutdown_timeout=5, max_concurrent_batches=2,
    )
    anyio.run(Slow(settings, transport=make(transport)).run, backend=backend)
    print("exited", flush=True)
    """
)


@over_transports
async def test_sigterm_with_batches_in_flight(
    broker_url: str,
    queue: str,
    anyio_backend: str,
    transport_kind: str,
    tmp_path: Path,
) -> None:
    script = tmp_path / "consumer.py"
    script.write_text(SCRIPT)
    async with admin_channel(broker_url) as channel:
        ids = await publish_ids(channel, range(100), routing_key=queue)
    stopped_at = 0.0

    def on_line(text: str, lines: list[str], process: anyio.abc.Process) -> None:
        nonlocal stopped_at
        if text.startswith("batch") and sum(x.startswith("batch") for x in lines) == 2:
            process.send_signal(signal.SIGTERM)
            stopped_at = anyio.current_time()

    code, lines = await run_consumer_process(
        script, [broker_url, queue, anyio_backend, transport_kind], on_line, timeout=20
    )
    assert code == 0, lines
    assert anyio.current_time() - stopped_at < 5 + 1
    in_handler = [i for x in lines if x.startswith("batch ") for i in x.split()[1:]]
    acked = [i for x in lines if x.startswith("acked ") for i in x.split()[1:]]
    assert lines[-2:] == ["on_stop", "exited"]
    # Batches in flight when SIGTERM came finished and settled; no new ones began.
    assert sorted(acked, key=int) == sorted(in_handler, key=int)
    assert len(in_handler) <= 15
    async with admin_channel(broker_url) as channel:
        remaining = ids_of(await drain(channel, queue))
    assert sorted(remaining + acked, key=int) == ids


STUCK_SCRIPT = textwrap.dedent(
    """
    import logging, sys, anyio
    from amqp_batch import BatchConsumer, BatchConsumerSettings, MessageResult
    from tests.support.transports import make_transport as make

    url, queue, backend, transport = sys.argv[1:5]
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")

    class Stuck(BatchConsumer):
        async def process_messages(self, messages):
            print("batch " + " ".join(m.message_id for m in messages), flush=True)
            await anyio.sleep_forever()  # a handler that never finishes
            yield MessageResult.ACK

    settings = BatchConsumerSettings(
        url=url, queue_name=queue, prefetch_count=10, batch_size=5,
        batch_timeout=60, shutdown_timeout=120,
    )
    try:
        anyio.run(Stuck(settings, transport=make(transport)).run, backend=backend)
    finally:
        print("exited", flush=True)
    """
)


@over_transports
async def test_second_signal_stops_at_once(
    broker_url: str,
    queue: str,
    anyio_backend: str,
    transport_kind: str,
    tmp_path: Path,
) -> None:
    """The first SIGINT starts a graceful drain bounded by shutdown_timeout (120 s
    here); a second one stops at once, and nothing unfinished is acked."""
    script = tmp_path / "stuck.py"
    script.write_text(STUCK_SCRIPT)
    async with admin_channel(broker_url) as channel:
        ids = await publish_ids(channel, range(10), routing_key=queue)

    def on_line(text: str, lines: list[str], process: anyio.abc.Process) -> None:
        # one signal at a time: the OS merges signals that are pending together
        if text.startswith("batch") or "stopping gracefully" in text:
            process.send_signal(signal.SIGINT)

    # far below the 120 s shutdown_timeout
    _, lines = await run_consumer_process(
        script, [broker_url, queue, anyio_backend, transport_kind], on_line, timeout=30
    )
    assert "exited" in lines, lines
    assert any(line.startswith("batch") for line in lines)
    async with admin_channel(broker_url) as channel:
        remaining = ids_of(await drain(channel, queue))
    assert sorted(remaining, key=int) == ids  # nothing was acked
