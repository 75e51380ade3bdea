"""The ``amqp-batch`` command, run as a real process (``python -m amqp_batch``).

``run`` targets live in ``tests/cli_targets/`` (no package), which the tests put
on the subprocess's ``PYTHONPATH``. Async tests run on asyncio and trio and start
the command with the same ``--backend``; sync subprocess tests parametrize it.
Tests follow the command through its output lines, never through sleeps.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import anyio
import anyio.abc
import anyio.to_thread
import pytest
from tests.support.rabbit_node import PrivateNode

from amqp_batch import MessageResult, __version__
from consumer_support import (
    admin_channel,
    cleanup,
    drain,
    ids_of,
    message_count,
    publish_ids,
)

TARGETS = Path(__file__).resolve().parent / "cli_targets"
BACKENDS = ["asyncio", "trio"]
MARKER = "Pw-marker-7f3a9c"


def _fate() -> Callable[[int], MessageResult]:
    """``cli_handlers.fate``: the rule the target handlers follow."""
    spec = importlib.util.spec_from_file_location(
        "cli_handlers_rule", TARGETS / "cli_handlers.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rule: Callable[[int], MessageResult] = module.fate
    return rule


fate = _fate()


def cli_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for the command: no AMQP_BATCH_* from ours, the targets
    importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AMQP_BATCH_")}
    env["PYTHONPATH"] = str(TARGETS)
    env.update(extra or {})
    return env


def run_cli(
    args: Sequence[str],
    *,
    cwd: Path,
    env: Mapping[str, str] | None = None,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    """Run the command to its end; its exit code, stdout and stderr."""
    return subprocess.run(
        [sys.executable, "-m", "amqp_batch", *args],
        cwd=cwd,
        env=cli_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def closed_port() -> int:
    """A local TCP port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def with_password(url: str, user: str, password: str) -> str:
    parts = urlsplit(url)
    netloc = f"{user}:{password}@{parts.hostname}:{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


class CLIProcess:
    """A running ``amqp-batch`` whose output (stdout and stderr) is read line by
    line, on demand."""

    def __init__(self, process: anyio.abc.Process) -> None:
        self.process = process
        self.lines: list[str] = []
        self._buffer = b""
        self._eof = False

    async def _read_line(self) -> str | None:
        assert self.process.stdout is not None
        while b"\n" not in self._buffer:
            if self._eof:
                return None
            try:
                self._buffer += await self.process.stdout.receive()
            except anyio.EndOfStream:
                self._eof = True
                if self._buffer:
                    self._buffer += b"\n"
        line, _, self._buffer = self._buffer.partition(b"\n")
        self.lines.append(line.decode())
        return self.lines[-1]

    async def expect(
        self, predicate: Callable[[str], bool], timeout: float = 30
    ) -> str:
        """Read until a line satisfies ``predicate``; that line."""
        with anyio.move_on_after(timeout):
            while (line := await self._read_line()) is not None:
                if predicate(line):
                    return line
            raise AssertionError(f"the command ended first; its output: {self.lines}")
        raise AssertionError(f"no such line in {timeout} s; the output: {self.lines}")

    async def expect_ids(self, ids: Iterable[str], timeout: float = 30) -> None:
        """Read until the handler printed every id in ``ids`` (``batch ...``)."""
        missing = set(ids)

        def done(line: str) -> bool:
            if line.startswith("batch "):
                missing.difference_update(line.split()[1:])
            return not missing

        await self.expect(done, timeout)

    async def finish(self, timeout: float = 30) -> int:
        """Read the rest of the output; the exit code."""
        with anyio.fail_after(timeout):
            while await self._read_line() is not None:
                pass
            return await self.process.wait()

    @property
    def output(self) -> str:
        return "\n".join(self.lines)


@asynccontextmanager
async def cli_process(
    args: Sequence[str], *, cwd: Path, env: Mapping[str, str] | None = None
) -> AsyncIterator[CLIProcess]:
    """Start the command; kill it if the test leaves before it ended."""
    process = await anyio.open_process(
        [sys.executable, "-m", "amqp_batch", *args],
        cwd=cwd,
        env=cli_env(env),
        stderr=subprocess.STDOUT,
    )
    try:
        yield CLIProcess(process)
    finally:
        if process.returncode is None:
            process.kill()
        with anyio.CancelScope(shield=True):
            await process.aclose()


def summary_counts(line: str) -> dict[str, int]:
    """``key=value`` numbers of a summary line."""
    return {key: int(value) for key, value in re.findall(r"(\w+)=(\d+)\b", line)}


