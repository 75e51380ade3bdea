"""``amqp-batch run --processes N`` against RabbitMQ, on asyncio and trio.

The command runs as a real process; its children's output comes through it
(``tests/cli_targets/cli_supervised.py`` prints ``start PID IDS`` and
``acked PID IDS``). Tests follow that output, never sleeps.
"""

from __future__ import annotations

import collections
import os
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest
from tests.support.invariant import Report

from consumer_support import admin_channel, cleanup, drain, ids_of, publish_ids
from test_cli import CLIProcess, cli_process, run_cli, with_password

SHUTDOWN_TIMEOUT = 10


def command(url: str, queue: str, backend: str, *extra: str) -> list[str]:
    return [
        "run", "cli_supervised:handle", "--url", url, "--queue", queue,
        "--processes", "2", "--batch-timeout", "60", "--summary-interval", "0",
        "--shutdown-timeout", str(SHUTDOWN_TIMEOUT), "--backend", backend, *extra,
    ]  # fmt: skip


class Lines:
    """What the handlers printed: per id, the (pid, redelivered) of each start,
    and the pids that acked it."""

    def __init__(self, cli: CLIProcess) -> None:
        self.starts: dict[str, list[tuple[str, bool]]] = collections.defaultdict(list)
        self.acks: dict[str, list[str]] = collections.defaultdict(list)
        for line in cli.lines:
            kind, _, rest = line.partition(" ")
            if kind not in ("start", "acked"):
                continue
            pid, *ids = rest.split()
            for token in ids:
                message_id, _, flag = token.partition(":")
                if kind == "start":
                    self.starts[message_id].append((pid, flag == "r"))
                else:
                    self.acks[message_id].append(pid)

    def report(self, confirmed: list[str], remaining: list[str]) -> Report:
        """The invariant over the children's output and what is left queued."""
        duplicates = sum(len(s) - 1 for s in self.starts.values())
        unflagged = sum(
            sum(1 for _, redelivered in s[1:] if not redelivered)
            for s in self.starts.values()
        )
        return Report(
            confirmed=frozenset(confirmed),
            acked=frozenset(self.acks),
            dead_lettered=collections.Counter(),
            still_queued=collections.Counter(remaining),
            duplicates=duplicates,
            unflagged_duplicates=unflagged,
            deliveries=sum(len(s) for s in self.starts.values()),
        )


@asynccontextmanager
async def busy_children(
    url: str, queue: str, backend: str, tmp_path: Path
) -> AsyncIterator[tuple[CLIProcess, list[str], set[str]]]:
    """200 ids queued, the supervisor of 2 children started, each child with a
    batch (of 5, 2 s of work) in its handler: the command, the ids and the
    children's pids."""
    async with admin_channel(url) as channel:
        await channel.queue_declare(queue, durable=True)
        ids = await publish_ids(channel, range(200), routing_key=queue)
    args = command(
        url, queue, backend,
        "--batch-size", "5", "--prefetch", "20", "--max-concurrent-batches", "2",
    )  # fmt: skip
    pids: set[str] = set()

    def both_busy(line: str) -> bool:
        if line.startswith("start "):
            pids.add(line.split()[1])
        return len(pids) == 2

    async with cli_process(
        args, cwd=tmp_path, env={"AMQP_BATCH_TEST_WORK": "2"}
    ) as cli:
        await cli.expect(both_busy, timeout=60)
        yield cli, ids, pids


async def test_sigterm_drains_batches_in_flight_in_every_process(
    broker_url: str, unique_name: str, anyio_backend: str, tmp_path: Path
) -> None:
    queue = unique_name
    try:
        async with busy_children(broker_url, queue, anyio_backend, tmp_path) as busy:
            cli, ids, _ = busy
            signalled = time.monotonic()
            cli.process.send_signal(signal.SIGTERM)
            code = await cli.finish(timeout=SHUTDOWN_TIMEOUT + 20)
            elapsed = time.monotonic() - signalled
        assert code == 0, cli.output
        assert elapsed < SHUTDOWN_TIMEOUT + 2, (elapsed, cli.output)
        assert "SIGTERM: stopping 2 process(es) gracefully" in cli.output
        assert cli.output.count("SIGTERM: stopping gracefully") == 2  # each child
        lines = Lines(cli)
        # Every batch that was in a handler finished and was acked, once.
        unfinished = set(lines.starts) - set(lines.acks)
        assert not unfinished, (sorted(unfinished, key=int), cli.output)
        assert all(len(pids) == 1 for pids in lines.acks.values())
        async with admin_channel(broker_url) as channel:
            remaining = ids_of(await drain(channel, queue))
        report = lines.report(ids, remaining)
        report.assert_holds(allow_still_queued=True)
        assert sorted(remaining + list(lines.acks), key=int) == ids
    finally:
        await cleanup(broker_url, [queue])


