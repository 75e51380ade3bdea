"""``deploy/``: the Dockerfile and the Kubernetes manifests agree with the CLI.

The manifests must parse; the probes must hit the paths and port the command
serves; the image's CMD must be a real ``amqp-batch`` invocation (run here with
``--check`` against the broker, with the Deployment's environment); the grace
period must cover the drain. The image itself is built only where a Docker engine
answers.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from amqp_batch._cli import parser
from amqp_batch._cli._supervisor import KILL_GRACE
from test_cli import run_cli

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"

# What docs/how-to/containers.md documents for the HTTP endpoints of
# `amqp-batch run --http-port PORT --http-host HOST`.
DOCUMENTED_PORT = 9464
DOCUMENTED_LIVENESS = "/healthz"
DOCUMENTED_READINESS = "/readyz"


def manifests() -> dict[str, dict[str, Any]]:
    """Every Kubernetes object under deploy/kubernetes, by kind."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            assert isinstance(document, dict), path
            assert document["kind"] not in found, f"two {document['kind']} objects"
            found[document["kind"]] = document
    return found


def container() -> dict[str, Any]:
    (only,) = manifests()["Deployment"]["spec"]["template"]["spec"]["containers"]
    return only


def env() -> dict[str, str]:
    """The container's plain environment values (not those from secrets)."""
    return {e["name"]: e["value"] for e in container()["env"] if "value" in e}


