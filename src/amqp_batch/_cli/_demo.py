"""``amqp-batch demo``: the library end to end in a few seconds.

It declares a demo queue with a dead-letter exchange and queue, publishes sample
messages, consumes them in batches with a handler that ACKs most, NACKs some and
REQUEUEs others, shows progress, and prints the final counts per result and in the
dead-letter queue. It uses the broker at ``--url`` / ``AMQP_BATCH_URL`` (default:
localhost); when none answers it says so and runs the same demo on the in-memory
:class:`~amqp_batch.testing.MemoryBroker`.

Progress: on a terminal, a bar redrawn after every batch; otherwise one line per
quarter of the messages settled, so logs stay short.
"""

from __future__ import annotations

import argparse
import os
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING

import anyio

from .._consumer import batch_consumer
from .._exceptions import ConnectionRefused
from .._message import Message
from .._publisher import Publisher
from .._results import MessageResult
from .._settings import BatchConsumerSettings
from .._transport._base import Transport
from .._transport._native import NativeTransport, open_publisher
from .._transport._url import parse_url
from .._version import __version__
from ._common import CLIError, describe

if TYPE_CHECKING:
    from ..testing import MemoryBroker

__all__ = [
    "DEFAULT_URL",
    "DEMO_QUEUE",
    "add_demo_arguments",
    "demo_command",
    "run_demo",
]

DEFAULT_URL = "amqp://guest:guest@localhost:5672/"
DEMO_QUEUE = "amqp-batch.demo"
#: The demo's REQUEUE limit: a REQUEUEd message is handled three times, then
#: dead-lettered.
DEMO_RETRIES = 2
#: Seconds the whole demo may take once the messages are published.
DEMO_TIMEOUT = 120


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``demo`` subcommand's arguments."""
    parser.add_argument(
        "--url",
        metavar="URL",
        default=None,
        help=f"broker URL [env AMQP_BATCH_URL; default {DEFAULT_URL}]",
    )
    parser.add_argument(
        "-n",
        "--messages",
        type=int,
        default=2000,
        metavar="N",
        help="how many messages to publish [default 2000]",
    )
    parser.add_argument(
        "--queue",
        default=DEMO_QUEUE,
        metavar="NAME",
        help=f"the demo queue; NAME.dlx and NAME.dlq are its dead-letter exchange "
        f"and queue; all three are deleted at the start and the end "
        f"[default {DEMO_QUEUE}]",
    )


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
        with anyio.fail_after(parameters.connection_timeout or 10):
            async with open_publisher(parameters):
                pass
    except (ConnectionRefused, TimeoutError) as exc:
        from ..testing import MemoryBroker

        reason = "no answer" if isinstance(exc, TimeoutError) else describe(exc)
        print(f"no RabbitMQ answered at {parameters.redacted_url} ({reason})")
        return MemoryBroker(), "the IN-MEMORY broker (MemoryBroker), not RabbitMQ"
    return NativeTransport(), f"RabbitMQ at {parameters.redacted_url}"


def _progress(done: int, total: int, width: int = 30) -> str:
    filled = width * done // max(total, 1)
    return f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total}"


async def _delete_topology(url: str, queue: str) -> None:
    async with open_publisher(parse_url(url)) as publisher:
        await publisher.channel.queue_delete(queue)
        await publisher.channel.queue_delete(f"{queue}.dlq")
        await publisher.channel.exchange_delete(f"{queue}.dlx")


def _demo_settings(url: str, queue: str) -> BatchConsumerSettings:
    """A non-durable queue with a dead-letter exchange and queue of its own."""
    return BatchConsumerSettings(
        url=url,
        queue_name=queue,
        queue_durable=False,
        dead_letter_exchange=f"{queue}.dlx",
        dead_letter_queue=f"{queue}.dlq",
        batch_size=100,
        batch_timeout=0.2,
        prefetch_count=500,
        max_requeue_attempts=DEMO_RETRIES,
    )