async def test_a_killed_process_is_restarted_and_its_messages_redelivered(
    broker_url: str, unique_name: str, anyio_backend: str, tmp_path: Path
) -> None:
    queue = unique_name
    async with admin_channel(broker_url) as channel:
        await channel.queue_declare(queue, durable=True)
        ids = await publish_ids(channel, range(300), routing_key=queue)
    args = command(broker_url, queue, anyio_backend, "--batch-size", "10",
                   "--prefetch", "30")  # fmt: skip

    def all_acked(line: str) -> bool:  # over every line read so far
        return line.startswith("acked ") and set(Lines(cli).acks) >= set(ids)

    try:
        async with cli_process(
            args, cwd=tmp_path, env={"AMQP_BATCH_TEST_WORK": "0.3"}
        ) as cli:
            first = await cli.expect(lambda line: line.startswith("start "), 60)
            victim = first.split()[1]
            in_flight = first.split()[2:]
            os.kill(int(victim), signal.SIGKILL)
            await cli.expect(lambda line: "died (signal SIGKILL): restarting" in line)
            await cli.expect(lambda line: ": started, pid" in line)
            await cli.expect(all_acked, timeout=60)
            cli.process.send_signal(signal.SIGTERM)
            code = await cli.finish(timeout=SHUTDOWN_TIMEOUT + 20)
        assert code == 0, cli.output
        lines = Lines(cli)
        async with admin_channel(broker_url) as channel:
            remaining = ids_of(await drain(channel, queue))
        report = lines.report(ids, remaining)
        report.assert_holds(max_duplicates=30)  # at most the victim's prefetch
        # The batch the victim had in its handler went to someone else, redelivered.
        for message_id in in_flight:
            assert any(
                pid != victim and redelivered
                for pid, redelivered in lines.starts[message_id]
            ), (message_id, lines.starts[message_id])
    finally:
        await cleanup(broker_url, [queue])


async def _exited(pid: int) -> None:
    """Wait until process ``pid`` (not our child: no ``wait``) has exited: its
    pidfd becomes readable then."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        await anyio.wait_readable(pidfd)
    finally:
        os.close(pidfd)


async def test_children_drain_and_exit_when_the_supervisor_is_killed(
    broker_url: str, unique_name: str, anyio_backend: str, tmp_path: Path
) -> None:
    """SIGKILL of the supervisor while both children have batches in their
    handlers: each child sees the supervisor gone, finishes and acks what it
    holds, and exits; none keeps consuming as an orphan."""
    queue = unique_name
    try:
        async with busy_children(broker_url, queue, anyio_backend, tmp_path) as busy:
            cli, ids, pids = busy
            cli.process.kill()
            # The children share the supervisor's output: its end comes when
            # the last child has closed it.
            code = await cli.finish(timeout=SHUTDOWN_TIMEOUT + 20)
        assert code == -signal.SIGKILL
        assert cli.output.count("the supervisor is gone: stopping gracefully") == 2
        with anyio.fail_after(10):
            for pid in pids:
                await _exited(int(pid))
        lines = Lines(cli)
        unfinished = set(lines.starts) - set(lines.acks)
        assert not unfinished, (sorted(unfinished, key=int), cli.output)
        async with admin_channel(broker_url) as channel:
            remaining = ids_of(await drain(channel, queue))
        report = lines.report(ids, remaining)
        report.assert_holds(allow_still_queued=True)
        assert remaining, "the children stopped consuming: some ids stay queued"
        assert sorted(remaining + list(lines.acks), key=int) == ids
    finally:
        await cleanup(broker_url, [queue])


def test_a_child_refuses_a_lifeline_that_is_no_pipe(
    broker_url: str, unique_name: str, tmp_path: Path
) -> None:
    env = {"AMQP_BATCH_SUPERVISOR_FD": "not-a-descriptor"}
    args = ["run", "cli_supervised:handle", "--url", broker_url, "-q", unique_name]
    result = run_cli(args, cwd=tmp_path, env=env)
    assert result.returncode == 2, result.stderr
    assert "AMQP_BATCH_SUPERVISOR_FD='not-a-descriptor' names no pipe" in result.stderr


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_non_retryable_child_failure_stops_the_supervisor(
    broker_url: str, unique_name: str, tmp_path: Path, backend: str
) -> None:
    # A refused login is final: each child exits 2, so does the supervisor.
    bad = with_password(broker_url, "nobody", "Pw-supervised-5e1")
    result = run_cli(command(bad, unique_name, backend), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "exited 2: stopping all" in result.stderr
    assert "Pw-supervised-5e1" not in result.stderr + result.stdout


def test_help_tells_workers_and_processes_apart(tmp_path: Path) -> None:
    result = run_cli(["run", "--help"], cwd=tmp_path)
    text = " ".join(result.stdout.split())
    assert "connections in this process" in text
    assert "run N OS processes" in text
