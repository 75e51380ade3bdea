"""Dead-letter queue tooling, sans-IO: what a dead letter says about itself, filters,
grouping, and the properties of a replayed copy.

``amqp-batch dlq`` (``_cli/_dlq.py``) does the broker work; everything here is pure
so it can be tested without one.

Where a dead letter's facts come from:

- **reason**: ``x-dead-letter-reason`` when the library dead-lettered it (a copy
  that ran out of REQUEUEs, a bad ``x-retry-count``...; the part before ``": "``,
  e.g. ``invalid-retry-count``), else the newest ``x-death`` entry's reason when
  RabbitMQ did (``rejected``, ``expired``, ``maxlen``, ``delivery_limit``), else
  ``unknown``. A replay removes ``x-dead-letter-reason``, so a header that is
  present always describes the latest death.
- **original destination**: ``x-original-exchange`` / ``x-original-routing-key``
  (set by the library on its copies and dead letters), else the newest ``x-death``
  entry's exchange and first routing key, else the exchange and routing key the
  dead letter was delivered with.
- **age**: from the newest ``x-death`` entry's ``time``, else the message's
  ``timestamp`` property; ``None`` when neither is set.
"""

from __future__ import annotations

import datetime
import fnmatch
import hashlib
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs

from ._retry import (
    DEAD_LETTER_REASON_HEADER,
    ORIGINAL_EXCHANGE_HEADER,
    ORIGINAL_ROUTING_KEY_HEADER,
    RETRY_COUNT_HEADER,
    InvalidRetryCount,
    parse_retry_count,
)
from ._transport._base import Delivery, Properties

__all__ = [
    "AGE_BUCKETS",
    "REPLAYED_AT_HEADER",
    "REPLAY_ID_HEADER",
    "REPLAY_KEY_HEADER",
    "DeadLetter",
    "Filters",
    "Groups",
    "age_bucket",
    "group",
    "parse_duration",
    "parse_header_filter",
    "replay_properties",
]

#: When the copy was replayed (an AMQP timestamp, UTC).
REPLAYED_AT_HEADER = "x-replayed-at"
#: The id of the replay run that published the copy (one per command run).
REPLAY_ID_HEADER = "x-replay-id"
#: A fingerprint of the dead letter the copy was made from: the same dead letter
#: replayed twice (a replay killed between a confirm and its ack, then run again)
#: gives two copies with the same key, so duplicates are recognisable.
REPLAY_KEY_HEADER = "x-replay-key"

_UTC = datetime.timezone.utc
_DURATION = re.compile(r"(?P<number>\d+(?:\.\d+)?)(?P<unit>ms|s|m|h|d|w)?")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """Seconds in ``text``: ``90``, ``90s``, ``15m``, ``2h``, ``1d``, ``1h30m``.

    Raises :class:`ValueError` for anything else (a negative or empty duration).
    """
    position, total = 0, 0.0
    compact = text.strip().replace(" ", "")
    while position < len(compact):
        match = _DURATION.match(compact, position)
        if match is None:
            break
        total += float(match["number"]) * _UNITS[match["unit"] or "s"]
        position = match.end()
    if not compact or position != len(compact):
        raise ValueError(
            f"not a duration: {text!r} (examples: 90s, 15m, 2h, 1d, 1h30m)"
        )
    return total


def parse_header_filter(text: str) -> tuple[str, str]:
    """``key=value`` as ``(key, value)``; :class:`ValueError` if malformed."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"not KEY=VALUE: {text!r}")
    return key.strip(), value


def _text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    return None


def _newest_death(headers: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The newest ``x-death`` entry (RabbitMQ keeps them newest first)."""
    deaths = headers.get("x-death")
    if isinstance(deaths, Sequence) and not isinstance(deaths, str | bytes):
        for entry in deaths:
            if isinstance(entry, Mapping):
                return entry
    return None


def _aware(value: Any) -> datetime.datetime | None:
    if not isinstance(value, datetime.datetime):
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=_UTC)