def expected_fates(ids: Iterable[int]) -> tuple[list[str], list[str]]:
    """(acked, dead-lettered) ids under ``cli_handlers.fate`` with no retries."""
    acked = [str(i) for i in ids if fate(i) is MessageResult.ACK]
    dead = [str(i) for i in ids if fate(i) is not MessageResult.ACK]
    return acked, dead


# -- run: handler functions and consumer classes --------------------------------


@pytest.mark.parametrize("target", ["cli_handlers:handle", "cli_handlers:handle_list"])
async def test_run_handler_acks_and_dead_letters(
    broker_url: str, unique_name: str, anyio_backend: str, tmp_path: Path, target: str
) -> None:
    queue, dlx, dlq = unique_name, f"{unique_name}.dlx", f"{unique_name}.dlq"
    ids = range(1, 61)
    args = [
        "run", target, "--url", broker_url, "--queue", queue,
        "--dead-letter-exchange", dlx, "--dead-letter-queue", dlq,
        "--max-retries", "0", "--batch-size", "10", "--prefetch", "50",
        "--batch-timeout", "0.2", "--backend", anyio_backend,
    ]  # fmt: skip
    try:
        async with cli_process(args, cwd=tmp_path) as cli:
            await cli.expect(lambda line: "worker 0: connecting -> consuming" in line)
            async with admin_channel(broker_url) as channel:
                await publish_ids(channel, ids, routing_key=queue)
            await cli.expect_ids(map(str, ids))
            cli.process.send_signal(signal.SIGTERM)
            code = await cli.finish()
        assert code == 0, cli.output
        acked, dead = expected_fates(ids)
        final = summary_counts(next(x for x in cli.lines if "stopped after" in x))
        assert final["ack"] == len(acked)
        assert final["nack"] == sum(fate(i) is MessageResult.NACK for i in ids)
        assert final["dead_lettered"] == len(dead)  # NACKs and exhausted REQUEUEs
        assert "worker 0: stopping -> stopped" in cli.output
        async with admin_channel(broker_url) as channel:
            assert await message_count(channel, queue) == 0  # the rest were acked
            assert sorted(ids_of(await drain(channel, dlq)), key=int) == dead
    finally:
        await cleanup(broker_url, [queue, dlq], [dlx])


@pytest.mark.parametrize("target", ["cli_consumers:Ingest", "cli_consumers:Single"])
async def test_run_consumer_subclass_with_env_settings(
    broker_url: str, unique_name: str, anyio_backend: str, tmp_path: Path, target: str
) -> None:
    """A BatchConsumer / Consumer subclass, instantiated with settings that come
    from AMQP_BATCH_* variables."""
    queue, dlx, dlq = unique_name, f"{unique_name}.dlx", f"{unique_name}.dlq"
    ids = range(1, 31)
    env = {
        "AMQP_BATCH_URL": broker_url,
        "AMQP_BATCH_QUEUE_NAME": queue,
        "AMQP_BATCH_DEAD_LETTER_EXCHANGE": dlx,
        "AMQP_BATCH_DEAD_LETTER_QUEUE": dlq,
        "AMQP_BATCH_MAX_REQUEUE_ATTEMPTS": "0",
        "AMQP_BATCH_BATCH_TIMEOUT": "0.2",
    }
    args = ["run", target, "--backend", anyio_backend, "--workers", "2"]
    try:
        async with cli_process(args, cwd=tmp_path, env=env) as cli:
            consuming: set[str] = set()

            def both_consuming(line: str) -> bool:
                if "connecting -> consuming" in line:
                    consuming.add(line.split("worker ")[1].split(":", maxsplit=1)[0])
                return consuming == {"0", "1"}

            await cli.expect(both_consuming)
            async with admin_channel(broker_url) as channel:
                await publish_ids(channel, ids, routing_key=queue)
            await cli.expect_ids(map(str, ids))
            cli.process.send_signal(signal.SIGTERM)
            code = await cli.finish()
        assert code == 0, cli.output
        if target.endswith("Ingest"):
            assert f"on_start {queue}" in cli.lines
            assert cli.lines.index("on_stop") > cli.lines.index(f"on_start {queue}")
        acked, dead = expected_fates(ids)
        final = summary_counts(next(x for x in cli.lines if "stopped after" in x))
        assert final["ack"] == len(acked)
        async with admin_channel(broker_url) as channel:
            assert await message_count(channel, queue) == 0
            assert sorted(ids_of(await drain(channel, dlq)), key=int) == dead
    finally:
        await cleanup(broker_url, [queue, dlq], [dlx])


