"""Transport ceiling: consume + multiple-ack throughput, ours vs raw aiormq.

Pre-fills a durable queue with persistent 256-byte messages (published with
confirms), then times a bare consumer that acks with ``multiple=True`` every 100
messages until the queue is drained. Consumers measured in the same run on the same
queue: our native transport on asyncio and on trio, and raw aiormq on asyncio.
Each figure is the median of ``--runs`` runs.

    python bench/transport.py [--url amqp://...] [--messages 50000] [--runs 3]
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import statistics
import subprocess
import sys
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
from cpu import Meter

from amqp_batch._transport._base import Delivery, Properties, QueueSpec, SessionSpec
from amqp_batch._transport._native import connect, open_session
from amqp_batch._transport._native._session import open_publisher
from amqp_batch._transport._url import parse_url

QUEUE = "amqp-batch.bench.transport"
BODY = b"x" * 256
PREFETCH = 1000
ACK_EVERY = 100


async def fill(url: str, count: int) -> None:
    """Purge the queue and publish ``count`` persistent messages with confirms."""
    parameters = parse_url(url)
    async with connect(parameters) as connection, connection.channel() as channel:
        await channel.queue_declare(QUEUE, durable=True)
        await channel.queue_purge(QUEUE)
        await channel.confirm_select()
        properties = Properties(delivery_mode=2)
        window = []
        for _ in range(count):
            waiter = channel.start_publish(
                BODY, routing_key=QUEUE, properties=properties
            )
            window.append(waiter)
            if len(window) >= 500:
                for pending in window:
                    assert pending is not None
                    await pending.wait()
                window.clear()
        for pending in window:
            assert pending is not None
            await pending.wait()
        info = await channel.queue_declare(QUEUE, passive=True)
        assert info.message_count == count, info


async def consume_native(
    url: str,
    count: int,
    clock: Meter | None = None,
    *,
    queue: str = QUEUE,
    arguments: dict[str, Any] | None = None,
) -> float:
    """Drain ``count`` messages of ``queue`` (declared with ``arguments``, e.g.
    a quorum queue's) with our transport; returns seconds."""
    clock = clock or Meter()
    spec = SessionSpec(
        parameters=parse_url(url),
        queue=queue,
        prefetch_count=PREFETCH,
        queues=[QueueSpec(name=queue, durable=True, arguments=arguments)],
    )
    async with open_session(spec) as session:
        clock.start()
        received = 0
        deliveries = session.deliveries
        while True:
            # Take what the reader has buffered without a task switch each, as
            # the library's batcher does: the ceiling is the transport at its best.
            try:
                delivery = deliveries.receive_nowait()
            except anyio.WouldBlock:
                delivery = await deliveries.receive()
            received += 1
            if received % ACK_EVERY == 0 or received == count:
                await session.ack(delivery.delivery_tag, multiple=True)
            if received == count:
                break
        return clock.stop()


#: A plain ACK in the ceiling's ledger (the other entries are publish confirms).
_ACK = "ack"
RETRY_HEADER = "x-retry-count"
REASON_HEADER = "x-dead-letter-reason"


class _MixedLedger:
    """Unsettled tags in tag order; settles from the lowest, as DESIGN.md says.

    An entry is ``_ACK`` or the confirm of a publish (a copy or a dead letter)
    after which the original is acked. :meth:`flush` sends the run of ACKs and
    confirmed publishes from the lowest tag as one ``ack(multiple=True)`` at the
    run's last tag, and stops at the first unconfirmed publish.
    """

    def __init__(self, channel: Any) -> None:
        self.channel = channel
        self.pending: deque[tuple[int, Any]] = deque()

    def flush(self) -> None:
        pending, last_ack = self.pending, 0
        while pending:
            tag, entry = pending[0]
            if entry is not _ACK and not entry.done:
                break
            last_ack = tag
            pending.popleft()
        if last_ack:
            self.channel.ack(last_ack, multiple=True)


def _copy_properties(delivery: Delivery, extra: dict[str, Any]) -> Properties:
    """A copy's properties: the headers kept, the first destination noted."""
    headers = dict(delivery.properties.headers or {})
    headers.setdefault("x-original-exchange", delivery.exchange)
    headers.setdefault("x-original-routing-key", delivery.routing_key)
    headers.update(extra)
    return Properties(delivery_mode=delivery.properties.delivery_mode, headers=headers)


async def consume_native_mixed(
    url: str,
    count: int,
    *,
    queue: str,
    dead_letter_exchange: str,
    dead_letter_queue: str,
    expect_dead: int,
    max_requeue: int = 3,
    clock: Meter | None = None,
) -> tuple[float, int]:
    """W2's broker work on the bare transport: its ceiling; returns seconds and
    the number of deliveries.

    Message ``i`` (the body starts with it) is NACKed if ``i % 10 == 0``,
    always requeued if ``i % 10 == 1``, else acked, and the broker is given the
    work the library gives it with its default ``dead_letter_strategy=
    "publish"``: a NACK is published to the dead-letter exchange with
    ``x-dead-letter-reason`` and acked once that is confirmed; a requeue
    publishes a copy to the back of the queue with ``x-retry-count`` + 1
    (mandatory) and acks the original once the copy is confirmed; a copy at
    ``max_requeue`` is published to the dead-letter exchange under its original
    routing key and acked after that confirm. Every publish is persistent,
    confirmed, on a publisher connection of its own (as the library's). What the
    library adds is gone: no batches, no handler, no actors and streams between
    them. Publishes are pipelined, confirms awaited in order by one task,
    settlement in tag order with one ``ack(multiple=True)`` per run, every 100
    deliveries, whenever the delivery buffer runs dry and whenever a confirm
    unblocks the lowest tag. Timed like the library's W2: until the queue is
    empty and the dead-letter queue holds
    ``expect_dead``.
    """
    clock = clock or Meter()
    parameters = parse_url(url)
    sink, deliveries = anyio.create_memory_object_stream[Delivery](PREFETCH + 16)
    async with (
        connect(parameters) as probe_connection,
        probe_connection.channel() as probe,
        connect(parameters) as connection,
        connection.channel() as channel,
        open_publisher(parameters) as publisher,
        sink,
        deliveries,
    ):
        await channel.basic_qos(PREFETCH)
        await channel.basic_consume(queue, f"amqp-batch.bench.{os.getpid()}", sink)
        clock.start()
        ledger = _MixedLedger(channel)
        confirms_in, confirms_out = anyio.create_memory_object_stream[Any](math.inf)
        async with anyio.create_task_group() as group:
            group.start_soon(_confirm_in_order, confirms_out, ledger)
            received = await _mixed_deliveries(
                deliveries,
                publisher,
                ledger,
                confirms_in,
                count,
                queue,
                dead_letter_exchange,
                max_requeue,
            )
            confirms_in.close()
        # Every confirm is in and the flush behind it sent.
        while [
            (await probe.queue_declare(name, passive=True)).message_count
            for name in (queue, dead_letter_queue)
        ] != [0, expect_dead]:
            await anyio.sleep(0.005)
        return clock.stop(), received


async def _confirm_in_order(confirms: Any, ledger: _MixedLedger) -> None:
    """Await each publish confirm; one that unblocks the lowest tag flushes.

    Takes the confirms queued without a task switch each (``receive`` would
    checkpoint once per publish), as the deliveries are taken.
    """
    async with confirms:
        while True:
            try:
                waiter = confirms.receive_nowait()
            except anyio.WouldBlock:
                try:
                    waiter = await confirms.receive()
                except anyio.EndOfStream:
                    break
            except anyio.EndOfStream:
                break
            await waiter.wait()  # raises if the broker nacked or returned it
            if ledger.pending and ledger.pending[0][1] is waiter:
                ledger.flush()
    ledger.flush()


async def _mixed_deliveries(
    deliveries: Any,
    publisher: Any,
    ledger: _MixedLedger,
    confirms: Any,
    count: int,
    queue: str,
    dead_letter_exchange: str,
    max_requeue: int,
) -> int:
    """Decide every delivery until each of the ``count`` messages is final;
    returns the number of deliveries."""
    final = received = 0
    pending = ledger.pending
    while final < count:
        try:
            delivery = deliveries.receive_nowait()
        except anyio.WouldBlock:
            ledger.flush()
            delivery = await deliveries.receive()
        received += 1
        tag, kind = delivery.delivery_tag, int(delivery.body[:10]) % 10
        if kind > 1:
            pending.append((tag, _ACK))
            final += 1
        else:
            waiter, done = _publish_for(
                delivery, kind, publisher, queue, dead_letter_exchange, max_requeue
            )
            final += done
            pending.append((tag, waiter))
            confirms.send_nowait(waiter)
        if received % ACK_EVERY == 0:
            ledger.flush()
    ledger.flush()
    return received


def _publish_for(
    delivery: Delivery,
    kind: int,
    publisher: Any,
    queue: str,
    dead_letter_exchange: str,
    max_requeue: int,
) -> tuple[Any, bool]:
    """Start the publish W2's library does for a NACK (``kind`` 0) or a REQUEUE
    (1); returns its confirm and whether the message is final with it.

    A NACK is dead-lettered as with ``dead_letter_strategy="publish"`` (the
    library's default): published to the dead-letter exchange, confirmed, then
    the original acked. A REQUEUE is a copy to the back of the queue, or past
    ``max_requeue`` a dead letter under its original routing key.
    """
    if kind == 0:
        properties = _copy_properties(delivery, {REASON_HEADER: "rejected"})
        return publisher.start_publish(
            delivery.body,
            exchange=dead_letter_exchange,
            routing_key=delivery.routing_key,
            properties=properties,
        ), True
    headers = delivery.properties.headers
    retries = headers.get(RETRY_HEADER, 0) if headers else 0
    if retries >= max_requeue:
        properties = _copy_properties(delivery, {REASON_HEADER: "max-requeue-attempts"})
        return publisher.start_publish(
            delivery.body,
            exchange=dead_letter_exchange,
            routing_key=headers["x-original-routing-key"],
            properties=properties,
        ), True
    return publisher.start_publish(
        delivery.body,
        routing_key=queue,
        properties=_copy_properties(delivery, {RETRY_HEADER: retries + 1}),
        mandatory=True,
    ), False


async def consume_aiormq(url: str, count: int, clock: Meter | None = None) -> float:
    """Drain ``count`` messages with raw aiormq; returns seconds."""
    import asyncio

    import aiormq

    connection = await aiormq.connect(url)
    channel = await connection.channel()
    await channel.basic_qos(prefetch_count=PREFETCH)
    done = asyncio.Event()
    received = 0

    async def on_message(message: aiormq.abc.DeliveredMessage) -> None:
        nonlocal received
        received += 1
        if received % ACK_EVERY == 0 or received == count:
            await channel.basic_ack(message.delivery_tag, multiple=True)
        if received == count:
            done.set()

    clock = clock or Meter()
    clock.start()
    await channel.basic_consume(QUEUE, on_message, no_ack=False)
    await done.wait()
    elapsed = clock.stop()
    await connection.close()
    return elapsed


def measure(
    name: str,
    backend: str,
    consumer: Callable[[str, int], Awaitable[float]],
    url: str,
    count: int,
    runs: int,
) -> dict[str, object]:
    """Fill and drain ``runs`` times; return the median rate."""
    rates = []
    for _ in range(runs):
        anyio.run(fill, url, count)
        seconds = anyio.run(consumer, url, count, backend=backend)
        rates.append(count / seconds)
        print(f"  {name:<28} {count / seconds:>10,.0f} msg/s", flush=True)
    return {"consumer": name, "median": statistics.median(rates), "runs": rates}


def commit() -> str:
    """The current git commit, short."""
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def report(results: list[dict[str, object]], count: int, runs: int) -> str:
    """A Markdown table: median msg/s and the ratio to aiormq."""
    baseline = next(
        r["median"] for r in results if r["consumer"] == "aiormq 7 (asyncio)"
    )
    assert isinstance(baseline, float)
    lines = [
        f"# Transport ceiling: consume + ack(multiple) every {ACK_EVERY}",
        "",
        f"{datetime.date.today().isoformat()}, commit {commit()}, "
        f"{platform.node()} ({os.cpu_count()} cores, Python "
        f"{platform.python_version()}), {count} persistent {len(BODY)}-byte "
        f"messages, prefetch {PREFETCH}, median of {runs} runs.",
        "",
        "| consumer | median msg/s | vs aiormq |",
        "| --- | ---: | ---: |",
    ]
    for result in results:
        median = result["median"]
        assert isinstance(median, float)
        lines.append(
            f"| {result['consumer']} | {median:,.0f} | {median / baseline:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    """Run the transport benchmark and write bench/results/transport.md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--url",
        default=os.environ.get("AMQP_BATCH_BENCH_URL", "amqp://guest:guest@127.0.0.1/"),
    )
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    results = []
    # Interleave the consumers run by run so that machine noise hits all of them.
    for _ in range(1):
        results.append(
            measure(
                "amqp-batch native (asyncio)",
                "asyncio",
                consume_native,
                args.url,
                args.messages,
                args.runs,
            )
        )
        results.append(
            measure(
                "amqp-batch native (trio)",
                "trio",
                consume_native,
                args.url,
                args.messages,
                args.runs,
            )
        )
        results.append(
            measure(
                "aiormq 7 (asyncio)",
                "asyncio",
                consume_aiormq,
                args.url,
                args.messages,
                args.runs,
            )
        )
    table = report(results, args.messages, args.runs)
    print(table)
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "transport.md").write_text(table)
    sys.exit(0)


if __name__ == "__main__":
    main()
