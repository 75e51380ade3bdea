"""Workloads W1-W7: queue fills, paced publishing, and one measurement per process.

The runner (``bench/run.py``) fills the queue in its own process, then starts one
child process per measurement so that every consumer starts from a fresh
interpreter (and its peak RSS is its own):

- ``python bench/workloads.py --consumer amqp-batch|ceiling|aiormq ...`` for our
  consumers (this file; ``--consumer amqp-batch --transport aiormq`` runs the
  amqp-batch consumer on the aiormq transport, asyncio only), and
- ``bench/.venvs/aio-pika-batch/bin/python bench/peers/aio_pika_batch_driver.py``
  for aio-pika-batch.

Both print the same JSON lines on stdout: ``{"ready": true}`` once consuming
(latency mode only), then the result. The fill and the bare consumers (our
transport's ceiling and raw aiormq) are ``bench/transport.py``'s own functions.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import mmap
import os
import struct
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent))

import transport
from cpu import Meter
from peers.common import batch_options

import amqp_batch
from amqp_batch import (
    BatchConsumerSettings,
    Message,
    MessageResult,
    batch_consumer,
)
from amqp_batch._transport._base import Properties
from amqp_batch._transport._native import connect
from amqp_batch._transport._url import parse_url

PREFIX = "amqp-batch.bench."
#: W1, W3, W4, W6: the queue bench/transport.py fills and drains.
DRAIN_QUEUE = transport.QUEUE
#: W2: a queue with a dead-letter exchange and queue.
MIXED_QUEUE = PREFIX + "mixed"
MIXED_DLX = PREFIX + "mixed.dlx"
MIXED_DLQ = PREFIX + "mixed.dlq"
#: W5: messages carrying their publish time.
LATENCY_QUEUE = PREFIX + "latency"
MAX_REQUEUE = 3
PERSISTENT = Properties(delivery_mode=2)


@dataclass(frozen=True)
class Topology:
    """A workload's queue, its dead-letter exchange and queue, and their type.

    Every consumer of the workload declares the work queue with
    :attr:`arguments`; the fill declares all of it first. A quorum topology's
    dead-letter queue is quorum too: the fill declares and binds it, and the
    library is given only the exchange (it would declare a classic one).
    """

    queue: str
    dlx: str | None = None
    dlq: str | None = None
    quorum: bool = False

    @property
    def arguments(self) -> dict[str, Any]:
        """The work queue's arguments, as every consumer declares them."""
        arguments: dict[str, Any] = {"x-queue-type": "quorum"} if self.quorum else {}
        if self.dlx:
            arguments["x-dead-letter-exchange"] = self.dlx
        return arguments


#: W1Q: W1 on a quorum queue.
QUORUM_QUEUE = PREFIX + "quorum"
#: W2Q: W2 on a quorum queue whose dead-letter queue is quorum too.
MIXED_Q_QUEUE = PREFIX + "mixed-quorum"
MIXED_Q_DLX = PREFIX + "mixed-quorum.dlx"
MIXED_Q_DLQ = PREFIX + "mixed-quorum.dlq"
#: W7: the outage; amqp-batch's delayed retries add ``<queue>.retry.<n>s``.
OUTAGE_QUEUE = PREFIX + "outage"
OUTAGE_DLX = PREFIX + "outage.dlx"
OUTAGE_DLQ = PREFIX + "outage.dlq"
TOPOLOGIES = {
    t.queue: t
    for t in (
        Topology(DRAIN_QUEUE),
        Topology(LATENCY_QUEUE),
        Topology(MIXED_QUEUE, MIXED_DLX, MIXED_DLQ),
        Topology(QUORUM_QUEUE, quorum=True),
        Topology(MIXED_Q_QUEUE, MIXED_Q_DLX, MIXED_Q_DLQ, quorum=True),
        Topology(OUTAGE_QUEUE, OUTAGE_DLX, OUTAGE_DLQ),
    )
}
#: W7's amqp-batch configuration with delayed retries (the names of the delay
#: queues the library declares follow from it; ``delete_all`` removes them).
OUTAGE_RETRY_DELAYS = (1.0, 2.0, 4.0)


