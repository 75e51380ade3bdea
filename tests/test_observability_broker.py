"""Monitoring against a real RabbitMQ (a private node), on asyncio and trio:
scraped metrics equal a scripted run exactly, probes follow a connection cut,
spans link to their producers, JSON logs parse, a real Prometheus scrapes.

The scripted run: 100 ACK, 10 NACK, 10 REQUEUE-then-ACK, one connection cut
half way (through a fault proxy that holds the reconnect until /readyz was seen
at 503). The invariant (tests/support/invariant.py) holds after it.
"""

from __future__ import annotations

import collections
import functools
import json
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from opentelemetry import trace as otel_trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from tests.support.fault_proxy import FaultProxy
from tests.support.invariant import Recorder, check
from tests.support.prometheus_server import PrometheusServer, find_prometheus
from tests.support.rabbit_node import PrivateNode

from amqp_batch import (
    BatchConsumerSettings,
    ConsumerHooks,
    Message,
    MessageResult,
    Settlement,
    WorkerHealth,
    WorkerState,
    batch_consumer,
)
from amqp_batch._cli import main
from amqp_batch._publisher import default_transport
from amqp_batch._transport._base import Properties
from amqp_batch._transport._url import parse_url
from amqp_batch.prometheus import PrometheusHooks, serve_http
from amqp_batch.tracing import TracingHooks
from consumer_support import admin_channel, cleanup

pytestmark = [pytest.mark.anyio, pytest.mark.private_node]


# --------------------------------------------------------------------- helpers


def decide(message: Message) -> MessageResult:
    """ack-N: ACK; nack-N: NACK; retry-N: REQUEUE once, then ACK."""
    kind = (message.message_id or "").split("-", 1)[0]
    if kind == "nack":
        return MessageResult.NACK
    if kind == "retry" and message.retry_count == 0:
        return MessageResult.REQUEUE
    return MessageResult.ACK


def script(part: int) -> list[str]:
    """Half of the run: 50 ACK, 5 NACK, 5 REQUEUE-then-ACK ids, interleaved."""
    ids = []
    for n in range(part * 50, part * 50 + 50):
        ids.append(f"ack-{n}")
        if n % 10 == 0:
            ids += [f"nack-{n}", f"retry-{n}"]
    return ids


class Progress(ConsumerHooks):
    """Waits on what the consumer reports, instead of sleeping."""

    def __init__(self) -> None:
        self.results: collections.Counter[str] = collections.Counter()
        self.states: list[tuple[int, WorkerState]] = []
        self._changed = anyio.Event()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    def settled(
        self, worker: int, queue: str, settlements: Sequence[Settlement]
    ) -> None:
        for settlement in settlements:
            result = settlement.result
            self.results[result.value if result else "dead_letter"] += 1
        self._notify()

    def worker_state_changed(self, health: WorkerHealth, previous: WorkerState) -> None:
        self.states.append((health.index, health.state))
        self._notify()

    @property
    def last_state(self) -> WorkerState | None:
        return self.states[-1][1] if self.states else None

    async def wait(self, condition: Callable[[], bool], timeout: float = 30) -> None:
        try:
            with anyio.fail_after(timeout):
                while not condition():
                    await self._changed.wait()
        except TimeoutError:
            raise AssertionError(f"timed out: {self.results} {self.states}") from None


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a /metrics answer, by name and labels."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def sample(
    scraped: dict[tuple[str, frozenset[tuple[str, str]]], float],
    name: str,
    **labels: str,
) -> float | None:
    return scraped.get((name, frozenset(labels.items())))


def _settings(url: str, queue: str, **overrides: Any) -> BatchConsumerSettings:
    values: dict[str, Any] = {
        "url": url,
        "queue_name": queue,
        "dead_letter_exchange": f"{queue}.dlx",
        "dead_letter_queue": f"{queue}.dlq",
        "prefetch_count": 20,
        "batch_size": 10,
        "batch_timeout": 0.05,
        "connection_name": queue,
        "reconnect_backoff_base": 0.05,
        "reconnect_backoff_cap": 0.2,
        "shutdown_timeout": 10.0,
    }
    values.update(overrides)
    return BatchConsumerSettings(**values)


