"""The base of the library's ``async with`` objects (consumer, publisher)."""

from __future__ import annotations

from types import TracebackType

__all__ = ["AsyncContext"]


class AsyncContext:
    """An ``async with`` object: a subclass defines ``__aenter__`` and
    :meth:`_aexit`.

    Leaving the block runs :meth:`_aexit` whether the body returned or raised;
    the body's exception is not passed on (it propagates by itself, and what
    closing does does not depend on it).
    """

    async def _aexit(self) -> None:
        raise NotImplementedError

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self._aexit()