def body(index: int, stamp: float = 0.0, size: int = 256) -> bytes:
    """``size`` bytes: the index (10 digits), a space, the publish time (18)."""
    return f"{index:010d} {stamp:018.6f} ".encode().ljust(size, b"x")


def stamp_of(data: bytes) -> float:
    return float(data[11:29])


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


@contextlib.contextmanager
def body_size(size: int) -> Iterator[None]:
    """Make ``transport.fill`` publish ``size``-byte bodies (W6: 4 KiB)."""
    saved = transport.BODY
    transport.BODY = b"x" * size
    try:
        yield
    finally:
        transport.BODY = saved


def fill_drain(url: str, count: int, size: int = 256) -> None:
    """W1/W3/W4/W6: bench/transport.py's confirmed fill of its durable queue."""
    with body_size(size):
        anyio.run(transport.fill, url, count)


async def _declare(channel: Any, topology: Topology) -> None:
    """The topology's exchange and queues (as the consumers declare them)."""
    quorum = {"x-queue-type": "quorum"} if topology.quorum else None
    if topology.dlx and topology.dlq:
        await channel.exchange_declare(topology.dlx, "topic", durable=True)
        await channel.queue_declare(topology.dlq, durable=True, arguments=quorum)
        await channel.queue_bind(topology.dlq, topology.dlx, "#")
    await channel.queue_declare(
        topology.queue, durable=True, arguments=topology.arguments or None
    )


async def fill_queue_async(url: str, topology: Topology, count: int) -> None:
    """Purge the topology's queues (W7: delete its delay queues, whose copies
    would come back), publish ``count`` indexed messages with confirms,
    pipelined 500 at a time as ``transport.fill`` does."""
    queue = topology.queue
    async with connect(parse_url(url)) as connection, connection.channel() as channel:
        await _declare(channel, topology)
        await channel.queue_purge(queue)
        if topology.dlq:
            await channel.queue_purge(topology.dlq)
        if queue == OUTAGE_QUEUE:
            for name in outage_delay_queues():
                await channel.queue_delete(name)
        await channel.confirm_select()
        window = []
        for index in range(count):
            window.append(
                channel.start_publish(
                    body(index), routing_key=queue, properties=PERSISTENT
                )
            )
            if len(window) >= 500 or index == count - 1:
                for pending in window:
                    await pending.wait()
                window.clear()
        info = await channel.queue_declare(queue, passive=True)
        assert info.message_count == count, info


def fill_queue(url: str, queue: str, count: int) -> None:
    """W1Q, W2, W2Q, W7: fill ``queue`` (one of :data:`TOPOLOGIES`)."""
    anyio.run(fill_queue_async, url, TOPOLOGIES[queue], count)


def fill_mixed(url: str, count: int) -> None:
    fill_queue(url, MIXED_QUEUE, count)


def outage_delay_queues() -> list[str]:
    """The delay queues amqp-batch declares for W7's delayed retries."""
    from amqp_batch._delays import delay_queue_name  # the runner's package only

    return [delay_queue_name(OUTAGE_QUEUE, d) for d in OUTAGE_RETRY_DELAYS]


async def reset_latency_queue(url: str) -> None:
    async with connect(parse_url(url)) as connection, connection.channel() as channel:
        await channel.queue_declare(LATENCY_QUEUE, durable=True)
        await channel.queue_purge(LATENCY_QUEUE)


