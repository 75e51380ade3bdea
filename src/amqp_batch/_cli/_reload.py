"""``amqp-batch run --reload``: restart the consumer when its code changes (for
development; needs ``pip install 'amqp-batch[reload]'``, which adds watchfiles).

The command becomes a reloader: it runs the consumer as a child process (the same
command without ``--reload``) and watches the ``.py`` files in the directory of the
target's module, recursively. When one changes, it stops the child gracefully
(SIGTERM: the batches in the handler finish and are settled, prefetched messages
go back to the queue, bounded by ``shutdown_timeout``), then starts a new one,
which imports the new code. A child that exits on its own (an import error in
the new code) is restarted at the next change. SIGTERM/SIGINT stop the child and
the reloader.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import attrs

from .._settings import BatchConsumerSettings
from ._common import EXIT_OK, CLIError
from ._run import build_settings
from ._supervisor import KILL_GRACE, child_argv
from ._target import Target, load_target

__all__ = ["add_reload_arguments", "reload_command", "watched_directory"]

logger = logging.getLogger("amqp_batch.cli")


def add_reload_arguments(parser: argparse.ArgumentParser) -> None:
    """``--reload`` for ``run``."""
    group = parser.add_argument_group("development")
    group.add_argument(
        "--reload",
        action="store_true",
        help="restart the consumer gracefully whenever a .py file next to the "
        "target's module changes (needs pip install 'amqp-batch[reload]')",
    )


def watched_directory(target: Target) -> Path:
    """The directory of the module that defines the target's handler or class."""
    obj: Any = target.handler if target.handler is not None else target.consumer_class
    source = inspect.getsourcefile(inspect.unwrap(obj))
    if source is None:
        raise CLIError(f"--reload: cannot find the source file of {target.spec!r}")
    return Path(source).resolve().parent


@attrs.define
class _Reloader:
    command: list[str]
    directory: Path
    settings: BatchConsumerSettings
    stopping: anyio.Event = attrs.Factory(anyio.Event)
    process: anyio.abc.Process | None = None

    async def _start(self) -> anyio.abc.Process:
        process = await anyio.open_process(
            self.command, stdin=subprocess.DEVNULL, stdout=None, stderr=None,
            env={**os.environ}, start_new_session=True,
        )  # fmt: skip
        self.process = process
        logger.info("reload: consumer started, pid %d; watching %s for changes",
                    process.pid, self.directory)  # fmt: skip
        return process

    async def _signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as received:
            async for signum in received:
                self.stopping.set()
                if self.process is not None and self.process.returncode is None:
                    self.process.send_signal(signal.Signals(signum))

    async def _next_change(self, process: anyio.abc.Process | None) -> list[str]:
        """Changed paths, or ``[]`` when ``process`` exited or we were told to
        stop first."""
        import watchfiles

        changed: list[str] = []
        async with anyio.create_task_group() as group:

            async def watch() -> None:
                async for changes in watchfiles.awatch(
                    self.directory, watch_filter=watchfiles.PythonFilter()
                ):
                    changed.extend(sorted({path for _, path in changes}))
                    group.cancel_scope.cancel()

            async def end(waiting: Any) -> None:
                await waiting()
                group.cancel_scope.cancel()

            group.start_soon(watch)
            group.start_soon(end, self.stopping.wait)
            if process is not None:
                group.start_soon(end, process.wait)
        return changed

    async def _stop(self, process: anyio.abc.Process) -> int:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        with anyio.move_on_after(self.settings.shutdown_timeout + KILL_GRACE):
            return await process.wait()
        logger.warning("reload: pid %d did not stop: killed", process.pid)
        process.kill()
        return await process.wait()

    async def run(self) -> int:
        code = EXIT_OK
        async with anyio.create_task_group() as group:
            group.start_soon(self._signals)
            process: anyio.abc.Process | None = await self._start()
            while not self.stopping.is_set():
                changed = await self._next_change(process)
                if self.stopping.is_set():
                    break
                if not changed:  # the consumer exited on its own
                    assert process is not None
                    logger.warning("reload: consumer exited %s; restarting at the "
                                   "next change", process.returncode)  # fmt: skip
                    process = None
                    continue
                logger.info("reload: %s changed: restarting the consumer",
                            ", ".join(changed))  # fmt: skip
                if process is not None:
                    await self._stop(process)
                process = await self._start()
            if process is not None:
                code = await self._stop(process)
            group.cancel_scope.cancel()
        return code


def reload_command(args: argparse.Namespace) -> int:
    """``amqp-batch run --reload``: the exit code (raises :class:`CLIError`)."""
    if getattr(args, "processes", None) is not None:
        raise CLIError("--reload runs one consumer: drop --processes")
    if args.check:
        raise CLIError("--check runs once: drop --reload")
    try:
        import watchfiles  # noqa: F401
    except ImportError:
        raise CLIError(
            "--reload needs watchfiles: pip install 'amqp-batch[reload]'"
        ) from None
    target = load_target(args.target)
    settings = build_settings(args)
    command = [
        sys.executable, "-m", "amqp_batch", *child_argv(args.argv, flags=["--reload"])
    ]  # fmt: skip
    reloader = _Reloader(command, watched_directory(target), settings)
    code: int = anyio.run(reloader.run, backend=args.backend)
    return code
