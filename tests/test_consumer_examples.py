"""The ported aio-pika-batch README examples run against the broker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from consumer_support import cleanup, unique_name

pytestmark = pytest.mark.anyio

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


async def _run(
    name: str, url: str, backend: str, queue: str, **env: str
) -> tuple[int, list[str]]:
    environ = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(sys.path),
        AMQP_BATCH_URL=url,
        EXAMPLE_QUEUE=queue,
        EXAMPLE_BACKEND=backend,
        AMQP_BATCH_QUEUE_NAME=queue,
        **env,
    )
    with anyio.fail_after(60):
        result = await anyio.run_process(
            [sys.executable, str(EXAMPLES / name)],
            env=environ,
            check=False,
            stderr=subprocess.STDOUT,
        )
    return result.returncode, result.stdout.decode().splitlines()


async def test_quickstart(broker_url: str, anyio_backend: str) -> None:
    queue = unique_name("ex")
    try:
        code, lines = await _run("quickstart.py", broker_url, anyio_backend, queue)
    finally:
        await cleanup(broker_url, queues=[queue])
    assert code == 0, lines
    assert sorted(x for x in lines if x.startswith("ok")) == [
        f"ok {n}" for n in range(4)
    ]
    assert "bad b'not json'" in lines
    assert lines[-1] == "stopped"


async def test_single_message(broker_url: str, anyio_backend: str) -> None:
    queue = unique_name("ex")
    try:
        code, lines = await _run("single_message.py", broker_url, anyio_backend, queue)
    finally:
        await cleanup(broker_url, queues=[queue])
    assert code == 0, lines
    assert lines == ["got a retry 0", "got b retry 0", "got c retry 0", "stopped"]


async def test_fan_in(broker_url: str, anyio_backend: str) -> None:
    prefix = unique_name("fan")
    try:
        code, lines = await _run("fan_in.py", broker_url, anyio_backend, prefix)
    finally:
        await cleanup(
            broker_url,
            queues=[f"{prefix}-source-{i}" for i in range(3)] + [f"{prefix}-writer"],
            exchanges=[f"{prefix}-staging"],
        )
    assert code == 0, lines
    rows = sorted(f"{prefix}-source-{i}:{n}" for i in range(3) for n in range(3))
    assert lines[-1] == f"rows {rows}"


@pytest.mark.parametrize("mode", ["context", "serve"])
async def test_ways_to_run(broker_url: str, anyio_backend: str, mode: str) -> None:
    queue = unique_name("ex")
    try:
        code, lines = await _run(
            "ways_to_run.py", broker_url, anyio_backend, queue, EXAMPLE_MODE=mode
        )
    finally:
        await cleanup(broker_url, queues=[queue])
    assert code == 0, lines
    assert sorted(x for x in lines if x.startswith("handled")) == [
        "handled one",
        "handled two",
    ]
    if mode == "serve":
        assert lines[0] == "on_start"
        assert "healthy True" in lines
        assert lines[-2:] == ["on_stop", "stopped"]


async def test_ways_to_run_with_signal(broker_url: str, anyio_backend: str) -> None:
    queue = unique_name("ex")
    environ = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(sys.path),
        AMQP_BATCH_URL=broker_url,
        AMQP_BATCH_QUEUE_NAME=queue,
        EXAMPLE_BACKEND=anyio_backend,
        EXAMPLE_MODE="run",
    )
    try:
        async with await anyio.open_process(
            [sys.executable, str(EXAMPLES / "ways_to_run.py")],
            env=environ,
            stderr=subprocess.STDOUT,
        ) as process:
            assert process.stdout is not None
            output = b""
            with anyio.fail_after(30):
                async for chunk in process.stdout:
                    output += chunk
                    if b"on_start" in output:
                        process.send_signal(signal.SIGINT)
                        break
                async for chunk in process.stdout:
                    output += chunk
                code = await process.wait()
    finally:
        await cleanup(broker_url, queues=[queue])
    lines = output.decode().splitlines()
    assert code == 0, lines
    assert lines[-3:] == ["on_start", "on_stop", "stopped"]
