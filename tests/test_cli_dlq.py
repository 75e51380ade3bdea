"""``amqp-batch dlq inspect|replay|purge`` against RabbitMQ, on asyncio and trio.

A dead-letter queue is filled with 300 messages the broker dead-lettered for three
reasons from three queues with three routing keys (``rejected`` from ``orders``,
``expired`` from ``payments``, ``maxlen`` from ``audit``), interleaved. The command
runs in-process through its async entry (``run_dlq``), and once as a process that
is SIGKILLed half-way through a replay.
"""

from __future__ import annotations

import collections
import io
import json
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import anyio
import pytest
from tests.support.invariant import Recorder, check

from amqp_batch._cli._dlq import run_dlq
from amqp_batch._dlq import REPLAY_ID_HEADER, REPLAY_KEY_HEADER, REPLAYED_AT_HEADER
from amqp_batch._transport._base import Delivery, Properties
from amqp_batch._transport._native import connect
from amqp_batch._transport._url import parse_url
from consumer_support import admin_channel, cleanup, drain, ids_of, message_count
from test_cli import cli_process

#: routing key -> (work queue suffix, queue arguments, reason its messages die of)
SOURCES = {
    "orders.created": ("orders", {}, "rejected"),
    "payments.failed": ("payments", {"x-message-ttl": 0}, "expired"),
    "audit.log": ("audit", {"x-max-length": 0}, "maxlen"),
}
KEYS = list(SOURCES)
TOTAL = 300


class Topology:
    """The names of one test's exchanges and queues."""

    def __init__(self, name: str) -> None:
        self.exchange = f"{name}.work"
        self.dlx = f"{name}.dlx"
        self.dlq = f"{name}.dlq"
        self.queues = {
            key: f"{name}.{suffix}" for key, (suffix, _, _) in SOURCES.items()
        }
        self.spare = f"{name}.spare"

    @property
    def all_queues(self) -> list[str]:
        return [self.dlq, self.spare, *self.queues.values()]


def key_of(message_id: str) -> str:
    return KEYS[int(message_id) % 3]


async def wait_for(url: str, queue: str, count: int) -> list[str]:
    """Wait until ``queue`` holds ``count`` messages (the broker dead-letters
    asynchronously): a consumer without prefetch limit receives them all, then its
    channel closes without acking, which puts them back in order. Their ids."""
    send, receive = anyio.create_memory_object_stream[Delivery](count + 1)
    async with (
        connect(parse_url(url)) as connection,
        connection.channel() as channel,
    ):
        with send, receive:
            await channel.basic_consume(queue, "amqp-batch-test-wait", send)
            with anyio.fail_after(30):
                got = [await receive.receive() for _ in range(count)]
    return ids_of(got)


async def fill(url: str, top: Topology) -> list[str]:
    """Declare everything and dead-letter ids 0..299 (id % 3 picks the key); the
    ids in their order in the dead-letter queue."""
    async with admin_channel(url) as channel:
        await channel.exchange_declare(top.exchange, "direct")
        await channel.exchange_declare(top.dlx, "fanout")
        await channel.queue_declare(top.dlq)
        await channel.queue_bind(top.dlq, top.dlx)
        await channel.queue_declare(top.spare)
        for key, (_, arguments, _) in SOURCES.items():
            queue = top.queues[key]
            await channel.queue_declare(
                queue, arguments={"x-dead-letter-exchange": top.dlx, **arguments}
            )
            await channel.queue_bind(queue, top.exchange, key)
        ids = []
        for number in range(TOTAL):
            text = str(number)
            key = key_of(text)
            await channel.publish(
                text.encode(),
                exchange=top.exchange,
                routing_key=key,
                properties=Properties(
                    message_id=text,
                    delivery_mode=2,
                    headers={"tenant": f"t{number % 2}"},
                ),
            )
            if SOURCES[key][2] == "rejected":
                delivery = await channel.basic_get(top.queues[key], no_ack=False)
                assert delivery is not None
                channel.reject(delivery.delivery_tag, requeue=False)
            ids.append(text)
    # The order the broker dead-lettered them in (three queues race).
    order = await wait_for(url, top.dlq, TOTAL)
    assert sorted(order, key=int) == ids
    return order


