"""A throwaway Prometheus server for the scrape test.

``python -m tests.support.prometheus_server --ensure`` installs Debian's
``prometheus`` package when it is missing (as root, with apt; its service is not
started). It never fails: where apt is not available the scrape test skips,
saying why. :class:`PrometheusServer` runs ``prometheus`` on a free port with a
scrape config of its own and a temporary storage directory, and asks its HTTP
query API.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["PrometheusServer", "ensure_prometheus_installed", "find_prometheus"]

INSTALL_HINT = (
    "the Prometheus server is not installed (as root: apt-get install prometheus; "
    "`nox -s tests` does it where apt is available)"
)


def find_prometheus() -> str | None:
    """The ``prometheus`` executable, if installed."""
    return shutil.which("prometheus") or (
        "/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None
    )


def ensure_prometheus_installed() -> str | None:
    """Install Debian's ``prometheus`` if missing and possible; its path or None.

    The package's service is not started (a temporary ``policy-rc.d`` denies
    service starts), so nothing listens on 9090 behind the tests' back.
    """
    found = find_prometheus()
    if found is not None:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return None
    policy = Path("/usr/sbin/policy-rc.d")
    created = False
    if not policy.exists():
        policy.write_text(
            "#!/bin/sh\n# amqp-batch tests: do not start services\nexit 101\n"
        )
        policy.chmod(0o755)
        created = True
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "RUNLEVEL": "1"}
    try:
        for command in (
            ["apt-get", "update"],
            ["apt-get", "install", "-y", "--no-install-recommends", "prometheus"],
        ):
            done = subprocess.run(
                command, env=env, stdin=subprocess.DEVNULL, check=False
            )
            if done.returncode != 0:
                return None
    finally:
        if created:
            policy.unlink(missing_ok=True)
    return find_prometheus()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class PrometheusServer:
    """``prometheus`` scraping ``targets`` every ``interval`` seconds."""

    def __init__(self, targets: Sequence[str], *, interval: float = 1.0) -> None:
        executable = find_prometheus()
        if executable is None:
            raise FileNotFoundError(INSTALL_HINT)
        self.executable = executable
        self.targets = list(targets)
        self.interval = interval
        self.port = free_port()
        self._dir = Path(tempfile.mkdtemp(prefix="amqp-batch-prometheus-"))
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> None:
        config = self._dir / "prometheus.yml"
        # YAML is a superset of JSON: no YAML writer needed.
        config.write_text(
            json.dumps(
                {
                    "global": {
                        "scrape_interval": f"{round(self.interval * 1000)}ms",
                        "scrape_timeout": f"{round(self.interval * 1000)}ms",
                    },
                    "scrape_configs": [
                        {
                            "job_name": "amqp-batch",
                            "static_configs": [{"targets": self.targets}],
                        }
                    ],
                }
            )
        )
        log = open(self._dir / "prometheus.log", "wb")  # noqa: SIM115
        self._process = subprocess.Popen(
            [
                self.executable,
                f"--config.file={config}",
                f"--storage.tsdb.path={self._dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"prometheus exited: {self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)  # a subprocess's readiness: polled, bounded
        raise TimeoutError(f"prometheus not ready in {timeout} s: {self.log_tail()}")

    def log_tail(self) -> str:
        path = self._dir / "prometheus.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def query(self, expression: str) -> list[dict[str, Any]]:
        """The result vector of an instant query (``/api/v1/query``)."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode(
            {"query": expression}
        )
        with urllib.request.urlopen(url, timeout=5) as reply:
            answer = json.load(reply)
        assert answer["status"] == "success", answer
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def query_range(
        self, expression: str, start: float, end: float, step: float
    ) -> list[dict[str, Any]]:
        """The result matrix of a range query (``/api/v1/query_range``)."""
        parameters = {"query": expression, "start": start, "end": end, "step": step}
        url = f"{self.url}/api/v1/query_range?" + urllib.parse.urlencode(parameters)
        with urllib.request.urlopen(url, timeout=10) as reply:
            answer = json.load(reply)
        assert answer["status"] == "success", answer
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def targets_health(self) -> list[str]:
        with urllib.request.urlopen(f"{self.url}/api/v1/targets", timeout=5) as reply:
            answer = json.load(reply)
        return [t["health"] for t in answer["data"]["activeTargets"]]

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> PrometheusServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """``--ensure``: install Prometheus if missing (never fails)."""
    parser = argparse.ArgumentParser(prog="python -m tests.support.prometheus_server")
    parser.add_argument("--ensure", action="store_true", help="install if missing")
    options = parser.parse_args(argv)
    if options.ensure:
        found = ensure_prometheus_installed()
        print(
            f"prometheus: {found}" if found else f"prometheus: skipped ({INSTALL_HINT})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
