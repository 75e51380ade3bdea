"""The FastAPI, trio-nursery and configuration examples, against the broker."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import httpx
import pytest
from asgi_lifespan import LifespanManager
from tests.support.rabbit_node import PrivateNode

from amqp_batch import BatchConsumerSettings, Publisher
from consumer_support import (
    admin_channel,
    cleanup,
    drain,
    ids_of,
    publish_ids,
    take,
    unique_name,
)

pytestmark = pytest.mark.anyio

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` (the examples are not a package)."""
    spec = importlib.util.spec_from_file_location(
        f"example_{name}", EXAMPLES / f"{name}.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def run_example(
    name: str, environ: dict[str, str], args: Sequence[str] = ()
) -> tuple[int, list[str]]:
    """Run ``examples/<name>`` in a subprocess; its exit code and output lines."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), **environ)
    with anyio.fail_after(60):
        result = await anyio.run_process(
            [sys.executable, str(EXAMPLES / name), *args],
            env=env,
            check=False,
            stderr=subprocess.STDOUT,
        )
    return result.returncode, result.stdout.decode().splitlines()


async def wait(event: anyio.Event) -> None:
    with anyio.fail_after(20):
        await event.wait()


# -- examples/fastapi_app.py -------------------------------------------------------
# FastAPI and Starlette are anyio code, and so are httpx's ASGITransport and
# asgi-lifespan: the app runs (and is tested here) on asyncio and on trio. Only
# uvicorn, the server its docstring names, is asyncio-only.


async def test_fastapi_endpoints_answer_while_a_batch_is_in_progress(
    broker_url: str,
) -> None:
    fastapi_app = load_example("fastapi_app")
    queue, dlx, dlq = unique_name("api"), unique_name("dlx"), unique_name("dlq")
    saved: list[list[str]] = []
    entered, release, all_saved = anyio.Event(), anyio.Event(), anyio.Event()

    async def save(orders: Sequence[Any]) -> None:
        saved.append([order.id for order in orders])
        if len(saved) == 1:
            entered.set()
            await release.wait()  # the first batch stays in the handler
        if sum(map(len, saved)) == 5:
            all_saved.set()

    # Batches flush at 3 messages; the timeout is never reached.
    settings = BatchConsumerSettings(
        url=broker_url,
        queue_name=queue,
        batch_size=3,
        batch_timeout=30,
        prefetch_count=10,
        dead_letter_exchange=dlx,
        dead_letter_queue=dlq,
        connection_name=queue,
    )
    app = fastapi_app.create_app(settings, save=save)
    try:
        async with (
            LifespanManager(app) as manager,
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=manager.app),
                base_url="http://orders.test",
            ) as client,
        ):
            consumer = app.state.service["consumer"]
            async with admin_channel(broker_url) as channel:  # another producer
                await publish_ids(channel, ["not-json"], routing_key=queue)
            for n in range(2):
                response = await client.post(
                    "/orders", json={"id": f"o{n}", "item": "book"}
                )
                assert response.status_code == 202
                assert response.json() == {"queued": f"o{n}"}
            await wait(entered)

            # The first batch is blocked in the handler; the endpoints answer.
            response = await client.get("/health")
            assert response.status_code == 200
            assert response.json() == {
                "healthy": True,
                "workers": ["consuming"],
                "acked": 0,
                "batches": 0,
                "processed": 0,
                "invalid": 0,
                "in_progress": 3,
            }
            for n in range(2, 5):
                response = await client.post(
                    "/orders", json={"id": f"o{n}", "item": "pen", "quantity": 2}
                )
                assert response.status_code == 202
            response = await client.post("/orders", json={"item": "no id"})
            assert response.status_code == 422  # invalid: never published

            release.set()
            await wait(all_saved)
        # Leaving the lifespan drained the consumer: everything is settled.
        dead = await take(broker_url, dlq, 1)
        async with admin_channel(broker_url) as channel:
            left = await drain(channel, queue)
    finally:
        await cleanup(broker_url, queues=[queue, dlq], exchanges=[dlx])
    assert saved == [["o0", "o1"], ["o2", "o3", "o4"]]
    assert consumer.health()[0].results == {"ack": 5, "nack": 1, "dead_lettered": 1}
    assert ids_of(dead) == ["not-json"]
    assert left == []
    counts = app.state.counts
    assert (counts.batches, counts.processed, counts.invalid) == (2, 5, 1)
    assert not consumer.is_running


async def test_fastapi_publishes_across_a_cut_and_a_broker_restart(
    destructive_node: PrivateNode,
) -> None:
    """POST /orders keeps answering 202 after the publisher's connection is cut
    and after the broker application is restarted; every order is saved."""
    node = destructive_node
    fastapi_app = load_example("fastapi_app")
    queue = unique_name("api-faults")
    orders = ["o0", "o1", "o2"]
    saved: set[str] = set()
    changed = anyio.Event()

    async def save(batch: Sequence[Any]) -> None:
        nonlocal changed
        saved.update(order.id for order in batch)
        changed.set()
        changed = anyio.Event()

    async def saved_all(ids: Sequence[str]) -> None:
        with anyio.fail_after(30):
            while not set(ids) <= saved:
                await changed.wait()

    settings = BatchConsumerSettings(
        url=node.url,
        queue_name=queue,
        batch_size=10,
        batch_timeout=0.05,
        connection_name=queue,
        reconnect_backoff_base=0.05,
        reconnect_backoff_cap=0.5,
    )
    app = fastapi_app.create_app(settings, save=save)
    try:
        async with (
            LifespanManager(app) as manager,
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=manager.app),
                base_url="http://orders.test",
            ) as client,
        ):
            for number, order in enumerate(orders):
                if number == 1:
                    closed = await anyio.to_thread.run_sync(
                        node.close_connection, f"{queue}-publisher"
                    )
                    assert closed == 1
                elif number == 2:
                    await anyio.to_thread.run_sync(node.stop_app)
                    await anyio.to_thread.run_sync(node.start_app)
                response = await client.post(
                    "/orders", json={"id": order, "item": "book"}
                )
                assert response.status_code == 202
                await saved_all(orders[: number + 1])
            publisher = app.state.service["publisher"]
            assert publisher.connections_opened == 3
    finally:
        await cleanup(node.url, queues=[queue])
    assert saved == set(orders)


# -- examples/fan_in.py across faults ------------------------------------------------


async def test_fan_in_across_a_broker_restart_and_a_cut(
    destructive_node: PrivateNode, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    """The fan-in pipeline, run in-process with its Publisher wrapped: the broker
    application restarts as the first message is published (every consumer and
    the publisher reconnect), and the publisher's connection is cut before the
    fifth publish (none in flight, so no duplicates). Every row arrives once."""
    node = destructive_node
    prefix = unique_name("fan-faults")
    monkeypatch.setenv("AMQP_BATCH_URL", node.url)
    monkeypatch.setenv("EXAMPLE_QUEUE", prefix)
    fan_in = load_example("fan_in")

    async def restart() -> None:
        await anyio.to_thread.run_sync(node.stop_app)
        await anyio.to_thread.run_sync(node.start_app)

    async def cut() -> None:
        closed = await anyio.to_thread.run_sync(
            node.close_connection, f"{prefix}-publisher"
        )
        assert closed == 1

    faults = {1: restart, 5: cut}
    publishers: list[Publisher] = []

    class FaultyPublisher(Publisher):
        """Runs the fault of the n-th publish once no publish is in flight."""

        def __init__(self, url: str) -> None:
            super().__init__(
                url,
                connection_name=f"{prefix}-publisher",
                reconnect_backoff_base=0.05,
                reconnect_backoff_cap=0.5,
            )
            self.calls, self.in_flight = 0, 0
            self.lock, self.idle = anyio.Lock(), anyio.Event()
            publishers.append(self)

        async def publish(self, body: bytes, **kwargs: Any) -> None:
            self.calls += 1
            fault = faults.get(self.calls)
            async with self.lock:
                while fault is not None and self.in_flight:
                    await self.idle.wait()
                if fault is not None:
                    await fault()
                self.in_flight += 1
            try:
                await super().publish(body, **kwargs)
            finally:
                self.in_flight -= 1
                if not self.in_flight:
                    self.idle.set()
                    self.idle = anyio.Event()

    monkeypatch.setattr(fan_in, "Publisher", FaultyPublisher)
    try:
        with anyio.fail_after(90):
            await fan_in.main()
    finally:
        await cleanup(
            node.url,
            queues=[*fan_in.SOURCES, fan_in.WRITER_QUEUE],
            exchanges=[fan_in.STAGING],
        )
    rows = sorted(f"{queue}:{n}" for queue in fan_in.SOURCES for n in range(3))
    assert capsys.readouterr().out.splitlines()[-1] == f"rows {rows}"
    (publisher,) = publishers
    assert publisher.calls == 18  # 9 from main, 9 from the sources
    assert publisher.connections_opened == 3


# -- examples/trio_nursery.py ------------------------------------------------------
# A trio program (it calls trio.run itself); the test's own backend only runs
# the subprocess.


async def test_trio_nursery(broker_url: str) -> None:
    queue = unique_name("trio")
    try:
        code, lines = await run_example(
            "trio_nursery.py", {"AMQP_BATCH_URL": broker_url, "EXAMPLE_QUEUE": queue}
        )
        dead = await take(broker_url, f"{queue}-dead", 1)
        async with admin_channel(broker_url) as channel:
            left = await drain(channel, queue)
    finally:
        await cleanup(
            broker_url, queues=[queue, f"{queue}-dead"], exchanges=[f"{queue}-dlx"]
        )
    assert code == 0, lines
    images = [str(n) for n in range(1, 13)]
    assert lines[-4:] == [
        f"acked {','.join(images)}",
        "dead-lettered not-an-image",
        "results {'ack': 12, 'dead_lettered': 1, 'nack': 1}",
        "stopped",
    ]
    assert lines[0].startswith("progress consuming")
    assert ids_of(dead) == ["not-an-image"]
    assert left == []


# -- examples/config_from_env.py ---------------------------------------------------


async def test_config_from_env(
    broker_url: str, anyio_backend: str, tmp_path: Path
) -> None:
    queue = unique_name("env")
    env_file = tmp_path / "settings.env"
    env_file.write_text(
        "# local development values\n"
        "AMQP_BATCH_QUEUE_NAME=from-the-file\n"
        "AMQP_BATCH_BATCH_SIZE=2\n"
        "export AMQP_BATCH_BATCH_TIMEOUT=0.1\n"
        'AMQP_BATCH_QUEUE_ARGUMENTS={"x-max-length": 1000}\n'
        "AMQP_BATCH_UNHANDLED_EXCEPTION_ACTION=nack\n"
    )
    environ = {
        "EXAMPLE_ENV_FILE": str(env_file),
        "EXAMPLE_BACKEND": anyio_backend,
        "AMQP_BATCH_URL": broker_url,
        "AMQP_BATCH_QUEUE_NAME": queue,  # the environment wins over the file
        "AMQP_BATCH_PREFETCH_COUNT": "20",
    }
    try:
        code, lines = await run_example("config_from_env.py", environ)
        async with admin_channel(broker_url) as channel:
            # Declared with the file's argument: the same declaration is accepted.
            await channel.queue_declare(
                queue, durable=True, arguments={"x-max-length": 1000}
            )
            left = await drain(channel, queue)
    finally:
        await cleanup(broker_url, queues=[queue])
    assert code == 0, lines
    settings_line, handled_line = lines[0], lines[-1]
    assert settings_line.startswith("BatchConsumerSettings(")
    for shown in (
        f"queue_name='{queue}'",
        "prefetch_count=20",
        "batch_size=2",
        "batch_timeout=0.1",
        "'x-max-length': 1000",
        "MessageResult.NACK",
        "connection_name='config-example'",
    ):
        assert shown in settings_line
    password = httpx.URL(broker_url).password
    assert password
    assert f":{password}@" not in settings_line
    assert ":***@" in settings_line
    assert handled_line == "handled one two three"
    assert left == []


async def test_config_from_env_bad_value_names_the_variable() -> None:
    """It stops before connecting anywhere."""
    code, lines = await run_example(
        "config_from_env.py",
        {
            "EXAMPLE_ENV_FILE": "/nonexistent/.env",
            "AMQP_BATCH_URL": "amqp://app:secret@127.0.0.1:1/",
            "AMQP_BATCH_QUEUE_NAME": unique_name("env"),
            "AMQP_BATCH_BATCH_SIZE": "lots",
        },
    )
    assert code == 1
    assert lines[-1].startswith("bad configuration: AMQP_BATCH_BATCH_SIZE: ")
    assert not any("secret" in line for line in lines)