@attrs.frozen(kw_only=True)
class DeadLetter:
    """One message of a dead-letter queue and what its headers say."""

    delivery: Delivery
    #: ``rejected``, ``expired``, ``maxlen``, ``delivery_limit`` (RabbitMQ), the
    #: library's reasons (``max-requeue-attempts``...), or ``unknown``.
    reason: str
    #: The whole ``x-dead-letter-reason`` (with its detail), or the same as reason.
    reason_detail: str
    #: ``broker`` (``x-death``), ``library`` (``x-dead-letter-reason``) or ``unknown``.
    dead_lettered_by: str
    original_exchange: str
    original_routing_key: str
    #: The queue the message died in (``x-death``), when known.
    original_queue: str | None
    #: ``x-retry-count``; ``None`` when it is present but not a valid count.
    retry_count: int | None
    #: When it was dead-lettered (or published, see the module doc), if known.
    died_at: datetime.datetime | None

    @classmethod
    def from_delivery(cls, delivery: Delivery) -> DeadLetter:
        """Read the facts of a dead letter from its delivery."""
        headers = delivery.properties.headers or {}
        death = _newest_death(headers)
        library_reason = _text(headers.get(DEAD_LETTER_REASON_HEADER))
        if library_reason is not None:
            by, detail = "library", library_reason
        elif death is not None and _text(death.get("reason")):
            by, detail = "broker", str(_text(death.get("reason")))
        else:
            by, detail = "unknown", "unknown"
        exchange, routing_key = _original(delivery, headers, death)
        try:
            retry_count: int | None = parse_retry_count(headers)
        except InvalidRetryCount:
            retry_count = None
        died_at = _aware(death.get("time")) if death is not None else None
        return cls(
            delivery=delivery,
            reason=detail.split(": ", 1)[0].strip() or "unknown",
            reason_detail=detail,
            dead_lettered_by=by,
            original_exchange=exchange,
            original_routing_key=routing_key,
            original_queue=_text(death.get("queue")) if death is not None else None,
            retry_count=retry_count,
            died_at=died_at or _aware(delivery.properties.timestamp),
        )

    def age(self, now: datetime.datetime) -> float | None:
        """Seconds since it died (see :attr:`died_at`), or ``None``."""
        if self.died_at is None:
            return None
        return max(0.0, (now - self.died_at).total_seconds())

    def replay_key(self) -> str:
        """A fingerprint of this dead letter: body, identifying properties, headers
        and destination. Copies of the same dead letter share it."""
        props = self.delivery.properties
        digest = hashlib.sha256()
        for part in (
            self.delivery.body,
            repr(props.message_id).encode(),
            repr(props.correlation_id).encode(),
            repr(props.timestamp).encode(),
            repr(sorted((props.headers or {}).items(), key=lambda kv: kv[0])).encode(),
            self.original_exchange.encode(),
            self.original_routing_key.encode(),
        ):
            digest.update(len(part).to_bytes(8, "big"))
            digest.update(part)
        return digest.hexdigest()[:32]


def _original(
    delivery: Delivery, headers: Mapping[str, Any], death: Mapping[str, Any] | None
) -> tuple[str, str]:
    exchange = _text(headers.get(ORIGINAL_EXCHANGE_HEADER))
    routing_key = _text(headers.get(ORIGINAL_ROUTING_KEY_HEADER))
    if exchange is not None and routing_key is not None:
        return exchange, routing_key
    if death is not None:
        keys = death.get("routing-keys")
        death_exchange = _text(death.get("exchange"))
        if isinstance(keys, Sequence) and keys and death_exchange is not None:
            first = _text(keys[0])
            if first is not None:
                return death_exchange, first
    return delivery.exchange, delivery.routing_key


@attrs.frozen(kw_only=True)
class Filters:
    """Which dead letters a command acts on; every given criterion must match."""

    #: Reasons (as :attr:`DeadLetter.reason`); empty matches any.
    reasons: frozenset[str] = frozenset()
    #: A glob (``orders.*``, ``*.eu``) on the original routing key.
    routing_key: str | None = None
    #: Header values, compared as text.
    headers: tuple[tuple[str, str], ...] = ()
    #: Only dead letters at least this many seconds old (unknown age: no match).
    older_than: float | None = None

    @property
    def any(self) -> bool:
        """True when at least one criterion is set."""
        return bool(
            self.reasons
            or self.routing_key is not None
            or self.headers
            or self.older_than is not None
        )

    def matches(self, letter: DeadLetter, now: datetime.datetime) -> bool:
        """True when ``letter`` passes every criterion."""
        if self.reasons and letter.reason not in self.reasons:
            return False
        if self.routing_key is not None and not fnmatch.fnmatchcase(
            letter.original_routing_key, self.routing_key
        ):
            return False
        headers = letter.delivery.properties.headers or {}
        for key, value in self.headers:
            if key not in headers or _header_text(headers[key]) != value:
                return False
        if self.older_than is not None:
            age = letter.age(now)
            if age is None or age < self.older_than:
                return False
        return True


