"""The amqp-batch benchmark: workloads W1-W7 with every peer in the same run.

    python bench/run.py [--runs 3] [--quick] [--soak] [--only W1,W2] [--url ...]
                        [--baseline REV] [--callgrind] [--out DIR]

(``nox -s bench`` runs this.) Peers, side by side on one broker:

- aio-pika-batch 0.1.0, in its own Python 3.12 virtual environment
  (``bench/.venvs/aio-pika-batch``, created on first use), driven by
  ``bench/peers/aio_pika_batch_driver.py``;
- what users would pick instead, each in its own virtual environment
  (``bench/.venvs/<name>``) and driven by ``bench/peers/<name>_driver.py``: a
  FastStream subscriber, a hand-written aio-pika batch loop, pika's
  BlockingConnection with multiple-acks;
- raw aiormq 7 and our transport's bare ceilings (``bench/transport.py``: W1's
  consume + ``ack(multiple=True)`` every 100, and W2's broker work done by hand);
- amqp-batch on asyncio and on trio, and with ``--baseline REV`` the amqp-batch
  of commit REV (a temporary git worktree under ``bench/.baseline``) in W1 and W2.

Every measurement runs in a fresh child process after the queue was filled with
confirms (persistent messages, durable queue); each reports its CPU time and the
broker's over its timed window (``bench/cpu.py``). Each figure is the median of
``--runs`` runs; the consumers are interleaved within each run. Writes
``latest.md``, ``latest.json`` and ``latest.png`` to ``--out`` (default
``bench/results``; a ``--quick`` run without ``--out`` writes to a temporary
directory, so that a smoke run never replaces the published results).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import cpu  # noqa: E402
import workloads  # noqa: E402
from workloads import (  # noqa: E402
    DRAIN_QUEUE,
    LATENCY_QUEUE,
    MIXED_DLQ,
    MIXED_DLX,
    MIXED_Q_DLQ,
    MIXED_Q_DLX,
    MIXED_Q_QUEUE,
    MIXED_QUEUE,
    OUTAGE_DLQ,
    OUTAGE_DLX,
    OUTAGE_QUEUE,
    OUTAGE_RETRY_DELAYS,
    QUORUM_QUEUE,
)

VENVS = HERE / ".venvs"
PEER_PYTHON = VENVS / "aio-pika-batch" / "bin" / "python"
PEER_DRIVER = HERE / "peers" / "aio_pika_batch_driver.py"


def _find_python312() -> str:
    """A Python 3.12 that runs: $AMQP_BATCH_BENCH_PYTHON312, pyenv's own
    installs, then ``python3.12`` on PATH (a pyenv shim on PATH may exist without
    the version being selected, so every candidate is tried)."""
    candidates = [os.environ.get("AMQP_BATCH_BENCH_PYTHON312", "")]
    pyenv_root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    candidates += sorted(
        (str(p) for p in pyenv_root.glob("versions/3.12*/bin/python3.12")),
        reverse=True,
    )
    candidates.append(shutil.which("python3.12") or "")
    for candidate in filter(None, candidates):
        probe = subprocess.run(
            [candidate, "-c", "import sys; assert sys.version_info[:2] == (3, 12)"],
            capture_output=True,
            check=False,
        )
        if probe.returncode == 0:
            return candidate
    return "python3.12"


PYTHON312 = _find_python312()
#: The peers other than aio-pika-batch run on the interpreter that runs the bench.
BASE_PYTHON = getattr(sys, "_base_executable", sys.executable)
CHILD_TIMEOUT = 900.0


class Env:
    """A peer's virtual environment: ``bench/.venvs/<name>``, one pinned package."""

    def __init__(self, name: str, python: str, package: str, version: str) -> None:
        self.name, self.python, self.package, self.version = (
            name,
            python,
            package,
            version,
        )
        self.path = VENVS / name
        self.executable = self.path / "bin" / "python"
        self.driver = HERE / "peers" / f"{name.replace('-', '_')}_driver.py"

    def ready(self) -> bool:
        """True when the venv has the pinned version installed."""
        if not self.executable.exists():
            return False
        probe = subprocess.run(
            [
                str(self.executable),
                "-c",
                "import importlib.metadata as m, sys; "
                f"sys.exit(m.version({self.package.split('[')[0]!r}) != {self.version!r})",
            ],
            capture_output=True,
            check=False,
        )
        return probe.returncode == 0

    def ensure(self) -> None:
        """Create the venv and install the pinned package (once); uv if present."""
        if self.ready():
            return
        requirement = f"{self.package}=={self.version}"
        print(f"creating {self.path} ({requirement}) ...", flush=True)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        uv = shutil.which("uv")
        if uv:
            subprocess.run(
                [uv, "venv", "-q", "-p", self.python, str(self.path)], check=True
            )
            subprocess.run(
                [uv, "pip", "install", "-q", "-p", str(self.executable), requirement],
                check=True,
            )
        else:
            subprocess.run(
                [self.python, "-m", "venv", "--clear", str(self.path)], check=True
            )
            subprocess.run(
                [str(self.executable), "-m", "pip", "install", "-q", requirement],
                check=True,
            )

    def command(self, url: str, count: int, **options: Any) -> list[str]:
        command = [str(self.executable), str(self.driver), "--url", url]
        command += ["--count", str(count)]
        for key, value in options.items():
            command += [f"--{key.replace('_', '-')}", str(value)]
        return command


ENVS = {
    env.name: env
    for env in (
        Env("aio-pika-batch", PYTHON312, "aio-pika-batch", "0.1.0"),
        Env("faststream", BASE_PYTHON, "faststream[rabbit]", "0.7.8"),
        Env("aio-pika", BASE_PYTHON, "aio-pika", "10.2.1"),
        Env("pika", BASE_PYTHON, "pika", "1.4.4"),
    )
}
#: The workloads each peer environment is measured in.
ENV_WORKLOADS = {
    "aio-pika-batch": {"W1", "W2", "W3", "W4", "W5", "W6", "W1Q", "W2Q", "W7"},
    "faststream": {"W1", "W2"},
    "aio-pika": {"W1", "W2"},
    "pika": {"W1", "W2"},
}

