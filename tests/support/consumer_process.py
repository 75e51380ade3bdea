"""A consumer in a process of its own, for the process-level rows (F6, F7, L1).

Run it as ``python -m tests.support.consumer_process URL QUEUE [options]`` (or as a
script). It consumes ``QUEUE`` with :meth:`BatchConsumer.run` (so SIGINT/SIGTERM
take the real graceful path) and prints one line per event on stdout, flushed at
once, so whatever it printed is there even after a SIGKILL::

    ready                                   every worker consumes (first time)
    state <worker> <previous> <new>         a worker changed state
    took <id> <redelivered 0|1>             the receiver took a delivery (--trace-took)
    batch <n> <id> <id> ...                 batch n entered the handler
    decided <n> <id>:<retry>:<redelivered>:<RESULT> ...
                                            the handler's results for batch n, printed
                                            before they go to the acker
    rss <kib>                               resident set size (--rss-every seconds)
    log <LEVEL> <logger> <message>          a library log record (INFO and up)
    exited                                  anyio.run returned

``--transport aiormq`` consumes through :class:`~amqp_batch.AiormqTransport`
(asyncio only); the default is the native transport.

Handler modes (``--mode``):

- ``ack``: ACK every message;
- ``hold-until-stop``: each batch waits until a worker enters ``stopping`` (a
  graceful stop began), then ACKs; a batch holding ``--hang-id`` never finishes
  (the shutdown timeout must cancel it);
- ``block-after``: ACK the first ``--block-after`` messages; every later batch
  blocks forever (its messages stay unacked until the process dies).

The test side is :class:`ConsumerProcess`: start it, wait for lines, signal or
kill it, and :meth:`ConsumerProcess.replay` its decisions into a
:class:`~tests.support.invariant.Recorder` for the total-queue check.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
from tests.support.transports import make_transport

from amqp_batch import (
    BatchConsumer,
    BatchConsumerSettings,
    Message,
    MessageResult,
    WorkerHealth,
    WorkerState,
)
from amqp_batch._transport._base import Delivery, Properties

if TYPE_CHECKING:
    from tests.support.invariant import Recorder

__all__ = ["ConsumerProcess", "main"]

ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------- the process


def _emit(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


class _LineHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage().replace("\n", " | ")
        _emit(f"log {record.levelname} {record.name} {message}")


class _TracedDeliveries(anyio.abc.ObjectReceiveStream[Delivery]):
    """The session's deliveries, printing ``took`` as the receiver takes each."""

    def __init__(self, inner: anyio.abc.ObjectReceiveStream[Delivery]) -> None:
        self._inner = inner

    async def receive(self) -> Delivery:
        return self._took(await self._inner.receive())

    def receive_nowait(self) -> Delivery:
        return self._took(self._inner.receive_nowait())

    @staticmethod
    def _took(delivery: Delivery) -> Delivery:
        _emit(f"took {delivery.properties.message_id} {int(delivery.redelivered)}")
        return delivery

    async def aclose(self) -> None:
        await self._inner.aclose()


class _TracedSession:
    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.deliveries = _TracedDeliveries(inner.deliveries)

    @property
    def consumer_cancelled_by_broker(self) -> bool:
        return bool(self._inner.consumer_cancelled_by_broker)

    async def ack(self, delivery_tag: int, *, multiple: bool = False) -> None:
        await self._inner.ack(delivery_tag, multiple=multiple)

    async def nack(
        self, delivery_tag: int, *, multiple: bool = False, requeue: bool = True
    ) -> None:
        await self._inner.nack(delivery_tag, multiple=multiple, requeue=requeue)

    async def reject(self, delivery_tag: int, *, requeue: bool = True) -> None:
        await self._inner.reject(delivery_tag, requeue=requeue)

    async def cancel(self) -> None:
        await self._inner.cancel()