async def publish(url: str, queue: str, ids: Sequence[str], **headers: Any) -> None:
    async with admin_channel(url) as channel:
        for message_id in ids:
            await channel.publish(
                message_id.encode(),
                routing_key=queue,
                properties=Properties(
                    message_id=message_id,
                    delivery_mode=2,
                    headers={name: value(message_id) for name, value in headers.items()}
                    or None,
                ),
            )


@asynccontextmanager
async def http_server(consumer: Any, registry: CollectorRegistry) -> AsyncIterator[str]:
    async with anyio.create_task_group() as group:
        port = await group.start(serve_http, consumer, "127.0.0.1", 0, registry)
        yield f"http://127.0.0.1:{port}"
        group.cancel_scope.cancel()


@pytest.fixture
async def queue(private_node: PrivateNode, unique_name: str) -> AsyncIterator[str]:
    yield unique_name
    await cleanup(
        private_node.url,
        queues=[unique_name, f"{unique_name}.dlq"],
        exchanges=[f"{unique_name}.dlx"],
    )


# --------------------------------------------------------------------- the scripted run


async def test_scraped_metrics_equal_the_scripted_run(
    private_node: PrivateNode, queue: str
) -> None:
    registry = CollectorRegistry()
    progress = Progress()
    recorder = Recorder(decide, max_requeue=3)
    first, second = script(0), script(1)
    async with FaultProxy("127.0.0.1", private_node.amqp_port) as proxy:
        settings = _settings(proxy.url_for(), queue)
        metrics = PrometheusHooks(registry)
        async with (
            batch_consumer(
                settings, recorder.handler, hooks=[metrics, progress]
            ) as consumer,
            http_server(consumer, registry) as base,
            httpx.AsyncClient(base_url=base) as client,
        ):
            assert (await client.get("/readyz")).status_code == 200
            await publish(private_node.url, queue, first)
            await progress.wait(lambda: progress.results.total() == 65)
            # Nothing unsettled in flight when the cut comes, so nothing is
            # redelivered: the counts stay exact.
            await _wait_broker_settled(private_node, queue)

            proxy.stall()  # the reconnect will hang in its handshake
            proxy.cut()
            await progress.wait(lambda: progress.last_state is WorkerState.CONNECTING)
            during = await client.get("/readyz")
            proxy.resume()
            await progress.wait(lambda: progress.last_state is WorkerState.CONSUMING)
            after = await client.get("/readyz")

            await publish(private_node.url, queue, second)
            await progress.wait(lambda: progress.results.total() == 130)
            scraped = samples((await client.get("/metrics")).text)

    assert during.status_code == 503
    (not_consuming,) = during.json()["not_consuming"]
    assert not_consuming["worker"] == 0
    assert not_consuming["state"] == "connecting"
    assert not_consuming["last_error"].startswith("ConnectionLost")
    assert after.status_code == 200

    total = "amqp_batch_messages_total"
    assert sample(scraped, total, queue=queue, result="ack") == 110
    assert sample(scraped, total, queue=queue, result="nack") == 10
    assert sample(scraped, total, queue=queue, result="requeue") == 10
    assert sample(scraped, "amqp_batch_reconnects_total", reason="ConnectionLost") == 1
    assert sum(value for (name, _), value in scraped.items() if name == total) == 130
    assert sample(scraped, "amqp_batch_unsettled_deliveries", queue=queue) == 0
    assert sample(scraped, "amqp_batch_batches_in_handler", queue=queue) == 0
    assert sample(scraped, "amqp_batch_workers", state="consuming") == 1
    copies = sample(scraped, "amqp_batch_copy_confirm_seconds_count", queue=queue)
    # The 10 REQUEUE copies and the 10 NACKs, which the library publishes to
    # the dead-letter exchange itself (dead_letter_strategy "publish").
    assert copies == 20
    assert sample(scraped, "amqp_batch_hook_errors_total") is None

    report = await check(
        private_node.url, queue, f"{queue}.dlq", recorder, first + second
    )
    report.assert_holds()
    assert len(report.dead_lettered) == 10
    assert len(report.acked) == 110