async def test_sigterm_drains_batches_in_flight_and_exits_0(
    broker_url: str, unique_name: str, anyio_backend: str, tmp_path: Path
) -> None:
    queue = unique_name
    async with admin_channel(broker_url) as channel:
        await channel.queue_declare(queue, durable=True)
        ids = await publish_ids(channel, range(100), routing_key=queue)
    args = [
        "run", "cli_consumers:Slow", "--url", broker_url, "--queue", queue,
        "--batch-size", "5", "--prefetch", "40", "--batch-timeout", "60",
        "--max-concurrent-batches", "2", "--shutdown-timeout", "20",
        "--backend", anyio_backend,
    ]  # fmt: skip
    try:
        async with cli_process(args, cwd=tmp_path) as cli:
            await cli.expect(lambda line: line.startswith("batch "))
            cli.process.send_signal(signal.SIGTERM)
            code = await cli.finish()
        assert code == 0, cli.output
        assert "SIGTERM: stopping gracefully" in cli.output
        in_handler = [
            i for x in cli.lines if x.startswith("batch ") for i in x.split()[1:]
        ]
        acked = [i for x in cli.lines if x.startswith("acked ") for i in x.split()[1:]]
        # Batches in the handler when SIGTERM came finished and were settled.
        assert sorted(acked, key=int) == sorted(in_handler, key=int)
        assert 0 < len(acked) <= 15
        async with admin_channel(broker_url) as channel:
            remaining = ids_of(await drain(channel, queue))
        # Prefetched messages went back: nothing lost, nothing acked twice.
        assert sorted(remaining + acked, key=int) == ids
    finally:
        await cleanup(broker_url, [queue])


async def test_password_in_url_never_logged(
    private_node: PrivateNode, unique_name: str, anyio_backend: str, tmp_path: Path
) -> None:
    user = f"cli-{anyio_backend}-{os.getpid()}"
    private_node.add_user(user, MARKER)
    url = with_password(private_node.url, user, MARKER)
    queue = unique_name
    args = [
        "run", "cli_handlers:handle", "--url", url, "--queue", queue,
        "--failover-url", with_password(url, user, MARKER),
        "--batch-timeout", "0.1", "--summary-interval", "0.2",
        "--backend", anyio_backend, "--log-level", "debug",
    ]  # fmt: skip
    try:
        async with cli_process(args, cwd=tmp_path) as cli:
            await cli.expect(lambda line: "-> consuming" in line)
            async with admin_channel(url) as channel:
                await publish_ids(channel, [1, 3], routing_key=queue)
            await cli.expect_ids(["1", "3"])
            await cli.expect(lambda line: "summary:" in line)
            cli.process.send_signal(signal.SIGTERM)
            assert await cli.finish() == 0, cli.output
        assert f"{user}:***@" in cli.output
        assert MARKER not in cli.output
    finally:
        await cleanup(private_node.url, [queue])


# -- run: errors are one line and exit 2 --------------------------------------------


def assert_one_line_error(
    result: subprocess.CompletedProcess[str], *expected: str
) -> None:
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("amqp-batch run: error: "), lines
    for text in expected:
        assert text in lines[0], lines[0]
    assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("no_such_module_x:handle", "no module named 'no_such_module_x'"),
        ("cli_handlers:missing", "has no attribute 'missing'"),
        ("cli_handlers:NOT_CALLABLE", "not a handler function"),
        ("cli_handlers:plain", "is a plain function"),
        ("cli_handlers:NotAConsumer", "not a BatchConsumer or Consumer subclass"),
        ("cli_consumers:Unfinished", "does not implement process_messages()"),
        ("cli_consumers:NeedsMore", "cannot create NeedsMore(settings)"),
        ("cli_broken:handle", "RuntimeError: cli_broken refuses to import"),
        ("cli_handlers", "is not MODULE:NAME"),
    ],
)
def test_bad_target(tmp_path: Path, target: str, expected: str) -> None:
    port = closed_port()  # the target is checked before any connection
    result = run_cli(
        ["run", target, "-q", "q", "--url", f"amqp://127.0.0.1:{port}/"], cwd=tmp_path
    )
    assert_one_line_error(result, expected)


def test_missing_queue(tmp_path: Path) -> None:
    result = run_cli(["run", "cli_handlers:handle"], cwd=tmp_path)
    assert_one_line_error(result, "no queue to consume", "--queue")


def test_invalid_setting(tmp_path: Path) -> None:
    result = run_cli(
        ["run", "cli_handlers:handle", "-q", "q", "--batch-size", "100"],
        cwd=tmp_path,
        env={"AMQP_BATCH_PREFETCH_COUNT": "20"},
    )
    assert_one_line_error(result, "prefetch_count (20) must be >= batch_size (100)")