class _TracingTransport:
    """A transport (``inner``), with every session's deliveries traced."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def open_session(self, spec: Any) -> AbstractAsyncContextManager[Any]:
        inner = self._inner

        @asynccontextmanager
        async def traced() -> AsyncIterator[Any]:
            async with inner.open_session(spec) as session:
                yield _TracedSession(session)

        return traced()

    def open_publisher(self, parameters: Any, *, declare: Any = ()) -> Any:
        return self._inner.open_publisher(parameters, declare=declare)


def _rss_kib() -> int:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") // 1024


class HarnessConsumer(BatchConsumer[BatchConsumerSettings]):
    """The consumer the process runs; see the module docstring for the modes."""

    def __init__(
        self, settings: BatchConsumerSettings, options: argparse.Namespace
    ) -> None:
        transport = make_transport(options.transport)
        if options.trace_took:
            transport = _TracingTransport(transport)
        super().__init__(settings, transport=transport)
        self.options = options
        self.batches = 0
        self.decided = 0
        self.stopping = anyio.Event()
        self._ready = False

    def on_worker_state_change(
        self, health: WorkerHealth, previous: WorkerState
    ) -> None:
        _emit(f"state {health.index} {previous.value} {health.state.value}")
        if health.state is WorkerState.STOPPING:
            self.stopping.set()
        if not self._ready and self.is_healthy:
            self._ready = True
            _emit("ready")

    async def process_messages(
        self, messages: Sequence[Message]
    ) -> AsyncIterator[MessageResult]:
        self.batches += 1
        number = self.batches
        ids = [m.message_id or m.body.decode("utf-8", "replace") for m in messages]
        _emit(f"batch {number} {' '.join(ids)}")
        mode = self.options.mode
        if mode == "hold-until-stop":
            await self.stopping.wait()
            if self.options.hang_id in ids:
                await anyio.sleep_forever()
        elif mode == "block-after" and self.decided >= self.options.block_after:
            await anyio.sleep_forever()
        self.decided += len(messages)
        results = [MessageResult.ACK] * len(messages)
        decided = " ".join(
            f"{i}:{m.retry_count}:{int(m.redelivered)}:{r.name}"
            for i, m, r in zip(ids, messages, results, strict=True)
        )
        _emit(f"decided {number} {decided}")
        for result in results:
            yield result

    async def report_rss(self) -> None:
        while True:
            _emit(f"rss {_rss_kib()}")
            await anyio.sleep(self.options.rss_every)

    async def run_all(self) -> None:
        async with anyio.create_task_group() as group:
            if self.options.rss_every:
                group.start_soon(self.report_rss)
            await self.run()
            group.cancel_scope.cancel()


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.support.consumer_process")
    parser.add_argument("url")
    parser.add_argument("queue")
    parser.add_argument("--backend", default="asyncio", choices=["asyncio", "trio"])
    parser.add_argument("--transport", default="native", choices=["native", "aiormq"])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--prefetch", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=5)
    parser.add_argument("--batch-timeout", type=float, default=0.2)
    parser.add_argument("--max-concurrent", type=int, default=1)
    parser.add_argument("--shutdown-timeout", type=float, default=5.0)
    parser.add_argument("--connection-name", default=None)
    parser.add_argument(
        "--mode", default="ack", choices=["ack", "hold-until-stop", "block-after"]
    )
    parser.add_argument("--block-after", type=int, default=0)
    parser.add_argument("--hang-id", default=None)
    parser.add_argument("--trace-took", action="store_true")
    parser.add_argument("--rss-every", type=float, default=0.0)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Consume until a signal stops the process (see the module docstring)."""
    options = _parse(argv)
    handler = _LineHandler()
    library = logging.getLogger("amqp_batch")
    library.addHandler(handler)
    library.setLevel(logging.INFO)
    settings = BatchConsumerSettings(
        url=options.url,
        queue_name=options.queue,
        num_workers=options.workers,
        prefetch_count=options.prefetch,
        batch_size=options.batch_size,
        batch_timeout=options.batch_timeout,
        max_concurrent_batches=options.max_concurrent,
        shutdown_timeout=options.shutdown_timeout,
        connection_name=options.connection_name,
        reconnect_backoff_base=0.05,
        reconnect_backoff_cap=0.5,
    )
    consumer = HarnessConsumer(settings, options)
    anyio.run(consumer.run_all, backend=options.backend)
    _emit("exited")
    return 0


# --------------------------------------------------------------------- the test side


def _decisions(line: str) -> list[tuple[str, int, bool, MessageResult]]:
    found = []
    for item in line.split()[2:]:
        message_id, retry, redelivered, result = item.rsplit(":", 3)
        found.append(
            (message_id, int(retry), redelivered == "1", MessageResult[result])
        )
    return found