APB = "aio-pika-batch 0.1.0"
FASTSTREAM = "FastStream 0.7.8 subscriber"
AIO_PIKA = "aio-pika 10.2.1 batch loop"
PIKA = "pika 1.4.4 BlockingConnection"
#: The peers beside aio-pika-batch in W1 and W2: (label, environment).
OTHER_PEERS = ((FASTSTREAM, "faststream"), (AIO_PIKA, "aio-pika"), (PIKA, "pika"))
AIORMQ = "raw aiormq 7"
CEIL_AIO = "transport ceiling (asyncio)"
CEIL_TRIO = "transport ceiling (trio)"
AB_AIO = "amqp-batch (asyncio)"
AB_TRIO = "amqp-batch (trio)"
#: W1's amqp-batch with PrometheusHooks and TracingHooks (``--observe``).
AB_OBSERVED = "amqp-batch + metrics + tracing (asyncio)"
AB_AIORMQ = "amqp-batch on the aiormq transport (asyncio)"
ALL_WORKLOADS = ("W1", "W2", "W3", "W4", "W5", "W6", "W1P", "W4P", "W1Q", "W2Q", "W7")
#: Workloads that drain a queue: it must be empty after every measurement (a
#: consumer that stopped before its last ack leaves messages behind). W2, W2Q
#: and W7 check their queues themselves (their end condition).
DRAIN_WORKLOADS = {
    **dict.fromkeys(("W1", "W3", "W4", "W6", "W1P", "W4P"), DRAIN_QUEUE),
    "W1Q": QUORUM_QUEUE,
}
#: W2: measurements of the ceiling and amqp-batch rows per run.
W2_REPEATS = 5
#: W7: seconds of the outage, from the consumer's start.
OUTAGE_SECONDS = 5.0
#: W7's configurations: (label, which consumer, options).
OUTAGE_CONFIGURATIONS = (
    (f"{APB}, requeue (max 3)", "peer", {"max_requeue": 3}),
    (f"{AB_AIO}, immediate requeue (max 3)", "amqp-batch", {"max_requeue": 3}),
    (
        f"{AB_AIO}, delays {'/'.join(f'{d:g}' for d in OUTAGE_RETRY_DELAYS)} s "
        "(max 10) + kill switch",
        "amqp-batch",
        {
            "max_requeue": 10,
            "retry_delays": ",".join(f"{d:g}" for d in OUTAGE_RETRY_DELAYS),
            # threshold 0.5, window 2 s, at least 100 results, cool-down 1 s
            "kill_switch": "0.5,2,100,1",
        },
    ),
)


# -- sizes --------------------------------------------------------------------------


def sizes(quick: bool) -> dict[str, Any]:
    if quick:
        return {
            "W1": 5_000,
            "W2": 2_000,
            "W4": 4_000,
            "W5_seconds": 5,
            "W6": 10_000,
            "W7": 2_000,
        }
    return {
        "W1": 50_000,
        "W2": 20_000,
        "W4": 20_000,
        "W5_seconds": 30,
        "W6": 100_000,
        "W7": 10_000,
    }


# -- the baseline commit ---------------------------------------------------------------


class Baseline:
    """Another commit's amqp-batch: a temporary git worktree under bench/.baseline.

    Its consumer runs from this checkout's ``bench/workloads.py`` with
    ``PYTHONPATH=<worktree>/src``, so the child imports that commit's package (the
    result's ``amqp_batch`` path is checked). REV must have the bench's internal
    imports (``amqp_batch._transport._native.connect`` and friends), i.e. be no
    older than the bench itself.
    """

    def __init__(self, revision: str) -> None:
        root = self._git("rev-parse", "--show-toplevel", cwd=HERE)
        self.root = Path(root)
        self.short = self._git("rev-parse", "--short", f"{revision}^{{commit}}")
        self.path = HERE / ".baseline" / self.short
        self.label = f"amqp-batch @{self.short} (asyncio)"
        self.created = False

    def _git(self, *arguments: str, cwd: Path | None = None) -> str:
        return subprocess.run(
            ["git", *arguments],
            capture_output=True,
            text=True,
            check=True,
            cwd=cwd or self.root,
        ).stdout.strip()

    def __enter__(self) -> Baseline:
        if not (self.path / "src" / "amqp_batch").is_dir():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._git("worktree", "add", "--detach", str(self.path), self.short)
            self.created = True
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.created:
            self._git("worktree", "remove", "--force", str(self.path))

    def env(self) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": str(self.path / "src")}

    def check(self, result: dict[str, Any]) -> None:
        imported = result.get("amqp_batch", "")
        if not imported.startswith(str(self.path)):
            raise ChildFailed(f"the baseline child imported amqp_batch from {imported}")


# -- one measurement ----------------------------------------------------------------


class ChildFailed(RuntimeError):
    pass


