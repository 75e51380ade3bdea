"""What ``amqp-batch dlq`` prints: the groups, one message, progress."""

from __future__ import annotations

import datetime
from typing import Any, TextIO

from .._dlq import AGE_BUCKETS, DeadLetter, Groups

__all__ = ["Progress", "describe_letter", "format_letter", "print_groups"]

#: Bytes of a body ``--show`` prints.
BODY_PREVIEW = 200


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def _shown(text: str) -> str:
    """``text`` without control characters (producer headers are untrusted)."""
    return "".join(c if c.isprintable() else "?" for c in text)


def print_groups(
    out: TextIO, queue: str, size: int, scanned: int, filtered: bool, groups: Groups
) -> None:
    """The ``inspect`` report as text."""

    def line(text: str = "") -> None:
        print(text, file=out)

    which = f", {groups.total} matching the filters" if filtered else ""
    line(f"dead-letter queue {queue!r}: {size} messages ({scanned} inspected{which})")
    if not groups.total:
        return
    line("by reason:")
    for reason, count in groups.by_reason.most_common():
        line(f"  {count:>8}  {_shown(reason)}")
    line("by original exchange / routing key:")
    for (exchange, key), count in groups.by_destination.most_common():
        line(f"  {count:>8}  {_shown(exchange) or '(default)'} / {_shown(key)}")
    line("by retry count (x-retry-count):")
    for retry, count in groups.by_retry_count.most_common():
        line(f"  {count:>8}  {retry}")
    line("dead-lettered by:")
    for by, count in groups.by_dead_lettered_by.most_common():
        line(f"  {count:>8}  {by}")
    line("by age:")
    for label in [*(label for _, label in AGE_BUCKETS), "unknown"]:
        if groups.by_age[label]:
            line(f"  {groups.by_age[label]:>8}  {label}")
    line(f"oldest {_age(groups.oldest)}, newest {_age(groups.newest)}")
    out.flush()


def describe_letter(letter: DeadLetter, now: datetime.datetime) -> dict[str, Any]:
    """One dead letter as a JSON-ready dict (the body as a text preview)."""
    delivery = letter.delivery
    properties = {
        name: value
        for name in (
            "content_type",
            "content_encoding",
            "delivery_mode",
            "priority",
            "correlation_id",
            "reply_to",
            "expiration",
            "message_id",
            "timestamp",
            "type",
            "user_id",
            "app_id",
        )
        if (value := getattr(delivery.properties, name)) is not None
    }
    body = delivery.body
    return {
        "reason": letter.reason_detail,
        "dead_lettered_by": letter.dead_lettered_by,
        "original_exchange": letter.original_exchange,
        "original_routing_key": letter.original_routing_key,
        "original_queue": letter.original_queue,
        "retry_count": letter.retry_count,
        "age_seconds": letter.age(now),
        "delivered_with": {
            "exchange": delivery.exchange,
            "routing_key": delivery.routing_key,
        },
        "properties": properties,
        "headers": dict(delivery.properties.headers or {}),
        "body_bytes": len(body),
        "body_preview": body[:BODY_PREVIEW].decode("utf-8", "replace"),
    }


def format_letter(described: dict[str, Any]) -> str:
    """:func:`describe_letter`'s dict as indented text."""
    lines = [
        f"reason: {_shown(described['reason'])} "
        f"(by {described['dead_lettered_by']}); "
        f"age {_age(described['age_seconds'])}; "
        f"retry count {described['retry_count']}",
        f"original: exchange {described['original_exchange']!r}, routing key "
        f"{described['original_routing_key']!r}, queue {described['original_queue']!r}",
        "properties:",
        *(f"  {key}: {value!r}" for key, value in described["properties"].items()),
        "headers:",
        *(f"  {key}: {value!r}" for key, value in described["headers"].items()),
        f"body ({described['body_bytes']} bytes): {described['body_preview']!r}",
    ]
    return "\n".join(lines)


class Progress:
    """A bar redrawn in place on a terminal; otherwise one line per tenth."""

    def __init__(self, out: TextIO, verb: str, *, quiet: bool, bar: bool) -> None:
        """``verb`` in the past tense: ``replayed``, ``removed``."""
        self._out = out
        self._verb = verb
        self._quiet = quiet
        self._bar = bar
        self._tenths = 0

    def update(self, scanned: int, total: int, acted: int) -> None:
        """After each message scanned; ``acted`` replayed or removed so far."""
        if self._quiet or not total:
            return
        if self._bar:
            width = 30
            filled = width * scanned // total
            bar = f"[{'#' * filled}{'.' * (width - filled)}]"
            print(
                f"\r{bar} {scanned}/{total} scanned, {acted} {self._verb}",
                end="",
                file=self._out,
                flush=True,
            )
        elif 10 * scanned // total > self._tenths:
            self._tenths = 10 * scanned // total
            print(
                f"progress: {scanned}/{total} scanned, {acted} {self._verb}",
                file=self._out,
                flush=True,
            )

    def done(self, scanned: int, total: int, acted: int) -> None:
        """The end of the pass (ends the bar's line)."""
        if self._bar and not self._quiet and total:
            print(file=self._out, flush=True)