async def _dead_letter_count(url: str, dlq: str, memory: MemoryBroker | None) -> int:
    """How many messages the dead-letter queue holds."""
    if memory is not None:
        return memory.message_count(dlq)
    async with open_publisher(parse_url(url)) as admin:
        info = await admin.channel.queue_declare(dlq, passive=True)
        return int(info.message_count)


async def _demo_transport(
    url: str, queue: str
) -> tuple[Transport, MemoryBroker | None]:
    """The transport (announced), and the memory broker when it is one."""
    transport, where = await _pick_transport(url)
    print(f"amqp-batch {__version__} demo on {where}")
    from ..testing import MemoryBroker

    if isinstance(transport, MemoryBroker):
        return transport, transport
    await _delete_topology(url, queue)  # leftovers of an interrupted run
    return transport, None


async def run_demo(
    url: str, count: int, *, interactive: bool, queue: str = DEMO_QUEUE
) -> Counter[str]:
    """Run the demo. Returns the handler's results per kind (``ACK``, ``NACK``,
    ``REQUEUE``), ``final`` (messages that reached their last result),
    ``dead_letter_queue`` (its size at the end) and ``in_memory`` (1 if the demo
    ran on the in-memory broker)."""
    transport, memory = await _demo_transport(url, queue)
    dlq = f"{queue}.dlq"
    settings = _demo_settings(url, queue)
    counts: Counter[str] = Counter()
    settled = anyio.Event()
    quarters_shown = 0
    # Every message ends acked or dead-lettered exactly once:
    # ACK -> acked; NACK -> DLQ; REQUEUE -> retried twice, then DLQ.

    async def handle(messages: Sequence[Message]) -> AsyncIterator[MessageResult]:
        nonlocal quarters_shown
        for message in messages:
            result = _fate(int(message.body))
            counts[result.name] += 1
            if result is not MessageResult.REQUEUE or (
                message.retry_count >= DEMO_RETRIES
            ):
                counts["final"] += 1
            yield result
        done = counts["final"]
        if interactive:
            print(f"\r{_progress(done, count)}", end="", flush=True)
        elif 4 * done // max(count, 1) > quarters_shown:
            quarters_shown = 4 * done // max(count, 1)
            print(f"progress: {done}/{count} messages settled", flush=True)
        if done >= count:
            settled.set()

    try:
        async with batch_consumer(settings, handle, transport=transport):
            async with Publisher(url, transport=transport) as publisher:
                for number in range(1, count + 1):
                    await publisher.publish(str(number).encode(), routing_key=queue)
            with anyio.fail_after(DEMO_TIMEOUT):
                await settled.wait()
    except TimeoutError:
        raise CLIError(
            f"the demo did not finish within {DEMO_TIMEOUT} s "
            f"({counts['final']}/{count} settled)"
        ) from None
    if interactive:
        print()
    counts["dead_letter_queue"] = await _dead_letter_count(url, dlq, memory)
    if memory is not None:
        counts["in_memory"] = 1
    else:
        await _delete_topology(url, queue)
    return counts


def demo_command(args: argparse.Namespace, *, interactive: bool) -> int:
    """``amqp-batch demo``: print the final counts; the exit code."""
    url = args.url or os.environ.get("AMQP_BATCH_URL") or DEFAULT_URL
    if args.messages < 1:
        raise CLIError("--messages must be at least 1")
    try:
        parse_url(url)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    counts: Counter[str] = anyio.run(
        lambda: run_demo(url, args.messages, interactive=interactive, queue=args.queue),
        backend=args.backend,
    )
    where = " [in-memory broker]" if counts["in_memory"] else ""
    print(
        f"handled: ACK {counts['ACK']}, NACK {counts['NACK']}, "
        f"REQUEUE {counts['REQUEUE']}; settled {counts['final']}/{args.messages}; "
        f"dead-letter queue: {counts['dead_letter_queue']}{where}"
    )
    return 0
