"""CPU time of a measured consumer and of the broker, over the timed window.

Standard library only: the peer drivers import it under their own interpreters
(``bench/.venvs/*``). Every measurement process wraps its timed window in a
:class:`Meter`; the result carries

- ``cpu_seconds``: the process's own user + system time in the window
  (``getrusage(RUSAGE_SELF)``, all its threads);
- ``wall``: the window's start and end on the wall clock (``time.time()``), so
  that the runner can merge the windows of several processes started together;
- ``broker_cpu``: the broker's cumulative user + system time at the window's
  start and end (``/proc/<pid>/stat`` of ``beam.smp``), when the runner found the
  broker's process and passed its pid in ``AMQP_BATCH_BENCH_BROKER_PID``.
"""

from __future__ import annotations

import os
import resource
import time
from typing import Any

BROKER_PID_VARIABLE = "AMQP_BATCH_BENCH_BROKER_PID"
_TICKS = os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """User + system CPU seconds of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` (``None`` if unreadable)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            text = stat.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces: split after its closing bracket.
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def listening_pid(port: int) -> int | None:
    """The pid of the local process listening on TCP ``port`` (needs /proc)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as lines:
                rows = lines.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            for fd in os.listdir(f"/proc/{entry}/fd"):
                if os.readlink(f"/proc/{entry}/fd/{fd}") in inodes:
                    return int(entry)
        except OSError:
            continue
    return None


def broker_pid() -> int | None:
    """The broker's pid from the environment the runner set, if any."""
    value = os.environ.get(BROKER_PID_VARIABLE, "")
    return int(value) if value.isdigit() else None


class Meter:
    """Times one window: wall clock, own CPU and the broker's CPU.

    ``start()`` and ``stop()`` return like a stopwatch (``stop()`` gives the
    window in seconds, from ``time.perf_counter``); ``figures()`` gives what the
    result JSON carries.
    """

    def __init__(self) -> None:
        self.broker = broker_pid()
        self._started = 0.0
        self.seconds = 0.0
        self._figures: dict[str, Any] = {}

    def start(self) -> None:
        self._figures = {
            "wall": [time.time()],
            "cpu_start": own_cpu_seconds(),
            "broker_cpu": [process_cpu_seconds(self.broker)] if self.broker else None,
        }
        self._started = time.perf_counter()

    def stop(self) -> float:
        self.seconds = time.perf_counter() - self._started
        figures = self._figures
        figures["cpu_seconds"] = own_cpu_seconds() - figures.pop("cpu_start")
        figures["wall"].append(time.time())
        if figures["broker_cpu"] is not None and self.broker:
            figures["broker_cpu"].append(process_cpu_seconds(self.broker))
            if None in figures["broker_cpu"]:
                figures["broker_cpu"] = None
        return self.seconds

    def figures(self) -> dict[str, Any]:
        """``cpu_seconds``, ``wall`` and ``broker_cpu`` of the window."""
        return dict(self._figures)