def run_child(
    command: list[str],
    on_ready: Callable[[], None] | None = None,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run one measurement process; ``on_ready`` runs once it consumes."""
    with tempfile.TemporaryFile("w+") as errors:
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=errors, text=True, env=env
        )
        assert process.stdout is not None
        result: dict[str, Any] | None = None
        try:
            if on_ready is not None:
                line = process.stdout.readline()
                if not line.strip().startswith('{"ready"'):
                    raise ChildFailed(f"no ready line, got {line!r}")
                on_ready()
            output, _ = process.communicate(timeout=CHILD_TIMEOUT)
        except BaseException:
            process.kill()
            process.wait()
            raise
        finally:
            errors.seek(0)
            stderr = errors.read()
        lines = [line for line in output.splitlines() if line.startswith("{")]
        if process.returncode != 0 or not lines:
            tail = "\n".join(stderr.strip().splitlines()[-15:])
            raise ChildFailed(f"exit {process.returncode}: {tail}")
        result = json.loads(lines[-1])
        return result


def run_together(commands: list[list[str]]) -> list[dict[str, Any]]:
    """Start several measurement processes, release them together once each has
    printed its ready line, and collect their results."""
    with contextlib.ExitStack() as stack:
        errors = [stack.enter_context(tempfile.TemporaryFile("w+")) for _ in commands]
        processes = [
            subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=error,
                text=True,
            )
            for command, error in zip(commands, errors, strict=True)
        ]
        try:
            for process in processes:
                assert process.stdout is not None
                line = process.stdout.readline()
                if not line.strip().startswith('{"ready"'):
                    raise ChildFailed(f"no ready line, got {line!r}")
            for process in processes:
                assert process.stdin is not None
                process.stdin.write("go\n")
                process.stdin.flush()
            outputs = [
                process.communicate(timeout=CHILD_TIMEOUT)[0] for process in processes
            ]
        except BaseException:
            for process in processes:
                process.kill()
                process.wait()
            raise
        results = []
        for process, output, error in zip(processes, outputs, errors, strict=True):
            lines = [line for line in output.splitlines() if line.startswith("{")]
            if process.returncode != 0 or not lines:
                error.seek(0)
                tail = "\n".join(error.read().strip().splitlines()[-15:])
                raise ChildFailed(f"exit {process.returncode}: {tail}")
            results.append(json.loads(lines[-1]))
        return results


def merge(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One result for processes that shared a workload: the rate from the first
    start to 95% handled, the CPU of all, the broker's from the first start to
    the last end."""
    walls = [r["wall"] for r in results]
    merged = dict(results[0])
    # Timed to the first moment MARK of the messages were handled (see
    # workloads.Progress.wait), scaled so that count / seconds is that rate.
    span = min(r["wall_mark"] for r in results) - min(w[0] for w in walls)
    merged["seconds"] = span / workloads.Progress.MARK
    merged["cpu_seconds"] = sum(r["cpu_seconds"] for r in results)
    merged["handled"] = sum(r["handled"] for r in results)
    merged["peak_rss_kib"] = max(r["peak_rss_kib"] for r in results)
    merged["shares"] = [r["handled"] for r in results]
    brokers = [r.get("broker_cpu") for r in results]
    merged["broker_cpu"] = (
        None
        if None in brokers
        else [min(b[0] for b in brokers), max(b[1] for b in brokers)]  # type: ignore[index]
    )
    return merged


def ours(consumer: str, url: str, count: int, **options: Any) -> list[str]:
    command = [
        sys.executable,
        str(HERE / "workloads.py"),
        "--consumer",
        consumer,
        "--url",
        url,
        "--count",
        str(count),
    ]
    for key, value in options.items():
        command += [f"--{key.replace('_', '-')}", str(value)]
    return command


def peer(url: str, count: int, **options: Any) -> list[str]:
    """A command for aio-pika-batch's driver."""
    return ENVS["aio-pika-batch"].command(url, count, **options)


# -- workloads ------------------------------------------------------------------------


class Bench:
    def __init__(
        self, args: argparse.Namespace, baseline: Baseline | None = None
    ) -> None:
        self.url: str = args.url
        self.n = sizes(args.quick)
        self.baseline = baseline
        #: (workload, consumer) -> list of per-run values (dicts).
        self.values: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
        self.failures: list[str] = []
        #: --callgrind: consumer -> instructions per message.
        self.instructions: dict[str, float] = {}

    def record(
        self,
        workload: str,
        consumer: str,
        fill: Callable[[], None],
        command: list[str] | list[list[str]],
        on_ready: Callable[[], None] | None = None,
        count: int | None = None,
        baseline: bool = False,
    ) -> None:
        """Fill, run one measurement (or several processes together), keep it."""
        try:
            fill()
            if isinstance(command[0], list):
                result = merge(run_together(command))  # type: ignore[arg-type]
            else:
                env = self.baseline.env() if baseline and self.baseline else None
                result = run_child(command, on_ready, env)  # type: ignore[arg-type]
                if baseline and self.baseline:
                    self.baseline.check(result)
            if workload in DRAIN_WORKLOADS:
                queue = DRAIN_WORKLOADS[workload]
                left = anyio.run(workloads.queue_counts, self.url, queue)[0]
                if left:
                    raise ChildFailed(f"{left} message(s) left in the queue")
        except Exception as exc:  # a failed measurement is reported, not fatal
            message = f"{workload} / {consumer}: {type(exc).__name__}: {exc}"
            print("  FAILED", message, flush=True)
            self.failures.append(message)
            return
        self.derive(result, count)
        self.values[(workload, consumer)].append(result)
        self.show(workload, consumer, result)

    @staticmethod
    def derive(result: dict[str, Any], count: int | None) -> None:
        """Rates, CPU per message and latency percentiles from a raw result."""
        per = count or result.get("handled") or 1
        if count is not None:
            result["rate"] = count / result["seconds"]
        if result.get("cpu_seconds") is not None:
            result["cpu_us"] = result["cpu_seconds"] / per * 1e6
        broker = result.get("broker_cpu")
        if broker:
            result["broker_us"] = (broker[1] - broker[0]) / per * 1e6
        latencies = sorted(result.pop("latencies", None) or [])
        if latencies:
            result["p50"] = percentile(latencies, 0.50)
            result["p99"] = percentile(latencies, 0.99)
            result["max"] = latencies[-1]

    @staticmethod
    def show(workload: str, consumer: str, result: dict[str, Any]) -> None:
        if "drain_seconds" in result:
            shown = (
                f"{result['dead_lettered']:,} dead-lettered, drained "
                f"{result['drain_seconds']:.1f} s after recovery"
            )
        elif "rate" in result:
            shown = f"{result['rate']:>10,.0f} msg/s"
        elif "p50" in result:
            shown = (
                f"p50 {result['p50'] * 1000:.1f} ms, p99 {result['p99'] * 1000:.1f} ms,"
                f" max {result['max'] * 1000:.1f} ms"
            )
        else:
            shown = f"RSS growth {result.get('soak_growth_kib', 0) / 1024:.1f} MiB"
        cpu = f"CPU {result['cpu_us']:.1f} µs/msg" if "cpu_us" in result else ""
        if "broker_us" in result:
            cpu += f", broker {result['broker_us']:.1f}"
        print(
            f"  {workload:<3} {consumer:<44} {shown}  {cpu} "
            f"(peak RSS {result['peak_rss_kib'] / 1024:.1f} MiB)",
            flush=True,
        )

    def drain_fill(self, count: int, size: int = 256) -> Callable[[], None]:
        return lambda: workloads.fill_drain(self.url, count, size)

    def w1(self) -> None:
        n, url = self.n["W1"], self.url
        fill = self.drain_fill(n)
        self.record("W1", APB, fill, peer(url, n, queue=DRAIN_QUEUE), count=n)
        for label, env in OTHER_PEERS:
            command = ENVS[env].command(url, n, queue=DRAIN_QUEUE)
            self.record("W1", label, fill, command, count=n)
        self.record("W1", AIORMQ, fill, ours("aiormq", url, n), count=n)
        self.record("W1", CEIL_AIO, fill, ours("ceiling", url, n), count=n)
        self.record("W1", AB_AIO, fill, ours("amqp-batch", url, n), count=n)
        # Right after the row it is compared with: a measurement pays for the
        # broker's background work left by the one before it (the message
        # store's clean-up after a fast drain), so both follow a fast row.
        self.baseline_row("W1", fill, ours("amqp-batch", url, n), n)
        observed = [*ours("amqp-batch", url, n), "--observe"]
        self.record("W1", AB_OBSERVED, fill, observed, count=n)
        command = ours("amqp-batch", url, n, transport="aiormq")
        self.record("W1", AB_AIORMQ, fill, command, count=n)

    def baseline_row(
        self, workload: str, fill: Callable[[], None], command: list[str], n: int
    ) -> None:
        """With ``--baseline``: one measurement of that commit's amqp-batch."""
        if self.baseline:
            label = self.baseline.label
            self.record(workload, label, fill, command, count=n, baseline=True)

    def w2(self) -> None:
        n, url = self.n["W2"], self.url
        dlq = n // 5
        fill = lambda: workloads.fill_mixed(url, n)  # noqa: E731
        common = {"queue": MIXED_QUEUE, "mode": "mixed", "expect_dlq": dlq}
        dead = {"dlx": MIXED_DLX, "dlq": MIXED_DLQ}
        self.record("W2", APB, fill, peer(url, n, **dead, **common), count=n)
        for label, env in OTHER_PEERS:
            command = ENVS[env].command(url, n, **dead, **common)
            self.record("W2", label, fill, command, count=n)
        # Short and noisy (its tail waits on persistent confirms): the ceiling,
        # amqp-batch and baseline rows are measured W2_REPEATS times per run,
        # in turns, every other turn with amqp-batch before its ceiling, so no
        # row always follows the same one (see baseline_row).
        for repeat in range(W2_REPEATS):
            self.backends("W2", fill, n, swap=repeat % 2 == 1, **common)
            self.baseline_row("W2", fill, ours("amqp-batch", url, n, **common), n)
        command = ours("amqp-batch", url, n, transport="aiormq", **common)
        self.record("W2", AB_AIORMQ, fill, command, count=n)

    def w1q(self) -> None:
        """W1 on a quorum queue: aio-pika-batch, the ceilings, amqp-batch."""
        n, url = self.n["W1"], self.url
        fill = lambda: workloads.fill_queue(url, QUORUM_QUEUE, n)  # noqa: E731
        command = peer(url, n, queue=QUORUM_QUEUE, queue_type="quorum")
        self.record("W1Q", APB, fill, command, count=n)
        self.backends("W1Q", fill, n, queue=QUORUM_QUEUE)

    def w2q(self) -> None:
        """W2 on a quorum queue with a quorum dead-letter queue."""
        n, url = self.n["W2"], self.url
        fill = lambda: workloads.fill_queue(url, MIXED_Q_QUEUE, n)  # noqa: E731
        common = {"queue": MIXED_Q_QUEUE, "mode": "mixed", "expect_dlq": n // 5}
        dead = {"dlx": MIXED_Q_DLX, "dlq": MIXED_Q_DLQ, "queue_type": "quorum"}
        self.record("W2Q", APB, fill, peer(url, n, **dead, **common), count=n)
        self.backends("W2Q", fill, n, **common)

    def backends(
        self,
        workload: str,
        fill: Callable[[], None],
        n: int,
        *,
        swap: bool = False,
        **options: Any,
    ) -> None:
        """The ceiling and amqp-batch (``swap``: amqp-batch first), on asyncio
        and on trio."""
        for backend, ceiling, ours_label in (
            ("asyncio", CEIL_AIO, AB_AIO),
            ("trio", CEIL_TRIO, AB_TRIO),
        ):
            pair = (("ceiling", ceiling), ("amqp-batch", ours_label))
            for consumer, label in pair[::-1] if swap else pair:
                command = ours(consumer, self.url, n, backend=backend, **options)
                self.record(workload, label, fill, command, count=n)

    def w7(self) -> None:
        """The outage: every message fails for OUTAGE_SECONDS from the
        consumer's start, then succeeds; dead letters and the drain after it."""
        n, url = self.n["W7"], self.url
        fill = lambda: workloads.fill_queue(url, OUTAGE_QUEUE, n)  # noqa: E731
        common = {"queue": OUTAGE_QUEUE, "mode": "outage", "outage": OUTAGE_SECONDS}
        for label, consumer, options in OUTAGE_CONFIGURATIONS:
            if consumer == "peer":
                dead = {"dlx": OUTAGE_DLX, "dlq": OUTAGE_DLQ}
                command = peer(url, n, **dead, **common, **options)
            else:
                command = ours(consumer, url, n, **common, **options)
            self.record("W7", label, fill, command, count=n)

    def w3(self) -> None:
        n, url = self.n["W1"], self.url
        fill = self.drain_fill(n)
        self.record(
            "W3", CEIL_TRIO, fill, ours("ceiling", url, n, backend="trio"), count=n
        )
        self.record(
            "W3", AB_TRIO, fill, ours("amqp-batch", url, n, backend="trio"), count=n
        )

    def w4(self) -> None:
        n, url = self.n["W4"], self.url
        fill = self.drain_fill(n)
        for workers in (1, 4):
            suffix = f", {workers} worker{'s' if workers > 1 else ''}"
            options = {"mode": "io", "sleep": 0.02, "workers": workers}
            self.record(
                "W4",
                APB + suffix,
                fill,
                peer(url, n, queue=DRAIN_QUEUE, **options),
                count=n,
            )
            self.record(
                "W4",
                AB_AIO + suffix,
                fill,
                ours("amqp-batch", url, n, **options),
                count=n,
            )
            self.record(
                "W4",
                AB_TRIO + suffix,
                fill,
                ours("amqp-batch", url, n, backend="trio", **options),
                count=n,
            )

    def processes(self, workload: str, count: int, **options: Any) -> None:
        """amqp-batch (asyncio) in 1 and in 2 processes on the same queue."""
        fill = self.drain_fill(count)
        detail = ", 4 workers" if options.get("workers") == 4 else ""
        for number in (1, 2):
            progress = Path(tempfile.gettempdir(), f"amqp-batch-bench-{os.getpid()}")
            workloads.Progress.create(str(progress), number)
            commands = [
                ours(
                    "amqp-batch",
                    self.url,
                    count,
                    progress=f"{progress},{slot},{number}",
                    **options,
                )
                for slot in range(number)
            ]
            label = f"{AB_AIO}{detail}, {number} process{'es' if number > 1 else ''}"
            self.record(workload, label, fill, commands, count=count)
            progress.unlink(missing_ok=True)

    def w1p(self) -> None:
        self.processes("W1P", self.n["W1"])

    def w4p(self) -> None:
        self.processes("W4P", self.n["W4"], mode="io", sleep=0.02, workers=4)

    def w5(self) -> None:
        rate, seconds = 200, self.n["W5_seconds"]
        n, url = rate * seconds, self.url
        fill = lambda: anyio.run(workloads.reset_latency_queue, url)  # noqa: E731
        publish = lambda: anyio.run(workloads.publish_paced, url, rate, n)  # noqa: E731
        options = {"queue": LATENCY_QUEUE, "mode": "latency", "batch_timeout": 0.1}
        for consumer, command in (
            (APB, peer(url, n, **options)),
            (AB_AIO, ours("amqp-batch", url, n, **options)),
            (AB_TRIO, ours("amqp-batch", url, n, backend="trio", **options)),
        ):
            self.record("W5", consumer, fill, command, on_ready=publish)

    def w6(self) -> None:
        n, url = self.n["W6"], self.url
        fill = self.drain_fill(n, 4096)
        self.record("W6", APB, fill, peer(url, n, queue=DRAIN_QUEUE), count=n)
        self.record("W6", AIORMQ, fill, ours("aiormq", url, n), count=n)
        self.record("W6", CEIL_AIO, fill, ours("ceiling", url, n), count=n)
        self.record("W6", AB_AIO, fill, ours("amqp-batch", url, n), count=n)
        self.record(
            "W6", AB_TRIO, fill, ours("amqp-batch", url, n, backend="trio"), count=n
        )

    def callgrind(self) -> None:
        """Instructions per message of W1 under callgrind (``--callgrind``).

        Each consumer drains CALLGRIND_COUNTS[0] and then [1] messages in a fresh
        process under ``valgrind --tool=callgrind``; the difference of the two
        totals over the difference of the counts is the cost of one more message,
        without the interpreter's start-up and imports. PYTHONHASHSEED is fixed.
        """
        small, large = CALLGRIND_COUNTS
        env = {**os.environ, "PYTHONHASHSEED": "0"}
        for label, consumer in ((CEIL_AIO, "ceiling"), (AB_AIO, "amqp-batch")):
            totals = []
            for count in (small, large):
                workloads.fill_drain(self.url, count)
                totals.append(
                    callgrind_instructions(ours(consumer, self.url, count), env)
                )
            self.instructions[label] = (totals[1] - totals[0]) / (large - small)
            print(
                f"  callgrind {label:<32} {self.instructions[label]:,.0f} instructions/msg",
                flush=True,
            )

    def callgrind_lines(self) -> list[str]:
        if not self.instructions:
            return []
        small, large = CALLGRIND_COUNTS
        lines = [
            "",
            f"Instructions per message under callgrind (W1 asyncio, {large:,} minus "
            f"{small:,} messages, one process each; repeatable where wall time is not):",
            "",
            "| consumer | instructions / message |",
            "| --- | ---: |",
        ]
        lines += [f"| {c} | {i:,.0f} |" for c, i in self.instructions.items()]
        return lines

    def soak(self, minutes: float) -> None:
        """W6 sustained: amqp-batch consuming 4 KiB messages at 1,000 msg/s."""
        rate, url = 1000, self.url
        n = int(rate * minutes * 60)
        fill = lambda: anyio.run(workloads.reset_latency_queue, url)  # noqa: E731
        publish = lambda: anyio.run(  # noqa: E731
            workloads.publish_paced, url, rate, n, 4096
        )
        options = {"queue": LATENCY_QUEUE, "mode": "soak", "batch_timeout": 0.1}
        self.record(
            "W6 soak",
            AB_AIO,
            fill,
            ours("amqp-batch", url, n, **options),
            on_ready=publish,
        )


CALLGRIND_COUNTS = (2_000, 4_000)


def callgrind_instructions(command: list[str], env: dict[str, str]) -> int:
    """Total instructions (callgrind's "Collected") of one measurement process."""
    with tempfile.TemporaryDirectory() as folder:
        completed = subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={folder}/callgrind.out.%p",
                *command,
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=CHILD_TIMEOUT,
            check=False,
        )
    if completed.returncode != 0:
        raise ChildFailed(completed.stderr[-2000:])
    for line in completed.stderr.splitlines():
        if "Collected :" in line:
            return int(line.rsplit(":", 1)[1].strip())
    raise ChildFailed("no 'Collected' line from callgrind")


def percentile(ordered: list[float], q: float) -> float:
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


# -- report ---------------------------------------------------------------------------


def git_commit() -> str:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=HERE,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", "src"],
            capture_output=True,
            text=True,
            cwd=HERE,
        ).stdout.strip()
        return commit + (" (src modified)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> str:
    model = "unknown CPU"
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    broker = "RabbitMQ (version unknown)"
    if shutil.which("rabbitmqctl"):
        version = subprocess.run(
            ["rabbitmqctl", "version"], capture_output=True, text=True
        ).stdout.strip()
        if version:
            broker = f"RabbitMQ {version}"
    return (
        f"{platform.node()}, {os.cpu_count()} cores ({model}), "
        f"{platform.system()} {platform.release()}, {broker} on the same host"
    )


def med(values: list[dict[str, Any]], key: str) -> float:
    return statistics.median(v[key] for v in values)


def cpu_figures(runs: list[dict[str, Any]]) -> dict[str, float | None]:
    """Median CPU µs per message of the consumer and of the broker."""
    figures: dict[str, float | None] = {}
    for key in ("cpu_us", "broker_us"):
        values = [r[key] for r in runs if r.get(key) is not None]
        figures[key] = statistics.median(values) if values else None
    return figures


def summarise(bench: Bench) -> list[dict[str, Any]]:
    """Rows: workload, consumer, metric, median, ratios, per-run values."""
    v = bench.values
    rows: list[dict[str, Any]] = []

    def rate(w: str, c: str) -> float | None:
        return med(v[(w, c)], "rate") if v.get((w, c)) else None

    apb_w1 = rate("W1", APB)
    for workload in ("W1", "W2", "W3", "W4", "W1P", "W4P", "W1Q", "W2Q"):
        for (w, consumer), runs in v.items():
            if w != workload:
                continue
            value = med(runs, "rate")
            ceiling = None
            if workload == "W4":
                reference = rate("W4", APB + consumer[consumer.index(",") :])
            elif workload in ("W1P", "W4P"):
                # The ratio to the same consumer in one process.
                reference = rate(workload, consumer.rsplit(", ", 1)[0] + ", 1 process")
            else:
                reference = rate(workload, APB) if workload != "W3" else apb_w1
                # A ceiling per backend and workload (W3 is W1 on trio).
                trio = "(trio)" in consumer or workload == "W3"
                ceiling = rate(workload, CEIL_TRIO if trio else CEIL_AIO)
            rows.append(
                {
                    "workload": workload,
                    "consumer": consumer,
                    "unit": "msg/s",
                    "value": value,
                    "vs_peer": value / reference if reference else None,
                    "vs_ceiling": value / ceiling if ceiling else None,
                    "runs": [r["rate"] for r in runs],
                    **cpu_figures(runs),
                }
            )
    for (w, consumer), runs in v.items():
        if w == "W5":
            peer_p99 = med(v[("W5", APB)], "p99") if v.get(("W5", APB)) else None
            p99 = med(runs, "p99")
            rows.append(
                {
                    "workload": "W5",
                    "consumer": consumer,
                    "unit": "ms p50 / p99",
                    "value": (med(runs, "p50") * 1000, p99 * 1000),
                    "vs_peer": p99 / peer_p99 if peer_p99 else None,
                    "vs_ceiling": None,
                    "runs": [(r["p50"] * 1000, r["p99"] * 1000) for r in runs],
                    **cpu_figures(runs),
                }
            )
    for (w, consumer), runs in v.items():
        if w == "W6":
            peer_peak = (
                med(v[("W6", APB)], "peak_rss_kib") if v.get(("W6", APB)) else None
            )
            peak = med(runs, "peak_rss_kib")
            growth = statistics.median(
                r["peak_rss_kib"] - r["baseline_rss_kib"] for r in runs
            )
            rows.append(
                {
                    "workload": "W6",
                    "consumer": consumer,
                    "unit": "MiB peak RSS (growth)",
                    "value": (peak / 1024, growth / 1024),
                    "vs_peer": peak / peer_peak if peer_peak else None,
                    "vs_ceiling": None,
                    "runs": [r["peak_rss_kib"] / 1024 for r in runs],
                    **cpu_figures(runs),
                }
            )
        if w == "W7":
            rows.append(
                {
                    "workload": "W7",
                    "consumer": consumer,
                    "unit": "failed handler calls",
                    "value": med(runs, "failed_calls"),
                    "dead_lettered": med(runs, "dead_lettered"),
                    "drain_seconds": med(runs, "drain_seconds"),
                    "vs_peer": None,
                    "vs_ceiling": None,
                    "runs": [(r["dead_lettered"], r["drain_seconds"]) for r in runs],
                    **cpu_figures(runs),
                }
            )
        if w == "W6 soak":
            for r in runs:
                rows.append(
                    {
                        "workload": "W6 soak",
                        "consumer": consumer,
                        "unit": "MiB RSS growth after warm-up",
                        "value": r.get("soak_growth_kib", 0) / 1024,
                        "vs_peer": None,
                        "vs_ceiling": None,
                        "runs": [],
                    }
                )
    return rows


def fmt_value(row: dict[str, Any]) -> str:
    value = row["value"]
    if row["workload"] == "W5":
        return f"{value[0]:.1f} / {value[1]:.1f} ms"
    if row["workload"] == "W6":
        return f"{value[0]:.1f} MiB (+{value[1]:.1f})"
    if row["workload"] == "W6 soak":
        return f"+{value:.1f} MiB"
    if row["workload"] == "W7":
        return f"{value:,.0f} failed calls"
    return f"{value:,.0f} msg/s"


def fmt_run(workload: str, run: Any) -> str:
    """One run's figure in the runs column."""
    if workload == "W7":
        return f"{run[0]:,}/{run[1]:.1f} s"
    if isinstance(run, tuple):
        return f"{run[0]:.0f}/{run[1]:.0f}"
    return f"{run:.1f}" if workload == "W6" else f"{run:,.0f}"


def fmt_ratio(ratio: float | None) -> str:
    return "—" if ratio is None else f"{ratio:.2f}x"


def goals(bench: Bench) -> list[str]:
    """The issue's goals, checked against this run's medians."""
    v = bench.values
    out = []

    def rate(w: str, c: str) -> float | None:
        return med(v[(w, c)], "rate") if v.get((w, c)) else None

    def line(text: str, ok: bool | None) -> None:
        mark = "n/a" if ok is None else ("met" if ok else "**not met**")
        out.append(f"| {text} | {mark} |")

    w1, apb1, ceil1 = rate("W1", AB_AIO), rate("W1", APB), rate("W1", CEIL_AIO)
    if w1 and apb1 and ceil1:
        line(
            f"W1: {w1 / apb1:.2f}x aio-pika-batch (goal ≥ 4x), {w1 / ceil1:.2f}x "
            "the transport ceiling (goal ≥ 0.85x)",
            w1 >= 4 * apb1 and w1 >= 0.85 * ceil1,
        )
    observed = rate("W1", AB_OBSERVED)
    if w1 and observed:
        line(
            f"W1 with metrics and tracing: {observed / w1:.2f}x of W1 without "
            "(goal ≥ 0.90x)",
            observed >= 0.90 * w1,
        )
    for workload, name in (("W1", AB_AIO), ("W3", AB_TRIO)):
        cpu = cpu_figures(v.get((workload, name)) or []).get("cpu_us")
        if cpu is not None:
            line(
                f"{workload} {name}: {cpu:.1f} µs CPU per message (goal ≤ 20 µs)",
                cpu <= 20,
            )
    w2, apb2 = rate("W2", AB_AIO), rate("W2", APB)
    if w2 and apb2:
        ceil2 = rate("W2", CEIL_AIO)
        bound = f"; its ceiling is {ceil2 / apb2:.2f}x" if ceil2 else ""
        line(f"W2: {w2 / apb2:.2f}x aio-pika-batch (goal ≥ 8x{bound})", w2 >= 8 * apb2)
    w3 = rate("W3", AB_TRIO)
    if w3 and w1:
        line(
            f"W3: trio at {w3 / w1:.2f}x W1 asyncio (goal within 10%)",
            abs(w3 / w1 - 1) <= 0.10,
        )
    for name in (AB_AIO, AB_TRIO):
        one, four = rate("W4", name + ", 1 worker"), rate("W4", name + ", 4 workers")
        if one and four:
            line(
                f"W4 {name}: 4 workers {four / one:.2f}x 1 worker (goal ≥ 3.5x)",
                four >= 3.5 * one,
            )
    for name in (AB_AIO, AB_TRIO):
        if v.get(("W5", name)):
            p99 = med(v[("W5", name)], "p99") * 1000
            line(f"W5 {name}: p99 {p99:.1f} ms (goal ≤ 100 + 20 ms)", p99 <= 120)
    for name, ceiling in ((AB_AIO, CEIL_AIO), (AB_TRIO, CEIL_TRIO)):
        ours_w2, ceil_w2 = rate("W2", name), rate("W2", ceiling)
        if ours_w2 and ceil_w2:
            line(
                f"W2 {name}: {ours_w2 / ceil_w2:.2f}x its ceiling (goal ≥ 0.85x)",
                ours_w2 >= 0.85 * ceil_w2,
            )
    for workload in ("W1P", "W4P"):
        rows = {c: med(r, "rate") for (w, c), r in v.items() if w == workload and r}
        one = next((x for c, x in rows.items() if c.endswith(", 1 process")), None)
        two = next((x for c, x in rows.items() if c.endswith(", 2 processes")), None)
        if one and two:
            line(
                f"{workload}: 2 processes {two / one:.2f}x 1 process (no goal set)",
                None,
            )
    for workload in ("W1Q", "W2Q"):
        for name in (AB_AIO, AB_TRIO):
            ours_q, apb_q = rate(workload, name), rate(workload, APB)
            if ours_q and apb_q:
                line(
                    f"{workload} {name}: {ours_q / apb_q:.2f}x aio-pika-batch on the "
                    "quorum queue (no goal set)",
                    None,
                )
    for label, _, _ in OUTAGE_CONFIGURATIONS:
        if v.get(("W7", label)):
            runs = v[("W7", label)]
            line(
                f"W7 {label}: {med(runs, 'dead_lettered'):,.0f} of {bench.n['W7']:,} "
                f"dead-lettered, drained {med(runs, 'drain_seconds'):.1f} s after "
                "recovery (no goal set)",
                None,
            )
    if v.get(("W6", AB_AIO)):
        peak = med(v[("W6", AB_AIO)], "peak_rss_kib") / 1024
        growth = statistics.median(
            (r["peak_rss_kib"] - r["baseline_rss_kib"]) / 1024
            for r in v[("W6", AB_AIO)]
        )
        line(
            f"W6: peak RSS {peak:.1f} MiB, +{growth:.1f} MiB over the idle process "
            "(bound: prefetch × body = 1000 × 4 KiB = 3.9 MiB plus a constant)",
            None,
        )
    return out


def fmt_cpu(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def peers_line(selected: list[str]) -> str:
    """The peers measured and where they ran."""
    used = [
        f"{env.package.split('[')[0]} {env.version} (Python "
        f"{'3.12' if env.python == PYTHON312 else platform.python_version()})"
        for name, env in ENVS.items()
        if ENV_WORKLOADS[name] & set(selected)
    ]
    return "Peers, each in its own venv under bench/.venvs: " + ", ".join(used) + "."


def render(bench: Bench, args: argparse.Namespace, elapsed: float) -> str:
    rows = summarise(bench)
    n = bench.n
    lines = [
        "# amqp-batch benchmark: latest run",
        "",
        f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}, commit "
        f"`{git_commit()}`, {machine()}.",
        f"amqp-batch and the bare consumers on Python {platform.python_version()}. "
        f"{peers_line(args.selected)} "
        f"Median of {args.runs} run(s){' (quick sizes)' if args.quick else ''}; "
        f"bench took {elapsed / 60:.1f} min."
        + (
            f" Baseline rows: amqp-batch at commit `{bench.baseline.short}`."
            if bench.baseline
            else ""
        ),
    ]
    if rows:
        lines += [
            "",
            f"W1/W3 {n['W1']:,} × 256 B, W2 {n['W2']:,}, W4 {n['W4']:,} (handler sleeps "
            f"20 ms per batch), W5 200 msg/s for {n['W5_seconds']} s, W6 {n['W6']:,} × 4 KiB, "
            f"W1Q/W2Q: W1/W2 on quorum queues, W7 {n['W7']:,} with every message "
            f"failing (REQUEUE) for the first {OUTAGE_SECONDS:g} s of the consumer. "
            "Batch 100, timeout 0.5 s (W5: 0.1 s), prefetch 1000. Throughput counts the "
            "consumer from start until every message is settled and it has stopped "
            "(W2: until the queue is empty and the DLQ holds 20%); the bare consumers "
            "(bench/transport.py) time from consume to the last ack (W2's ceiling: "
            "until the queue is empty and the DLQ holds 20%). CPU is µs per message "
            "(W2: per original message) over the timed window: the consumer's own "
            "process(es) (getrusage), and the broker's beam.smp (/proc). W2's ceiling, "
            f"amqp-batch and baseline rows are measured {W2_REPEATS} times per run, in "
            "turns, every other turn with amqp-batch before its ceiling (the median is "
            "over all of them); a baseline row comes right after the amqp-batch row it "
            "is compared with.",
            "",
            "| workload | consumer | median | vs aio-pika-batch | vs transport ceiling "
            "| CPU µs/msg | broker CPU µs/msg | dead-lettered | drain after recovery (s) "
            "| runs |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
    for row in rows:
        runs = ", ".join(fmt_run(row["workload"], r) for r in row["runs"])
        dead = row.get("dead_lettered")
        lines.append(
            f"| {row['workload']} | {row['consumer']} | {fmt_value(row)} | "
            f"{fmt_ratio(row['vs_peer'])} | {fmt_ratio(row['vs_ceiling'])} | "
            f"{fmt_cpu(row.get('cpu_us'))} | {fmt_cpu(row.get('broker_us'))} | "
            f"{'—' if dead is None else f'{dead:,.0f}'} | "
            f"{fmt_cpu(row.get('drain_seconds'))} | {runs} |"
        )
    lines += [
        "",
        "W3's \"vs aio-pika-batch\" is against aio-pika-batch's W1 (it has no trio "
        "mode); W4's is against aio-pika-batch with the same number of workers; W5 "
        "and W6 ratios compare p99 and peak RSS (lower is better). W1P and W4P are "
        "W1 and W4 (4 workers) with the consumer in 1 and in 2 processes on the same "
        'queue; their "vs aio-pika-batch" column is the ratio to 1 process, and '
        "their CPU is both processes' together. Each row's ceiling is the one of "
        "its backend (asyncio or trio) in the same workload. W7's median is the "
        "handler's failed calls during the outage (REQUEUEs given), its runs "
        "dead-lettered/drain after recovery, the time from the end of the outage "
        "until the queue is empty and every message is acked or dead-lettered; "
        "its CPU counts the whole run per original message.",
        *bench.callgrind_lines(),
        "",
        "## Performance goals",
        "",
        "| goal | status |",
        "| --- | --- |",
        *goals(bench),
    ]
    if bench.failures:
        lines += ["", "## Failed measurements", ""]
        lines += [f"- `{failure}`" for failure in bench.failures]
    return "\n".join(lines) + "\n"


def find_broker(url: str) -> None:
    """Tell every child the broker's pid (for its CPU), if it runs on this host."""
    parts = urllib.parse.urlsplit(url)
    if parts.hostname not in ("127.0.0.1", "localhost", "::1"):
        return
    pid = cpu.listening_pid(parts.port or 5672)
    if pid is not None:
        os.environ[cpu.BROKER_PID_VARIABLE] = str(pid)
    else:
        print("broker process not found: no broker CPU figures", file=sys.stderr)


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--url",
        default=os.environ.get("AMQP_BATCH_BENCH_URL", "amqp://guest:guest@127.0.0.1/"),
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="small counts, smoke run")
    parser.add_argument(
        "--only",
        default=",".join(ALL_WORKLOADS),
        help=f"comma-separated workloads out of {','.join(ALL_WORKLOADS)} "
        "(empty: none, e.g. with --callgrind)",
    )
    parser.add_argument(
        "--soak", action="store_true", help="also W6's 10-minute sustained run"
    )
    parser.add_argument("--soak-minutes", type=float, default=10.0)
    parser.add_argument(
        "--baseline",
        metavar="REV",
        default=None,
        help="also run the amqp-batch of commit REV in W1 and W2 (a git worktree)",
    )
    parser.add_argument(
        "--callgrind",
        action="store_true",
        help="also instructions per message of W1 under valgrind's callgrind",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="results directory (default bench/results; a temporary one for --quick)",
    )
    args = parser.parse_args()
    args.selected = [w.strip().upper() for w in args.only.split(",") if w.strip()]
    unknown = set(args.selected) - set(ALL_WORKLOADS)
    if unknown:
        parser.error(f"unknown workload(s) {', '.join(sorted(unknown))}")
    if args.out is None:
        args.out = (
            tempfile.mkdtemp(prefix="amqp-batch-bench-")
            if args.quick
            else str(HERE / "results")
        )
    return args


def write(bench: Bench, args: argparse.Namespace, elapsed: float) -> None:
    """Print the table; write latest.md, latest.json and latest.png to --out."""
    table = render(bench, args, elapsed)
    print()
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest.md").write_text(table)
    raw: dict[str, Any] = {f"{w}|{c}": runs for (w, c), runs in bench.values.items()}
    if bench.instructions:
        raw["callgrind"] = bench.instructions
    (out / "latest.json").write_text(json.dumps(raw, indent=1))
    try:
        import chart
    except ImportError as exc:
        print(f"no chart ({exc}); install matplotlib", file=sys.stderr)
    else:
        chart.draw(summarise(bench), out / "latest.png", table.splitlines()[2])
        print(f"wrote {out / 'latest.md'} and {out / 'latest.png'}")


def main() -> None:
    args = parse_arguments()
    for name, env in ENVS.items():
        if ENV_WORKLOADS[name] & set(args.selected):
            env.ensure()
    find_broker(args.url)
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        baseline = (
            stack.enter_context(Baseline(args.baseline)) if args.baseline else None
        )
        bench = Bench(args, baseline)
        try:
            for run in range(args.runs if args.selected else 0):
                print(f"run {run + 1}/{args.runs}", flush=True)
                for workload in args.selected:
                    getattr(bench, workload.lower())()
            if args.soak:
                bench.soak(args.soak_minutes)
            if args.callgrind:
                bench.callgrind()
        finally:
            anyio.run(workloads.delete_all, args.url)
    write(bench, args, time.monotonic() - started)


if __name__ == "__main__":
    main()
