"""A throwaway RabbitMQ node for destructive tests.

:class:`PrivateNode` boots the installed ``rabbitmq-server`` as a node of its own: a
unique node name, free ports (AMQP, AMQPS, Erlang distribution), and every file it
writes (database, logs, configuration, pid file, Erlang cookie, certificates) in one
temporary directory. Tests may stop, crash, alarm or reconfigure it at will; the
machine's shared broker on port 5672 is never touched.

Ownership and the Erlang cookie: as root, the node and every ``rabbitmqctl`` call run
as the ``rabbitmq`` user (the Debian scripts refuse to run as anyone else), with
``HOME`` pointing at a private directory that holds a fresh ``.erlang.cookie``. The
node and its CLI calls therefore share a cookie that no other node knows, so a
mistyped node name can never reach the shared broker (whose cookie lives in
``/var/lib/rabbitmq``). As any other user, everything runs as that user.

Run ``python -m tests.support.rabbit_node --ensure`` to install RabbitMQ when missing
(root only), or ``--smoke`` to boot and stop a node and print how long it took.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import errno
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from tests.support.erlang_shell import ErlangShell, ShellError

if TYPE_CHECKING:
    import trustme

__all__ = [
    "NodeCommandError",
    "NodeStartError",
    "PrivateNode",
    "RabbitMQNotInstalled",
    "ensure_rabbitmq_installed",
    "find_rabbitmq_scripts",
    "reap_orphaned_nodes",
]

RABBITMQ_USER = "rabbitmq"
NODE_PREFIX = "amqpbatch"
DEBIAN_SCRIPTS_DIR = Path("/usr/lib/rabbitmq/bin")
INSTALL_HINT = (
    "RabbitMQ is not installed. Install the Debian package as root "
    "(`apt-get install rabbitmq-server`, 3.10 or later), or put a RabbitMQ generic "
    "unix build's `sbin` directory on PATH, or set AMQP_BATCH_TEST_URL for the "
    "non-destructive tests."
)
# Node names we create: amqpbatch-<owning pid>-<random hex>@localhost
_NODE_NAME_RE = re.compile(rf"^{NODE_PREFIX}-(\d+)-[0-9a-f]+@localhost$")
_ADVANCED_CONFIG = "[].\n"
# rabbit application settings that the helpers change and reset() puts back.
_RESETTABLE_SETTINGS = ("consumer_timeout", "channel_tick_interval", "max_message_size")
_ENABLED_PLUGINS = "[].\n"
#: The acting user the CLI records for its changes (an Erlang binary literal).
_CLI_USER = '<<"rmq-cli">>'


class RabbitMQNotInstalled(RuntimeError):
    """``rabbitmq-server`` is not installed and could not be installed."""


class NodeStartError(RuntimeError):
    """The private node did not boot; the message carries the end of its log."""


class NodeCommandError(RuntimeError):
    """A ``rabbitmqctl`` command failed."""

    def __init__(self, args: Sequence[str], returncode: int, output: str) -> None:
        """Record the failed command, its exit status and its combined output."""
        super().__init__(
            f"rabbitmqctl {' '.join(args)} exited {returncode}: {output.strip()}"
        )
        self.returncode = returncode
        self.output = output


# --------------------------------------------------------------------------- install


def find_rabbitmq_scripts() -> Path | None:
    """Return the directory holding the real ``rabbitmq-server`` script, or None.

    Debian's ``/usr/sbin/rabbitmq-server`` is a wrapper that switches to the
    ``rabbitmq`` user and redirects output; we call the scripts behind it directly.
    """
    if (DEBIAN_SCRIPTS_DIR / "rabbitmq-server").exists():
        return DEBIAN_SCRIPTS_DIR
    found = shutil.which("rabbitmq-server")
    if found is None:
        return None
    real = Path(found).resolve()
    if real.name == "rabbitmq-script-wrapper":
        return real.parent
    return real.parent


def ensure_rabbitmq_installed() -> Path:
    """Make sure ``rabbitmq-server`` is installed; return its scripts directory.

    As root on Debian, installs the ``rabbitmq-server`` package without starting its
    service (a temporary ``policy-rc.d`` denies service starts, ``RUNLEVEL=1``), so
    no second default node competes for port 5672. A running broker is never
    stopped. Otherwise raises :class:`RabbitMQNotInstalled` saying what to install.
    """
    scripts = find_rabbitmq_scripts()
    if scripts is not None:
        return scripts
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise RabbitMQNotInstalled(INSTALL_HINT)
    policy = Path("/usr/sbin/policy-rc.d")
    created_policy = False
    if not policy.exists():
        policy.write_text(
            "#!/bin/sh\n# amqp-batch tests: do not start services\nexit 101\n"
        )
        policy.chmod(0o755)
        created_policy = True
    env = {
        **os.environ,
        "DEBIAN_FRONTEND": "noninteractive",
        "RUNLEVEL": "1",
    }
    try:
        subprocess.run(
            ["apt-get", "update"], check=True, env=env, stdin=subprocess.DEVNULL
        )
        subprocess.run(
            ["apt-get", "install", "-y", "--no-install-recommends", "rabbitmq-server"],
            check=True,
            env=env,
            stdin=subprocess.DEVNULL,
        )
    finally:
        if created_policy:
            policy.unlink(missing_ok=True)
    scripts = find_rabbitmq_scripts()
    if scripts is None:
        raise RabbitMQNotInstalled(INSTALL_HINT)
    return scripts


# --------------------------------------------------------------------------- helpers


def _erl_binary(text: str) -> str:
    """An Erlang binary literal of ``text`` (UTF-8), safe for any content."""
    return "<<" + ",".join(str(byte) for byte in text.encode()) + ">>"


def _erl_string(text: str) -> str:
    """An Erlang string (list) literal of ``text`` (code points)."""
    return "[" + ",".join(str(ord(char)) for char in text) + "]"


def _free_port(taken: set[int], all_interfaces: bool = False) -> int:
    """Return a TCP port that is free now (on 127.0.0.1, or on every interface).

    ``all_interfaces`` also checks the IPv6 wildcard, where the system has one.
    """
    host = "0.0.0.0" if all_interfaces else "127.0.0.1"
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port: int = sock.getsockname()[1]
        if port in taken:
            continue
        if all_interfaces and socket.has_ipv6:
            try:
                with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock6:
                    sock6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    sock6.bind(("::", port))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    continue  # taken on IPv6; other errors: no IPv6 here
        taken.add(port)
        return port


def _port_open(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:``port``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (zombies count as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    # Field 3 is the state; "Z" is a zombie, "X" dead.
    state = stat.rsplit(")", 1)[-1].split()[0]
    return state not in {"Z", "X"}


def _wait_until(
    predicate: Callable[[], bool], timeout: float, interval: float = 0.05
) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def _processes_of_node(node_name: str) -> list[int]:
    """Pids of processes whose environment names ``node_name`` as RABBITMQ_NODENAME.

    That is the VM and its helpers (``erl_child_setup``, ``inet_gethost``), but not
    ``epmd``: a node started where none runs spawns one, and other nodes on the
    machine may have registered with it since.
    """
    marker = f"RABBITMQ_NODENAME={node_name}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            if marker not in environ.split(b"\0"):
                continue
            if (entry / "comm").read_text().strip() == "epmd":
                continue
        except OSError:
            continue
        pids.append(int(entry.name))
    return pids


def reap_orphaned_nodes() -> list[str]:
    """Kill private nodes left behind by test processes that no longer exist.

    Only nodes named ``amqpbatch-<pid>-<hex>@localhost`` whose owning ``<pid>`` is
    dead are killed (a test run that was SIGKILLed); their temp dirs are removed.
    Returns the node names reaped.
    """
    reaped: list[str] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            if b"beam" not in cmdline.split(b"\0", 1)[0]:
                continue
            environ = dict(
                item.split(b"=", 1)
                for item in (entry / "environ").read_bytes().split(b"\0")
                if b"=" in item
            )
        except OSError:
            continue
        node_name = environ.get(b"RABBITMQ_NODENAME", b"").decode()
        match = _NODE_NAME_RE.match(node_name)
        if match is None or _pid_alive(int(match.group(1))):
            continue
        for pid in _processes_of_node(node_name):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        base = Path(environ.get(b"RABBITMQ_MNESIA_BASE", b"").decode()).parent
        if base.name.startswith(f"{NODE_PREFIX}-node-") and base.parent == Path(
            tempfile.gettempdir()
        ):
            shutil.rmtree(base, ignore_errors=True)
        reaped.append(node_name)
    return reaped


# --------------------------------------------------------------------------- the node


class PrivateNode:
    """A RabbitMQ node of our own, for tests that stop, crash or alarm the broker.

    ``start()`` boots it (about 5 s); ``stop()`` always stops it and deletes its
    directory. Also a context manager. All helpers are synchronous and block until
    the broker reports the change done (bounded waits); from async tests call them
    through ``anyio.to_thread.run_sync``.
    """

    def __init__(
        self,
        *,
        tls: bool = True,
        start_timeout: float = 60.0,
        extra_config: Mapping[str, str] | None = None,
    ) -> None:
        """Prepare (but do not start) a node.

        ``extra_config`` adds ``rabbitmq.conf`` lines (key -> value), e.g.
        ``{"heartbeat": "5"}``. ``tls=False`` skips the AMQPS listener.
        """
        self.node_name = f"{NODE_PREFIX}-{os.getpid()}-{secrets.token_hex(4)}@localhost"
        self.tls = tls
        self.start_timeout = start_timeout
        self.extra_config = dict(extra_config or {})
        taken: set[int] = set()
        self.amqp_port = _free_port(taken)
        self.amqps_port = _free_port(taken, all_interfaces=True)
        self.dist_port = _free_port(taken)
        self.os_pid: int | None = None
        self.base_dir: Path | None = None
        self._ca: trustme.CA | None = None
        self._scripts: Path | None = None
        self._user: pwd.struct_passwd | None = None
        self._defaults: dict[str, str] = {}
        self._atexit_registered = False
        self._shell: ErlangShell | None = None

    # ----------------------------------------------------------------- public facts

    @property
    def url(self) -> str:
        """AMQP URL of the node (guest user, default vhost)."""
        return f"amqp://guest:guest@127.0.0.1:{self.amqp_port}/"

    @property
    def tls_url(self) -> str:
        """AMQPS URL of the node's TLS listener (server cert for ``localhost``)."""
        return f"amqps://guest:guest@localhost:{self.amqps_port}/"

    @property
    def ca(self) -> trustme.CA:
        """The ``trustme`` CA that signed the node's server certificate."""
        if self._ca is None:
            raise RuntimeError(
                "the node has no TLS listener (tls=False or not started)"
            )
        return self._ca

    def client_ssl_context(self) -> ssl.SSLContext:
        """A client ``SSLContext`` that trusts (only) the node's CA."""
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        self.ca.configure_trust(context)
        return context

    @property
    def log_file(self) -> Path:
        """The node's main log file."""
        return self._dir / "log" / f"{self.node_name}.log"

    def __repr__(self) -> str:
        """Name, ports and OS pid."""
        return (
            f"<PrivateNode {self.node_name} amqp={self.amqp_port} "
            f"amqps={self.amqps_port} pid={self.os_pid}>"
        )

    # ----------------------------------------------------------------- lifecycle

    def __enter__(self) -> PrivateNode:
        """Start the node."""
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the node and delete its directory."""
        self.stop()

    def start(self) -> None:
        """Boot the node and wait until it serves AMQP and answers ``rabbitmqctl``.

        The first call creates the directory, configuration and certificates; a
        later call (after :meth:`kill9`) boots again on the same data directory.
        """
        if self.os_pid is not None and _pid_alive(self.os_pid):
            raise RuntimeError(f"{self.node_name} is already running")
        if self.base_dir is None:
            self._scripts = ensure_rabbitmq_installed()
            reap_orphaned_nodes()
            self._prepare()
        if not self._atexit_registered:
            atexit.register(self.stop)
            self._atexit_registered = True
        try:
            self._boot()
        except BaseException:
            self._kill_processes()
            raise

    def stop(self) -> None:
        """Stop the node (``rabbitmqctl stop``, SIGKILL if it lingers); delete its dir.

        Safe to call more than once and on a node that never started or crashed.
        """
        try:
            if self.os_pid is not None and _pid_alive(self.os_pid):
                self._stop_and_halt(timeout=20)
            self._kill_processes()
        finally:
            self.os_pid = None
            if self._shell is not None:
                self._shell.close()
                self._shell = None
            if self.base_dir is not None:
                shutil.rmtree(self.base_dir, ignore_errors=True)
                self.base_dir = None
            if self._atexit_registered:
                atexit.unregister(self.stop)
                self._atexit_registered = False

    def _stop_and_halt(self, timeout: float) -> bool:
        """What ``rabbitmqctl stop PIDFILE`` does: ``rabbit:stop_and_halt()`` on
        the node (through the shell), then wait until the VM exited."""
        pid = self._require_pid()
        # The call usually ends with the connection to the halting node.
        with contextlib.suppress(NodeCommandError, TimeoutError):
            self.eval("rabbit:stop_and_halt().", timeout)
        return _wait_until(lambda: not _pid_alive(pid), timeout)

    def kill9(self) -> None:
        """Crash the node: SIGKILL its Erlang VM and wait until it is gone.

        The data directory stays; :meth:`start` boots the node again on it.
        """
        pid = self._require_pid()
        os.kill(pid, signal.SIGKILL)
        if not _wait_until(lambda: not _pid_alive(pid), 10):
            raise RuntimeError(f"{self.node_name} (pid {pid}) survived SIGKILL")
        self._kill_processes()
        self.os_pid = None
        _wait_until(lambda: not _port_open(self.amqp_port), 5)

    def stop_app(self) -> None:
        """``rabbitmqctl stop_app``: the broker application stops, the VM stays.

        Runs what the CLI runs (``rabbit:stop()``) through the shell.
        """
        self._expect_ok("stop_app", "rabbit:stop().")

    def start_app(self) -> None:
        """``rabbitmqctl start_app``, then wait until the AMQP port accepts again.

        Runs what the CLI runs (``rabbit:start()``) through the shell.
        """
        self._expect_ok("start_app", "rabbit:start().")
        if not _wait_until(lambda: _port_open(self.amqp_port), 30, 0.1):
            raise NodeStartError(f"{self.node_name}: AMQP port closed after start_app")

    def reset(self) -> None:
        """Undo what destructive tests may leave behind, keeping queues and data.

        Boots a crashed node, starts a stopped app, clears the memory alarm and puts
        back the settings changed by :meth:`set_consumer_timeout` and
        :meth:`set_max_message_size`.
        """
        if self.base_dir is None:
            raise RuntimeError("the node was stopped for good; create a new one")
        if self.os_pid is None or not _pid_alive(self.os_pid):
            self._kill_processes()
            self.start()
        restore = "".join(
            f"application:set_env(rabbit, {key}, {value}), "
            for key, value in self._defaults.items()
        )
        running = self.eval(
            f"{restore}case rabbit:is_running() of "
            "true -> rabbit_alarm:clear_alarm({resource_limit, memory, node()}), "
            "running; false -> stopped end."
        )
        if running != "running":
            self.start_app()  # a fresh rabbit app starts without alarms

    # ----------------------------------------------------------------- ctl helpers

    def ctl(self, *args: str, timeout: float = 60.0) -> str:
        """Run ``rabbitmqctl -n NODE ARGS...``; return stdout, raise on failure."""
        return self._run_ctl(list(args), timeout=timeout)

    def eval(self, expr: str, timeout: float = 60.0) -> str:
        """Evaluate an Erlang expression on the node; return the printed result.

        The same as ``rabbitmqctl eval`` (``erl_eval`` on the node, the result
        printed with ``~p``), through the node's long-lived :class:`ErlangShell`
        instead of a new CLI VM per call; a failure raises
        :class:`NodeCommandError`.
        """
        return self._shell_call(expr, timeout).strip()

    def eval_binary(self, expr: str, timeout: float = 60.0) -> str:
        """Evaluate an expression whose result is a binary; return it as text."""
        return self._shell_call(expr, timeout, raw=True)

    def _shell_call(self, expr: str, timeout: float, raw: bool = False) -> str:
        if self._shell is None:
            self._shell = ErlangShell(
                self.node_name,
                self._env(),
                self._popen_kwargs(),
                self._dir / "shell.log",
            )
        try:
            return self._shell.call(expr, timeout, raw=raw)[1]
        except ShellError as exc:
            raise NodeCommandError(["eval", expr], 1, str(exc)) from exc

    def _expect_ok(self, command: str, expr: str, timeout: float = 60.0) -> None:
        """Evaluate ``expr``, which must return ``ok`` (as the CLI command does)."""
        result = self.eval(expr, timeout)
        if result != "ok":
            raise NodeCommandError([command], 1, result)

    def list_connections(self) -> list[dict[str, Any]]:
        """The node's client connections as ``{"pid", "name", "state"}`` dicts.

        ``name`` is the client-provided ``connection_name`` (None when absent); the
        pid string is what ``rabbitmqctl close_connection`` accepts; ``state`` is
        the broker's (``running``, ``blocked``, ``closing``...).
        """
        # What `rabbitmqctl list_connections pid state client_properties` lists
        # (every running node's connections), one tab-separated line each, the
        # name hex-encoded ("-" when the client gave none).
        output = self.eval_binary(
            "iolist_to_binary([begin "
            "Props = case proplists:get_value(client_properties, C) of "
            "L when is_list(L) -> L; _ -> [] end, "  # `none` in the handshake
            'Name = case lists:keyfind(<<"connection_name">>, 1, Props) of '
            '{_, longstr, N} -> binary:encode_hex(N); _ -> <<"-">> end, '
            "[rabbit_misc:pid_to_string(proplists:get_value(pid, C)), 9, "
            'io_lib:format("~s", [proplists:get_value(state, C)]), 9, Name, 10] '
            "end || C <- rabbit_networking:connection_info_all("
            "[pid, state, client_properties])])."
        )
        connections: list[dict[str, Any]] = []
        for line in output.splitlines():
            if not line.strip():
                continue
            pid, state, name = line.split("\t")
            connections.append(
                {
                    "pid": pid,
                    "name": None if name == "-" else bytes.fromhex(name).decode(),
                    "state": state,
                }
            )
        return connections

    def close_connection(
        self, connection_name: str, reason: str = "test", timeout: float = 10.0
    ) -> int:
        """Close every connection whose client-provided name is ``connection_name``.

        Returns how many. Waits until the broker no longer lists them as open: gone,
        or ``closing`` (the broker sent ``connection.close`` and waits for the
        client's ``close-ok``; it delivers nothing more).
        """
        pids = [
            c["pid"] for c in self.list_connections() if c["name"] == connection_name
        ]
        for pid in pids:
            with contextlib.suppress(NodeCommandError):  # it may have gone already
                # What `rabbitmqctl close_connection PID REASON` runs.
                self.eval(
                    "rabbit_networking:close_connection(rabbit_misc:string_to_pid("
                    f"{_erl_string(pid)}), {_erl_binary(reason)})."
                )

        def gone() -> bool:
            return not any(
                c["pid"] in pids and c["state"] not in ("closing", "closed")
                for c in self.list_connections()
            )

        if pids and not _wait_until(gone, timeout, 0.1):
            raise TimeoutError(f"connections {pids} still open after {timeout} s")
        return len(pids)

    def set_memory_alarm(self) -> None:
        """Raise the memory alarm: the broker blocks publishing connections.

        Returns once every connection has heard of it (see :meth:`_alarm`).
        """
        self._alarm("rabbit_alarm:set_alarm({{resource_limit, memory, node()}, []})")

    def clear_memory_alarm(self) -> None:
        """Clear the memory alarm raised by :meth:`set_memory_alarm`.

        Returns once every connection has heard of it (see :meth:`_alarm`).
        """
        self._alarm("rabbit_alarm:clear_alarm({resource_limit, memory, node()})")

    def _alarm(self, change: str) -> None:
        """Make an alarm ``change`` and wait until it is in force.

        ``rabbit_alarm`` takes the change as an event and tells each connection
        by a message. A call to ``rabbit_alarm`` after it returns once the
        alarm handler told them all; a call to each connection process after
        that returns once the connection handled that message, so a publish
        sent from then on is held back (or no longer) for sure.
        """
        self.eval(
            f"{change}, rabbit_alarm:get_alarms(), "
            "[catch rabbit_networking:connection_info(P, [state]) "
            "|| P <- rabbit_networking:connections()], ok."
        )

    def set_consumer_timeout(self, ms: int, tick_interval_ms: int = 500) -> None:
        """Set the delivery-acknowledgement timeout (and a fast channel tick).

        Applies to channels opened afterwards; :meth:`reset` restores the default.
        """
        self._remember_defaults()
        self.eval(
            f"application:set_env(rabbit, consumer_timeout, {int(ms)}), "
            "application:set_env(rabbit, channel_tick_interval, "
            f"{int(tick_interval_ms)})."
        )

    def set_max_message_size(self, nbytes: int) -> None:
        """Set the broker's ``max_message_size``; :meth:`reset` restores the default."""
        self._remember_defaults()
        self.eval(f"application:set_env(rabbit, max_message_size, {int(nbytes)}).")

    def delete_queue(self, name: str, vhost: str = "/") -> None:
        """Delete a queue under its consumers (they get ``basic.cancel``).

        What ``rabbitmqctl delete_queue -p VHOST NAME`` runs, through the shell.
        """
        result = self.eval(
            f"case rabbit_amqqueue:lookup(rabbit_misc:r({_erl_binary(vhost)}, queue, "
            f"{_erl_binary(name)})) of {{ok, Q}} -> rabbit_amqqueue:delete(Q, false, "
            'false, <<"rmq-cli">>); Error -> Error end.'
        )
        if not result.startswith("{ok,"):
            raise NodeCommandError(["delete_queue", "-p", vhost, name], 1, result)

    def add_vhost(self, name: str, users: Sequence[str] = ("guest",)) -> None:
        """Create a vhost and give ``users`` full permissions on it.

        What ``rabbitmqctl add_vhost`` and ``set_permissions`` run, through the
        shell.
        """
        self._expect_ok(
            "add_vhost", f"rabbit_vhost:add({_erl_binary(name)}, {_CLI_USER})."
        )
        for user in users:
            self._set_permissions(user, name)

    def _set_permissions(self, user: str, vhost: str) -> None:
        everything = _erl_binary(".*")
        self._expect_ok(
            "set_permissions",
            "rabbit_auth_backend_internal:set_permissions("
            f"{_erl_binary(user)}, {_erl_binary(vhost)}, "
            f"{everything}, {everything}, {everything}, {_CLI_USER}).",
        )

    def add_user(
        self, name: str, password: str, vhosts: Sequence[str] = ("/",)
    ) -> None:
        """Create a user with full permissions on ``vhosts``.

        What ``rabbitmqctl add_user`` and ``set_permissions`` run, through the
        shell.
        """
        self._expect_ok(
            "add_user",
            "rabbit_auth_backend_internal:add_user("
            f"{_erl_binary(name)}, {_erl_binary(password)}, {_CLI_USER}).",
        )
        for vhost in vhosts:
            self._set_permissions(name, vhost)

    def queue_counts(self, name: str, vhost: str = "/") -> tuple[int, int]:
        """``(messages_ready, messages_unacknowledged)`` of a queue, or KeyError."""
        info = self.queue_info(name, ["messages_ready", "messages_unacknowledged"])
        return int(info["messages_ready"]), int(info["messages_unacknowledged"])

    def queue_info(
        self, name: str, items: Sequence[str], vhost: str = "/"
    ) -> dict[str, str]:
        """``rabbitmqctl list_queues ITEMS`` for one queue: item -> value as text
        (a list's elements joined with commas), or KeyError.

        As the CLI does, the queue's node answers (a quorum queue's leader: its
        counts live there), through the shell.
        """
        keys = ", ".join(items)
        output = self.eval_binary(
            f"case rabbit_amqqueue:lookup(rabbit_misc:r({_erl_binary(vhost)}, queue, "
            f"{_erl_binary(name)})) of "
            "{ok, Q} -> "
            "Node = case amqqueue:get_pid(Q) of {_, N} -> N; P -> node(P) end, "
            f"Info = erpc:call(Node, rabbit_amqqueue, info, [Q, [{keys}]], 30000), "
            "Text1 = fun(V) when is_binary(V) -> V; (V) when is_atom(V) -> "
            'atom_to_list(V); (V) -> io_lib:format("~p", [V]) end, '
            'Text = fun(V) when is_list(V) -> lists:join(",", [Text1(E) || E <- V]); '
            "(V) -> Text1(V) end, "
            "iolist_to_binary([[atom_to_list(K), 9, Text(V), 10] || {K, V} <- Info]); "
            '_ -> <<"not_found">> end.'
        )
        if output == "not_found":
            raise KeyError(f"no queue {name!r} in vhost {vhost!r}")
        return dict(line.split("\t", 1) for line in output.splitlines() if line)

    # ----------------------------------------------------------------- internals

    @property
    def _dir(self) -> Path:
        if self.base_dir is None:
            raise RuntimeError("the node is not started")
        return self.base_dir

    def _remember_defaults(self) -> None:
        """Snapshot the settings :meth:`reset` restores, before the first change."""
        if self._defaults:
            return
        keys = ", ".join(_RESETTABLE_SETTINGS)
        output = self.eval(f"[application:get_env(rabbit, K) || K <- [{keys}]].")
        values = re.findall(r"\{ok,([^{}]+)\}|undefined", output)
        for key, value in zip(_RESETTABLE_SETTINGS, values, strict=True):
            if value:
                self._defaults[key] = value

    def _require_pid(self) -> int:
        if self.os_pid is None:
            raise RuntimeError(f"{self.node_name} is not running")
        return self.os_pid

    def _prepare(self) -> None:
        """Create the temp dir, config files, cookie and certificates."""
        if os.geteuid() == 0:
            self._user = pwd.getpwnam(RABBITMQ_USER)
        base = Path(tempfile.mkdtemp(prefix=f"{NODE_PREFIX}-node-"))
        self.base_dir = base
        home = base / "home"
        home.mkdir()
        cookie = home / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(20).upper())
        cookie.chmod(0o400)
        (base / "enabled_plugins").write_text(_ENABLED_PLUGINS)
        (base / "advanced.config").write_text(_ADVANCED_CONFIG)
        # Our own env file instead of /etc/rabbitmq/rabbitmq-env.conf (which names
        # the shared node).
        (base / "rabbitmq-env.conf").write_text("ERL_EPMD_ADDRESS=127.0.0.1\n")
        config = {
            "log.console": "false",
            "log.file.level": "info",
            "disk_free_limit.absolute": "1MB",
        }
        if self.tls:
            config.update(self._make_certificates(base))
        config.update(self.extra_config)
        (base / "rabbitmq.conf").write_text(
            "".join(f"{key} = {value}\n" for key, value in config.items())
        )
        if self._user is not None:
            uid, gid = self._user.pw_uid, self._user.pw_gid
            for path in [base, *base.rglob("*")]:
                os.chown(path, uid, gid)

    def _make_certificates(self, base: Path) -> dict[str, str]:
        """Write a trustme CA and a server cert; return the TLS config lines."""
        import trustme

        self._ca = trustme.CA()
        server = self._ca.issue_cert("localhost", "127.0.0.1")
        tls_dir = base / "tls"
        tls_dir.mkdir()
        self._ca.cert_pem.write_to_path(str(tls_dir / "ca.pem"))
        server.cert_chain_pems[0].write_to_path(str(tls_dir / "server.pem"))
        server.private_key_pem.write_to_path(str(tls_dir / "server.key"))
        (tls_dir / "server.key").chmod(0o600)
        return {
            # Every interface, so tests can reach it under a name or address
            # the certificate does not cover (127.0.0.2). guest is loopback-only.
            "listeners.ssl.default": str(self.amqps_port),
            "ssl_options.cacertfile": str(tls_dir / "ca.pem"),
            "ssl_options.certfile": str(tls_dir / "server.pem"),
            "ssl_options.keyfile": str(tls_dir / "server.key"),
            "ssl_options.verify": "verify_peer",
            "ssl_options.fail_if_no_peer_cert": "false",
        }

    def _env(self) -> dict[str, str]:
        """A clean environment for the server and CLI scripts."""
        base = self._dir
        local_dist = "-kernel inet_dist_use_interface {127,0,0,1}"
        return {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "HOME": str(base / "home"),
            "RABBITMQ_NODENAME": self.node_name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.amqp_port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(base / "log"),
            "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(base / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(base / "node.pid"),
            "RABBITMQ_CONF_ENV_FILE": str(base / "rabbitmq-env.conf"),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": local_dist,
            "RABBITMQ_CTL_ERL_ARGS": local_dist,
            "RABBITMQ_CTL_DIST_PORT_MIN": "35672",
            "RABBITMQ_CTL_DIST_PORT_MAX": "35772",
            "ERL_CRASH_DUMP": str(base / "erl_crash.dump"),
        }

    def _popen_kwargs(self) -> dict[str, Any]:
        """Run as the ``rabbitmq`` user when we are root; own session (no Ctrl-C)."""
        kwargs: dict[str, Any] = {
            "env": self._env(),
            "cwd": str(self._dir),
            "stdin": subprocess.DEVNULL,
            "start_new_session": True,
        }
        if self._user is not None:
            kwargs.update(
                user=self._user.pw_uid, group=self._user.pw_gid, extra_groups=[]
            )
        return kwargs

    def _run_ctl(self, args: list[str], timeout: float) -> str:
        assert self._scripts is not None
        command = [str(self._scripts / "rabbitmqctl"), "-n", self.node_name, *args]
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            **self._popen_kwargs(),
        )
        if result.returncode != 0:
            raise NodeCommandError(
                args, result.returncode, result.stdout + result.stderr
            )
        output: str = result.stdout
        return output

    def _boot(self) -> None:
        """Run ``rabbitmq-server -detached``; wait for AMQP, then ``await_startup``."""
        assert self._scripts is not None
        base = self._dir
        pid_file = base / "node.pid"
        crash_dump = base / "erl_crash.dump"
        pid_file.unlink(missing_ok=True)
        crash_dump.unlink(missing_ok=True)
        with (base / "server.out").open("ab") as out:
            subprocess.run(
                [str(self._scripts / "rabbitmq-server"), "-detached"],
                stdout=out,
                stderr=subprocess.STDOUT,
                check=True,
                timeout=30,
                **self._popen_kwargs(),
            )
        deadline = time.monotonic() + self.start_timeout
        while True:
            if crash_dump.exists():
                raise NodeStartError(self._failure("crashed while booting"))
            pid = self._read_pid(pid_file)
            if pid is not None and not _pid_alive(pid):
                raise NodeStartError(self._failure(f"VM (pid {pid}) exited"))
            if pid is not None and _port_open(self.amqp_port):
                self.os_pid = pid
                break
            if time.monotonic() > deadline:
                raise NodeStartError(self._failure("did not boot in time"))
            time.sleep(0.1)
        remaining = max(5.0, deadline - time.monotonic())
        # What `rabbitmqctl await_startup` runs, through the shell.
        self._expect_ok(
            "await_startup",
            f"rabbit:await_startup(node(), false, {int(remaining * 1000)}).",
            remaining + 5,
        )

    @staticmethod
    def _read_pid(pid_file: Path) -> int | None:
        try:
            text = pid_file.read_text().strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None

    def _failure(self, what: str) -> str:
        """Describe a failed boot with the tail of the log and crash dump slogan."""
        parts = [f"{self.node_name} {what}."]
        with contextlib.suppress(OSError):
            log_tail = self.log_file.read_text(errors="replace").splitlines()[-15:]
            parts.append("log tail:\n" + "\n".join(log_tail))
        with contextlib.suppress(OSError):
            out = (self._dir / "server.out").read_text(errors="replace")[-2000:]
            if out.strip():
                parts.append("server output:\n" + out)
        with contextlib.suppress(OSError):
            dump = (self._dir / "erl_crash.dump").read_text(errors="replace")
            slogan = [
                line for line in dump.splitlines()[:5] if line.startswith("Slogan")
            ]
            parts.extend(slogan)
        return "\n".join(parts)

    def _kill_processes(self) -> None:
        """SIGKILL every process that belongs to this node (VM, helpers)."""
        pids = _processes_of_node(self.node_name)
        if self.os_pid is not None:
            pids.append(self.os_pid)
        for pid in set(pids):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        for pid in set(pids):
            _wait_until(lambda pid=pid: not _pid_alive(pid), 5)  # type: ignore[misc]


# --------------------------------------------------------------------------- CLI


@contextlib.contextmanager
def _timed(label: str) -> Iterator[None]:
    started = time.monotonic()
    yield
    print(f"{label}: {time.monotonic() - started:.2f} s")


def main(argv: Sequence[str] | None = None) -> int:
    """``--ensure``: install RabbitMQ if missing; ``--smoke``: boot and stop a node."""
    parser = argparse.ArgumentParser(prog="python -m tests.support.rabbit_node")
    parser.add_argument("--ensure", action="store_true", help="install if missing")
    parser.add_argument("--smoke", action="store_true", help="boot and stop a node")
    parser.add_argument("--reap", action="store_true", help="kill orphaned nodes")
    options = parser.parse_args(argv)
    if options.ensure:
        try:
            print(f"rabbitmq scripts: {ensure_rabbitmq_installed()}")
        except RabbitMQNotInstalled as exc:
            print(exc, file=sys.stderr)
            return 1
    if options.reap:
        print(f"reaped: {reap_orphaned_nodes()}")
    if options.smoke:
        node = PrivateNode()
        try:
            with _timed("start"):
                node.start()
            print(node, node.url, node.tls_url)
        finally:
            with _timed("stop"):
                node.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
