"""The pipe that ties an ``amqp-batch run --processes`` child to its supervisor.

The supervisor keeps the write end of a pipe open and never writes to it; each
child gets the read end, named by :data:`SUPERVISOR_FD_ENV`. The kernel closes
the write end when the supervisor exits, however it exits (SIGKILL included),
and the child then reads end-of-file and drains as on SIGTERM.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Awaitable, Callable

import anyio

from ._common import CLIError

__all__ = ["SUPERVISOR_FD_ENV", "take_lifeline", "watch_lifeline"]

logger = logging.getLogger("amqp_batch.cli")

#: In a supervised child: the descriptor of the read end of the supervisor's pipe.
SUPERVISOR_FD_ENV = "AMQP_BATCH_SUPERVISOR_FD"


def take_lifeline() -> int | None:
    """The supervisor's pipe when this process is a supervised child, else None.

    The variable is removed from the environment and the descriptor made
    non-inheritable, so a process the handler starts is not tied to it. Raises
    :class:`CLIError` when the variable names no pipe.
    """
    text = os.environ.pop(SUPERVISOR_FD_ENV, None)
    if text is None:
        return None
    problem = f"{SUPERVISOR_FD_ENV}={text!r} names no pipe from a supervisor"
    try:
        fd = int(text)
        mode = os.fstat(fd).st_mode
    except (ValueError, OSError):
        raise CLIError(problem) from None
    if not stat.S_ISFIFO(mode):
        raise CLIError(problem)
    os.set_inheritable(fd, False)
    return fd


async def watch_lifeline(fd: int, stop: Callable[[], Awaitable[None]]) -> None:
    """Wait until the supervisor is gone, then ``stop``. Nothing is ever
    written to the pipe, so ``fd`` becomes readable only at its end-of-file."""
    await anyio.wait_readable(fd)
    logger.warning("the supervisor is gone: stopping gracefully")
    await stop()