@pytest.fixture
async def dead_letters(
    broker_url: str, unique_name: str, anyio_backend: str
) -> AsyncIterator[tuple[Topology, list[str]]]:
    top = Topology(unique_name)
    try:
        yield top, await fill(broker_url, top)
    finally:
        await cleanup(broker_url, top.all_queues, [top.exchange, top.dlx])


async def dlq(url: str, *argv: str) -> tuple[int, str]:
    """Run ``amqp-batch dlq ARGV --url URL`` in-process; (exit code, stdout)."""
    out = io.StringIO()
    code = await run_dlq([*argv, "--url", url], out=out)
    return code, out.getvalue()


async def contents(url: str, queue: str) -> list[Delivery]:
    """Every message of ``queue``, left in place (drained, then put back)."""
    async with admin_channel(url) as channel:
        got = []
        while (delivery := await channel.basic_get(queue, no_ack=False)) is not None:
            got.append(delivery)
        # closing the channel without acking puts them back, in order
    return got


def by_reason(ids: Sequence[str], reason: str) -> list[str]:
    return [i for i in ids if SOURCES[key_of(i)][2] == reason]


async def test_inspect_reports_exact_groups_and_moves_nothing(
    broker_url: str, dead_letters: tuple[Topology, list[str]]
) -> None:
    top, ids = dead_letters
    code, out = await dlq(broker_url, "inspect", top.dlq, "--json", "--show", "2")
    assert code == 0
    report = json.loads(out)
    assert report["messages"] == report["inspected"] == report["total"] == TOTAL
    assert report["by_reason"] == {"rejected": 100, "expired": 100, "maxlen": 100}
    assert sorted(
        (d["exchange"], d["routing_key"], d["count"])
        for d in report["by_original_destination"]
    ) == sorted((top.exchange, key, 100) for key in KEYS)
    assert report["by_retry_count"] == {"0": TOTAL}
    assert report["by_dead_lettered_by"] == {"broker": TOTAL}
    assert report["by_age"] == {"< 1 min": TOTAL}
    assert report["age_seconds"]["oldest"] >= report["age_seconds"]["newest"] >= 0
    first = report["shown"][0]
    assert first["properties"]["message_id"] == "0"
    assert first["body_preview"] == "0"
    assert first["original_queue"] == top.queues["orders.created"]
    # Text output, with a filter: the same groups, restricted.
    code, text = await dlq(
        broker_url, "inspect", top.dlq, "--routing-key", "pay*", "--header", "tenant=t1"
    )
    assert code == 0
    assert "50 matching the filters" in text
    assert "expired" in text and "rejected" not in text
    # Nothing removed, nothing reordered.
    assert ids_of(await contents(broker_url, top.dlq)) == ids


async def test_replay_by_reason_moves_exactly_those_back(
    broker_url: str, dead_letters: tuple[Topology, list[str]]
) -> None:
    top, ids = dead_letters
    rejected = by_reason(ids, "rejected")
    code, out = await dlq(broker_url, "replay", top.dlq, "--reason", "rejected")
    assert code == 0, out
    assert f"replayed 100 of {TOTAL}" in out
    async with admin_channel(broker_url) as channel:
        back = await drain(channel, top.queues["orders.created"])
        for key in ("payments.failed", "audit.log"):
            assert await message_count(channel, top.queues[key]) == 0
    assert ids_of(back) == rejected
    for delivery in back:
        headers = delivery.properties.headers or {}
        assert delivery.exchange == top.exchange
        assert delivery.routing_key == "orders.created"
        assert {REPLAYED_AT_HEADER, REPLAY_ID_HEADER, REPLAY_KEY_HEADER} <= set(headers)
        assert "x-retry-count" not in headers
        assert headers["x-death"][0]["reason"] == "rejected"  # history kept
    # The rest stayed, in their order.
    rest = [i for i in ids if i not in set(rejected)]
    assert ids_of(await contents(broker_url, top.dlq)) == rest


async def test_purge_dry_run_removes_nothing_and_purge_removes_the_match(
    broker_url: str, dead_letters: tuple[Topology, list[str]]
) -> None:
    top, ids = dead_letters
    code, out = await dlq(broker_url, "purge", top.dlq, "--dry-run")
    assert code == 0
    assert f"would remove {TOTAL} of {TOTAL}" in out
    assert ids_of(await contents(broker_url, top.dlq)) == ids
    code, out = await dlq(
        broker_url, "purge", top.dlq, "--reason", "expired", "--yes", "--json"
    )
    assert code == 0
    assert json.loads(out)["removed"] == 100
    assert ids_of(await contents(broker_url, top.dlq)) == [
        i for i in ids if SOURCES[key_of(i)][2] != "expired"
    ]


