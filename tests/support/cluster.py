"""A three-node RabbitMQ cluster of private nodes, for the cluster tests.

:class:`Cluster` boots ``size`` :class:`ClusterNode` s (each a
:class:`~tests.support.rabbit_node.PrivateNode`: its own name, ports and
directory, reaped if its test process dies) that share one fresh Erlang cookie,
then joins every node to the first (``stop_app; join_cluster <first>; start_app``).
``stop()`` stops every node, always, even after a failed boot.

The cookie: each node's ``HOME`` holds a ``.erlang.cookie`` written before the
node boots, and ``rabbitmqctl`` runs with the same ``HOME``, so the server and the
CLI agree without ``RABBITMQ_ERLANG_COOKIE`` (which RabbitMQ 3.10's CLI reports
as deprecated on every call). The cookie is known to the cluster's nodes only; the
shared broker (whose cookie lives in ``/var/lib/rabbitmq``) can never be reached.

Faults: :meth:`Cluster.kill9`, :meth:`Cluster.restart`, ``stop_app``/``start_app``
per node, and :func:`cluster_proxies` puts a
:class:`~tests.support.fault_proxy.FaultProxy` in front of every node (in the
test's event loop). :meth:`Cluster.quorum_queue` tells a quorum queue's leader and
members.

``python -m tests.support.cluster`` boots a cluster and prints its boot time and
memory (RSS of the three ``beam.smp``).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import attrs
from tests.support.fault_proxy import FaultProxy
from tests.support.rabbit_node import (
    NodeCommandError,
    PrivateNode,
    _erl_string,
    _pid_alive,
    _port_open,
    _wait_until,
)

__all__ = [
    "Cluster",
    "ClusterNode",
    "QueueMembers",
    "cluster_proxies",
    "declared_queue",
]

_T = TypeVar("_T")


class ClusterNode(PrivateNode):
    """A private node that uses a given Erlang cookie and can restart on its data."""

    def __init__(self, cookie: str, **kwargs: Any) -> None:
        """Prepare (not start) a node whose cookie is ``cookie``."""
        super().__init__(**kwargs)
        self._cookie = cookie

    @property
    def short_name(self) -> str:
        """The node name without ``@localhost`` (for messages)."""
        return self.node_name.split("@", 1)[0]

    def _prepare(self) -> None:
        """Write the node's files, then replace its fresh cookie by the shared one."""
        super()._prepare()
        cookie = self._dir / "home" / ".erlang.cookie"
        stat = cookie.stat()
        cookie.unlink()
        cookie.write_text(self._cookie)
        cookie.chmod(0o400)
        os.chown(cookie, stat.st_uid, stat.st_gid)

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the VM gracefully (as ``rabbitmqctl stop`` does), keeping its data:
        :meth:`start` boots it again and it rejoins the cluster."""
        pid = self._require_pid()
        if not self._stop_and_halt(timeout):
            raise RuntimeError(f"{self.node_name} (pid {pid}) did not stop")
        self._kill_processes()  # helpers (epmd excepted) may outlive the VM
        self.os_pid = None
        _wait_until(lambda: not _port_open(self.amqp_port), 5)

    def join_cluster(self, first: str) -> None:
        """``rabbitmqctl join_cluster FIRST`` (a disc node; the broker
        application stopped): what the CLI runs, through the node's shell."""
        result = self.eval(
            f"rabbit_mnesia:join_cluster(list_to_atom({_erl_string(first)}), disc)."
        )
        if result not in ("ok", "{ok,already_member}"):
            raise NodeCommandError(["join_cluster", first], 1, result)

    @property
    def running(self) -> bool:
        """Whether the node's VM is alive."""
        return self.os_pid is not None and _pid_alive(self.os_pid)

    def rss_bytes(self) -> int:
        """Resident memory of the node's Erlang VM (``beam.smp``), bytes."""
        status = Path(f"/proc/{self._require_pid()}/status").read_text()
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS line")


@attrs.frozen
class QueueMembers:
    """Where a quorum queue lives: its leader and its members (node names)."""

    name: str
    leader: str
    members: tuple[str, ...]
    online: tuple[str, ...]