class ConsumerProcess:
    """Runs the harness in a child process and collects its lines.

    ``async with ConsumerProcess(url, queue, backend="trio", workers=2) as proc:``
    starts it and waits for ``ready``; leaving the block kills it if it still runs.
    Keyword options are the command line's (``max_concurrent=2`` becomes
    ``--max-concurrent 2``; ``True`` is a flag).
    """

    def __init__(
        self, url: str, queue: str, *, ready_timeout: float = 30.0, **options: Any
    ) -> None:
        self.command = [sys.executable, "-m", "tests.support.consumer_process"]
        self.command += [url, queue]
        for key, value in options.items():
            flag = "--" + key.replace("_", "-")
            if value is True:
                self.command.append(flag)
            elif value is not None and value is not False:
                self.command += [flag, str(value)]
        self.ready_timeout = ready_timeout
        self.lines: list[str] = []
        #: Messages decided so far (kept up to date as lines arrive).
        self.decided_total = 0
        self.returncode: int | None = None
        self._changed = anyio.Event()
        self._process: anyio.abc.Process | None = None
        self._group: anyio.abc.TaskGroup | None = None

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    async def __aenter__(self) -> ConsumerProcess:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), *sys.path]))
        self._process = await anyio.open_process(
            self.command, env=env, cwd=ROOT, stderr=subprocess.STDOUT
        )
        self._group = anyio.create_task_group()
        await self._group.__aenter__()
        self._group.start_soon(self._read)
        try:
            await self.wait_line(lambda line: line == "ready", self.ready_timeout)
        except BaseException:
            await self.__aexit__(*sys.exc_info())
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._process is not None and self._group is not None
        with anyio.CancelScope(shield=True):
            if self._process.returncode is None:
                self._process.kill()
            await self._process.wait()
            self.returncode = self._process.returncode
        self._group.cancel_scope.cancel()
        await self._group.__aexit__(None, None, None)
        with anyio.CancelScope(shield=True):
            await self._process.aclose()

    async def _read(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        buffer = b""
        async for chunk in self._process.stdout:
            buffer += chunk
            *complete, buffer = buffer.split(b"\n")
            if complete:
                for raw in complete:
                    line = raw.decode()
                    self.lines.append(line)
                    if line.startswith("decided "):
                        self.decided_total += line.count(" ") - 1
                self._notify()
        await self._process.wait()
        self.returncode = self._process.returncode
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def wait_until(
        self, predicate: Callable[[], bool], timeout: float, what: str = ""
    ) -> None:
        """Wait until ``predicate()`` holds, re-checked after every new line."""
        try:
            with anyio.fail_after(timeout):
                while not predicate():
                    if self.returncode is not None:
                        raise AssertionError(f"the consumer exited: {self.tail()}")
                    await self._changed.wait()
        except TimeoutError:
            raise AssertionError(f"timed out waiting {what}: {self.tail()}") from None

    async def wait_line(self, predicate: Callable[[str], bool], timeout: float) -> str:
        """Wait for (and return) the first line ``predicate`` accepts."""
        found: list[str] = []

        def seen() -> bool:
            found[:] = [line for line in self.lines if predicate(line)][:1]
            return bool(found)

        await self.wait_until(seen, timeout, "for a line")
        return found[0]

    async def wait_exit(self, timeout: float) -> int:
        """Wait until the process exits; return its exit code."""
        with anyio.fail_after(timeout):
            while self.returncode is None:
                await self._changed.wait()
        return self.returncode

    def send_signal(self, signum: signal.Signals) -> None:
        assert self._process is not None
        self._process.send_signal(signum)

    def kill(self) -> None:
        """SIGKILL the process."""
        assert self._process is not None
        self._process.kill()

    def tail(self, count: int = 15) -> str:
        return "\n".join(self.lines[-count:])

    # -- what it printed ------------------------------------------------------------

    def batches(self) -> list[list[str]]:
        """The ids of every batch that entered the handler, in order."""
        return [line.split()[2:] for line in self.lines if line.startswith("batch ")]

    def decided_ids(self) -> list[str]:
        return [
            message_id
            for line in self.lines
            if line.startswith("decided ")
            for message_id, *_ in _decisions(line)
        ]

    def rss_kib(self) -> list[int]:
        return [int(line.split()[1]) for line in self.lines if line.startswith("rss ")]

    def replay(self, recorder: Recorder) -> None:
        """Feed every decision the process printed into ``recorder``."""
        pending: list[MessageResult] = []
        decide = recorder.decide
        recorder.decide = lambda message: pending.pop()
        try:
            for line in self.lines:
                if not line.startswith("decided "):
                    continue
                for message_id, retry, redelivered, result in _decisions(line):
                    pending.append(result)
                    recorder.record(_message(message_id, retry, redelivered))
        finally:
            recorder.decide = decide


def _message(message_id: str, retry: int, redelivered: bool) -> Message:
    delivery = Delivery(
        delivery_tag=0,
        redelivered=redelivered,
        exchange="",
        routing_key="",
        consumer_tag="",
        body=message_id.encode(),
        properties=Properties(message_id=message_id),
    )
    return Message(delivery, retry_count=retry)


if __name__ == "__main__":
    sys.exit(main())