async def _wait_broker_settled(node: PrivateNode, queue: str) -> None:
    """Until the broker holds nothing unacknowledged for ``queue`` (bounded; the
    acks are already on the wire)."""
    with anyio.fail_after(30):
        # The broker's own counts, read by rabbitmqctl: polled, bounded.
        while await anyio.to_thread.run_sync(node.queue_counts, queue) != (0, 0):  # noqa: ASYNC110
            await anyio.sleep(0.1)


async def test_the_broker_sampler_reads_the_queues(
    private_node: PrivateNode, queue: str
) -> None:
    registry = CollectorRegistry()
    metrics = PrometheusHooks(registry)

    async def handle(messages: Sequence[Message]) -> list[MessageResult]:
        return [MessageResult.NACK] * len(messages)

    settings = _settings(private_node.url, queue)
    progress = Progress()
    async with batch_consumer(settings, handle, hooks=[metrics, progress]) as consumer:
        await publish(private_node.url, queue, [f"n-{n}" for n in range(7)])
        await progress.wait(lambda: progress.results["nack"] == 7)
        await _wait_broker_settled(private_node, queue)
        async with anyio.create_task_group() as group:
            await group.start(metrics.sample_consumer, consumer)
            # A missing queue closes the sampler's channel; the others are read
            # on a new connection.
            await group.start(
                functools.partial(
                    metrics.sample_broker,
                    default_transport(),
                    parse_url(private_node.url),
                    [f"{queue}.missing", queue],
                    interval=3600,
                )
            )
            group.cancel_scope.cancel()
    value = registry.get_sample_value
    assert value("amqp_batch_queue_messages", {"queue": f"{queue}.missing"}) is None
    assert value("amqp_batch_queue_messages", {"queue": queue}) == 0
    assert value("amqp_batch_queue_consumers", {"queue": queue}) == 1
    dlq = {"queue": f"{queue}.dlq"}
    assert value("amqp_batch_dead_letter_queue_messages", dlq) == 7


# --------------------------------------------------------------------- tracing


async def test_each_batch_span_links_to_its_producers(
    private_node: PrivateNode, queue: str
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    progress = Progress()
    ids = [f"ack-{n}" for n in range(25)]
    trace_ids = {message_id: os.urandom(16).hex() for message_id in ids}
    trace_ids["ack-3"] = "not a trace"  # garbage from a producer: no link

    def traceparent(message_id: str) -> str:
        return f"00-{trace_ids[message_id]}-00f067aa0ba902b7-01"

    #: The batch span current in the handler -> the ids of its messages.
    handled: dict[int, list[str]] = {}

    async def handle(messages: Sequence[Message]) -> list[MessageResult]:
        # The batch span is current in the handler.
        current = otel_trace.get_current_span().get_span_context().span_id
        handled[current] = [m.message_id or "" for m in messages]
        with provider.get_tracer("app").start_as_current_span("write"):
            pass
        return [MessageResult.ACK] * len(messages)

    settings = _settings(private_node.url, queue, batch_size=10, prefetch_count=10)
    hooks = [TracingHooks(provider), progress]
    async with batch_consumer(settings, handle, hooks=hooks):
        await publish(private_node.url, queue, ids, traceparent=traceparent)
        await progress.wait(lambda: progress.results.total() == 25)
    spans = exporter.get_finished_spans()
    batches = [span for span in spans if span.name == f"{queue} process"]
    writes = [span for span in spans if span.name == "write"]
    assert sorted(handled) == sorted(span.context.span_id for span in batches)
    for span in batches:
        ids = handled[span.context.span_id]
        assert span.attributes["messaging.batch.message_count"] == len(ids)
        # One link per message, in order, to its own producer (none for garbage).
        linked = [format(link.context.trace_id, "032x") for link in span.links]
        assert linked == [trace_ids[i] for i in ids if i != "ack-3"]
    assert sum(len(ids) for ids in handled.values()) == 25
    assert len(writes) == len(batches)
    batch_span_ids = {span.context.span_id for span in batches}
    assert {span.parent.span_id for span in writes if span.parent} == batch_span_ids


# --------------------------------------------------------------------- the HTTP server


async def test_bad_requests_do_not_disturb_consuming(
    private_node: PrivateNode, queue: str
) -> None:
    registry = CollectorRegistry()
    progress = Progress()
    settings = _settings(private_node.url, queue)
    async with (
        batch_consumer(
            settings, Recorder().handler, hooks=[PrometheusHooks(registry), progress]
        ) as consumer,
        http_server(consumer, registry) as base,
    ):
        port = int(base.rsplit(":", 1)[1])
        slow = [await anyio.connect_tcp("127.0.0.1", port) for _ in range(5)]
        for stream in slow:
            await stream.send(b"GET /metr")  # and never the rest
        answers = []
        for raw in (
            b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc",
            b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(64),  # TLS
        ):
            async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                await stream.send(raw)
                answers.append(await _read_all(stream))
        await publish(private_node.url, queue, [str(n) for n in range(100)])
        await progress.wait(lambda: progress.results["ack"] == 100)
        async with httpx.AsyncClient(base_url=base) as client:
            ready = await client.get("/readyz")
        for stream in slow:
            await stream.aclose()
    assert [answer.split(b" ", 2)[1] for answer in answers] == [b"405", b"414", b"400"]
    assert ready.status_code == 200
    assert not [s for _, s in progress.states if s is WorkerState.BACKING_OFF]


async def _read_all(stream: Any) -> bytes:
    data = b""
    with anyio.fail_after(10):
        while True:
            try:
                data += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return data


# --------------------------------------------------------------------- the command


HANDLER = """\
from amqp_batch import MessageResult
import logging

log = logging.getLogger("app")

async def handle(messages):
    log.info("batch of %d", len(messages), extra={"size": len(messages)})
    for message in messages:
        nack = message.body.startswith(b"nack")
        yield MessageResult.NACK if nack else MessageResult.ACK
"""


def _command(tmp_path: Path, *args: str) -> list[str]:
    (tmp_path / "obs_handlers.py").write_text(HANDLER)
    return [sys.executable, "-m", "amqp_batch", "run", "obs_handlers:handle", *args]


def _environment(tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path]),
        "PYTHONUNBUFFERED": "1",
    }


