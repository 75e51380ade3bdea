"""Settings: aio-pika-batch names and defaults, validation, redaction, from_env."""

from __future__ import annotations

from pathlib import Path

import pytest

from amqp_batch import BatchConsumerSettings, ConsumerSettings, MessageResult


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