class Cluster:
    """``size`` private nodes joined into one RabbitMQ cluster.

    ``start()`` boots them in parallel and joins them (about 15 s for three on an
    idle machine); ``stop()`` stops them all. Also a context manager. The helpers
    are synchronous; from async tests call them through ``anyio.to_thread``.
    """

    def __init__(
        self,
        size: int = 3,
        *,
        extra_config: Mapping[str, str] | None = None,
        start_timeout: float = 90.0,
    ) -> None:
        """Prepare (not start) ``size`` nodes sharing a fresh cookie."""
        if size < 1:
            raise ValueError("a cluster has at least one node")
        cookie = secrets.token_hex(20).upper()
        self.nodes = [
            ClusterNode(
                cookie,
                tls=False,
                start_timeout=start_timeout,
                extra_config=extra_config,
            )
            for _ in range(size)
        ]
        #: Seconds ``start()`` took (boot and join), once started.
        self.boot_s: float | None = None

    def __repr__(self) -> str:
        """The node names and AMQP ports."""
        nodes = ", ".join(f"{n.short_name}:{n.amqp_port}" for n in self.nodes)
        return f"<Cluster {nodes}>"

    # --------------------------------------------------------------- lifecycle

    def __enter__(self) -> Cluster:
        """Start the cluster."""
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Stop every node."""
        self.stop()

    def start(self) -> None:
        """Boot every node, join the others to the first; stop all on failure."""
        started = time.monotonic()
        try:
            _parallel(lambda node: node.start(), self.nodes)
            first = self.nodes[0].node_name
            for node in self.nodes[1:]:
                node.stop_app()
                node.join_cluster(first)
                node.start_app()
            self.wait_running(self.nodes)
        except BaseException:
            self.stop()
            raise
        self.boot_s = time.monotonic() - started

    def stop(self) -> None:
        """Stop every node (each one even if another fails) and delete its files."""
        _parallel(lambda node: node.stop(), self.nodes)

    # --------------------------------------------------------------- facts

    @property
    def urls(self) -> list[str]:
        """The nodes' AMQP URLs, in node order."""
        return [node.url for node in self.nodes]

    def node(self, name: str) -> ClusterNode:
        """The node called ``name`` (full ``...@localhost`` name)."""
        for node in self.nodes:
            if node.node_name == name:
                return node
        raise KeyError(name)

    def index(self, name: str) -> int:
        """The position of node ``name`` in :attr:`nodes`."""
        return self.nodes.index(self.node(name))

    def any_running(self, exclude: Iterable[ClusterNode] = ()) -> ClusterNode:
        """A node whose VM is alive (for CLI queries), not one of ``exclude``."""
        excluded = set(map(id, exclude))
        for node in self.nodes:
            if id(node) not in excluded and node.running:
                return node
        raise RuntimeError("no cluster node is running")

    def rss_bytes(self) -> list[int]:
        """Resident memory of each running node's VM, bytes."""
        return [node.rss_bytes() for node in self.nodes if node.running]

    def running_nodes(self, via: ClusterNode | None = None) -> set[str]:
        """The names of the nodes whose broker application runs, as the cluster
        sees them."""
        node = via or self.any_running()
        # What `rabbitmqctl cluster_status` reads, through the node's shell.
        output = node.eval_binary(
            'iolist_to_binary(lists:join(" ", [atom_to_list(N) || N <- '
            "proplists:get_value(running_nodes, rabbit_mnesia:status(), [])]))."
        )
        return set(output.split())

    def wait_running(self, nodes: Iterable[ClusterNode], timeout: float = 60) -> None:
        """Wait until every node of ``nodes`` runs as a member of the cluster."""
        wanted = {node.node_name for node in nodes}

        def ready() -> bool:
            with contextlib.suppress(
                NodeCommandError, TimeoutError, subprocess.TimeoutExpired
            ):
                return wanted <= self.running_nodes()
            return False

        if not _wait_until(ready, timeout, 0.2):
            raise TimeoutError(f"{sorted(wanted)} not all running after {timeout} s")

    def quorum_queue(
        self, name: str, via: ClusterNode | None = None, vhost: str = "/"
    ) -> QueueMembers:
        """Leader and members of quorum queue ``name`` (what ``rabbitmqctl
        list_queues name type leader members online`` lists), asked of ``via``
        or any running node."""
        node = via or self.any_running()
        queue = node.queue_info(name, ["type", "leader", "members", "online"], vhost)
        if queue["type"] != "quorum":
            raise ValueError(f"{name} is a {queue['type']} queue")
        return QueueMembers(
            name=name,
            leader=queue["leader"],
            members=tuple(filter(None, queue["members"].split(","))),
            online=tuple(filter(None, queue["online"].split(","))),
        )

    def wait_leader(
        self,
        name: str,
        *,
        not_on: str | None = None,
        online: int | None = None,
        timeout: float = 30.0,
    ) -> QueueMembers:
        """Wait until quorum queue ``name`` has a leader other than ``not_on``
        (and, if given, ``online`` members online); return where it lives."""
        found: list[QueueMembers] = []

        def elected() -> bool:
            with contextlib.suppress(
                NodeCommandError,
                KeyError,
                RuntimeError,
                TimeoutError,
                subprocess.TimeoutExpired,
            ):
                members = self.quorum_queue(name)
                if (
                    members.leader
                    and members.leader != not_on
                    and (online is None or len(members.online) >= online)
                ):
                    found.append(members)
                    return True
            return False

        if not _wait_until(elected, timeout, 0.2):
            raise TimeoutError(f"{name}: no leader other than {not_on} in {timeout} s")
        return found[-1]

    # --------------------------------------------------------------- faults

    def heal(self) -> None:
        """Put every node back: boot crashed or stopped VMs (in parallel), start
        stopped broker applications; wait until all run in the cluster."""
        down = [node for node in self.nodes if not node.running]
        if down:
            _parallel(lambda node: node.start(), down)
        running = self.running_nodes()
        stopped = [node for node in self.nodes if node.node_name not in running]
        for node in stopped:
            node.start_app()
        if down or stopped:
            self.wait_running(self.nodes)

    def kill9(self, index: int) -> None:
        """Crash node ``index`` (SIGKILL its VM); :meth:`start_node` boots it."""
        self.nodes[index].kill9()

    def start_node(self, index: int) -> None:
        """Boot node ``index`` again on its data; wait until it rejoined."""
        node = self.nodes[index]
        node.start()
        self.wait_running([node])

    def restart(self, index: int) -> None:
        """Stop node ``index`` gracefully (``rabbitmqctl stop``) and boot it again."""
        self.nodes[index].shutdown()
        self.start_node(index)

    def stop_app(self, index: int) -> None:
        """``rabbitmqctl stop_app`` on node ``index`` (its VM stays up)."""
        self.nodes[index].stop_app()

    def start_app(self, index: int) -> None:
        """``rabbitmqctl start_app`` on node ``index`` (it returns once the broker
        application runs again, in the cluster) and wait for its AMQP port."""
        self.nodes[index].start_app()

    def wait_queue_settled(self, name: str, timeout: float = 60.0) -> None:
        """Wait until queue ``name`` holds no message, ready or unacknowledged,
        as the cluster sees it (everything delivered was settled)."""

        def settled() -> bool:
            with contextlib.suppress(
                NodeCommandError,
                KeyError,
                RuntimeError,
                TimeoutError,
                subprocess.TimeoutExpired,
            ):
                return self.any_running().queue_counts(name) == (0, 0)
            return False

        if not _wait_until(settled, timeout, 0.2):
            raise TimeoutError(f"{name}: messages left after {timeout} s")