async def publish_paced(url: str, rate: float, count: int, size: int = 256) -> None:
    """W5: publish ``count`` persistent messages at ``rate`` per second, each
    carrying its publish time; confirms are awaited in the background."""
    interval = 1.0 / rate
    async with connect(parse_url(url)) as connection, connection.channel() as channel:
        await channel.confirm_select()
        pending = []
        start = anyio.current_time()
        for index in range(count):
            delay = start + index * interval - anyio.current_time()
            if delay > 0:
                await anyio.sleep(delay)
            pending.append(
                channel.start_publish(
                    body(index, time.time(), size),
                    routing_key=LATENCY_QUEUE,
                    properties=PERSISTENT,
                )
            )
        for waiter in pending:
            await waiter.wait()


async def queue_counts(url: str, *names: str) -> list[int]:
    """Ready-message counts (passive declares) on a fresh connection."""
    async with connect(parse_url(url)) as connection, connection.channel() as channel:
        return [
            (await channel.queue_declare(name, passive=True)).message_count
            for name in names
        ]


async def delete_all(url: str) -> None:
    """Delete every queue and exchange the bench declared."""
    async with connect(parse_url(url)) as connection, connection.channel() as channel:
        for topology in TOPOLOGIES.values():
            for queue in (topology.queue, topology.dlq):
                if queue:
                    await channel.queue_delete(queue)
            if topology.dlx:
                await channel.exchange_delete(topology.dlx)
        for queue in outage_delay_queues():
            await channel.queue_delete(queue)


# -- amqp-batch as a consumer ------------------------------------------------------


class Progress:
    """The final counts of several consumer processes, in one shared file.

    Each process of a multi-process measurement writes its own count into its
    slot after every batch; each stops once the slots add up to the total.
    """

    #: The share of the messages handled at which the runner stops the clock.
    MARK = 0.95

    def __init__(self, path: str, slot: int, slots: int) -> None:
        self._file = open(path, "r+b")  # noqa: SIM115 (lives as long as the process)
        self._map = mmap.mmap(self._file.fileno(), 8 * slots)
        self._slot = slot
        self._format = f"{slots}q"

    @staticmethod
    def create(path: str, slots: int) -> None:
        Path(path).write_bytes(bytes(8 * slots))

    def publish(self, value: int) -> None:
        struct.pack_into("q", self._map, 8 * self._slot, value)

    def total(self) -> int:
        return sum(struct.unpack_from(self._format, self._map))

    async def wait(self, count: int) -> float:
        """Poll until the slots add up to ``count``; return the wall-clock time
        at which they first reached ``MARK`` of it.

        The runner times several processes to that mark, not to the end: once the
        queue is drained each process holds a partial batch that waits out the
        batch timeout, however many processes there are.
        """
        mark = None
        while (total := self.total()) < count:
            if mark is None and total >= self.MARK * count:
                mark = time.time()
            await anyio.sleep(0.002)
        return time.time() if mark is None else mark


class _State:
    def __init__(
        self, mode: str, target: float, sleep: float, progress: Progress | None = None
    ) -> None:
        self.mode = mode
        self.target = target
        self.sleep = sleep
        self.progress = progress
        self.max_requeue = MAX_REQUEUE
        self.handled = 0
        self.final = 0
        #: outage mode: the handler fails until this ``time.monotonic()``.
        self.outage_until = math.inf
        #: outage mode: REQUEUEs given in the outage, and at the limit.
        self.failed = 0
        self.dead = 0
        self.latencies: list[float] = []
        self.done = anyio.Event()
        #: soak mode: (seconds since the first batch, RSS KiB) every 5 s.
        self.rss_samples: list[tuple[float, int]] = []
        self.first_batch: float | None = None


