"""``amqp-batch run --reload``: editing the target's module hands the queue to the
new handler, on asyncio and trio, against RabbitMQ. Tests follow the output."""

from __future__ import annotations

import signal
from pathlib import Path

from consumer_support import admin_channel, cleanup, message_count, publish_ids
from test_cli import cli_process, run_cli

HANDLER = """\
from amqp_batch import MessageResult


async def handle(messages):
    print("{version} " + " ".join(m.body.decode() for m in messages), flush=True)
    for _ in messages:
        yield MessageResult.ACK
"""


async def test_editing_the_module_restarts_with_the_new_handler(
    broker_url: str, unique_name: str, anyio_backend: str, tmp_path: Path
) -> None:
    queue = unique_name
    module = tmp_path / "reload_target.py"
    module.write_text(HANDLER.format(version="v1"))
    async with admin_channel(broker_url) as channel:
        await channel.queue_declare(queue, durable=True)
    args = [
        "run", "reload_target:handle", "--reload", "--url", broker_url,
        "--queue", queue, "--batch-size", "1", "--summary-interval", "0",
        "--backend", anyio_backend,
    ]  # fmt: skip
    try:
        async with cli_process(args, cwd=tmp_path) as cli:
            await cli.expect(lambda line: "-> consuming" in line)
            async with admin_channel(broker_url) as channel:
                await publish_ids(channel, ["1"], routing_key=queue)
            await cli.expect(lambda line: line == "v1 1")
            module.write_text(HANDLER.format(version="v2"))
            await cli.expect(lambda line: "changed: restarting the consumer" in line)
            await cli.expect(lambda line: "SIGTERM: stopping gracefully" in line)
            await cli.expect(lambda line: "reload: consumer started" in line)
            async with admin_channel(broker_url) as channel:
                await publish_ids(channel, ["2"], routing_key=queue)
            await cli.expect(lambda line: line.startswith("v2 "))
            cli.process.send_signal(signal.SIGTERM)
            code = await cli.finish()
        assert code == 0, cli.output
        handled = [line for line in cli.lines if line.startswith(("v1 ", "v2 "))]
        assert handled == ["v1 1", "v2 2"], cli.output
        async with admin_channel(broker_url) as channel:
            assert await message_count(channel, queue) == 0
    finally:
        await cleanup(broker_url, [queue])


def test_reload_does_not_combine_with_processes(tmp_path: Path) -> None:
    (tmp_path / "reload_target.py").write_text(HANDLER.format(version="v1"))
    result = run_cli(
        ["run", "reload_target:handle", "-q", "q", "--reload", "--processes", "2"],
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "--reload runs one consumer" in result.stderr