@pytest.mark.parametrize("backend", BACKENDS)
def test_unreachable_broker(tmp_path: Path, backend: str) -> None:
    url = f"amqp://guest:{MARKER}@127.0.0.1:{closed_port()}/"
    result = run_cli(
        ["run", "cli_handlers:handle", "-q", "q", "--url", url, "--backend", backend],
        cwd=tmp_path,
    )
    assert_one_line_error(result, "no broker answered", "guest:***@127.0.0.1")
    assert MARKER not in result.stderr + result.stdout


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_credentials(broker_url: str, tmp_path: Path, backend: str) -> None:
    url = with_password(broker_url, "guest", MARKER)
    result = run_cli(
        ["run", "cli_handlers:handle", "-q", "q", "--url", url, "--backend", backend],
        cwd=tmp_path,
    )
    assert_one_line_error(result, "AuthenticationError", "guest:***@")
    assert MARKER not in result.stderr + result.stdout


async def test_refused_topology_is_one_line_and_exit_2(
    broker_url: str, unique_name: str, anyio_backend: str, tmp_path: Path
) -> None:
    """A queue that exists with other arguments: the redeclare is refused (406);
    the command stops with a one-line error, the worker's log has no traceback."""
    async with admin_channel(broker_url) as channel:
        await channel.queue_declare(
            unique_name, durable=True, arguments={"x-max-length": 5}
        )
    try:
        result = await anyio.to_thread.run_sync(
            lambda: run_cli(
                ["run", "cli_handlers:handle", "-q", unique_name, "--url", broker_url,
                 "--backend", anyio_backend],
                cwd=tmp_path,
            )
        )  # fmt: skip
        assert result.returncode == 2, result
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("amqp-batch run: error: ChannelClosed:"), last
        assert "PRECONDITION_FAILED" in last
        assert "Traceback" not in result.stderr
    finally:
        await cleanup(broker_url, [unique_name])


# -- run: where settings come from ------------------------------------------------


def check_settings(result: subprocess.CompletedProcess[str]) -> dict[str, str]:
    assert result.returncode == 0, result
    settings = {}
    for line in result.stdout.splitlines():
        if line.startswith("  ") and " = " in line:
            key, _, value = line.strip().partition(" = ")
            settings[key] = value
    return settings


@pytest.mark.parametrize("backend", BACKENDS)
def test_flags_override_env_override_dotenv(
    broker_url: str, tmp_path: Path, backend: str
) -> None:
    (tmp_path / ".env").write_text(
        "# read because it is in the current directory\n"
        f"AMQP_BATCH_URL={broker_url}\n"
        "AMQP_BATCH_QUEUE_NAME=from-dotenv\n"
        "AMQP_BATCH_BATCH_SIZE=11\n"
        "AMQP_BATCH_PREFETCH_COUNT=44\n"
        "export AMQP_BATCH_BATCH_TIMEOUT='6.5'\n"
    )
    env = {"AMQP_BATCH_BATCH_SIZE": "22", "AMQP_BATCH_PREFETCH_COUNT": "55"}
    result = run_cli(
        ["run", "cli_handlers:handle", "--check", "--batch-size", "33",
         "--backend", backend],
        cwd=tmp_path,
        env=env,
    )  # fmt: skip
    settings = check_settings(result)
    assert settings["batch_size"] == "33"  # flag > env > .env
    assert settings["prefetch_count"] == "55"  # env > .env
    assert settings["batch_timeout"] == "6.5"  # .env > default
    assert settings["queue_name"] == "'from-dotenv'"
    assert settings["max_requeue_attempts"] == "3"  # default
    assert "target: cli_handlers:handle (handler)" in result.stdout
    assert "answered" in result.stdout


def test_env_file_flag_and_no_env_file(broker_url: str, tmp_path: Path) -> None:
    (tmp_path / "settings.env").write_text(
        f"AMQP_BATCH_URL={broker_url}\nAMQP_BATCH_QUEUE_NAME=from-file\n"
    )
    (tmp_path / ".env").write_text("AMQP_BATCH_QUEUE_NAME=from-dotenv\n")
    result = run_cli(
        ["run", "cli_handlers:handle", "--check", "--env-file", "settings.env"],
        cwd=tmp_path,
    )
    assert check_settings(result)["queue_name"] == "'from-file'"
    result = run_cli(["run", "cli_handlers:handle", "--no-env-file"], cwd=tmp_path)
    assert_one_line_error(result, "no queue to consume")
    result = run_cli(
        ["run", "cli_handlers:handle", "--env-file", "missing.env"], cwd=tmp_path
    )
    assert_one_line_error(result, "--env-file 'missing.env': no such file")


