"""``amqp-batch run --processes N``: N consumer processes under one supervisor.

The supervisor starts N copies of the same ``amqp-batch run`` command (without
``--processes``), each an OS process of its own with its own ``--workers``
connections, in a session of its own so a terminal's Ctrl-C reaches only the
supervisor. It:

- forwards SIGTERM and SIGINT to every child, which drains gracefully (bounded by
  ``shutdown_timeout``); a second signal is forwarded too (the children stop at
  once); children still alive ``shutdown_timeout`` + :data:`KILL_GRACE` seconds
  after the first signal are killed (their unacked messages are redelivered);
- restarts a child that dies of anything else (a signal, an out-of-memory kill,
  an unexpected exit) after a back-off (``reconnect_backoff_base`` doubled per
  quick failure up to ``reconnect_backoff_cap``);
- stops every child and exits with the child's status when a child exits 1 or 2
  (the consumer stopped on a non-retryable error, or could not start: bad
  credentials, refused topology, bad settings), since a restart cannot fix that;
- holds the write end of a pipe whose read end every child watches
  (``_lifeline.py``): when the supervisor dies, even of SIGKILL, the
  kernel closes it, each child reads end-of-file and drains as on SIGTERM, so no
  consumer outlives its supervisor. (A pipe, not Linux's ``PR_SET_PDEATHSIG``: it
  works on every POSIX system and needs no code between fork and exec.)

Exit status: 0 stopped by a signal and every child drained; 1 or 2 as the child
that failed (1 also when a child did not drain cleanly).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

import anyio
import anyio.abc
import attrs

from .._settings import BatchConsumerSettings
from ._common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, CLIError
from ._lifeline import SUPERVISOR_FD_ENV
from ._run import build_settings
from ._target import load_target

__all__ = [
    "KILL_GRACE",
    "add_supervisor_arguments",
    "child_argv",
    "supervise",
    "supervise_command",
]

logger = logging.getLogger("amqp_batch.cli")

#: Seconds past ``shutdown_timeout`` after which children still alive are killed.
KILL_GRACE = 5.0
#: A child that ran this long before dying restarts without back-off.
STABLE_AFTER = 60.0
#: Exit statuses of a child that a restart cannot fix.
FATAL = (EXIT_FAILED, EXIT_USAGE)


def _processes(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def add_supervisor_arguments(parser: argparse.ArgumentParser) -> None:
    """``--processes`` for ``run``."""
    group = parser.add_argument_group("processes")
    group.add_argument(
        "--processes",
        type=_processes,
        metavar="N",
        help="run N OS processes, each a full consumer with its own --workers "
        "connections, under a supervisor that forwards SIGTERM/SIGINT and restarts "
        "a process that crashes [default: this process only, no supervisor]",
    )


def child_argv(argv: Sequence[str], *, flags: Sequence[str] = ()) -> list[str]:
    """``argv`` without ``--processes N`` and the valueless ``flags`` (the
    children's command line)."""
    result: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--processes":
            skip = True
        elif not arg.startswith("--processes=") and arg not in flags:
            result.append(arg)
    return result


@attrs.define
class _Supervisor:
    command: list[str]
    count: int
    settings: BatchConsumerSettings
    #: The read end of the lifeline pipe, passed to every child; the write end
    #: stays open in this process only (``os.pipe`` descriptors are not
    #: inherited unless passed) until it exits.
    lifeline: int
    stopping: anyio.Event = attrs.Factory(anyio.Event)
    signals: int = 0
    children: dict[int, anyio.abc.Process] = attrs.Factory(dict)
    fatal: int | None = None
    unclean: bool = False

    def stop(self, signum: signal.Signals) -> None:
        """Forward ``signum`` to every child; the first time, stop restarting."""
        self.signals += 1
        self.stopping.set()
        for index, process in self.children.items():
            if process.returncode is None:
                logger.info("process %d (pid %d): sending %s", index, process.pid,
                            signal.Signals(signum).name)  # fmt: skip
                process.send_signal(signum)

    async def watch_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as received:
            async for signum in received:
                name = signal.Signals(signum).name
                if not self.signals:
                    logger.info(
                        "%s: stopping %d process(es) gracefully", name, self.count
                    )
                self.stop(signal.Signals(signum))

    async def kill_late(self) -> None:
        """After the first signal, kill children that outlive their drain."""
        await self.stopping.wait()
        await anyio.sleep(self.settings.shutdown_timeout + KILL_GRACE)
        for index, process in self.children.items():
            if process.returncode is None:
                logger.warning("process %d (pid %d) did not stop: killed", index,
                               process.pid)  # fmt: skip
                self.unclean = True
                process.kill()

    async def keep_running(self, index: int) -> None:
        """Run child ``index``; restart it until told to stop or it fails for good."""
        delay = self.settings.reconnect_backoff_base
        while not self.stopping.is_set():
            started = time.monotonic()
            env = {
                **os.environ,
                "AMQP_BATCH_PROCESS_INDEX": str(index),
                SUPERVISOR_FD_ENV: str(self.lifeline),
            }
            process = await anyio.open_process(
                self.command, stdin=subprocess.DEVNULL, stdout=None, stderr=None,
                env=env, start_new_session=True, pass_fds=(self.lifeline,),
            )  # fmt: skip
            self.children[index] = process
            logger.info("process %d: started, pid %d", index, process.pid)
            code = await process.wait()
            if self.stopping.is_set():
                self.unclean = self.unclean or code != EXIT_OK
                logger.info("process %d (pid %d): exited %d", index, process.pid, code)
                return
            if code in FATAL:
                logger.error("process %d exited %d: stopping all", index, code)
                self.fatal = self.fatal or code
                self.stop(signal.SIGTERM)
                return
            if time.monotonic() - started >= STABLE_AFTER:
                delay = self.settings.reconnect_backoff_base
            logger.warning("process %d (pid %d) died (%s): restarting in %.1f s",
                           index, process.pid, _how(code), delay)  # fmt: skip
            with anyio.move_on_after(delay):
                await self.stopping.wait()
            delay = min(delay * 2, self.settings.reconnect_backoff_cap)

    async def run(self) -> int:
        async with anyio.create_task_group() as group:
            group.start_soon(self.watch_signals)
            group.start_soon(self.kill_late)
            async with anyio.create_task_group() as children:
                for index in range(self.count):
                    children.start_soon(self.keep_running, index)
            group.cancel_scope.cancel()
        if self.fatal is not None:
            return self.fatal
        return EXIT_FAILED if self.unclean else EXIT_OK


def _how(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit status {code}"


def supervise(
    args: argparse.Namespace, settings: BatchConsumerSettings, argv: Sequence[str]
) -> int:
    """Run ``args.processes`` children of ``argv`` under a supervisor; the exit
    code."""
    if args.check:
        raise CLIError("--check runs in this process: drop --processes")
    command = [sys.executable, "-m", "amqp_batch", *child_argv(argv)]
    logger.info(
        "supervisor: %d process(es) of %s, %d worker(s) each; SIGINT or SIGTERM "
        "stops them",
        args.processes,
        args.target,
        settings.num_workers,
    )
    lifeline, keep_open = os.pipe()
    supervisor = _Supervisor(command, args.processes, settings, lifeline)
    try:
        code: int = anyio.run(supervisor.run, backend=args.backend)
    finally:
        os.close(lifeline)
        os.close(keep_open)
    return code


def supervise_command(args: argparse.Namespace) -> int:
    """``amqp-batch run --processes N``: check the target and settings here, then
    supervise the children (raises :class:`CLIError`)."""
    load_target(args.target)
    return supervise(args, build_settings(args), args.argv)
