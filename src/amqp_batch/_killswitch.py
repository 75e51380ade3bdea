"""The kill switch: a circuit breaker over handler results, sans-IO.

It is fed the time and the counts of ok and failed results of each finished
batch, and answers whether the worker may take another batch. Nothing here
sleeps, reads a clock or talks to the broker: the worker passes ``now`` in.

States::

    closed ──(failed share >= threshold over the window, >= min_samples)──> open
    open ──(cooldown elapsed)──> half_open
    half_open ──(probe batch ok)──> closed        (the window starts afresh)
    half_open ──(probe batch failed)──> open      (another cooldown)

* **closed**: batches flow; results go into a sliding window of ``window``
  seconds. It trips when the window holds at least ``min_samples`` results
  and the failed share is at least ``threshold``.
* **open**: no batch may start (the worker stops taking deliveries). Results
  of batches that were already running are ignored: they say nothing about
  the dependency *now*.
* **half_open**: once ``cooldown`` seconds passed, exactly one probe batch
  may start (:meth:`KillSwitch.begin_batch`); its result decides, by the same
  threshold (a probe needs no minimum of samples).
"""

from __future__ import annotations

import collections
from typing import Literal

import attrs

__all__ = ["KillSwitch", "KillSwitchState", "Transition"]

#: Where the kill switch is: the very words ``WorkerHealth.kill_switch`` and the
#: logs show (mypy rejects a comparison with any other string).
KillSwitchState = Literal["closed", "open", "half_open"]


@attrs.frozen(kw_only=True)
class Transition:
    """One change of state, for the logs and ``health()``."""

    at: float
    old: KillSwitchState
    new: KillSwitchState
    reason: str


class KillSwitch:
    """A circuit breaker fed per-batch result counts (see the module doc)."""

    def __init__(
        self,
        *,
        threshold: float,
        window: float,
        min_samples: int,
        cooldown: float,
    ) -> None:
        if not 0 < threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
        self.threshold = threshold
        self.window = window
        self.min_samples = min_samples
        self.cooldown = cooldown
        self._state: KillSwitchState = "closed"
        self._samples: collections.deque[tuple[float, int, int]] = collections.deque()
        self._ok = 0
        self._failed = 0
        self._reopen_at = 0.0
        self._probing = False
        #: Every transition so far, oldest first (the last 100 kept).
        self.transitions: collections.deque[Transition] = collections.deque(maxlen=100)

    @property
    def state(self) -> KillSwitchState:
        """The current state (``open`` turns ``half_open`` only in :meth:`allows`)."""
        return self._state

    def allows(self, now: float) -> bool:
        """True when a new batch may start at ``now``."""
        if self._state == "open" and now >= self._reopen_at:
            self._move(now, "half_open", "cooldown over: probing")
        if self._state == "half_open":
            return not self._probing
        return self._state == "closed"

    def wait_time(self, now: float) -> float:
        """Seconds until :meth:`allows` may turn true by itself (0 when it is
        true now; ``inf`` while a probe batch is out: its result decides)."""
        if self.allows(now):
            return 0.0
        if self._state == "open":
            return self._reopen_at - now
        return float("inf")

    def begin_batch(self, now: float) -> None:
        """A batch starts; in ``half_open`` it is the probe (the only one)."""
        if self._state == "half_open":
            self._probing = True

    def record(self, now: float, ok: int, failed: int) -> Transition | None:
        """Feed the results of one finished batch; returns the transition it
        caused, if any."""
        if self._state == "open":
            return None
        if self._state == "half_open":
            if not self._probing:
                return None  # a batch that started before the switch opened
            self._probing = False
            if ok + failed and failed / (ok + failed) >= self.threshold:
                return self._trip(now, f"probe failed: {failed} of {ok + failed}")
            self._clear()
            return self._move(now, "closed", "probe succeeded")
        self._samples.append((now, ok, failed))
        self._ok += ok
        self._failed += failed
        self._expire(now)
        total = self._ok + self._failed
        if total >= self.min_samples and self._failed / total >= self.threshold:
            return self._trip(
                now,
                f"{self._failed} of {total} results failed in the last "
                f"{self.window:g} s",
            )
        return None

    def _expire(self, now: float) -> None:
        horizon = now - self.window
        while self._samples and self._samples[0][0] < horizon:
            _, ok, failed = self._samples.popleft()
            self._ok -= ok
            self._failed -= failed

    def _clear(self) -> None:
        self._samples.clear()
        self._ok = self._failed = 0

    def _trip(self, now: float, reason: str) -> Transition:
        self._clear()
        self._reopen_at = now + self.cooldown
        return self._move(now, "open", reason)

    def _move(self, now: float, new: KillSwitchState, reason: str) -> Transition:
        transition = Transition(at=now, old=self._state, new=new, reason=reason)
        self._state = new
        self.transitions.append(transition)
        return transition
