"""Shared fixtures: both async backends, a private RabbitMQ node, broker URLs, names.

- Every ``async def`` test runs on asyncio and on trio (anyio's pytest plugin, via
  the ``anyio_backend`` fixture), unless it is marked ``@pytest.mark.trio`` for
  pytest-trio (autojump clock tests).
- ``private_node``: one throwaway RabbitMQ node per test session, for destructive
  tests (stop, crash, alarms, closing connections). Always stopped at the end.
- ``broker_url``: ``AMQP_BATCH_TEST_URL`` if set, else the private node's URL; for
  tests that only declare, publish and consume their own uniquely named queues.
- ``unique_name``: a queue/exchange/connection name no other test uses.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

# ``tests.support`` is imported as a package from the repository root; pytest's
# default import mode only puts ``tests/`` itself on sys.path.
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from tests.support.rabbit_node import (  # noqa: E402
    PrivateNode,
    RabbitMQNotInstalled,
)

BROKER_URL_ENV = "AMQP_BATCH_TEST_URL"


def _marked(collector: pytest.Collector, obj: object, name: str) -> bool:
    own = getattr(obj, "pytestmark", ())
    return collector.get_closest_marker(name) is not None or any(
        mark.name == name for mark in own
    )


@pytest.hookimpl(tryfirst=True)
def pytest_pycollect_makeitem(
    collector: pytest.Module | pytest.Class, name: str, obj: object
) -> None:
    """Mark every coroutine test ``anyio`` (both backends) unless it is for trio."""
    if not collector.istestfunction(obj, name):
        return
    inner = getattr(getattr(obj, "hypothesis", None), "inner_test", obj)
    if not inspect.iscoroutinefunction(inner):
        return
    if _marked(collector, obj, "trio") or _marked(collector, obj, "anyio"):
        return
    pytest.mark.anyio(obj)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--soak",
        action="store_true",
        help="run only the minutes-long soak rows (marked soak); `nox -s soak`",
    )


def pytest_collection_modifyitems(
    config: pytest.Config, items: list[pytest.Item]
) -> None:
    """Tag tests that use the private node, so ``-m "not private_node"`` works,
    and tests that use ``broker_url`` ``broker`` (``-m "not private_node and not
    broker"`` is the offline part, which ``nox -s tests_pythons`` runs); keep
    ``soak`` tests for ``--soak`` runs and only those (deselected, not skipped,
    otherwise)."""
    for item in items:
        if "private_node" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.private_node)
        callspec = getattr(item, "callspec", None)
        if "broker_url" in getattr(item, "fixturenames", ()) or (
            callspec is not None and "rabbitmq" in callspec.params.values()
        ):  # broker_url, or a fixture parametrized "rabbitmq" that asks for it
            item.add_marker(pytest.mark.broker)
    soak = config.getoption("--soak")
    keep = [
        item for item in items if (item.get_closest_marker("soak") is not None) == soak
    ]
    if len(keep) != len(items):
        config.hook.pytest_deselected(items=[i for i in items if i not in keep])
        items[:] = keep


@pytest.fixture(scope="module", params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Run each async test on asyncio and on trio."""
    backend: str = request.param
    return backend


@pytest.fixture(scope="session")
def private_node() -> Iterator[PrivateNode]:
    """A RabbitMQ node of this test session's own; stopped at the end, always.

    Destructive tests use it directly. ``PrivateNode`` registers an ``atexit`` stop
    as a backstop, and a later run reaps nodes whose test process was killed.
    """
    node = PrivateNode()
    try:
        node.start()
    except RabbitMQNotInstalled as exc:
        node.stop()
        pytest.fail(str(exc), pytrace=False)
    except BaseException:
        node.stop()
        raise
    try:
        yield node
    finally:
        node.stop()


@pytest.fixture
def destructive_node(private_node: PrivateNode) -> Iterator[PrivateNode]:
    """The private node, put back in shape afterwards (``PrivateNode.reset``)."""
    try:
        yield private_node
    finally:
        private_node.reset()


@pytest.fixture
def broker_url(request: pytest.FixtureRequest) -> str:
    """``AMQP_BATCH_TEST_URL`` if set, else the private node's AMQP URL."""
    url = os.environ.get(BROKER_URL_ENV)
    if url:
        return url
    node: PrivateNode = request.getfixturevalue("private_node")
    return node.url


@pytest.fixture
def unique_name(request: pytest.FixtureRequest) -> str:
    """A name for a queue, exchange or connection that no other test uses."""
    test = re.sub(r"[^A-Za-z0-9_.-]+", "-", request.node.name)[:60].strip("-")
    return f"amqpbatch-test-{test}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


FIGURES_ENV = "AMQP_BATCH_FIGURES"


class Figures:
    """Measured figures of one test, for ``docs/reliability.md``.

    ``figures.record("F1", recovery_s=0.41, duplicates=3)`` appends one JSON line
    ``{"row": "F1", "test": <node id>, "backend": ..., ...}`` to the file named by
    ``AMQP_BATCH_FIGURES`` when it is set (the report script sets it); otherwise it
    only keeps the values on the object, so tests run the same either way.
    """

    def __init__(self, test: str, backend: str | None) -> None:
        self.test = test
        self.backend = backend
        self.rows: list[dict[str, object]] = []

    def record(self, row: str, **values: object) -> None:
        entry: dict[str, object] = {
            "row": row,
            "test": self.test,
            "backend": self.backend,
            **values,
        }
        self.rows.append(entry)
        path = os.environ.get(FIGURES_ENV)
        if path:
            with open(path, "a", encoding="utf-8") as out:
                out.write(json.dumps(entry, default=str) + "\n")


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Figures:
    """Record a fault row's figures (see :class:`Figures`)."""
    backend = None
    if "anyio_backend" in request.fixturenames:
        backend = request.getfixturevalue("anyio_backend")
    return Figures(request.node.nodeid, backend)
