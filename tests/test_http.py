"""The probe and metrics server: /metrics, /healthz, /readyz; bad, huge and slow
requests are answered or dropped without touching the rest."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import anyio
import pytest
from prometheus_client import CollectorRegistry, Counter

from amqp_batch import WorkerHealth, WorkerState
from amqp_batch._http import MAX_REQUEST_BYTES, HTTPServerError, serve_http


class FakeConsumer:
    def __init__(self, *states: WorkerState) -> None:
        self.states = list(states)

    def health(self) -> Sequence[WorkerHealth]:
        return [
            WorkerHealth(
                index=index,
                state=state,
                reconnect_count=0 if state is WorkerState.CONSUMING else 3,
                last_error=None
                if state is WorkerState.CONSUMING
                else "ConnectionLost: connection reset by peer",
                results={},
                url="amqp://app:***@rabbit:5672/",
            )
            for index, state in enumerate(self.states)
        ]


@asynccontextmanager
async def server(
    consumer: FakeConsumer, registry: CollectorRegistry | None = None, **options: float
) -> AsyncIterator[int]:
    async with anyio.create_task_group() as group:
        port = await group.start(
            lambda task_status: serve_http(
                consumer,
                "127.0.0.1",
                0,
                registry or CollectorRegistry(),
                task_status=task_status,
                **options,  # type: ignore[arg-type]
            )
        )
        yield port
        group.cancel_scope.cancel()


async def exchange(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``raw``, read the whole response (the server closes)."""
    with anyio.fail_after(10):
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            await stream.send(raw)
            data = b""
            while True:
                try:
                    data += await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    break
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


def get(path: str, method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()


async def test_metrics_are_the_registry_in_text_exposition() -> None:
    registry = CollectorRegistry()
    Counter("demo_things", "Things.", registry=registry).inc(7)
    async with server(FakeConsumer(WorkerState.CONSUMING), registry) as port:
        status, headers, body = await exchange(port, get("/metrics"))
        head_status, head_headers, head_body = await exchange(
            port, get("/metrics", "HEAD")
        )
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=")
    assert b"demo_things_total 7.0" in body
    assert head_status == 200
    assert head_body == b""
    assert int(head_headers["content-length"]) == len(body)


async def test_liveness_answers_while_the_loop_runs() -> None:
    async with server(FakeConsumer()) as port:
        status, headers, body = await exchange(port, get("/healthz"))
    assert status == 200
    assert headers["content-type"] == "application/json"
    assert json.loads(body)["alive"] is True


async def test_liveness_fails_once_the_watchdog_is_late() -> None:
    async with server(
        FakeConsumer(), liveness_timeout=0.2, watchdog_interval=0.05
    ) as port:
        time.sleep(0.5)  # noqa: ASYNC251 - the event loop is wedged on purpose
        status, _, body = await exchange(port, get("/healthz"))
    assert status == 503
    answer = json.loads(body)
    assert answer["alive"] is False
    assert answer["event_loop_lag_seconds"] >= 0.2


async def test_ready_when_every_worker_consumes() -> None:
    consumer = FakeConsumer(WorkerState.CONSUMING, WorkerState.CONSUMING)
    async with server(consumer) as port:
        status, _, body = await exchange(port, get("/readyz"))
    assert status == 200
    assert json.loads(body) == {"ready": True, "workers": 2, "not_consuming": []}


async def test_not_ready_names_each_worker_and_why() -> None:
    consumer = FakeConsumer(WorkerState.CONSUMING, WorkerState.BACKING_OFF)
    async with server(consumer) as port:
        status, _, body = await exchange(port, get("/readyz?verbose=1"))
        consumer.states[1] = WorkerState.CONSUMING
        status_after, _, _ = await exchange(port, get("/readyz"))
    assert status == 503
    answer = json.loads(body)
    assert answer["ready"] is False
    assert answer["not_consuming"] == [
        {
            "worker": 1,
            "state": "backing_off",
            "last_error": "ConnectionLost: connection reset by peer",
            "reconnect_count": 3,
        }
    ]
    assert b"***" not in body and b"rabbit" not in body  # no URL at all
    assert status_after == 200


async def test_not_ready_before_any_worker_exists() -> None:
    async with server(FakeConsumer()) as port:
        status, _, _ = await exchange(port, get("/readyz"))
    assert status == 503


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS"])
async def test_only_get_and_head(method: str) -> None:
    async with server(FakeConsumer(WorkerState.CONSUMING)) as port:
        request = f"{method} /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
        status, headers, _ = await exchange(port, (request + "\r\n").encode())
    assert status == 405
    assert headers["allow"] == "GET, HEAD"


async def test_unknown_path() -> None:
    async with server(FakeConsumer()) as port:
        status, _, _ = await exchange(port, get("/admin"))
    assert status == 404


async def test_request_line_too_long() -> None:
    async with server(FakeConsumer()) as port:
        status, _, _ = await exchange(port, get("/" + "a" * (MAX_REQUEST_BYTES + 10)))
    assert status == 414


async def test_headers_too_long() -> None:
    headers = "".join(f"X-Pad-{n}: {'b' * 100}\r\n" for n in range(100))
    async with server(FakeConsumer()) as port:
        status, _, _ = await exchange(
            port, f"GET /metrics HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode()
        )
    assert status == 431


@pytest.mark.parametrize(
    "raw", [b"HELLO\r\n\r\n", b"GET /metrics HTTP/1.1\r\n\r\n", b"\x00\xff\r\n\r\n"]
)
async def test_malformed_requests(raw: bytes) -> None:
    async with server(FakeConsumer()) as port:
        status, _, _ = await exchange(port, raw)
    assert status == 400


async def test_a_slow_client_is_dropped_and_others_are_served() -> None:
    consumer = FakeConsumer(WorkerState.CONSUMING)
    async with (
        server(consumer, read_timeout=0.3) as port,
        await anyio.connect_tcp("127.0.0.1", port) as slow,
    ):
        await slow.send(b"GET /metr")  # ... and never the rest
        status, _, _ = await exchange(port, get("/readyz"))
        assert status == 200
        with (
            anyio.fail_after(10),
            pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)),
        ):
            await slow.receive()


async def test_connections_beyond_the_limit_are_refused() -> None:
    async with server(FakeConsumer(), max_connections=2, read_timeout=30) as port:
        idle = [await anyio.connect_tcp("127.0.0.1", port) for _ in range(2)]
        try:
            # Both idle connections are being served (each waits for its request)
            # once the server answers a third with 503 before reading it.
            for _ in range(100):
                status, _, body = await exchange(port, get("/healthz"))
                if status == 503:
                    break
            assert status == 503
            assert body == b"too many connections\n"
        finally:
            for stream in idle:
                await stream.aclose()
        # Once the server has seen the two close, it serves again (each try is
        # a full request: the server answers 503 until it has).
        statuses = [(await exchange(port, get("/healthz")))[0] for _ in range(3)]
        for _ in range(100):
            if statuses[-1] == 200:
                break
            statuses.append((await exchange(port, get("/healthz")))[0])
        assert statuses[-1] == 200


async def test_a_taken_port_is_a_clear_error_at_start() -> None:
    async with server(FakeConsumer()) as port:
        with pytest.raises(HTTPServerError, match=f"cannot listen on 127.0.0.1:{port}"):
            await serve_http(FakeConsumer(), "127.0.0.1", port, CollectorRegistry())
