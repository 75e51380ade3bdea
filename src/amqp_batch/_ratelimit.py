"""A token bucket shared by all workers of a consumer (``max_messages_per_second``).

Tokens refill at ``rate`` per second up to ``burst``. Taking ``n`` tokens never
blocks the bookkeeping: :meth:`RateLimiter.reserve` debits them at once (the
bucket may go into debt) and returns how long the caller must wait, so the
decision is atomic between tasks without a lock, callers are served first come
first served, and a batch larger than the burst still passes (it waits for
its whole debt). The limiter is applied to a *complete* batch, just before it
goes to the handler: a batch is held past its deadline by exactly the wait the
limiter imposes, never more, and never split.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio

__all__ = ["RateLimiter"]


class RateLimiter:
    """At most ``rate`` messages per second on average, bursts up to ``burst``.

    ``clock`` and ``sleep`` default to anyio's (so trio's ``MockClock`` drives
    it); tests may inject their own.
    """

    def __init__(
        self,
        rate: float,
        *,
        burst: float | None = None,
        clock: Callable[[], float] | None = None,
        sleep: Callable[[float], Awaitable[object]] | None = None,
    ) -> None:
        if not rate > 0:
            raise ValueError(f"rate must be > 0, got {rate!r}")
        self.rate = rate
        #: Tokens the bucket holds when full (default: one second's worth).
        self.burst = max(1.0, rate) if burst is None else burst
        self._clock = clock or anyio.current_time
        self._sleep = sleep or anyio.sleep
        self._tokens: float | None = None  # full on first use
        self._updated = 0.0

    def _refill(self) -> float:
        now = self._clock()
        if self._tokens is None:
            self._tokens = self.burst
        else:
            elapsed = max(0.0, now - self._updated)
            self._tokens = min(self.burst, self._tokens + elapsed * self.rate)
        self._updated = now
        return self._tokens

    def reserve(self, count: int) -> float:
        """Take ``count`` tokens now; return the seconds to wait before using
        them (0 when the bucket had them)."""
        tokens = self._refill() - count
        self._tokens = tokens
        return 0.0 if tokens >= 0 else -tokens / self.rate

    def refund(self, count: int) -> None:
        """Give back tokens a cancelled caller reserved but never used."""
        self._tokens = min(self.burst, self._refill() + count)

    async def acquire(self, count: int) -> float:
        """Wait until ``count`` messages may go on; returns the wait imposed.
        A cancelled wait gives its tokens back."""
        wait = self.reserve(count)
        if wait > 0:
            try:
                await self._sleep(wait)
            except BaseException:
                self.refund(count)
                raise
        return wait
