"""Typed message bodies: decoders, and the decode step before the handler.

A decoder turns a body and its ``content_type`` into a value
(:class:`Decoder`). Give one to the consumer (``batch_consumer(settings,
handle, decoder=...)`` or a ``decoder`` attribute on a
:class:`~amqp_batch.BatchConsumer` subclass) and every message reaches the
handler with :attr:`Message.value <amqp_batch.Message.value>` set. A body that
does not decode never reaches the handler: it is dead-lettered with
``x-dead-letter-reason: decode-error`` and the error's class in
``x-decode-error-class``, and counted as ``decode_error`` in the worker's health.

Ready decoders: :func:`json_decoder` (stdlib), :func:`msgspec_decoder`
(``amqp-batch[msgspec]``) and :func:`pydantic_decoder` (``amqp-batch[pydantic]``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar, overload

from ._actors.planner import DECODE_ERROR, DeadLetter, Disposition
from ._message import Message

__all__ = [
    "DECODE_ERROR",
    "DECODE_ERROR_CLASS_HEADER",
    "Decoder",
    "UnsupportedContentType",
    "decode_batch",
    "json_decoder",
    "msgspec_decoder",
    "pydantic_decoder",
]

logger = logging.getLogger("amqp_batch.handler")

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)

#: The header that names the decoder's exception class (``module.QualName``).
DECODE_ERROR_CLASS_HEADER = "x-decode-error-class"
#: Content types the JSON decoders accept (besides none at all and ``*+json``).
JSON_CONTENT_TYPES = frozenset({"application/json", "text/json"})


class Decoder(Protocol[T_co]):
    """Turns a message body into a value: ``decoder(body, content_type)``.

    ``content_type`` is the message's property (``None`` when the producer set
    none). Raise any :class:`Exception` for a body that is not acceptable: the
    message is dead-lettered instead of reaching the handler.
    """

    def __call__(self, body: bytes, content_type: str | None, /) -> T_co:
        """Decode one body."""
        ...


class UnsupportedContentType(ValueError):
    """The message's ``content_type`` is not one the decoder reads."""


def _check_json(content_type: str | None) -> None:
    if content_type is None:
        return
    media = content_type.split(";", 1)[0].strip().lower()
    if media not in JSON_CONTENT_TYPES and not media.endswith("+json"):
        raise UnsupportedContentType(f"not a JSON content type: {media[:100]!r}")


@overload
def json_decoder() -> Decoder[Any]: ...
@overload
def json_decoder(into: Callable[[Any], T]) -> Decoder[T]: ...
def json_decoder(into: Callable[[Any], Any] | None = None) -> Decoder[Any]:
    """A JSON decoder (the stdlib's ``json``): the parsed value, or ``into(parsed)``
    when ``into`` is given (e.g. ``json_decoder(lambda d: Order(**d))``).

    Accepts messages without a content type, ``application/json``,
    ``text/json`` and ``*+json``; others raise :class:`UnsupportedContentType`.
    """

    def decode(body: bytes, content_type: str | None, /) -> Any:
        _check_json(content_type)
        parsed = json.loads(body)
        return parsed if into is None else into(parsed)

    return decode


def msgspec_decoder(type_: type[T]) -> Decoder[T]:
    """A JSON decoder into ``type_`` with `msgspec <https://jcristharif.com/msgspec/>`_
    (``pip install 'amqp-batch[msgspec]'``): a ``msgspec.Struct``, a dataclass,
    a ``TypedDict``...; validation errors dead-letter the message."""
    import msgspec

    decoder = msgspec.json.Decoder(type_)

    def decode(body: bytes, content_type: str | None, /) -> T:
        _check_json(content_type)
        return decoder.decode(body)

    return decode


def pydantic_decoder(type_: type[T]) -> Decoder[T]:
    """A JSON decoder into ``type_`` with `pydantic <https://docs.pydantic.dev>`_ 2
    (``pip install 'amqp-batch[pydantic]'``): a ``BaseModel`` or any type a
    ``TypeAdapter`` validates; validation errors dead-letter the message."""
    from pydantic import TypeAdapter

    adapter = TypeAdapter(type_)

    def decode(body: bytes, content_type: str | None, /) -> T:
        _check_json(content_type)
        return adapter.validate_json(body)

    return decode


def _error_class(exc: BaseException) -> str:
    kind = type(exc)
    return f"{kind.__module__}.{kind.__qualname__}"


def decode_batch(
    batch: Sequence[Message], decoder: Decoder[Any] | None
) -> tuple[list[Message], list[tuple[Message, Disposition]]]:
    """Decode every message of ``batch``: (the decoded ones, in order; the ones
    to dead-letter with their :class:`~._actors.planner.DeadLetter`).

    Without a decoder the batch is returned as it is. Only ``Exception`` s of
    the decoder are caught; the body and the error's text are never logged (they
    are the producer's data), only the class.
    """
    if decoder is None:
        return list(batch), []
    decoded: list[Message] = []
    failed: list[tuple[Message, Disposition]] = []
    for message in batch:
        try:
            value = decoder(message.body, message.content_type)
        except Exception as exc:
            name = _error_class(exc)
            logger.warning(
                "message %r (delivery %d) did not decode (%s); dead-lettering it",
                message.message_id,
                message.delivery_tag,
                name,
            )
            detail = {DECODE_ERROR_CLASS_HEADER: name}
            failed.append((message, DeadLetter(DECODE_ERROR, headers=detail)))
        else:
            decoded.append(
                Message(message.delivery, retry_count=message.retry_count, value=value)
            )
    return decoded, failed