def make_handler(state: _State) -> Any:
    """The benchmark handler (the same decisions as the aio-pika-batch driver)."""

    async def handle(messages: Sequence[Message]) -> Any:
        if state.sleep:
            await anyio.sleep(state.sleep)
        if state.mode == "soak":
            now = time.monotonic()
            if state.first_batch is None:
                state.first_batch = now
            if (
                not state.rss_samples
                or now - state.first_batch - state.rss_samples[-1][0] >= 5
            ):
                state.rss_samples.append((now - state.first_batch, rss_kib()))
        if state.mode == "latency":
            now = time.time()
            for message in messages:
                state.latencies.append(now - stamp_of(message.body))
        for message in messages:
            state.handled += 1
            if state.mode != "mixed":
                state.final += 1
                yield MessageResult.ACK
                continue
            kind = int(message.body[:10]) % 10
            if kind == 0:
                state.final += 1
                yield MessageResult.NACK
            elif kind == 1:
                if message.retry_count >= MAX_REQUEUE:
                    state.final += 1
                yield MessageResult.REQUEUE
            else:
                state.final += 1
                yield MessageResult.ACK
        if state.progress is not None:
            state.progress.publish(state.final)
        if state.final >= state.target:
            state.done.set()

    return handle


def make_outage_handler(state: _State) -> Any:
    """W7's handler: REQUEUE every message until ``state.outage_until`` (the
    dependency is down), ACK from then on."""

    async def handle(messages: Sequence[Message]) -> Any:
        failing = time.monotonic() < state.outage_until
        for message in messages:
            state.handled += 1
            if not failing:
                state.final += 1
                yield MessageResult.ACK
                continue
            state.failed += 1
            if message.retry_count >= state.max_requeue:
                state.final += 1  # dead-lettered by the library
                state.dead += 1
            yield MessageResult.REQUEUE
        if state.final >= state.target:
            state.done.set()

    return handle


def _settings(args: argparse.Namespace) -> BatchConsumerSettings:
    """The consumer's settings: the workload's topology (a quorum topology's
    dead-letter queue is the fill's), W7's retry delays and kill switch."""
    topology = TOPOLOGIES[args.queue]
    options: dict[str, Any] = {}
    if topology.quorum:
        options["queue_arguments"] = {"x-queue-type": "quorum"}
    if topology.dlx:
        options["dead_letter_exchange"] = topology.dlx
        if not topology.quorum:
            options["dead_letter_queue"] = topology.dlq
    if args.retry_delays:
        options["retry_delays"] = tuple(map(float, args.retry_delays.split(",")))
    if args.kill_switch:
        threshold, window, samples, cooldown = args.kill_switch.split(",")
        options |= {
            "kill_switch_threshold": float(threshold),
            "kill_switch_window": float(window),
            "kill_switch_min_samples": int(samples),
            "kill_switch_cooldown": float(cooldown),
        }
    return BatchConsumerSettings(**batch_options(args), **options)


def observability_hooks() -> list[Any]:
    """``--observe``: the library's metrics and tracing hooks, as a user turns
    them on. ``PrometheusHooks`` on a fresh registry (its broker sampler is not
    started: it runs on a connection of its own, off the consuming path) and
    ``TracingHooks`` on the OpenTelemetry API alone: with no SDK installed the
    global tracer provider is the no-op one, i.e. no exporter."""
    from prometheus_client import CollectorRegistry

    from amqp_batch.prometheus import PrometheusHooks
    from amqp_batch.tracing import TracingHooks

    return [PrometheusHooks(CollectorRegistry()), TracingHooks()]