async def test_command_serves_metrics_and_logs_json(
    private_node: PrivateNode, queue: str, tmp_path: Path, anyio_backend: str
) -> None:
    """``amqp-batch run --http-port --log-format json``: a scrape shows the
    counts; every stderr line is a JSON object; worker lines carry their fields."""
    port = _free_port()
    options = {
        "-q": queue,
        "--url": private_node.url,
        "--batch-size": "10",
        "--batch-timeout": "0.05",
        "--http-port": str(port),
        "--log-format": "json",
        "--backend": anyio_backend,
        "--summary-interval": "0",
    }
    command = _command(tmp_path, *[part for item in options.items() for part in item])
    async with await anyio.open_process(
        command, env=_environment(tmp_path), cwd=tmp_path
    ) as process:
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                await _wait_ready(client, process)
                await publish(private_node.url, queue, ["nack-1", *map(str, range(49))])
                scraped = await _wait_scraped(client, queue, 50)
        finally:
            process.terminate()
            with anyio.fail_after(30):
                await process.wait()
        assert process.stderr is not None
        stderr = (await _read_all(process.stderr)).decode()
    assert process.returncode == 0, stderr[-2000:]
    total = "amqp_batch_messages_total"
    assert sample(scraped, total, queue=queue, result="ack") == 49
    assert sample(scraped, total, queue=queue, result="nack") == 1
    entries = [json.loads(line) for line in stderr.splitlines() if line.strip()]
    assert all(entry["queue"] == queue for entry in entries), entries[:3]
    # Lines logged in the worker's tasks (the handler's, its state changes)
    # carry its number; the command's own start and stop lines only the queue.
    workers = [
        e
        for e in entries
        if e["logger"] in ("amqp_batch.worker", "app")
        or e["message"].startswith("worker 0:")
    ]
    assert len(workers) > 2 and all(entry["worker"] == 0 for entry in workers)
    batches = [e for e in entries if e["logger"] == "app"]
    assert sum(e["size"] for e in batches) == 50
    assert "guest:guest" not in stderr


