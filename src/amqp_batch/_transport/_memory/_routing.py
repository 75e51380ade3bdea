"""Exchange routing rules of RabbitMQ, as pure functions (sans-IO)."""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any

__all__ = ["EXCHANGE_TYPES", "headers_match", "matches", "topic_match"]

#: The exchange types the memory broker models.
EXCHANGE_TYPES = frozenset({"direct", "fanout", "topic", "headers"})


def topic_match(pattern: str, routing_key: str) -> bool:
    """Whether a topic binding ``pattern`` matches ``routing_key``.

    Words are separated by ``.``; ``*`` matches exactly one word and ``#`` zero or
    more words, as in RabbitMQ.
    """
    return _topic_match(tuple(pattern.split(".")), tuple(routing_key.split(".")))


@lru_cache(maxsize=4096)
def _topic_match(pattern: tuple[str, ...], words: tuple[str, ...]) -> bool:
    if not pattern:
        return not words
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        # '#' swallows zero words, or one word and stays in place.
        return _topic_match(rest, words) or (
            bool(words) and _topic_match(pattern, words[1:])
        )
    if not words:
        return False
    return (head in ("*", words[0])) and _topic_match(rest, words[1:])


def headers_match(
    binding_arguments: Mapping[str, Any] | None, headers: Mapping[str, Any] | None
) -> bool:
    """Whether a headers-exchange binding matches a message's ``headers``.

    ``x-match`` is ``all`` (the default), ``any``, ``all-with-x`` or ``any-with-x``;
    the plain forms ignore binding keys that start with ``x-``. A binding with no
    keys to compare matches every message under ``all`` and none under ``any``.
    """
    arguments = dict(binding_arguments or {})
    mode = str(arguments.pop("x-match", "all"))
    headers = headers or {}
    with_x = mode.endswith("-with-x")
    wanted = {
        key: value
        for key, value in arguments.items()
        if with_x or not key.startswith("x-")
    }
    hits = (key in headers and headers[key] == value for key, value in wanted.items())
    if mode.startswith("any"):
        return any(hits)
    return all(hits)


def matches(
    exchange_type: str,
    binding_key: str,
    binding_arguments: Mapping[str, Any] | None,
    routing_key: str,
    headers: Mapping[str, Any] | None,
) -> bool:
    """Whether one binding of an exchange of ``exchange_type`` takes a message."""
    if exchange_type == "fanout":
        return True
    if exchange_type == "direct":
        return binding_key == routing_key
    if exchange_type == "topic":
        return topic_match(binding_key, routing_key)
    if exchange_type == "headers":
        return headers_match(binding_arguments, headers)
    return False