async def consume_amqp_batch(args: argparse.Namespace) -> dict[str, Any]:
    """One measurement of amqp-batch (asyncio or trio, from ``args.backend``)."""
    progress = None
    if args.progress:
        path, slot, slots = args.progress.split(",")
        progress = Progress(path, int(slot), int(slots))
    # With several processes, none knows when its own share is done.
    state = _State(
        args.mode, math.inf if progress else args.count, args.sleep, progress
    )
    state.max_requeue = args.max_requeue
    settings = _settings(args)
    dlq = TOPOLOGIES[args.queue].dlq
    outage = args.mode == "outage"
    handler = make_outage_handler(state) if outage else make_handler(state)
    hooks = observability_hooks() if args.observe else []
    baseline = rss_kib()
    meter = Meter()
    chosen = None
    if args.transport == "aiormq":
        # Imported here: a --baseline commit may predate the aiormq transport.
        from amqp_batch import AiormqTransport

        chosen = AiormqTransport()
    async with connect(parse_url(args.url)) as probe, probe.channel() as channel:
        meter.start()
        # The outage is a fixed stretch from the consumer's start.
        state.outage_until = time.monotonic() + args.outage if outage else math.inf
        # Keywords only when used: a --baseline commit may predate them.
        extra: dict[str, Any] = {"hooks": hooks} if hooks else {}
        async with batch_consumer(settings, handler, transport=chosen, **extra):
            if args.mode in ("latency", "soak"):
                print(json.dumps({"ready": True}), flush=True)
            if progress is None:
                await state.done.wait()
            else:
                mark = await progress.wait(args.count)
        # Leaving the block drains: every result is applied, republishes confirmed.
        if args.mode in ("mixed", "outage"):
            expect = state.dead if outage else args.expect_dlq
            await wait_for_queues(channel, args.queue, dlq, expect)
        ended = time.monotonic()
        seconds = meter.stop()
    result: dict[str, Any] = {
        "seconds": seconds,
        "handled": state.handled,
        "latencies": state.latencies,
        "baseline_rss_kib": baseline,
        **meter.figures(),
    }
    if hooks:
        # Proof that the hooks ran: the acks the metrics counted.
        result["metrics_acks"] = hooks[0].registry.get_sample_value(
            "amqp_batch_messages_total", {"queue": args.queue, "result": "ack"}
        )
    if outage:
        result |= {
            "dead_lettered": state.dead,
            "failed_calls": state.failed,
            "drain_seconds": max(0.0, ended - state.outage_until),
        }
    if progress is not None:
        result["wall_mark"] = mark
    if args.mode == "soak" and state.rss_samples:
        # Growth after a one-minute warm-up.
        warm = next((kib for t, kib in state.rss_samples if t >= 60), None)
        warm = state.rss_samples[0][1] if warm is None else warm
        result["rss_samples"] = state.rss_samples
        result["soak_growth_kib"] = state.rss_samples[-1][1] - warm
    return result


async def wait_for_queues(
    channel: Any, queue: str, dlq: str | None, expect: int, patience: float = 30.0
) -> None:
    """Poll until ``queue`` is empty and ``dlq`` holds ``expect``; raise when the
    counts stay elsewhere for ``patience`` seconds (messages left behind by a
    consumer that stopped, instead of a measurement that never ends)."""
    last: list[int] = []
    since = time.monotonic()
    while True:
        counts = [
            (await channel.queue_declare(name, passive=True)).message_count
            for name in (queue, dlq)
            if name
        ]
        if counts == [0, expect][: len(counts)]:
            return
        if counts != last:
            last, since = counts, time.monotonic()
        elif time.monotonic() - since > patience:
            raise RuntimeError(
                f"{queue} and {dlq} hold {counts} message(s) for {patience:g} s after "
                f"the consumer stopped, expected [0, {expect}]"
            )
        await anyio.sleep(0.005)


async def consume_bare(args: argparse.Namespace) -> dict[str, Any]:
    """bench/transport.py's bare consumers: our transport's ceilings, raw aiormq."""
    baseline = rss_kib()
    meter = Meter()
    handled = args.count
    topology = TOPOLOGIES[args.queue]
    if args.consumer == "aiormq":
        seconds = await transport.consume_aiormq(args.url, args.count, meter)
    elif args.mode == "mixed":
        assert topology.dlx
        assert topology.dlq
        seconds, handled = await transport.consume_native_mixed(
            args.url,
            args.count,
            queue=args.queue,
            dead_letter_exchange=topology.dlx,
            dead_letter_queue=topology.dlq,
            expect_dead=args.expect_dlq,
            max_requeue=MAX_REQUEUE,
            clock=meter,
        )
    else:
        seconds = await transport.consume_native(
            args.url,
            args.count,
            meter,
            queue=args.queue,
            arguments=topology.arguments or None,
        )
    return {
        "seconds": seconds,
        "handled": handled,
        "baseline_rss_kib": baseline,
        **meter.figures(),
    }