def _header_text(value: Any) -> str:
    text = _text(value)
    if text is not None:
        return text
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


#: Age buckets of :attr:`Groups.by_age`: (upper bound in seconds, label).
AGE_BUCKETS = (
    (60.0, "< 1 min"),
    (3600.0, "< 1 h"),
    (86400.0, "< 1 d"),
    (604800.0, "< 7 d"),
    (float("inf"), ">= 7 d"),
)


def age_bucket(age: float | None) -> str:
    """The :data:`AGE_BUCKETS` label of ``age`` seconds (``unknown`` for None)."""
    if age is None:
        return "unknown"
    return next(label for bound, label in AGE_BUCKETS if age < bound)


@attrs.define
class Groups:
    """Counts of dead letters by reason, original destination, retry count, who
    dead-lettered them and age."""

    total: int = 0
    by_reason: Counter[str] = attrs.Factory(Counter)
    by_destination: Counter[tuple[str, str]] = attrs.Factory(Counter)
    by_retry_count: Counter[str] = attrs.Factory(Counter)
    by_dead_lettered_by: Counter[str] = attrs.Factory(Counter)
    by_age: Counter[str] = attrs.Factory(Counter)
    oldest: float | None = None
    newest: float | None = None

    def add(self, letter: DeadLetter, now: datetime.datetime) -> None:
        """Count ``letter``."""
        self.total += 1
        self.by_reason[letter.reason] += 1
        self.by_destination[
            (letter.original_exchange, letter.original_routing_key)
        ] += 1
        count = "invalid" if letter.retry_count is None else str(letter.retry_count)
        self.by_retry_count[count] += 1
        self.by_dead_lettered_by[letter.dead_lettered_by] += 1
        age = letter.age(now)
        self.by_age[age_bucket(age)] += 1
        if age is not None:
            self.oldest = age if self.oldest is None else max(self.oldest, age)
            self.newest = age if self.newest is None else min(self.newest, age)

    def as_json(self) -> dict[str, Any]:
        """A JSON-ready dict (destinations as ``{exchange, routing_key, count}``)."""
        return {
            "total": self.total,
            "by_reason": dict(self.by_reason.most_common()),
            "by_original_destination": [
                {"exchange": exchange, "routing_key": key, "count": n}
                for (exchange, key), n in self.by_destination.most_common()
            ],
            "by_retry_count": dict(self.by_retry_count.most_common()),
            "by_dead_lettered_by": dict(self.by_dead_lettered_by.most_common()),
            "by_age": {
                label: self.by_age[label]
                for label in [*(label for _, label in AGE_BUCKETS), "unknown"]
                if self.by_age[label]
            },
            "age_seconds": {"oldest": self.oldest, "newest": self.newest},
        }


def group(letters: Iterable[DeadLetter], now: datetime.datetime) -> Groups:
    """:class:`Groups` of ``letters``."""
    groups = Groups()
    for letter in letters:
        groups.add(letter, now)
    return groups


def replay_properties(
    letter: DeadLetter,
    *,
    replay_id: str,
    now: datetime.datetime,
    keep_retry_count: bool = False,
) -> Properties:
    """The properties of the replayed copy of ``letter``.

    Every property and header is kept except ``user_id`` (the broker refuses a
    foreign one), ``expiration`` when the message died of it (it would expire
    again at once), ``x-dead-letter-reason`` (it is no longer dead) and, unless
    ``keep_retry_count``, ``x-retry-count`` (the retries start again). The
    ``x-death`` history stays. Added: :data:`REPLAYED_AT_HEADER`,
    :data:`REPLAY_ID_HEADER` and :data:`REPLAY_KEY_HEADER`.
    """
    old = letter.delivery.properties
    headers = dict(old.headers or {})
    headers.pop(DEAD_LETTER_REASON_HEADER, None)
    if not keep_retry_count:
        headers.pop(RETRY_COUNT_HEADER, None)
    headers[REPLAYED_AT_HEADER] = now
    headers[REPLAY_ID_HEADER] = replay_id
    headers[REPLAY_KEY_HEADER] = letter.replay_key()
    expiration = None if letter.reason == "expired" else old.expiration
    return attrs.evolve(old, headers=headers, user_id=None, expiration=expiration)