@contextlib.asynccontextmanager
async def cluster_proxies(cluster: Cluster) -> AsyncIterator[list[FaultProxy]]:
    """A :class:`FaultProxy` in front of every node of ``cluster``, in node order
    (``proxy.url_for()`` is the URL through it)."""
    async with contextlib.AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(FaultProxy("127.0.0.1", node.amqp_port))
            for node in cluster.nodes
        ]


@contextlib.asynccontextmanager
async def declared_queue(
    url: str, name: str, arguments: Mapping[str, Any] | None = None
) -> AsyncIterator[str]:
    """Declare durable queue ``name`` (with ``arguments``) at ``url``; delete it
    on the way out."""
    from consumer_support import admin_channel, cleanup  # tests/ is on sys.path

    async with admin_channel(url) as channel:
        await channel.queue_declare(name, durable=True, arguments=arguments)
    try:
        yield name
    finally:
        await cleanup(url, queues=[name])


def _parallel(job: Callable[[_T], object], items: Sequence[_T]) -> None:
    """Run ``job`` on every item in threads; raise the first failure after all
    finished."""
    with ThreadPoolExecutor(max_workers=len(items)) as pool:
        futures = [pool.submit(job, item) for item in items]
    errors = [f.exception() for f in futures if f.exception() is not None]
    if errors:
        raise errors[0]  # type: ignore[misc]


def main(argv: Sequence[str] | None = None) -> int:
    """Boot a three-node cluster, print its boot time and memory, stop it."""
    del argv
    cluster = Cluster()
    try:
        cluster.start()
        rss = cluster.rss_bytes()
        print(cluster)
        print(f"boot (3 nodes, parallel, joined): {cluster.boot_s:.1f} s")
        print(
            "RSS of the beam.smp: "
            + ", ".join(f"{r / 2**20:.0f} MiB" for r in rss)
            + f" (total {sum(rss) / 2**20:.0f} MiB)"
        )
        print(f"running: {sorted(cluster.running_nodes())}")
    finally:
        stopped = time.monotonic()
        cluster.stop()
        print(f"stop: {time.monotonic() - stopped:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
