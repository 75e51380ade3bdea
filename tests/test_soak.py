"""The minutes-long reliability rows (docs/reliability.md): L1 (sustained load), F5
(broker kill -9 and restart) and L2 at its full 100k backlog. Marked ``soak``:
deselected unless pytest runs with ``--soak`` (``nox -s soak``).

``AMQP_BATCH_SOAK_SECONDS`` (default 180) sets L1's duration and
``AMQP_BATCH_SOAK_RATE`` (default 1000) its publish rate in messages per second.
"""

from __future__ import annotations

import os
import signal
import statistics
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
from tests.support.consumer_process import ConsumerProcess
from tests.support.invariant import Recorder, check
from tests.support.rabbit_node import PrivateNode

from amqp_batch import WorkerState
from consumer_support import admin_channel, cleanup
from test_reliability_faults import (
    Gate,
    Tracked,
    _port_opens,
    _settings,
    publish_many,
    run_l2,
)

pytestmark = [pytest.mark.soak, pytest.mark.anyio, pytest.mark.private_node]

SOAK_SECONDS = float(os.environ.get("AMQP_BATCH_SOAK_SECONDS", "180"))
SOAK_RATE = int(os.environ.get("AMQP_BATCH_SOAK_RATE", "1000"))
#: RSS growth after warm-up that still counts as flat.
MAX_GROWTH_MIB = 16.0


@pytest.fixture
async def queue(private_node: PrivateNode, unique_name: str) -> AsyncIterator[str]:
    async with admin_channel(private_node.url) as channel:
        await channel.queue_declare(unique_name, durable=True)
    yield unique_name
    await cleanup(private_node.url, queues=[unique_name])


# --------------------------------------------------------------------- L1


async def test_l1_sustained_load(
    private_node: PrivateNode, queue: str, anyio_backend: str, figures: Any
) -> None:
    """A consumer process with 3 workers takes ``SOAK_RATE`` msg/s for
    ``SOAK_SECONDS``; every id is acked exactly once (no duplicates at all) and
    its resident memory is flat after the first quarter (warm-up)."""
    node = private_node
    step = 0.1
    per_step = max(1, round(SOAK_RATE * step))
    confirmed: list[str] = []
    async with ConsumerProcess(
        node.url,
        queue,
        backend=anyio_backend,
        workers=3,
        prefetch=100,
        batch_size=50,
        batch_timeout=0.2,
        rss_every=2,
        connection_name=queue,
    ) as process:
        started = anyio.current_time()
        deadline = started + SOAK_SECONDS
        next_step = started
        while anyio.current_time() < deadline:
            confirmed += await publish_many(
                node.url, queue, per_step, start=len(confirmed)
            )
            # Pacing the load, not waiting for an outcome.
            next_step += step
            await anyio.sleep_until(next_step)
        published_s = anyio.current_time() - started
        await process.wait_until(
            lambda: process.decided_total >= len(confirmed), 60, "for every id"
        )
        lag_s = anyio.current_time() - started - published_s
        process.send_signal(signal.SIGTERM)
        assert await process.wait_exit(30) == 0, process.tail()
    recorder = Recorder()
    process.replay(recorder)
    report = await check(node.url, queue, None, recorder, confirmed)
    report.assert_holds(max_duplicates=0)
    rss = [kib / 1024 for kib in process.rss_kib()]
    assert len(rss) >= 8, rss
    warm = len(rss) // 4
    after_warmup = statistics.mean(rss[warm : warm + 3])
    at_end = statistics.mean(rss[-3:])
    growth = at_end - after_warmup
    assert growth < MAX_GROWTH_MIB, rss
    figures.record(
        "L1",
        duration_s=round(published_s, 1),
        rate_per_s=round(len(confirmed) / published_s),
        workers=3,
        drain_lag_s=round(lag_s, 2),
        rss_start_mib=round(rss[0], 1),
        rss_after_warmup_mib=round(after_warmup, 1),
        rss_end_mib=round(at_end, 1),
        rss_growth_mib=round(growth, 2),
        **report.figures(),
    )


# --------------------------------------------------------------------- L2 (100k)


async def test_l2_backlog_100k(
    private_node: PrivateNode, queue: str, figures: Any
) -> None:
    """L2 at the matrix's full size: 100k messages of backlog."""
    await run_l2(private_node, queue, figures, 100_000)


# --------------------------------------------------------------------- F5


async def test_f5_broker_kill9_and_restart(
    destructive_node: PrivateNode, queue: str, figures: Any
) -> None:
    """The broker's VM is SIGKILLed with a batch in the handler and booted again
    on its data: every confirmed persistent message (durable queue) is acked in
    the end; the workers consume again soon after the broker is back."""
    node = destructive_node
    workers, prefetch = 2, 20
    recorder = Recorder()
    gate = Gate(recorder)
    settings = _settings(
        node.url,
        queue,
        num_workers=workers,
        prefetch_count=prefetch,
        reconnect_backoff_cap=0.5,
    )
    consumer = Tracked(settings, gate.handler)
    with anyio.fail_after(180):
        async with consumer:
            gate.arm()
            confirmed = await publish_many(node.url, queue, 500)
            await gate.holding.wait()
            killed_at = anyio.current_time()
            await anyio.to_thread.run_sync(node.kill9)
            gate.release()
            await consumer.wait_entered(
                WorkerState.BACKING_OFF, killed_at, range(workers), timeout=10
            )
            async with anyio.create_task_group() as group:
                group.start_soon(anyio.to_thread.run_sync, node.start)
                back_at = await _port_opens(node.amqp_port, timeout=120)
            back = await consumer.wait_entered(
                WorkerState.CONSUMING, killed_at, range(workers), timeout=30
            )
            await recorder.wait_decided(confirmed, timeout=60)
    report = await check(node.url, queue, None, recorder, confirmed)
    report.assert_holds(max_duplicates=len(confirmed))
    recovery_s = back - back_at
    assert recovery_s <= 5.0, recovery_s
    figures.record(
        "F5",
        outage_s=round(back_at - killed_at, 2),
        recovery_after_restart_s=round(recovery_s, 3),
        **report.figures(),
    )