def child(argv: list[str] | None = None) -> None:
    """Entry point of one measurement process."""
    parser = argparse.ArgumentParser(description="one amqp-batch bench measurement")
    parser.add_argument(
        "--consumer", choices=["amqp-batch", "ceiling", "aiormq"], required=True
    )
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument(
        "--transport",
        choices=["native", "aiormq"],
        default="native",
        help="the amqp-batch consumer's transport (aiormq: asyncio only)",
    )
    parser.add_argument("--url", required=True)
    parser.add_argument("--queue", default=DRAIN_QUEUE)
    parser.add_argument(
        "--mode",
        choices=["drain", "mixed", "io", "latency", "soak", "outage"],
        default="drain",
    )
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--batch-timeout", type=float, default=0.5)
    parser.add_argument("--prefetch", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--expect-dlq", type=int, default=0)
    parser.add_argument("--max-requeue", type=int, default=MAX_REQUEUE)
    parser.add_argument(
        "--outage", type=float, default=5.0, help="outage mode: seconds of failures"
    )
    parser.add_argument(
        "--retry-delays", default="", help="comma-separated seconds (retry_delays)"
    )
    parser.add_argument(
        "--kill-switch",
        default="",
        help="THRESHOLD,WINDOW,MIN_SAMPLES,COOLDOWN (the kill switch on)",
    )
    parser.add_argument(
        "--observe",
        action="store_true",
        help="amqp-batch: with PrometheusHooks and TracingHooks (no exporter)",
    )
    parser.add_argument(
        "--profile", default=None, help="write a pyinstrument/cProfile file"
    )
    parser.add_argument(
        "--progress",
        default=None,
        help="PATH,SLOT,SLOTS: one of several processes sharing --count; waits "
        "for a line on stdin after printing a ready line",
    )
    args = parser.parse_args(argv)
    if args.transport == "aiormq" and args.backend != "asyncio":
        parser.error("--transport aiormq runs on asyncio only")
    if args.transport == "aiormq" and args.consumer != "amqp-batch":
        parser.error("--transport applies to --consumer amqp-batch")
    if args.progress:
        print(json.dumps({"ready": True}), flush=True)
        sys.stdin.readline()
    function = consume_amqp_batch if args.consumer == "amqp-batch" else consume_bare
    if args.profile:
        result = _profiled(function, args)
    else:
        result = anyio.run(function, args, backend=args.backend)
    result["peak_rss_kib"] = rss_kib("VmHWM")
    result["python"] = sys.version.split()[0]
    # Which amqp_batch ran (a --baseline row imports another commit's).
    result["amqp_batch"] = str(Path(amqp_batch.__file__).resolve().parent)
    print(json.dumps(result), flush=True)


def _profiled(function: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Run under cProfile (``.prof``) or pyinstrument (``.html``/``.txt``)."""
    path = Path(args.profile)
    if path.suffix == ".prof":
        import cProfile

        # CPU time, not wall time: a consumer's waits in epoll are not its cost.
        profiler = cProfile.Profile(time.process_time)
        result = profiler.runcall(anyio.run, function, args, backend=args.backend)
        profiler.dump_stats(path)
        return result
    from pyinstrument import Profiler

    profiler = Profiler(interval=0.0005, async_mode="disabled")
    with profiler:
        result = anyio.run(function, args, backend=args.backend)
    if path.suffix == ".html":
        path.write_text(profiler.output_html())
    else:
        path.write_text(profiler.output_text(unicode=True, show_all=False))
    return result


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    child()
