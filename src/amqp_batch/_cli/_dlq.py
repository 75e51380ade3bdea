"""``amqp-batch dlq inspect|replay|purge QUEUE``: look into a dead-letter queue, move
its messages back, or drop them, without losing or reordering any.

How messages are read: ``basic.get`` without auto-ack, one at a time, up to the
number of messages the queue held when the command started (a passive
``queue.declare``). Every message the command does not act on stays unacknowledged
on its channel until the end, when closing the channel makes RabbitMQ put them all
back at their original positions (a classic queue keeps their order). So:

- ``inspect`` never removes a message: it acks nothing.
- ``replay`` publishes a copy (publisher confirms, ``mandatory``) and acks the
  dead letter only after the broker confirmed the copy. Killed at any point, a
  replay loses nothing: unacked dead letters go back to the queue; at most the
  copies confirmed but not yet acked (one window) exist twice, recognisable by
  their equal ``x-replay-key`` header.
- ``purge`` acks the matching messages; the others go back.

The command uses the native transport's channel directly (``basic.get``, passive
declares), like ``amqp-batch demo``; the transport contract is unchanged.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from contextlib import aclosing, asynccontextmanager
from typing import Any, TextIO

import anyio
import anyio.to_thread
import attrs

from .._dlq import (
    DeadLetter,
    Filters,
    group,
    parse_duration,
    parse_header_filter,
    replay_properties,
)
from .._exceptions import ChannelClosed, MessageNacked, MessageReturned, TransportError
from .._transport._native import Channel, Connection, connect
from .._transport._url import parse_url
from ._common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, CLIError, describe, report
from ._dlq_output import Progress, describe_letter, format_letter, print_groups

__all__ = ["DEFAULT_URL", "add_dlq_arguments", "dlq_command", "run_dlq"]

DEFAULT_URL = "amqp://guest:guest@localhost:5672/"
#: Copies published before their confirms are awaited (and their dead letters
#: acked): the most a killed replay can duplicate.
REPLAY_WINDOW = 50

_UTC = datetime.timezone.utc


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _header(text: str) -> tuple[str, str]:
    try:
        return parse_header_filter(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(kind: type[int] | type[float]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be above 0, not {text}")
        return value

    return parse


def _add_shared(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("queue", metavar="QUEUE", help="the dead-letter queue")
    parser.add_argument(
        "--url",
        metavar="URL",
        help=f"broker URL [env AMQP_BATCH_URL; default {DEFAULT_URL}]",
    )
    filters = parser.add_argument_group("filters (all given must match)")
    filters.add_argument(
        "--reason",
        action="append",
        metavar="REASON",
        help="dead-letter reason: rejected, expired, maxlen, delivery_limit (by "
        "RabbitMQ), max-requeue-attempts, republish-failed, invalid-retry-count "
        "(by the library), unknown; repeatable",
    )
    filters.add_argument(
        "--routing-key",
        metavar="GLOB",
        help="original routing key, a glob: 'orders.*', '*.eu'",
    )
    filters.add_argument(
        "--header",
        action="append",
        type=_header,
        metavar="KEY=VALUE",
        help="a header with this value (compared as text); repeatable",
    )
    filters.add_argument(
        "--older-than",
        type=_duration,
        metavar="DURATION",
        help="dead-lettered at least this long ago: 90s, 15m, 2h, 1d",
    )
    parser.add_argument(
        "--limit",
        type=_positive(int),
        metavar="N",
        help="act on at most N matching messages [default all]",
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object (for scripts)"
    )


_INSPECT = """\
Count the messages of a dead-letter queue and group them by dead-letter reason,
original exchange and routing key, retry count and age. Nothing is removed or
reordered: the messages are read without acknowledging them and go back to their
positions when the command closes its channel (they are marked redelivered).
"""
_REPLAY = """\
Publish the matching messages back to where they came from (their original
exchange and routing key), or to --to-queue / --to-exchange, and remove them from
the dead-letter queue. Each copy is confirmed by the broker before its dead letter
is acknowledged: a replay killed at any point loses nothing (at most the last
window of copies exists twice; they carry the same x-replay-key header).
Messages that do not match stay in the queue, in order.
"""
_PURGE = """\
Remove the matching messages from a dead-letter queue (all of them without
filters), after a confirmation prompt (--yes skips it). The others stay, in order.
"""


def add_dlq_arguments(
    parser: argparse.ArgumentParser,
    common: Callable[[argparse.ArgumentParser], None],
) -> None:
    """The ``dlq`` subcommand's sub-commands; ``common`` adds --backend etc."""
    actions = parser.add_subparsers(dest="dlq_command", required=True, metavar="ACTION")
    inspect, replay, purge = (
        actions.add_parser(
            name,
            help=text,
            description=description,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        for name, text, description in (
            ("inspect", "count and group", _INSPECT),
            ("replay", "move messages back", _REPLAY),
            ("purge", "remove messages", _PURGE),
        )
    )
    for sub in (inspect, replay, purge):
        _add_shared(sub)
        common(sub)
    inspect.add_argument(
        "--show",
        type=int,
        default=0,
        metavar="N",
        help="also print the first N matching messages (headers, properties, body)",
    )
    where = replay.add_mutually_exclusive_group()
    where.add_argument("--to-queue", metavar="NAME", help="publish to this queue")
    where.add_argument(
        "--to-exchange",
        metavar="NAME",
        help="publish to this exchange, with the original routing key",
    )
    replay.add_argument(
        "--keep-retry-count",
        action="store_true",
        help="keep x-retry-count (default: removed, so the retries start again)",
    )
    replay.add_argument(
        "--rate", type=_positive(float), metavar="N", help="at most N messages a second"
    )
    replay.add_argument(
        "--dry-run", action="store_true", help="show what would move; move nothing"
    )
    purge.add_argument("--yes", action="store_true", help="do not ask")
    purge.add_argument(
        "--dry-run", action="store_true", help="count what would go; remove nothing"
    )


# -- reading the queue ----------------------------------------------------------------


@attrs.define
class _Job:
    """One run of a dlq action: its arguments, output and counters."""

    args: argparse.Namespace
    out: TextIO
    interactive: bool
    filters: Filters
    now: datetime.datetime = attrs.Factory(lambda: datetime.datetime.now(_UTC))
    scanned: int = 0
    matched: int = 0
    size: int = 0

    @property
    def url(self) -> str:
        return self.args.url or os.environ.get("AMQP_BATCH_URL") or DEFAULT_URL

    def print(self, text: str = "") -> None:
        if not self.args.json:
            print(text, file=self.out, flush=True)


def _filters(args: argparse.Namespace) -> Filters:
    return Filters(
        reasons=frozenset(args.reason or ()),
        routing_key=args.routing_key,
        headers=tuple(args.header or ()),
        older_than=args.older_than,
    )


@asynccontextmanager
async def _connected(job: _Job) -> AsyncIterator[Connection]:
    try:
        parameters = parse_url(job.url)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    connected = False
    try:
        async with connect(
            attrs.evolve(parameters, connection_name="amqp-batch-dlq")
        ) as connection:
            connected = True
            yield connection
    except TransportError as exc:
        if isinstance(exc, ChannelClosed):
            raise
        # Lost after connecting: unacked messages went back; some may have moved.
        code = EXIT_FAILED if connected else EXIT_USAGE
        raise CLIError(
            f"{parameters.redacted_url}: {describe(exc)}", exit_code=code
        ) from None


async def _exists(connection: Connection, kind: str, name: str) -> bool:
    """Whether queue/exchange ``name`` exists (a passive declare on a channel of
    its own, since a 404 closes the channel)."""
    if kind == "exchange" and (not name or name.startswith("amq.")):
        return True
    try:
        async with connection.channel() as channel:
            if kind == "queue":
                await channel.queue_declare(name, passive=True)
            else:
                await channel.exchange_declare(name, passive=True)
    except ChannelClosed as exc:
        if exc.reply_code == 404:
            return False
        raise
    return True


async def _letters(
    connection: Connection, channel: Channel, job: _Job
) -> AsyncGenerator[tuple[DeadLetter, bool], None]:
    """Each message of the queue (as it was at the start) and whether it matches;
    none is acked here. Stops after ``--limit`` matches."""
    queue = job.args.queue
    if not await _exists(connection, "queue", queue):
        raise CLIError(f"dead-letter queue {queue!r} does not exist")
    info = await channel.queue_declare(queue, passive=True)
    job.size = info.message_count
    limit = job.args.limit
    while job.scanned < job.size and (limit is None or job.matched < limit):
        delivery = await channel.basic_get(queue, no_ack=False)
        if delivery is None:
            break
        job.scanned += 1
        letter = DeadLetter.from_delivery(delivery)
        matches = job.filters.matches(letter, job.now)
        job.matched += matches
        yield letter, matches


# -- inspect --------------------------------------------------------------------------


async def _inspect(job: _Job) -> int:
    args = job.args
    shown: list[DeadLetter] = []
    matching: list[DeadLetter] = []
    async with (
        _connected(job) as connection,
        connection.channel() as channel,
        aclosing(_letters(connection, channel, job)) as letters,
    ):
        async for letter, matches in letters:
            if not matches:
                continue
            if len(shown) < args.show:
                shown.append(letter)
            # grouping needs no body: keep memory bounded on a large queue
            body_less = attrs.evolve(letter.delivery, body=b"")
            matching.append(attrs.evolve(letter, delivery=body_less))
    groups = group(matching, job.now)
    if args.json:
        document = {
            "queue": args.queue,
            "messages": job.size,
            "inspected": job.scanned,
            "matched": job.matched,
            **groups.as_json(),
            "shown": [describe_letter(letter, job.now) for letter in shown],
        }
        json.dump(document, job.out, default=str)
        job.out.write("\n")
        return EXIT_OK
    print_groups(job.out, args.queue, job.size, job.scanned, job.filters.any, groups)
    for number, letter in enumerate(shown, 1):
        job.print(f"\n-- message {number} of {len(shown)} --")
        job.print(format_letter(describe_letter(letter, job.now)))
    return EXIT_OK


# -- replay ---------------------------------------------------------------------------


@attrs.define
class _Copy:
    letter: DeadLetter
    exchange: str
    routing_key: str


def _destination(job: _Job, letter: DeadLetter) -> tuple[str, str]:
    if job.args.to_queue is not None:
        return "", job.args.to_queue
    if job.args.to_exchange is not None:
        return job.args.to_exchange, letter.original_routing_key
    return letter.original_exchange, letter.original_routing_key


class _Pacer:
    """Spaces out publishes to ``rate`` a second (``None``: no wait)."""

    def __init__(self, rate: float | None) -> None:
        self._interval = 1 / rate if rate else 0.0
        self._next = time.monotonic()

    async def wait(self) -> None:
        if not self._interval:
            return
        now = time.monotonic()
        if self._next > now:
            await anyio.sleep(self._next - now)
        self._next = max(now, self._next) + self._interval


class ReplayFailed(Exception):
    """A copy was refused or its destination is missing; the replay stops."""

    def __init__(self, message: str, *, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@attrs.define
class _Replayer:
    """Publishes windows of copies and acks each dead letter once its copy is
    confirmed (never before)."""

    job: _Job
    source: Channel
    sink: Channel
    replay_id: str = attrs.Factory(lambda: uuid.uuid4().hex)
    window: list[_Copy] = attrs.Factory(list)
    replayed: int = 0

    async def flush(self) -> None:
        """Publish the window, wait for every confirm, ack each confirmed one."""
        window, self.window = self.window, []
        now = datetime.datetime.now(_UTC)
        waiters = [
            self.sink.start_publish(
                copy.letter.delivery.body,
                exchange=copy.exchange,
                routing_key=copy.routing_key,
                properties=replay_properties(
                    copy.letter,
                    replay_id=self.replay_id,
                    now=now,
                    keep_retry_count=self.job.args.keep_retry_count,
                ),
                mandatory=True,
            )
            for copy in window
        ]
        failure: str | None = None
        for copy, waiter in zip(window, waiters, strict=True):
            assert waiter is not None  # the sink is in confirm mode
            try:
                await waiter.wait()
            except (MessageReturned, MessageNacked, ChannelClosed) as exc:
                failure = failure or (
                    f"the copy to exchange {copy.exchange!r}, routing key "
                    f"{copy.routing_key!r} was refused ({describe(exc)}); its dead "
                    f"letter stays in the queue"
                )
                continue
            self.source.ack(copy.letter.delivery.delivery_tag)
            self.replayed += 1
        if failure is not None:
            raise ReplayFailed(failure)


async def _check_target(connection: Connection, job: _Job) -> None:
    args = job.args
    if args.to_queue is not None and not await _exists(
        connection, "queue", args.to_queue
    ):
        raise CLIError(f"--to-queue {args.to_queue!r} does not exist; nothing moved")
    if args.to_exchange is not None and not await _exists(
        connection, "exchange", args.to_exchange
    ):
        raise CLIError(
            f"--to-exchange {args.to_exchange!r} does not exist; nothing moved"
        )


async def _replay_all(
    connection: Connection, job: _Job, replayer: _Replayer, plan: Counter[str]
) -> None:
    """Scan, filter and replay (or only plan, with --dry-run)."""
    args = job.args
    pacer = _Pacer(args.rate)
    size = max(1, min(REPLAY_WINDOW, math.ceil((args.rate or REPLAY_WINDOW) / 10)))
    progress = Progress(job.out, "replayed", quiet=args.json, bar=job.interactive)
    exists: dict[str, bool] = {}
    async with aclosing(_letters(connection, replayer.source, job)) as letters:
        async for letter, matches in letters:
            progress.update(job.scanned, job.size, replayer.replayed)
            if not matches:
                continue
            exchange, routing_key = _destination(job, letter)
            if exchange not in exists:
                exists[exchange] = await _exists(connection, "exchange", exchange)
            if not exists[exchange]:
                await replayer.flush()
                raise ReplayFailed(
                    f"exchange {exchange!r} (the original exchange of a message) does "
                    f"not exist; that message and the rest stay in the queue",
                    exit_code=EXIT_USAGE if not replayer.replayed else EXIT_FAILED,
                )
            plan[f"exchange {exchange!r}, routing key {routing_key!r}"] += 1
            if args.dry_run:
                continue
            await pacer.wait()
            replayer.window.append(_Copy(letter, exchange, routing_key))
            if len(replayer.window) >= size:
                await replayer.flush()
    await replayer.flush()
    progress.done(job.scanned, job.size, replayer.replayed)


async def _replay(job: _Job) -> int:
    plan: Counter[str] = Counter()
    failure: ReplayFailed | None = None
    async with _connected(job) as connection:
        await _check_target(connection, job)
        async with connection.channel() as source, connection.channel() as sink:
            await sink.confirm_select()
            replayer = _Replayer(job, source, sink)
            try:
                await _replay_all(connection, job, replayer, plan)
            except ReplayFailed as exc:
                failure = exc
    verb = "would replay" if job.args.dry_run else "replayed"
    moved = job.matched if job.args.dry_run else replayer.replayed
    _summary(job, verb, moved, plan, replay_id=replayer.replay_id)
    if failure is not None:
        raise CLIError(str(failure), exit_code=failure.exit_code)
    return EXIT_OK


def _summary(
    job: _Job, verb: str, moved: int, plan: Counter[str], **extra: Any
) -> None:
    left = job.size - moved if not job.args.dry_run else job.size
    if job.args.json:
        document = {
            "queue": job.args.queue,
            "messages": job.size,
            "scanned": job.scanned,
            "matched": job.matched,
            verb.replace(" ", "_"): moved,
            "destinations": dict(plan.most_common()),
            "left_in_queue": left,
            **extra,
        }
        json.dump(document, job.out)
        job.out.write("\n")
        return
    if not job.matched:
        job.print(
            f"no message of the {job.scanned} in {job.args.queue!r} matched "
            f"the filters; nothing {'would move' if job.args.dry_run else 'moved'}"
        )
        return
    job.print(
        f"{verb} {moved} of {job.scanned} messages of {job.args.queue!r}; "
        f"{left} left in the queue, in order"
    )
    for where, count in plan.most_common():
        job.print(f"  {count:>8}  to {where}")
    if "replay_id" in extra and moved and not job.args.dry_run:
        job.print(f"x-replay-id of the copies: {extra['replay_id']}")


# -- purge ----------------------------------------------------------------------------


async def _remove(job: _Job) -> int:
    """One pass: ack (remove) the matching messages unless --dry-run."""
    removed = 0
    progress = Progress(job.out, "removed", quiet=job.args.json, bar=job.interactive)
    async with _connected(job) as connection, connection.channel() as channel:
        async with aclosing(_letters(connection, channel, job)) as letters:
            async for letter, matches in letters:
                if matches and not job.args.dry_run:
                    channel.ack(letter.delivery.delivery_tag)
                    removed += 1
                progress.update(job.scanned, job.size, removed)
        progress.done(job.scanned, job.size, removed)
    return removed


async def _purge(job: _Job) -> int:
    args = job.args
    if not args.dry_run and not args.yes:
        if not sys.stdin.isatty():
            raise CLIError("purge asks for confirmation: pass --yes in scripts")
        quiet = argparse.Namespace(**{**vars(args), "dry_run": True, "json": True})
        dry = attrs.evolve(job, args=quiet)
        await _remove(dry)
        question = (
            f"remove {dry.matched} of the {dry.size} messages of {args.queue!r}? [y/N] "
        )
        answer = await anyio.to_thread.run_sync(input, question)
        if answer.strip().lower() not in ("y", "yes"):
            job.print("not confirmed: nothing removed")
            return EXIT_FAILED
    removed = await _remove(job)
    verb = "would remove" if args.dry_run else "removed"
    _summary(job, verb, job.matched if args.dry_run else removed, Counter())
    return EXIT_OK


# -- entry points ---------------------------------------------------------------------

_ACTIONS = {"inspect": _inspect, "replay": _replay, "purge": _purge}


async def run_dlq(
    argv: Sequence[str], *, out: TextIO | None = None, interactive: bool = False
) -> int:
    """Run ``amqp-batch dlq ARGV...`` in the current event loop; the exit code.

    Errors are reported as one line on stderr, as by the command.
    """
    from . import parser

    try:
        args = parser().parse_args(["dlq", *argv])
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        return await _dispatch(args, out or sys.stdout, interactive)
    except CLIError as exc:
        report(str(exc), prog=f"amqp-batch dlq {args.dlq_command}")
        return exc.exit_code


async def _dispatch(args: argparse.Namespace, out: TextIO, interactive: bool) -> int:
    job = _Job(args=args, out=out, interactive=interactive, filters=_filters(args))
    try:
        return await _ACTIONS[args.dlq_command](job)
    except ChannelClosed as exc:
        raise CLIError(describe(exc)) from None


def dlq_command(args: argparse.Namespace, *, interactive: bool) -> int:
    """``amqp-batch dlq ...``: the exit code (raises :class:`CLIError`)."""
    code: int = anyio.run(
        _dispatch, args, sys.stdout, interactive, backend=args.backend
    )
    return code
