"""The JSON log formatter: one object per line, extra and context fields,
passwords redacted."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from amqp_batch._cli import parser
from amqp_batch._cli._common import CLIError
from amqp_batch._cli._run import configure_run_logging
from amqp_batch._logging import (
    ContextFilter,
    JSONFormatter,
    log_context,
    log_fields,
    set_log_context,
)


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JSONFormatter())
    handler.addFilter(ContextFilter())
    logger = logging.getLogger("amqp_batch.test_logging")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        yield logger, out
    finally:
        logger.removeHandler(handler)
        logger.propagate = True


def lines(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_one_object_per_line_with_extra_fields(
    captured: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, out = captured
    logger.info("worker %d: %s", 2, "consuming", extra={"worker": 2, "queue": "q"})
    logger.warning("multi\nline", extra={"when": object()})
    first, second = lines(out)
    assert first["message"] == "worker 2: consuming"
    assert first["level"] == "INFO"
    assert first["logger"] == "amqp_batch.test_logging"
    assert first["worker"] == 2
    assert first["queue"] == "q"
    assert first["time"].endswith("+00:00")
    assert second["message"] == "multi\nline"
    assert second["when"].startswith("<object object")  # not serialisable: str()


def test_exceptions_are_one_field(captured: tuple[logging.Logger, io.StringIO]) -> None:
    logger, out = captured
    try:
        raise ValueError("bad value")
    except ValueError:
        logger.exception("handler raised")
    (entry,) = lines(out)
    assert "Traceback" in entry["exception"]
    assert "ValueError: bad value" in entry["exception"]


def test_passwords_never_appear(captured: tuple[logging.Logger, io.StringIO]) -> None:
    logger, out = captured
    logger.error(
        "cannot connect to %s",
        "amqp://app:s3cret@rabbit:5672/",
        extra={"url": "amqps://app:s3cret@rabbit/vhost"},
    )
    try:
        raise ConnectionError("amqp://user:hunter2@host/")
    except ConnectionError:
        logger.exception("failed")
    text = out.getvalue()
    assert "s3cret" not in text
    assert "hunter2" not in text
    assert "amqp://app:***@rabbit:5672/" in text
    assert len(lines(out)) == 2


def test_context_fields(captured: tuple[logging.Logger, io.StringIO]) -> None:
    logger, out = captured
    with log_context(queue="orders"):
        with log_context(worker=3):
            logger.info("inside")
            assert log_fields() == {"queue": "orders", "worker": 3}
        logger.info("queue only", extra={"queue": "explicit wins"})
    logger.info("outside")
    inside, queue_only, outside = lines(out)
    assert (inside["queue"], inside["worker"]) == ("orders", 3)
    assert queue_only["queue"] == "explicit wins"
    assert "worker" not in queue_only
    assert "queue" not in outside


async def test_context_fields_reach_tasks_started_inside(
    captured: tuple[logging.Logger, io.StringIO],
) -> None:
    """A worker sets its fields once; its child tasks (the handler's) inherit
    them, and other tasks do not see them."""
    logger, out = captured

    async def worker(index: int) -> None:
        set_log_context(worker=index)
        async with anyio.create_task_group() as group:
            group.start_soon(handler)

    async def handler() -> None:
        await anyio.lowlevel.checkpoint()
        logger.info("handling")

    with log_context(queue="orders"):
        async with anyio.create_task_group() as group:
            group.start_soon(worker, 0)
            group.start_soon(worker, 1)
        logger.info("consumer")
    entries = lines(out)
    assert sorted(e["worker"] for e in entries if e["message"] == "handling") == [0, 1]
    (consumer,) = [e for e in entries if e["message"] == "consumer"]
    assert consumer["queue"] == "orders" and "worker" not in consumer


def test_the_filter_stamps_records_where_they_are_logged() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", (), None)
    with log_context(queue="orders"):
        assert ContextFilter().filter(record)
    assert record.queue == "orders"  # type: ignore[attr-defined]
    # Formatted later, outside the context (e.g. by a QueueListener's thread).
    assert json.loads(JSONFormatter().format(record))["queue"] == "orders"


def _run_args(tmp_path: Path, config: object | None = None, **extra: str) -> Any:
    args = ["run", "x:y"]
    if config is not None:
        path = tmp_path / "logging.json"
        path.write_text(config if isinstance(config, str) else json.dumps(config))
        args += ["--log-config", str(path)]
    for flag, value in extra.items():
        args += [f"--{flag.replace('_', '-')}", value]
    return parser().parse_args(args)


@pytest.fixture
def restore_root_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
            if handler not in handlers:
                handler.close()
        for handler in handlers:
            root.addHandler(handler)
        root.setLevel(level)


@pytest.mark.usefixtures("restore_root_logging")
def test_log_config_is_a_json_dict_config(tmp_path: Path) -> None:
    out = tmp_path / "out.log"
    config = {
        "formatters": {"json": {"()": "amqp_batch.JSONFormatter"}},
        "handlers": {
            "file": {
                "class": "logging.FileHandler",
                "filename": str(out),
                "formatter": "json",
            }
        },
        "root": {"handlers": ["file"], "level": "INFO"},
    }
    configure_run_logging(_run_args(tmp_path, config))
    logging.getLogger("amqp_batch.test").info("hello", extra={"worker": 1})
    for handler in logging.getLogger().handlers:
        handler.flush()
    (entry,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert (entry["message"], entry["worker"]) == ("hello", 1)
    # The library's loggers, created at import, are not disabled by the file.
    assert not logging.getLogger("amqp_batch.hooks").disabled


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ("{not json", "JSONDecodeError"),
        ("[1, 2]", "expected a JSON object"),
        ({"handlers": {"h": {"class": "no.such.Handler"}}}, "ValueError"),
    ],
)
@pytest.mark.usefixtures("restore_root_logging")
def test_a_bad_log_config_is_a_usage_error(
    tmp_path: Path, config: object, expected: str
) -> None:
    with pytest.raises(CLIError, match=expected):
        configure_run_logging(_run_args(tmp_path, config))


@pytest.mark.usefixtures("restore_root_logging")
def test_log_format_json_replaces_the_text_handler(tmp_path: Path) -> None:
    configure_run_logging(_run_args(tmp_path, log_format="json"))
    (handler,) = logging.getLogger().handlers
    assert isinstance(handler.formatter, JSONFormatter)
