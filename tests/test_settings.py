"""Settings: aio-pika-batch names and defaults, validation, redaction, from_env."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import anyio
import attrs
import pytest

from amqp_batch import (
    BatchConsumerSettings,
    ConsumerSettings,
    Message,
    MessageResult,
    batch_consumer,
)
from amqp_batch._topology import retry_policy, topology
from consumer_support import (
    admin_channel,
    cleanup,
    ids_of,
    publish_ids,
    take,
    unique_name,
)


def test_defaults_match_aio_pika_batch() -> None:
    settings = BatchConsumerSettings(queue_name="q")
    assert settings.url == "amqp://guest:guest@localhost:5672/"
    assert settings.prefetch_count == 10
    assert settings.exchange_name is None
    assert settings.exchange_type == "direct"
    assert settings.routing_key is None
    assert settings.queue_durable is True
    assert settings.exchange_durable is True
    assert settings.queue_arguments is None
    assert settings.num_workers == 1
    assert settings.max_requeue_attempts == 3
    assert settings.unhandled_exception_action is MessageResult.REQUEUE
    assert settings.batch_size == 10
    assert settings.batch_timeout == 5.0
    assert settings.max_concurrent_batches == 1


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"batch_timeout": -1.0}, "batch_timeout"),
        ({"batch_timeout": 0}, "batch_timeout"),
        ({"shutdown_timeout": -0.5}, "shutdown_timeout"),
        ({"num_workers": 0}, "num_workers"),
        ({"prefetch_count": 5, "batch_size": 10}, "prefetch_count"),
        ({"url": "http://localhost/"}, "url"),
        ({"url": "amqp://[::1"}, "url"),
        ({"failover_urls": ("amqp://h:99999/",)}, "failover_urls"),
        ({"max_requeue_attempts": -1}, "max_requeue_attempts"),
        ({"max_concurrent_batches": 0}, "max_concurrent_batches"),
        ({"exchange_type": "nonsense"}, "exchange_type"),
        ({"unhandled_exception_action": "explode"}, "unhandled_exception_action"),
        ({"queue_name": ""}, "queue_name"),
        ({"num_workers": True}, "num_workers"),
        ({"reconnect_backoff_base": 5.0, "reconnect_backoff_cap": 1.0}, "reconnect"),
        ({"dead_letter_queue": "dlq"}, "dead_letter_queue"),
    ],
)
def test_validation_names_the_field(overrides: dict[str, object], field: str) -> None:
    values: dict[str, object] = {"queue_name": "q", **overrides}
    with pytest.raises((ValueError, TypeError), match=field):
        BatchConsumerSettings(**values)  # type: ignore[arg-type]


def test_repr_and_str_redact_passwords() -> None:
    settings = BatchConsumerSettings(
        queue_name="q",
        url="amqp://user:MARKER-secret@host/vh",
        failover_urls=["amqps://u:MARKER-other@h2/"],
    )
    assert "MARKER" not in repr(settings)
    assert "MARKER" not in str(settings)
    assert "user:***@host" in repr(settings)
    with pytest.raises(ValueError, match="url") as caught:
        BatchConsumerSettings(queue_name="q", url="amqp://u:MARKER-pw@h:notaport/")
    assert "MARKER" not in str(caught.value)


def test_consumer_settings_has_no_batch_fields() -> None:
    settings = ConsumerSettings(queue_name="q")
    assert not hasattr(settings, "batch_size")
    assert settings.urls == ("amqp://guest:guest@localhost:5672/",)


def test_connection_parameters_rotate_and_take_heartbeat() -> None:
    settings = BatchConsumerSettings(
        queue_name="q", url="amqp://a/", failover_urls="amqp://b/", heartbeat=7
    )
    hosts = [settings.connection_parameters(i).host for i in range(3)]
    assert hosts == ["a", "b", "a"]
    assert settings.connection_parameters(0).heartbeat == 7


def test_from_env_reads_every_type(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text(
        "# comment\n"
        "APP_QUEUE_NAME=from-file\n"
        "APP_BATCH_SIZE=99\n"
        "export APP_EXCHANGE_NAME='events'\n"
    )
    environ = {
        "APP_URL": "amqp://u:p@broker:5673/vh",
        "APP_BATCH_SIZE": "20",
        "APP_PREFETCH_COUNT": "40",
        "APP_BATCH_TIMEOUT": "0.25",
        "APP_QUEUE_DURABLE": "false",
        "APP_QUEUE_ARGUMENTS": '{"x-queue-type": "quorum"}',
        "APP_FAILOVER_URLS": "amqp://b1/, amqp://b2/",
        "APP_UNHANDLED_EXCEPTION_ACTION": "nack",
        "APP_HEARTBEAT": "",
        "OTHER_BATCH_SIZE": "1",
    }
    settings = BatchConsumerSettings.from_env(
        "APP_", env_file=env_file, environ=environ, num_workers=3
    )
    assert settings.queue_name == "from-file"
    assert settings.exchange_name == "events"
    assert settings.url == "amqp://u:p@broker:5673/vh"
    assert settings.batch_size == 20
    assert settings.prefetch_count == 40
    assert settings.batch_timeout == 0.25
    assert settings.queue_durable is False
    assert dict(settings.queue_arguments or {}) == {"x-queue-type": "quorum"}
    assert settings.failover_urls == ("amqp://b1/", "amqp://b2/")
    assert settings.unhandled_exception_action is MessageResult.NACK
    assert settings.heartbeat is None
    assert settings.num_workers == 3


def test_from_env_default_prefix_and_bad_values() -> None:
    settings = ConsumerSettings.from_env(environ={"AMQP_BATCH_QUEUE_NAME": "q"})
    assert settings.queue_name == "q"
    with pytest.raises(ValueError, match="AMQP_BATCH_NUM_WORKERS"):
        ConsumerSettings.from_env(
            environ={"AMQP_BATCH_QUEUE_NAME": "q", "AMQP_BATCH_NUM_WORKERS": "many"}
        )
    with pytest.raises(ValueError, match="AMQP_BATCH_QUEUE_DURABLE"):
        ConsumerSettings.from_env(
            environ={"AMQP_BATCH_QUEUE_NAME": "q", "AMQP_BATCH_QUEUE_DURABLE": "maybe"}
        )


# --- types of every field --------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"prefetch_count": 10.5}, "prefetch_count"),
        ({"num_workers": 1.5}, "num_workers"),
        ({"num_workers": 2.0}, "num_workers"),
        ({"batch_size": 3.0}, "batch_size"),
        ({"heartbeat": 2.5}, "heartbeat"),
        ({"max_requeue_attempts": False}, "max_requeue_attempts"),
        ({"max_batch_bytes": 1e6}, "max_batch_bytes"),
        ({"kill_switch_min_samples": 5.5}, "kill_switch_min_samples"),
        ({"batch_timeout": True}, "batch_timeout"),
        ({"shutdown_timeout": float("nan")}, "shutdown_timeout"),
        ({"queue_durable": 1}, "queue_durable"),
        ({"exchange_name": 5}, "exchange_name"),
        ({"exchange_type": 1}, "exchange_type"),
        ({"routing_key": b"key"}, "routing_key"),
        ({"queue_arguments": [("x", 1)]}, "queue_arguments"),
        ({"failover_urls": 5}, "failover_urls"),
        ({"retry_delays": (1, "5")}, "retry_delays"),
        ({"retry_delays": 5}, "retry_delays"),
        ({"retry_delays": (0,)}, "retry_delays"),
        ({"retry_delays": (10**8,)}, "retry_delays"),
        ({"retry_delays": (1,), "retry_backoff_base": 1.0}, "retry_delays"),
        ({"retry_backoff_base": 10, "retry_backoff_cap": 1}, "retry_backoff_cap"),
        ({"kill_switch_threshold": 1.5}, "kill_switch_threshold"),
        ({"kill_switch_threshold": 0}, "kill_switch_threshold"),
        ({"kill_switch_cooldown": 0}, "kill_switch_cooldown"),
        ({"handler_timeout": 0}, "handler_timeout"),
        ({"max_messages_per_second": -1}, "max_messages_per_second"),
        ({"dead_letter_strategy": "drop"}, "dead_letter_strategy"),
        ({"header_signing_key": "short"}, "header_signing_key"),
        ({"header_signing_key": 12345678901234567890}, "header_signing_key"),
    ],
)
def test_every_field_refuses_the_wrong_type(
    overrides: dict[str, object], field: str
) -> None:
    values: dict[str, object] = {"queue_name": "q", **overrides}
    with pytest.raises((ValueError, TypeError)) as caught:
        BatchConsumerSettings(**values)  # type: ignore[arg-type]
    assert str(caught.value).startswith(field)


def test_float_fields_take_integers() -> None:
    settings = BatchConsumerSettings(
        queue_name="q", batch_timeout=2, shutdown_timeout=1, retry_delays=[1, 2.5]
    )
    assert settings.batch_timeout == 2
    assert settings.retry_delays == (1, 2.5)


@pytest.mark.parametrize(
    ("variable", "value"),
    [("PREFETCH_COUNT", "10.5"), ("NUM_WORKERS", "1.5"), ("RETRY_DELAYS", "1,x")],
)
def test_from_env_refuses_floats_for_integers(variable: str, value: str) -> None:
    environ = {"AMQP_BATCH_QUEUE_NAME": "q", f"AMQP_BATCH_{variable}": value}
    with pytest.raises(ValueError, match=f"AMQP_BATCH_{variable}"):
        BatchConsumerSettings.from_env(environ=environ)


# --- the new settings -------------------------------------------------------


def test_new_settings_defaults_change_nothing() -> None:
    settings = BatchConsumerSettings(queue_name="q")
    assert settings.retry_delays == ()
    assert settings.retry_delay_schedule == ()
    assert settings.kill_switch_threshold is None
    assert settings.handler_timeout is None
    assert settings.broker_consumer_timeout is None
    assert settings.max_messages_per_second is None
    assert settings.dead_letter_strategy == "publish"
    assert settings.header_signing_key is None
    assert settings.timing_warnings() == []


def test_from_env_reads_the_new_settings() -> None:
    settings = BatchConsumerSettings.from_env(
        environ={
            "AMQP_BATCH_QUEUE_NAME": "q",
            "AMQP_BATCH_RETRY_DELAYS": "1, 10,60",
            "AMQP_BATCH_KILL_SWITCH_THRESHOLD": "0.5",
            "AMQP_BATCH_KILL_SWITCH_WINDOW": "10",
            "AMQP_BATCH_KILL_SWITCH_MIN_SAMPLES": "8",
            "AMQP_BATCH_KILL_SWITCH_COOLDOWN": "5",
            "AMQP_BATCH_HANDLER_TIMEOUT": "20",
            "AMQP_BATCH_BROKER_CONSUMER_TIMEOUT": "1800",
            "AMQP_BATCH_MAX_MESSAGES_PER_SECOND": "250.5",
            "AMQP_BATCH_DEAD_LETTER_STRATEGY": "broker",
            "AMQP_BATCH_HEADER_SIGNING_KEY": "MARKER-0123456789abcdef",
            "AMQP_BATCH_DEAD_LETTER_ROUTING_KEY": "dead",
        }
    )
    assert settings.retry_delays == (1.0, 10.0, 60.0)
    assert settings.kill_switch_threshold == 0.5
    assert settings.kill_switch_window == 10.0
    assert settings.kill_switch_min_samples == 8
    assert settings.kill_switch_cooldown == 5.0
    assert settings.handler_timeout == 20.0
    assert settings.broker_consumer_timeout == 1800.0
    assert settings.max_messages_per_second == 250.5
    assert settings.dead_letter_strategy == "broker"
    assert settings.header_signing_key == b"MARKER-0123456789abcdef"
    assert settings.dead_letter_routing_key == "dead"
    assert "MARKER" not in repr(settings)
    assert "MARKER" not in str(settings)


def test_retry_backoff_gives_one_delay_per_attempt() -> None:
    settings = BatchConsumerSettings(
        queue_name="q",
        max_requeue_attempts=6,
        retry_backoff_base=2,
        retry_backoff_cap=20,
    )
    assert settings.retry_delay_schedule == (2, 4, 8, 16, 20, 20)
    explicit = BatchConsumerSettings(queue_name="q", retry_delays=(5, 30))
    assert explicit.retry_delay_schedule == (5, 30)


def test_timing_warnings_name_what_does_not_fit() -> None:
    fits = BatchConsumerSettings(
        queue_name="q",
        batch_timeout=5,
        handler_timeout=60,
        shutdown_timeout=30,
        broker_consumer_timeout=1800,
    )
    assert fits.timing_warnings() == []
    tight = attrs.evolve(fits, handler_timeout=1800, shutdown_timeout=1800)
    warnings = tight.timing_warnings()
    assert len(warnings) == 2
    assert warnings[0].startswith("batch_timeout + handler_timeout (1805 s)")
    assert warnings[1].startswith("shutdown_timeout (1800 s)")


# --- every dead-letter exchange type delivers every dead letter to the DLQ ---


@pytest.mark.parametrize(
    ("exchange_type", "binding", "dead_key"),
    [
        ("topic", "#", None),
        ("fanout", "", None),
        ("headers", "", None),
        ("direct", "orders.dead", "orders.dead"),
    ],
)
def test_dead_letter_queue_binding_per_exchange_type(
    exchange_type: str, binding: str, dead_key: str | None
) -> None:
    settings = BatchConsumerSettings(
        queue_name="orders",
        dead_letter_exchange="dlx",
        dead_letter_exchange_type=exchange_type,
        dead_letter_queue="orders.dead",
    )
    assert settings.dead_letter_binding_key == binding
    assert settings.effective_dead_letter_routing_key == dead_key
    _, queues, bindings = topology(settings)
    work = next(q for q in queues if q.name == "orders")
    arguments = dict(work.arguments or {})
    assert arguments.get("x-dead-letter-routing-key") == dead_key
    assert [(b.queue, b.routing_key) for b in bindings] == [("orders.dead", binding)]
    assert retry_policy(settings).dead_letter_routing_key == dead_key


def test_direct_dead_letter_routing_key_can_be_chosen_once() -> None:
    chosen = BatchConsumerSettings(
        queue_name="orders",
        dead_letter_exchange="dlx",
        dead_letter_exchange_type="direct",
        dead_letter_queue="orders.dead",
        dead_letter_routing_key="failed",
    )
    assert chosen.dead_letter_binding_key == "failed"
    with pytest.raises(ValueError, match="dead_letter_routing_key"):
        attrs.evolve(chosen, queue_arguments={"x-dead-letter-routing-key": "other"})
    with pytest.raises(ValueError, match="dead_letter_queue"):
        BatchConsumerSettings(
            queue_name="orders",
            dead_letter_exchange="dlx",
            dead_letter_exchange_type="x-consistent-hash",
            dead_letter_queue="orders.dead",
        )


@pytest.mark.parametrize("exchange_type", ["direct", "fanout", "topic", "headers"])
async def test_every_dead_letter_exchange_type_delivers_to_the_queue(
    broker_url: str, exchange_type: str
) -> None:
    """Regression: a direct DLX was bound with an empty key, so dead letters
    (which keep their routing key) were dropped. NACKed originals (the broker
    dead-letters them) and exhausted copies (the library does) both arrive."""
    queue, exchange = unique_name(), unique_name("ex")
    dlx, dlq = unique_name("dlx"), unique_name("dlq")
    handled: set[str] = set()
    done = anyio.Event()

    async def handle(messages: Sequence[Message]) -> AsyncIterator[MessageResult]:
        for message in messages:
            handled.add(f"{message.message_id}:{message.retry_count}")
            nack = (message.message_id or "").startswith("nack")
            yield MessageResult.NACK if nack else MessageResult.REQUEUE
        if len(handled) == 6:
            done.set()

    settings = BatchConsumerSettings(
        url=broker_url,
        queue_name=queue,
        exchange_name=exchange,
        exchange_type="topic",
        routing_key="orders.#",
        dead_letter_exchange=dlx,
        dead_letter_exchange_type=exchange_type,
        dead_letter_queue=dlq,
        max_requeue_attempts=1,
        batch_timeout=0.05,
        connection_name=queue,
    )
    ids = ["nack-1", "nack-2", "requeue-1", "requeue-2"]
    try:
        async with batch_consumer(settings, handle):
            async with admin_channel(broker_url) as channel:
                await publish_ids(
                    channel, ids, exchange=exchange, routing_key="orders.created"
                )
            with anyio.fail_after(20):
                await done.wait()
        dead = await take(broker_url, dlq, len(ids))
    finally:
        await cleanup(broker_url, queues=[queue, dlq], exchanges=[exchange, dlx])
    assert sorted(ids_of(dead)) == sorted(ids)
    for delivery in dead:
        headers = delivery.properties.headers or {}
        if exchange_type == "direct":
            assert delivery.routing_key == dlq  # the fixed dead-letter key
        else:
            assert delivery.routing_key == "orders.created"
        if delivery.properties.message_id.startswith("requeue"):  # type: ignore[union-attr]
            assert headers["x-original-routing-key"] == "orders.created"


def test_configuration_page_lists_every_setting() -> None:
    """Docs move with code: every field is in the how-to's table with its
    variable."""
    page = (
        Path(__file__).resolve().parent.parent / "docs/how-to/configuration.md"
    ).read_text()
    for field in attrs.fields(BatchConsumerSettings):
        variable = (
            "never read"
            if field.name == "ssl_context"
            else (f"`AMQP_BATCH_{field.name.upper()}`")
        )
        rows = [line for line in page.splitlines() if f"| `{field.name}` |" in line]
        assert any(variable in row for row in rows), field.name


def test_queue_type_quorum_sets_the_queue_arguments() -> None:
    settings = BatchConsumerSettings(queue_name="q", queue_type="quorum")
    assert settings.work_queue_arguments == {"x-queue-type": "quorum"}
    assert BatchConsumerSettings(queue_name="q").work_queue_arguments == {}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"queue_type": "stream"}, "not supported"),
        ({"queue_type": "lazy"}, "must be one of"),
        ({"queue_type": 1}, "must be a str"),
        (
            {"queue_type": "quorum", "queue_arguments": {"x-queue-type": "classic"}},
            "set it in one place",
        ),
        ({"queue_type": "quorum", "queue_durable": False}, "queue_durable"),
    ],
)
def test_bad_queue_types_are_refused(
    overrides: dict[str, object], message: str
) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        BatchConsumerSettings(queue_name="q", **overrides)  # type: ignore[arg-type]
