"""Configuration from the environment, with a ``.env`` file for local development.

``BatchConsumerSettings.from_env()`` reads every field from ``AMQP_BATCH_<FIELD>``
(choose another prefix with ``from_env(prefix="ORDERS_")``), converted to the
field's type: integers and floats, booleans (1/true/yes/on, 0/false/no/off),
``QUEUE_ARGUMENTS`` as a JSON object, ``FAILOVER_URLS`` as a comma-separated list,
``UNHANDLED_EXCEPTION_ACTION`` by name. Keyword overrides win over the
environment, which wins over the ``env_file``. A bad value stops the program at
start-up with the variable's name; the settings' repr never shows a password.

Run:
    AMQP_BATCH_URL=amqp://guest:guest@localhost:5672/ AMQP_BATCH_QUEUE_NAME=orders \\
    AMQP_BATCH_BATCH_SIZE=50 python examples/config_from_env.py
"""

import os

import anyio

from amqp_batch import BatchConsumerSettings, MessageResult, Publisher, batch_consumer

#: A ``.env`` file of KEY=VALUE lines; a missing file is fine.
ENV_FILE = os.environ.get("EXAMPLE_ENV_FILE", ".env")


def load_settings():
    try:
        # An override for what the code decides rather than the deployment.
        return BatchConsumerSettings.from_env(
            env_file=ENV_FILE, connection_name="config-example"
        )
    except (TypeError, ValueError) as exc:
        raise SystemExit(f"bad configuration: {exc}") from None


async def main():
    settings = load_settings()
    print(settings)  # safe to log: the password is redacted
    bodies = [b"one", b"two", b"three"]
    handled = []
    done = anyio.Event()

    async def handle(messages):
        for message in messages:
            handled.append(message.body.decode())
            yield MessageResult.ACK
        if len(handled) == len(bodies):
            done.set()

    async with batch_consumer(settings, handle):
        async with Publisher.from_settings(settings) as publisher:
            for body in bodies:
                await publisher.publish(body, routing_key=settings.queue_name)
        await done.wait()
    print("handled", " ".join(handled))


if __name__ == "__main__":
    anyio.run(main, backend=os.environ.get("EXAMPLE_BACKEND", "asyncio"))
