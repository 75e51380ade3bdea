"""The pure parts of ``amqp-batch dlq``: what a dead letter says, filters, copies."""

from __future__ import annotations

import datetime
import io

import pytest

from amqp_batch._cli._dlq_output import Progress, print_groups
from amqp_batch._dlq import (
    REPLAY_KEY_HEADER,
    DeadLetter,
    Filters,
    age_bucket,
    group,
    parse_duration,
    parse_header_filter,
    replay_properties,
)
from amqp_batch._transport._base import Delivery, Properties

NOW = datetime.datetime(2026, 1, 2, tzinfo=datetime.timezone.utc)


def letter(headers: dict[str, object], **properties: object) -> DeadLetter:
    return DeadLetter.from_delivery(
        Delivery(
            delivery_tag=1,
            redelivered=False,
            exchange="orders.dlx",
            routing_key="orders.created",
            consumer_tag="",
            body=b"{}",
            properties=Properties(headers=headers, **properties),  # type: ignore[arg-type]
        )
    )


def broker_death(reason: str, minutes_ago: float = 0) -> dict[str, object]:
    return {
        "x-death": [
            {
                "reason": reason,
                "queue": "orders",
                "exchange": "orders",
                "routing-keys": ["orders.created", "cc.key"],
                "count": 1,
                "time": NOW - datetime.timedelta(minutes=minutes_ago),
            }
        ]
    }


def test_broker_dead_letter_facts_come_from_the_newest_x_death_entry() -> None:
    dead = letter(broker_death("expired", minutes_ago=90))
    assert (dead.reason, dead.dead_lettered_by) == ("expired", "broker")
    assert (dead.original_exchange, dead.original_routing_key) == (
        "orders",
        "orders.created",
    )
    assert dead.original_queue == "orders"
    assert dead.age(NOW) == 90 * 60
    assert dead.retry_count == 0


def test_library_dead_letter_reason_and_original_headers_win() -> None:
    dead = letter(
        {
            **broker_death("rejected"),
            "x-dead-letter-reason": "invalid-retry-count: x-retry-count is a str",
            "x-original-exchange": "",
            "x-original-routing-key": "orders",
            "x-retry-count": "3",
        }
    )
    assert (dead.reason, dead.dead_lettered_by) == ("invalid-retry-count", "library")
    assert dead.reason_detail.endswith("is a str")
    assert (dead.original_exchange, dead.original_routing_key) == ("", "orders")
    assert dead.retry_count is None  # not a valid count: shown as invalid
    assert group([dead], NOW).by_retry_count == {"invalid": 1}


def test_without_headers_the_delivery_says_where_it_came_from() -> None:
    dead = letter({})
    assert dead.reason == "unknown"
    assert (dead.original_exchange, dead.original_routing_key) == (
        "orders.dlx",
        "orders.created",
    )
    assert dead.age(NOW) is None


def test_filters_all_must_match() -> None:
    dead = letter({**broker_death("rejected", minutes_ago=30), "tenant": "eu"})
    assert Filters().matches(dead, NOW)
    assert Filters(reasons=frozenset({"rejected"}), routing_key="orders.*").matches(
        dead, NOW
    )
    assert Filters(headers=(("tenant", "eu"),), older_than=600).matches(dead, NOW)
    assert not Filters(reasons=frozenset({"expired"})).matches(dead, NOW)
    assert not Filters(routing_key="*.cancelled").matches(dead, NOW)
    assert not Filters(headers=(("tenant", "us"),)).matches(dead, NOW)
    assert not Filters(older_than=3600).matches(dead, NOW)
    assert not Filters(older_than=1).matches(letter({}), NOW)  # unknown age


def test_a_replayed_copy_resets_the_count_and_is_marked() -> None:
    dead = letter(
        {
            **broker_death("expired"),
            "x-retry-count": 2,
            "x-dead-letter-reason": "max-requeue-attempts",
        },
        user_id="producer",
        expiration="1000",
    )
    copy = replay_properties(dead, replay_id="run-1", now=NOW)
    headers = dict(copy.headers or {})
    assert "x-retry-count" not in headers
    assert "x-dead-letter-reason" not in headers
    assert headers["x-death"] == broker_death("expired")["x-death"]
    assert headers["x-replay-id"] == "run-1"
    assert headers[REPLAY_KEY_HEADER] == dead.replay_key()
    assert copy.user_id is None
    kept = replay_properties(dead, replay_id="run-2", now=NOW, keep_retry_count=True)
    assert dict(kept.headers or {})["x-retry-count"] == 2
    assert dict(kept.headers or {})[REPLAY_KEY_HEADER] == headers[REPLAY_KEY_HEADER]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90), ("90s", 90), ("15m", 900), ("2h", 7200), ("1d", 86400),
     ("1h30m", 5400), ("500ms", 0.5)],
)  # fmt: skip
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "-5m", "5 parsecs", "m"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


def test_header_filters() -> None:
    assert parse_header_filter("tenant=eu=1") == ("tenant", "eu=1")
    assert parse_header_filter("empty=") == ("empty", "")
    for bad in ("tenant", "=eu"):
        with pytest.raises(ValueError, match="KEY=VALUE"):
            parse_header_filter(bad)


def test_age_buckets() -> None:
    ages = [None, 5, 600, 7200, 3 * 86400, 30 * 86400]
    assert [age_bucket(a) for a in ages] == [
        "unknown", "< 1 min", "< 1 h", "< 1 d", "< 7 d", ">= 7 d"
    ]  # fmt: skip


@pytest.mark.parametrize("bar", [False, True])
def test_progress_is_a_bar_on_a_terminal_and_lines_otherwise(bar: bool) -> None:
    out = io.StringIO()
    progress = Progress(out, "replayed", quiet=False, bar=bar)
    for scanned in range(1, 101):
        progress.update(scanned, 100, scanned // 2)
    progress.done(100, 100, 50)
    text = out.getvalue()
    if bar:
        assert text.count("\r") == 100  # redrawn in place
        assert text.endswith("] 100/100 scanned, 50 replayed\n")
    else:
        lines = text.splitlines()
        assert len(lines) == 10  # one per tenth
        assert lines[-1] == "progress: 100/100 scanned, 50 replayed"


def test_text_output_neutralises_control_characters() -> None:
    out = io.StringIO()
    dead = letter({"x-dead-letter-reason": "bad\x1b[2Jreason"})
    print_groups(out, "q", 1, 1, False, group([dead], NOW))
    assert "\x1b" not in out.getvalue()
    assert "bad?[2Jreason" in out.getvalue()
