"""amqp-batch on a three-node RabbitMQ cluster with quorum queues (rows C1-C4).

One cluster of private nodes (``tests/support/cluster.py``) serves every test of
this module; each test puts it back in shape (every node running) at the end.
Every fault test checks the total-queue invariant (``tests/support/invariant.py``):
every confirmed id ends acked or dead-lettered, duplicates counted.
"""

from __future__ import annotations

from collections.abc import Iterator

import anyio
import pytest
from tests.support.cluster import Cluster

from consumer_support import admin_channel, cleanup

pytestmark = [pytest.mark.cluster, pytest.mark.private_node]

QUORUM = {"x-queue-type": "quorum"}


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    """Three private nodes joined into one cluster; stopped at the end, always."""
    nodes = Cluster(3)
    try:
        nodes.start()
        yield nodes
    finally:
        nodes.stop()


async def test_cluster_forms_and_a_quorum_queue_spans_it(
    cluster: Cluster, unique_name: str
) -> None:
    """The three nodes run as one cluster; a quorum queue declared on one node has
    a member on every node and a leader among them."""
    running = await anyio.to_thread.run_sync(cluster.running_nodes)
    assert running == {node.node_name for node in cluster.nodes}
    try:
        async with admin_channel(cluster.urls[1]) as channel:
            await channel.queue_declare(unique_name, durable=True, arguments=QUORUM)
        members = await anyio.to_thread.run_sync(cluster.quorum_queue, unique_name)
        assert set(members.members) == running
        assert members.leader in running
    finally:
        await cleanup(cluster.urls[0], queues=[unique_name])