def stages() -> list[list[str]]:
    """The Dockerfile's instructions per stage (continuation lines joined)."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    result: list[list[str]] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            result.append([])
        if result:  # a global ARG before the first FROM belongs to no stage
            result[-1].append(line)
    return result


def instruction(stage: list[str], name: str) -> list[str]:
    return [line[len(name) + 1 :] for line in stage if line.upper().startswith(name)]


def image_command() -> list[str]:
    """ENTRYPOINT + CMD of the final stage (exec form)."""
    final = stages()[-1]
    (entrypoint,) = instruction(final, "ENTRYPOINT")
    (cmd,) = instruction(final, "CMD")
    return [*json.loads(entrypoint), *json.loads(cmd)]


def run_parser() -> argparse.ArgumentParser:
    top = parser()
    # argparse has no public way to reach a subcommand's parser or its options.
    actions = top._actions  # noqa: SLF001
    subparsers = argparse._SubParsersAction  # noqa: SLF001
    (commands,) = [a for a in actions if isinstance(a, subparsers)]
    run: argparse.ArgumentParser = commands.choices["run"]
    return run


def http_flags_landed() -> bool:
    return "--http-port" in run_parser()._option_string_actions  # noqa: SLF001


def option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_manifests_parse_and_refer_to_each_other() -> None:
    objects = manifests()
    assert set(objects) == {
        "Deployment", "ScaledObject", "TriggerAuthentication", "PodDisruptionBudget",
        "Kustomization",
    }  # fmt: skip
    listed = set(objects["Kustomization"]["resources"])
    assert listed == {p.name for p in (DEPLOY / "kubernetes").glob("*.yaml")} - {
        "kustomization.yaml"
    }
    deployment = objects["Deployment"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert (
        objects["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"]
        == (deployment["spec"]["selector"]["matchLabels"])
    )
    scaled = objects["ScaledObject"]["spec"]
    assert scaled["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    (trigger,) = scaled["triggers"]
    assert trigger["type"] == "rabbitmq"
    assert trigger["metadata"]["queueName"] == env()["AMQP_BATCH_QUEUE_NAME"]
    assert trigger["metadata"]["mode"] == "QueueLength"
    auth = objects["TriggerAuthentication"]
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    (url,) = [e for e in container()["env"] if e["name"] == "AMQP_BATCH_URL"]
    (secret,) = auth["spec"]["secretTargetRef"]
    assert secret["name"] == url["valueFrom"]["secretKeyRef"]["name"]
    assert secret["key"] == url["valueFrom"]["secretKeyRef"]["key"]
    # the PDB never blocks every pod of a small Deployment
    assert objects["PodDisruptionBudget"]["spec"]["maxUnavailable"] == 1


def test_probes_hit_what_the_command_serves() -> None:
    command = image_command()
    spec = container()
    ports = {p["name"]: p["containerPort"] for p in spec["ports"]}
    served = int(option(command, "--http-port"))
    assert option(command, "--http-host") == "0.0.0.0"  # reachable from the kubelet
    for probe, path in (
        ("livenessProbe", DOCUMENTED_LIVENESS),
        ("readinessProbe", DOCUMENTED_READINESS),
    ):
        get = spec[probe]["httpGet"]
        assert ports.get(get["port"], get["port"]) == served, probe
        assert get["path"] == path, probe
    assert f"EXPOSE {served}" in stages()[-1]
    if http_flags_landed():
        # The flags are the parser's: the image's CMD parses, with our port.
        run = run_parser()
        action = run._option_string_actions["--http-port"]  # noqa: SLF001
        args = run.parse_args(command[2:])
        assert int(getattr(args, action.dest)) == served
        assert action.default in (None, argparse.SUPPRESS, served, str(served))
    else:
        # The HTTP flags have not landed on this branch yet: the port and the
        # paths are checked against the documented constants only.
        assert served == DOCUMENTED_PORT


def test_grace_period_covers_the_drain() -> None:
    spec = manifests()["Deployment"]["spec"]["template"]["spec"]
    timeout = float(env()["AMQP_BATCH_SHUTDOWN_TIMEOUT"])
    assert spec["terminationGracePeriodSeconds"] > timeout + KILL_GRACE


def test_image_command_checks_against_the_broker(
    broker_url: str, tmp_path: Path
) -> None:
    command = image_command()
    assert command[0] == "amqp-batch"
    arguments = command[1:]
    if not http_flags_landed():
        # Marked: --http-port/--http-host are not in this branch's parser yet;
        # everything else of the CMD runs as is.
        for flag in ("--http-port", "--http-host"):
            at = arguments.index(flag)
            del arguments[at : at + 2]
    settings = {**env(), "AMQP_BATCH_URL": broker_url}
    result = run_cli(
        [*arguments, "--check", "--no-env-file"],
        cwd=DEPLOY / "app",
        env={**settings, "PYTHONPATH": str(DEPLOY / "app")},
    )
    assert result.returncode == 0, (shlex.join(arguments), result.stderr)
    assert "answered" in result.stdout
    assert "queue_name = 'orders'" in result.stdout
    assert "shutdown_timeout = 30.0" in result.stdout


def test_dockerfile_is_multi_stage_slim_and_non_root() -> None:
    build, final = stages()
    assert build[0].startswith("FROM python:") and build[0].endswith(" AS build")
    assert final[0].startswith("FROM python:") and "-slim" in final[0]
    assert "COPY --from=build /opt/venv /opt/venv" in final
    (user,) = instruction(final, "USER")
    assert user not in ("root", "0")
    assert instruction(final, "STOPSIGNAL") == ["SIGTERM"]
    runs = " ".join(instruction(final, "RUN"))
    for tool in ("apt-get", "gcc", "build-essential", "pip install", "git"):
        assert tool not in runs, tool


def _docker_engine() -> bool:
    if shutil.which("docker") is None:
        return False
    probe = subprocess.run(
        ["docker", "info"], capture_output=True, timeout=30, check=False
    )
    return probe.returncode == 0


def test_image_builds(tmp_path: Path) -> None:
    if not _docker_engine():
        pytest.skip("no Docker engine answers here (only the docker client, or none)")
    tag = "amqp-batch-test-image:latest"
    build = subprocess.run(
        ["docker", "build", "-f", str(DOCKERFILE), "-t", tag, str(ROOT)],
        capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-3000:]
    version = subprocess.run(
        ["docker", "run", "--rm", tag, "--version"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert version.returncode == 0 and "amqp-batch" in version.stdout