def test_file_path_target(broker_url: str, tmp_path: Path) -> None:
    target = f"{TARGETS / 'cli_consumers.py'}:Ingest"
    result = run_cli(
        ["run", target, "--check", "-q", "q", "--url", broker_url],
        cwd=tmp_path,
        env={"PYTHONPATH": ""},  # found through the path alone
    )
    assert result.returncode == 0, result
    assert f"target: {target} (consumer class)" in result.stdout


def test_console_script_imports_from_the_current_directory(broker_url: str) -> None:
    script = Path(sys.executable).with_name("amqp-batch")
    assert script.exists(), "the package is installed with its console script"
    result = subprocess.run(
        [str(script), "run", "cli_handlers:handle", "--check", "-q", "q",
         "--url", broker_url],
        cwd=TARGETS,
        env=cli_env({"PYTHONPATH": ""}),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result
    assert "target: cli_handlers:handle (handler)" in result.stdout


# -- help and version ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], ["run", "demo", "--version"]),
        (["run"], ["MODULE:TARGET", "--queue", "--batch-size", "AMQP_BATCH_",
                   "--env-file", "--summary-interval", "--backend", "SIGTERM"]),
        (["demo"], ["--messages", "AMQP_BATCH_URL", "in-memory", "--backend"]),
    ],
)  # fmt: skip
def test_help(tmp_path: Path, args: list[str], expected: list[str]) -> None:
    result = run_cli([*args, "--help"], cwd=tmp_path)
    assert result.returncode == 0, result
    for text in expected:
        assert text in result.stdout


def test_version(tmp_path: Path) -> None:
    result = run_cli(["--version"], cwd=tmp_path)
    assert result.returncode == 0
    assert result.stdout.strip() == f"amqp-batch {__version__}"


# -- demo --------------------------------------------------------------------------


def demo_expectations(count: int, retries: int = 2) -> dict[str, int]:
    """What the demo's rule (every 10th NACK, other 7ths REQUEUE) gives."""
    nack = sum(n % 10 == 0 for n in range(1, count + 1))
    requeued = sum(n % 7 == 0 and n % 10 != 0 for n in range(1, count + 1))
    return {
        "ACK": count - nack - requeued,
        "NACK": nack,
        "REQUEUE": requeued * (retries + 1),
        "dead": nack + requeued,
    }


def assert_demo_counts(stdout: str, count: int) -> None:
    want = demo_expectations(count)
    assert (
        f"handled: ACK {want['ACK']}, NACK {want['NACK']}, REQUEUE {want['REQUEUE']}; "
        f"settled {count}/{count}; dead-letter queue: {want['dead']}"
    ) in stdout, stdout
    assert f"progress: {count}/{count} messages settled" in stdout  # not a TTY


@pytest.mark.parametrize("backend", BACKENDS)
def test_demo_on_rabbitmq(
    broker_url: str, unique_name: str, tmp_path: Path, backend: str
) -> None:
    result = run_cli(
        ["demo", "--messages", "300", "--queue", unique_name, "--backend", backend],
        cwd=tmp_path,
        env={"AMQP_BATCH_URL": broker_url},
    )
    assert result.returncode == 0, result
    assert "demo on RabbitMQ at" in result.stdout
    assert_demo_counts(result.stdout, 300)
    assert "in-memory" not in result.stdout


@pytest.mark.parametrize("backend", BACKENDS)
def test_demo_falls_back_to_memory_broker(tmp_path: Path, backend: str) -> None:
    url = f"amqp://guest:{MARKER}@127.0.0.1:{closed_port()}/"
    result = run_cli(
        ["demo", "--messages", "300", "--backend", backend],
        cwd=tmp_path,
        env={"AMQP_BATCH_URL": url},
    )
    assert result.returncode == 0, result
    assert "no RabbitMQ answered at amqp://guest:***@127.0.0.1" in result.stdout
    assert "demo on the IN-MEMORY broker" in result.stdout
    assert_demo_counts(result.stdout, 300)
    assert result.stdout.rstrip().endswith("[in-memory broker]")
    assert MARKER not in result.stdout + result.stderr


def test_demo_bad_credentials(broker_url: str, tmp_path: Path) -> None:
    url = with_password(broker_url, "guest", MARKER)
    result = run_cli(["demo", "--url", url], cwd=tmp_path)
    assert result.returncode == 2, result
    assert result.stderr.startswith("amqp-batch demo: error: AuthenticationError")
    assert len(result.stderr.strip().splitlines()) == 1
    assert MARKER not in result.stdout + result.stderr
