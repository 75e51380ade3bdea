"""The ``amqp-batch`` command: ``demo`` and ``--version``.

``amqp-batch demo`` declares a demo queue with a dead-letter exchange, publishes
sample messages, consumes them in batches with a handler that ACKs most, NACKs
some and REQUEUEs others, and prints progress and the final counts. It uses the
broker at ``AMQP_BATCH_URL`` (default: localhost); when none answers it says so and
runs the same demo on the in-memory :class:`~amqp_batch.testing.MemoryBroker`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from collections.abc import AsyncIterator, Sequence

import anyio

from ._consumer import batch_consumer
from ._exceptions import AMQPBatchError, ConnectionRefused
from ._message import Message
from ._publisher import Publisher
from ._results import MessageResult
from ._settings import BatchConsumerSettings
from ._transport._base import Transport
from ._transport._native import NativeTransport, open_publisher
from ._transport._url import parse_url
from ._version import __version__

__all__ = ["main"]

DEFAULT_URL = "amqp://guest:guest@localhost:5672/"
DEMO_QUEUE = "amqp-batch.demo"
DEMO_DLX = "amqp-batch.demo.dlx"
DEMO_DLQ = "amqp-batch.demo.dlq"


def _fate(number: int) -> MessageResult:
    """The demo handler's rule: most ACK, every 10th NACK, every 7th REQUEUE."""
    if number % 10 == 0:
        return MessageResult.NACK
    if number % 7 == 0:
        return MessageResult.REQUEUE
    return MessageResult.ACK


async def _pick_transport(url: str) -> tuple[Transport, str]:
    """The native transport if a broker answers at ``url``, else MemoryBroker."""
    parameters = parse_url(url)
    try:
        with anyio.fail_after(5):
            async with open_publisher(parameters):
                pass
    except (ConnectionRefused, TimeoutError):
        from .testing import MemoryBroker

        return MemoryBroker(), "in-memory broker (MemoryBroker; no RabbitMQ answered)"
    return NativeTransport(), f"RabbitMQ at {parameters.redacted_url}"


def _progress(done: int, total: int, width: int = 30) -> str:
    filled = width * done // max(total, 1)
    return f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total}"


async def run_demo(url: str, count: int, *, interactive: bool) -> Counter[str]:
    """Run the demo; returns the handler's results per kind and the DLQ size."""
    transport, where = await _pick_transport(url)
    print(f"amqp-batch {__version__} demo on {where}")
    settings = BatchConsumerSettings(
        url=url,
        queue_name=DEMO_QUEUE,
        queue_durable=False,
        dead_letter_exchange=DEMO_DLX,
        dead_letter_queue=DEMO_DLQ,
        batch_size=100,
        batch_timeout=0.2,
        prefetch_count=500,
        max_requeue_attempts=2,
    )
    counts: Counter[str] = Counter()
    settled = anyio.Event()
    # every message ends acked or dead-lettered exactly once:
    # ACK -> acked; NACK -> DLQ; REQUEUE -> retried twice, then DLQ.
    expected_final = count

    async def handle(messages: Sequence[Message]) -> AsyncIterator[MessageResult]:
        for message in messages:
            result = _fate(int(message.body))
            counts[result.name] += 1
            if (
                result is MessageResult.ACK
                or result is MessageResult.NACK
                or (result is MessageResult.REQUEUE and message.retry_count >= 2)
            ):
                counts["final"] += 1
            yield result
        if interactive:
            print(f"\r{_progress(counts['final'], expected_final)}", end="", flush=True)
        if counts["final"] >= expected_final:
            settled.set()

    async with batch_consumer(settings, handle, transport=transport):
        async with Publisher(url, transport=transport) as publisher:
            for number in range(1, count + 1):
                await publisher.publish(str(number).encode(), routing_key=DEMO_QUEUE)
        with anyio.fail_after(120):
            await settled.wait()
    if interactive:
        print()
    counts["dead_letter_queue"] = await _dlq_depth(transport, url)
    return counts


async def _dlq_depth(transport: Transport, url: str) -> int:
    from .testing import MemoryBroker

    if isinstance(transport, MemoryBroker):
        return transport.message_count(DEMO_DLQ)
    async with open_publisher(parse_url(url)) as publisher:
        info = await publisher.channel.queue_declare(DEMO_DLQ, passive=True)
        await publisher.channel.queue_purge(DEMO_DLQ)
        await publisher.channel.queue_delete(DEMO_QUEUE)
        return info.message_count


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="amqp-batch",
        description="RabbitMQ batch consumer for anyio (asyncio and trio).",
    )
    parser.add_argument("--version", action="version", version=__version__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="publish sample messages and consume them in batches",
        description=(
            "Declare a demo queue with a dead-letter queue, publish sample "
            "messages and consume them with a handler that ACKs, NACKs and "
            "REQUEUEs some. Uses AMQP_BATCH_URL (default localhost); falls back to "
            "the in-memory broker when no RabbitMQ answers."
        ),
    )
    demo.add_argument("--messages", type=int, default=2000, help="how many to publish")
    demo.add_argument(
        "--backend",
        choices=("asyncio", "trio"),
        default="asyncio",
        help="the event loop to run on",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``amqp-batch`` console script."""
    args = _parser().parse_args(argv)
    url = os.environ.get("AMQP_BATCH_URL", DEFAULT_URL)
    try:
        counts = anyio.run(
            lambda: run_demo(url, args.messages, interactive=sys.stdout.isatty()),
            backend=args.backend,
        )
    except (AMQPBatchError, ValueError) as exc:
        print(f"amqp-batch: error: {exc}", file=sys.stderr)
        return 2
    print(
        f"handled: ACK {counts['ACK']}, NACK {counts['NACK']}, "
        f"REQUEUE {counts['REQUEUE']}; settled {counts['final']}/{args.messages}; "
        f"dead-letter queue: {counts['dead_letter_queue']}"
    )
    return 0
