"""Dead-letter headers as RabbitMQ writes them (sans-IO)."""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import Any

import attrs

from .._base import Properties

__all__ = ["dead_letter_properties", "is_cycle"]


def _deaths(headers: Mapping[str, Any]) -> list[dict[str, Any]]:
    value = headers.get("x-death")
    if not isinstance(value, list | tuple):
        return []
    return [dict(entry) for entry in value if isinstance(entry, Mapping)]


def dead_letter_properties(
    properties: Properties,
    *,
    reason: str,
    queue: str,
    exchange: str,
    routing_key: str,
    now: datetime.datetime | None = None,
) -> Properties:
    """``properties`` with the ``x-death`` entry for dying in ``queue``.

    Like RabbitMQ: the newest entry comes first; dying again in the same queue for
    the same reason increments that entry's ``count`` and moves it to the front;
    ``x-first-death-*`` are set once and ``x-last-death-*`` every time; a
    per-message ``expiration`` moves to the entry's ``original-expiration`` so the
    message does not expire again.
    """
    headers = dict(properties.headers or {})
    deaths = _deaths(headers)
    when = (now or datetime.datetime.now(datetime.timezone.utc)).replace(microsecond=0)
    for index, entry in enumerate(deaths):
        if entry.get("queue") == queue and entry.get("reason") == reason:
            del deaths[index]
            count = entry.get("count")
            entry["count"] = (count if isinstance(count, int) else 0) + 1
            break
    else:
        entry = {
            "count": 1,
            "reason": reason,
            "queue": queue,
            "time": when,
            "exchange": exchange,
            "routing-keys": [routing_key],
        }
        if properties.expiration is not None:
            entry["original-expiration"] = properties.expiration
    deaths.insert(0, entry)
    headers["x-death"] = deaths
    headers.setdefault("x-first-death-reason", reason)
    headers.setdefault("x-first-death-queue", queue)
    headers.setdefault("x-first-death-exchange", exchange)
    headers["x-last-death-reason"] = reason
    headers["x-last-death-queue"] = queue
    headers["x-last-death-exchange"] = exchange
    return attrs.evolve(properties, headers=headers, expiration=None)


def is_cycle(properties: Properties, target_queue: str) -> bool:
    """Whether dead-lettering into ``target_queue`` closes a cycle with no
    rejection in it (RabbitMQ drops such messages instead of looping)."""
    for entry in _deaths(properties.headers or {}):  # newest first
        if entry.get("reason") == "rejected":
            return False
        if entry.get("queue") == target_queue:
            return True
    return False
