"""What every peer driver shares: arguments, the workload's decisions, the result.

Standard library only: each driver runs under its own virtual environment
(``bench/.venvs/<peer>``) and imports nothing from amqp-batch. Protocol on stdout,
as ``bench/workloads.py``: one JSON object per line, ``{"ready": true}`` once
consuming (latency mode), then the result with ``seconds``, ``handled``,
``baseline_rss_kib``, ``peak_rss_kib``, ``python`` and :class:`cpu.Meter`'s
figures. Logs go to stderr.

Modes: ``drain`` (ACK everything), ``mixed`` (message ``i``, the index at the
start of the body, is NACKed if ``i % 10 == 0``, always REQUEUEd if
``i % 10 == 1``, else ACKed; a REQUEUE is a copy with ``x-retry-count`` + 1 at
the back of the queue until ``--max-requeue``, then dead-lettered), ``io`` (ACK
after awaiting ``--sleep`` per batch) and ``latency``.
"""

from __future__ import annotations

import argparse
import enum
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cpu import Meter

__all__ = [
    "RETRY_HEADER",
    "Decision",
    "Meter",
    "batch_options",
    "decide",
    "emit",
    "parser",
    "rss_kib",
    "wait_for_counts",
]

RETRY_HEADER = "x-retry-count"


class Decision(enum.Enum):
    """What the workload's handler decides for one message."""

    ACK = "ack"
    NACK = "nack"  # reject without requeue: the broker dead-letters it
    REQUEUE = "requeue"  # a copy with the count + 1 to the back of the queue
    DEAD_LETTER = "dead-letter"  # a REQUEUE at the limit


def decide(mode: str, body: bytes, retry_count: int, max_requeue: int) -> Decision:
    """The handler's decision; every one but REQUEUE makes the message final."""
    if mode != "mixed":
        return Decision.ACK
    kind = int(body[:10]) % 10
    if kind == 0:
        return Decision.NACK
    if kind == 1:
        if retry_count >= max_requeue:
            return Decision.DEAD_LETTER
        return Decision.REQUEUE
    return Decision.ACK


def retry_count(headers: Any) -> int:
    """``x-retry-count`` from a header table (``None`` or missing: 0)."""
    return int((headers or {}).get(RETRY_HEADER, 0))


def copy_headers(headers: Any, queue: str, retries: int) -> dict[str, Any]:
    """A REQUEUE copy's headers: the originals kept, the count set, the first
    destination noted (as the library's copies)."""
    copied = dict(headers or {})
    copied.setdefault("x-original-exchange", "")
    copied.setdefault("x-original-routing-key", queue)
    copied[RETRY_HEADER] = retries + 1
    return copied


def rss_kib(field: str = "VmRSS") -> int:
    """Current resident set size (``VmHWM``: its peak), KiB.

    Not ``getrusage``: on Linux a child's ``ru_maxrss`` starts at its parent's
    RSS at fork time, which would hide the consumer's own peak.
    """
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


async def wait_for_counts(channel: Any, queue: str, dlq: str, expect_dlq: int) -> None:
    """Poll (aio-pika ``channel``) until ``queue`` is empty and ``dlq`` holds
    ``expect_dlq``: W2's end, as the library's measurement."""
    import asyncio

    async def counts() -> list[int]:
        return [
            (
                await channel.declare_queue(name, passive=True)
            ).declaration_result.message_count
            for name in (queue, dlq)
        ]

    while await counts() != [0, expect_dlq]:
        await asyncio.sleep(0.005)


def parser(description: str, modes: tuple[str, ...]) -> argparse.ArgumentParser:
    """The arguments every driver takes (the runner passes the same ones)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--url", required=True)
    parser.add_argument("--queue", required=True)
    parser.add_argument("--mode", choices=modes, default="drain")
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--batch-timeout", type=float, default=0.5)
    parser.add_argument("--prefetch", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--max-requeue", type=int, default=3)
    parser.add_argument("--dlx", default=None)
    parser.add_argument("--dlq", default=None)
    parser.add_argument("--expect-dlq", type=int, default=0)
    return parser


def batch_options(args: argparse.Namespace) -> dict[str, Any]:
    """The settings aio-pika-batch and amqp-batch share (same names), from the
    arguments of :func:`parser` (``bench/workloads.py`` takes the same)."""
    return {
        "url": args.url,
        "queue_name": args.queue,
        "prefetch_count": args.prefetch,
        "batch_size": args.batch_size,
        "batch_timeout": args.batch_timeout,
        "num_workers": args.workers,
        "max_requeue_attempts": args.max_requeue,
    }


def emit(meter: Meter, handled: int, baseline: int, **extra: Any) -> None:
    """Print the result line."""
    result = {
        "seconds": meter.seconds,
        "handled": handled,
        "baseline_rss_kib": baseline,
        "peak_rss_kib": rss_kib("VmHWM"),
        "python": sys.version.split()[0],
        **meter.figures(),
        **extra,
    }
    print(json.dumps(result), flush=True)