async def _wait_ready(client: httpx.AsyncClient, process: Any) -> None:
    """Until /readyz answers 200 (the command's start-up: a subprocess, polled)."""
    with anyio.fail_after(60):
        while True:
            if process.returncode is not None:
                raise AssertionError(f"the command exited {process.returncode}")
            try:
                if (await client.get("/readyz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await anyio.sleep(0.1)


async def _wait_scraped(
    client: httpx.AsyncClient, queue: str, count: int
) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Scrape until ``count`` results were applied (another process: polled)."""
    with anyio.fail_after(60):
        while True:
            scraped = samples((await client.get("/metrics")).text)
            applied = sum(
                value
                for (name, labels), value in scraped.items()
                if name == "amqp_batch_messages_total" and ("queue", queue) in labels
            )
            if applied >= count:
                return scraped
            await anyio.sleep(0.1)


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def test_command_with_a_taken_port_fails_at_start(
    private_node: PrivateNode, unique_name: str, tmp_path: Path
) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        command = _command(
            tmp_path,
            "-q",
            unique_name,
            "--url",
            private_node.url,
            "--http-port",
            str(port),
        )
        result = subprocess.run(
            command,
            check=False,
            env=_environment(tmp_path),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 2, result.stderr
    (line,) = [line for line in result.stderr.splitlines() if "error" in line]
    assert re.search(rf"cannot listen on 127\.0\.0\.1:{port} .*in use", line), line


# --------------------------------------------------------------------- a real scrape


@pytest.mark.skipif(
    find_prometheus() is None,
    reason="Debian's prometheus is not installed (`nox -s tests` installs it where "
    "apt is available)",
)
async def test_prometheus_scrapes_the_consumer(
    private_node: PrivateNode, queue: str
) -> None:
    registry = CollectorRegistry()
    progress = Progress()
    settings = _settings(private_node.url, queue)
    async with (
        batch_consumer(
            settings, Recorder().handler, hooks=[PrometheusHooks(registry), progress]
        ) as consumer,
        http_server(consumer, registry) as base,
    ):
        await publish(private_node.url, queue, [str(n) for n in range(42)])
        await progress.wait(lambda: progress.results["ack"] == 42)
        target = base.removeprefix("http://")
        server = PrometheusServer([target], interval=0.5)
        await anyio.to_thread.run_sync(server.start)
        try:
            expression = f'amqp_batch_messages_total{{queue="{queue}",result="ack"}}'
            with anyio.fail_after(60):
                while True:  # Prometheus scrapes on its own schedule: polled
                    result = await anyio.to_thread.run_sync(server.query, expression)
                    if result:
                        break
                    await anyio.sleep(0.25)
            health = await anyio.to_thread.run_sync(server.targets_health)
        finally:
            await anyio.to_thread.run_sync(server.stop)
    ((_, value),) = [entry["value"] for entry in result]
    assert float(value) == 42
    assert health == ["up"]


def test_command_refuses_http_port_with_processes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(["run", "x:y", "-q", "q", "--http-port", "9464", "--processes", "2"])
    assert code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert "--http-port and --processes" in line


async def test_failing_hooks_never_change_what_is_settled(
    private_node: PrivateNode, queue: str
) -> None:
    """Every event raises in one hook: consuming, settling and the other hooks
    go on; each failure is counted."""

    class Broken(ConsumerHooks):
        def batch_started(self, batch: Any) -> None:
            raise RuntimeError("observer bug")

        def batch_handled(self, *args: Any) -> None:
            raise RuntimeError("observer bug")

        def settled(self, *args: Any) -> None:
            raise RuntimeError("observer bug")

        def copy_confirmed(self, *args: Any) -> None:
            raise RuntimeError("observer bug")

    recorder = Recorder(decide, max_requeue=3)
    progress = Progress()
    ids = [f"ack-{n}" for n in range(20)] + ["nack-1", "retry-1"]
    settings = _settings(private_node.url, queue)
    async with batch_consumer(
        settings, recorder.handler, hooks=[Broken(), progress]
    ) as consumer:
        await publish(private_node.url, queue, ids)
        await progress.wait(lambda: progress.results.total() == 23)
        await _wait_broker_settled(private_node, queue)
    assert progress.results == {"ack": 21, "nack": 1, "requeue": 1}
    assert consumer.hook_errors >= 3  # batches, settlements, one confirmed copy
    report = await check(private_node.url, queue, f"{queue}.dlq", recorder, ids)
    report.assert_holds()
