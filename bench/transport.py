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
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio

from amqp_batch._transport._base import Properties, QueueSpec, SessionSpec
from amqp_batch._transport._native import connect, open_session
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


async def consume_native(url: str, count: int) -> float:
    """Drain ``count`` messages with our transport; returns seconds."""
    spec = SessionSpec(
        parameters=parse_url(url),
        queue=QUEUE,
        prefetch_count=PREFETCH,
        queues=[QueueSpec(name=QUEUE, durable=True)],
    )
    async with open_session(spec) as session:
        started = time.perf_counter()
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
        elapsed = time.perf_counter() - started
    return elapsed


async def consume_aiormq(url: str, count: int) -> float:
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

    started = time.perf_counter()
    await channel.basic_consume(QUEUE, on_message, no_ack=False)
    await done.wait()
    elapsed = time.perf_counter() - started
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