async def test_replay_dry_run_and_filters_that_match_nothing(
    broker_url: str, dead_letters: tuple[Topology, list[str]]
) -> None:
    top, ids = dead_letters
    code, out = await dlq(
        broker_url, "replay", top.dlq, "--routing-key", "audit.*", "--dry-run"
    )
    assert code == 0
    assert f"would replay 100 of {TOTAL}" in out
    assert f"to exchange {top.exchange!r}, routing key 'audit.log'" in out
    for argv in (
        ["--reason", "delivery_limit"],
        ["--older-than", "1d"],
        ["--header", "tenant=t9"],
    ):
        code, out = await dlq(broker_url, "replay", top.dlq, *argv)
        assert code == 0
        assert "matched the filters; nothing moved" in out
    assert ids_of(await contents(broker_url, top.dlq)) == ids


async def test_bad_input_is_one_line_and_moves_nothing(
    broker_url: str,
    dead_letters: tuple[Topology, list[str]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    top, ids = dead_letters
    cases = [
        (["inspect", f"{top.dlq}-missing"], 2, "does not exist"),
        (["replay", top.dlq, "--header", "tenant"], 2, "not KEY=VALUE"),
        (["replay", top.dlq, "--older-than", "soon"], 2, "not a duration"),
        (["replay", top.dlq, "--to-exchange", "nope.x"], 2, "'nope.x' does not exist"),
        (["replay", top.dlq, "--to-queue", "nope.q"], 2, "'nope.q' does not exist"),
        (["purge", top.dlq], 2, "pass --yes"),
    ]
    for argv, expected_code, message in cases:
        code, _ = await dlq(broker_url, *argv)
        err = capsys.readouterr().err
        assert code == expected_code, (argv, err)
        assert message in err, (argv, err)
        assert len(err.strip().splitlines()) == 1, err
    # The messages' own exchange is gone: nothing is acked.
    async with admin_channel(broker_url) as channel:
        await channel.exchange_delete(top.exchange)
    code, _ = await dlq(broker_url, "replay", top.dlq)
    assert code == 2
    assert f"exchange {top.exchange!r}" in capsys.readouterr().err
    assert ids_of(await contents(broker_url, top.dlq)) == ids


async def test_replay_killed_half_way_then_rerun_loses_nothing(
    broker_url: str,
    dead_letters: tuple[Topology, list[str]],
    anyio_backend: str,
    tmp_path: Path,
) -> None:
    top, ids = dead_letters
    args = [
        "dlq", "replay", top.dlq, "--to-queue", top.spare, "--rate", "150",
        "--url", broker_url, "--backend", anyio_backend,
    ]  # fmt: skip

    def half_way(line: str) -> bool:
        parts = line.split()
        return line.startswith("progress:") and int(parts[3]) >= TOTAL // 3

    async with cli_process(args, cwd=tmp_path) as cli:
        await cli.expect(half_way, timeout=60)
        cli.process.send_signal(signal.SIGKILL)
        assert await cli.finish() == -signal.SIGKILL
    async with admin_channel(broker_url) as channel:
        moved = await message_count(channel, top.spare)
    assert TOTAL // 3 <= moved < TOTAL, cli.output
    code, out = await dlq(broker_url, "replay", top.dlq, "--to-queue", top.spare)
    assert code == 0, out
    copies = await contents(broker_url, top.spare)
    report = await check(broker_url, top.spare, top.dlq, Recorder(), ids)
    report.assert_holds(allow_still_queued=True)
    assert not report.dead_lettered  # everything was replayed
    duplicates = sum(n - 1 for n in report.still_queued.values())
    assert set(report.still_queued) == set(ids)
    assert duplicates <= 15  # one window at 150/s
    # Duplicates are recognisable: same x-replay-key, different x-replay-id.
    keys = collections.defaultdict(set)
    for delivery in copies:
        headers = delivery.properties.headers or {}
        keys[headers[REPLAY_KEY_HEADER]].add(headers[REPLAY_ID_HEADER])
    assert len(keys) == TOTAL
    assert sum(len(runs) - 1 for runs in keys.values()) == duplicates
    print(f"duplicates after SIGKILL and rerun: {duplicates}", file=sys.stderr)
