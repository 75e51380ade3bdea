"""The shared token bucket, on virtual time: trio's MockClock (autojump) on trio,
and the same checks with an injected clock on both backends."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio
import anyio.lowlevel
import pytest
import trio
import trio.testing

from amqp_batch._ratelimit import RateLimiter

Clock = Callable[[], float]


class FakeClock:
    """A clock that only moves when a task sleeps (the earliest sleeper wakes)."""

    def __init__(self) -> None:
        self.now = 0.0
        self._sleepers: list[tuple[float, anyio.Event]] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        wake = anyio.Event()
        self._sleepers.append((self.now + seconds, wake))
        await wake.wait()

    async def run(self) -> None:
        """Advance to the earliest sleeper whenever every other task waits."""
        while True:
            await anyio.wait_all_tasks_blocked()
            if not self._sleepers:
                await anyio.lowlevel.checkpoint()
                continue
            self._sleepers.sort(key=lambda item: item[0])
            at, wake = self._sleepers.pop(0)
            self.now = max(self.now, at)
            wake.set()


Sleep = Callable[[float], Awaitable[object]]


async def _workers_share_the_rate(
    make: Callable[..., RateLimiter], clock: Clock, sleep: Sleep
) -> None:
    """Three workers, batches of 10, 50 msg/s with a burst of 50: by any time t
    at most 50 + 50 t messages went on, and the waits add up to that rate."""
    limiter = make(50.0, burst=50.0)
    start = clock()
    admitted: list[tuple[float, int]] = []
    waits: list[float] = []

    async def worker() -> None:
        for _ in range(10):
            waits.append(await limiter.acquire(10))
            admitted.append((clock() - start, 10))

    async with anyio.create_task_group() as group:
        for _ in range(3):
            group.start_soon(worker)
    total = 0
    for at, count in sorted(admitted):
        total += count
        assert total <= 50 + 50 * at + 1e-6
    # 300 messages: the first 50 at once, the other 250 at 50/s.
    assert max(at for at, _ in admitted) == pytest.approx(5.0)
    assert waits[:5] == [0.0] * 5  # the burst passes unthrottled


async def _wait_is_exactly_what_it_returns(
    make: Callable[..., RateLimiter], clock: Clock, sleep: Sleep
) -> None:
    """A batch is held by the wait the limiter imposes, and no longer; a batch
    bigger than the burst still passes, after its whole debt."""
    limiter = make(10.0, burst=5.0)
    before = clock()
    assert await limiter.acquire(5) == 0.0
    assert clock() == before
    wait = await limiter.acquire(20)  # 20 tokens of debt at 10/s
    assert wait == pytest.approx(2.0)
    assert clock() - before == pytest.approx(2.0)


async def _cancelled_wait_gives_tokens_back(
    make: Callable[..., RateLimiter], clock: Clock, sleep: Sleep
) -> None:
    limiter = make(1.0, burst=1.0)
    await limiter.acquire(1)
    with anyio.move_on_after(0):  # cancelled while waiting 100 s
        await limiter.acquire(100)
    await sleep(1.0)  # one token back: the next message goes on at once
    assert await limiter.acquire(1) == 0.0


CHECKS = [
    _workers_share_the_rate,
    _wait_is_exactly_what_it_returns,
    _cancelled_wait_gives_tokens_back,
]


@pytest.mark.trio
async def test_trio_mock_clock(autojump_clock: trio.testing.MockClock) -> None:
    for check in CHECKS:
        await check(RateLimiter, anyio.current_time, anyio.sleep)


@pytest.mark.parametrize("check", CHECKS)
async def test_injected_clock(
    check: Callable[[Callable[..., RateLimiter], Clock, Sleep], Awaitable[None]],
) -> None:
    clock = FakeClock()

    def make(rate: float, **kwargs: float) -> RateLimiter:
        return RateLimiter(rate, clock=clock, sleep=clock.sleep, **kwargs)

    async with anyio.create_task_group() as group:
        group.start_soon(clock.run)
        await check(make, clock, clock.sleep)
        group.cancel_scope.cancel()


def test_rate_is_validated() -> None:
    with pytest.raises(ValueError, match="rate"):
        RateLimiter(0)
