"""Project automation: ``nox -s tests``, ``tests_pythons``, ``lint``, ``typecheck``,
``docs``, ``bench``, ``soak``.

Every session runs on the interpreter that runs nox (``python3 -m nox``), in its own
virtualenv under ``.nox/`` (built with uv when it is installed, else venv).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import nox

ROOT = Path(__file__).parent
PYPROJECT = nox.project.load_toml(ROOT / "pyproject.toml")

nox.options.default_venv_backend = "uv" if shutil.which("uv") else "venv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.error_on_missing_interpreters = True

# Paths that exist in this checkout, among those we lint. Only the Python of
# docs/: ruff would also format the code blocks of every Markdown page there.
LINT_PATHS = [
    name
    for name in (
        "src",
        "tests",
        "bench",
        "examples",
        "scripts",
        "deploy",
        "docs/conf.py",
        "docs/diagrams",
        "noxfile.py",
    )
    if (ROOT / name).exists()
]


#: The Python versions the package supports (its classifiers say the same).
SUPPORTED_PYTHONS = ("3.10", "3.11", "3.12", "3.13")
#: The part of the suite that needs no broker: ``tests_pythons`` runs it.
OFFLINE = "not private_node and not broker"
#: Tests that compare our codec byte for byte with pamqp 4's (the reference).
#: Python 3.10 gets pamqp 3.3, whose encoder cannot encode negative short-short
#: integers, some decimals or keys over 127 bytes, so these ten fail on the
#: reference side there and are deselected (listed in the session's log).
PAMQP4_REFERENCE = (
    "test_encoding_is_pamqps or test_decoding_is_pamqps"
    " or test_any_value_of_any_tag_decodes_as_pamqp"
    " or test_damaged_tables_fail_cleanly_or_decode_as_pamqp"
    " or test_whole_delivery_fast_path_gives_the_frame_by_frame_delivery"
    " or (test_every_type_tag_decodes_as_pamqp and expected12)"
    " or (test_integers_take_pamqps_smallest_type and (-1] or -128 or -127))"
    " or (test_keys_up_to_255_bytes_are_kept_whole and key2)"
)


def _found_pythons() -> dict[str, str]:
    """Supported version -> interpreter path, for each one on this machine.

    pyenv's installs (``$PYENV_ROOT/versions/3.X.Y``, newest patch release) come
    first: a ``python3.X`` shim on PATH may not select any of them. Then plain
    ``python3.X`` executables on PATH.
    """
    found: dict[str, str] = {}
    roots = {os.environ.get("PYENV_ROOT", ""), str(Path.home() / ".pyenv")}
    roots.add("/root/.pyenv")
    installs: list[tuple[tuple[int, ...], Path]] = []
    for root in filter(None, roots):
        versions = Path(root) / "versions"
        if not versions.is_dir():
            continue
        for entry in versions.iterdir():
            if re.fullmatch(r"3\.\d+\.\d+", entry.name):
                numbers = tuple(int(part) for part in entry.name.split("."))
                installs.append((numbers, entry / "bin" / "python3"))
    for numbers, path in sorted(installs, reverse=True):
        version = f"{numbers[0]}.{numbers[1]}"
        if version in SUPPORTED_PYTHONS and path.exists():
            found.setdefault(version, str(path))
    for version in SUPPORTED_PYTHONS:
        if version not in found and (path := shutil.which(f"python{version}")):
            found[version] = path
    return dict(
        sorted(found.items(), key=lambda item: SUPPORTED_PYTHONS.index(item[0]))
    )


def _group(name: str) -> list[str]:
    """Requirements of a ``[dependency-groups]`` entry of pyproject.toml."""
    return list(nox.project.dependency_groups(PYPROJECT, name))


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite (a private RabbitMQ node is started for it).

    Without arguments, in two pytest processes side by side: the cluster group
    (``-m cluster``: three private nodes of its own, mostly waiting for them to
    boot, elect and rejoin) and everything else (``-m "not cluster"``, with the
    session's private node). They share no node, port or queue name. The
    cluster group's output follows the other's. Arguments after ``--`` run one
    pytest process with them instead.
    """
    session.install("-e", ".", *_group("test"), "aiormq")
    # Installs Debian's rabbitmq-server when missing (root only; never starts or
    # stops the machine's own broker), else explains what to install.
    session.run("python", "-m", "tests.support.rabbit_node", "--ensure")
    # Debian's prometheus for the one real-scrape test; never fails (without apt
    # that test skips and says why).
    session.run("python", "-m", "tests.support.prometheus_server", "--ensure")
    if session.posargs:
        session.run("python", "-m", "pytest", *session.posargs)
        return
    cluster_failed = False
    with tempfile.TemporaryFile() as cluster_log:
        bin_dir = session.bin
        env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
        cluster = subprocess.Popen(
            [f"{bin_dir}/python", "-m", "pytest", "-m", "cluster"],
            stdin=subprocess.DEVNULL,
            stdout=cluster_log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
        )
        session.log("the cluster group (-m cluster) runs beside, its output follows")
        try:
            session.run("python", "-m", "pytest", "-m", "not cluster")
        finally:
            cluster_failed = cluster.wait() != 0
            cluster_log.seek(0)
            session.log("the cluster group (-m cluster):")
            sys.stdout.flush()
            sys.stdout.buffer.write(cluster_log.read())
            sys.stdout.flush()
    if cluster_failed:
        session.error("the cluster group (-m cluster) failed")


@nox.session(python=False)
def tests_pythons(session: nox.Session) -> None:
    """The offline part of the suite (no broker) on every supported Python found.

    ``nox -s tests_pythons`` runs it on each of 3.10-3.13 that is installed
    (pyenv's versions first, then ``python3.X`` on PATH), in ``.nox/py3.X``;
    ``-- --oldest-newest`` only on the oldest and the newest found (CI does).
    Other arguments after ``--`` go to pytest. 3.10 exercises the
    ``exceptiongroup`` backport path.
    """
    found = _found_pythons()
    if not found:
        session.error(f"none of Python {', '.join(SUPPORTED_PYTHONS)} is installed")
    args = [arg for arg in session.posargs if arg != "--oldest-newest"]
    versions = list(found)
    if "--oldest-newest" in session.posargs:
        versions = sorted({versions[0], versions[-1]}, key=versions.index)
    missing = [v for v in SUPPORTED_PYTHONS if v not in found]
    if missing:
        session.log(f"not installed here, skipped: Python {', '.join(missing)}")
    # aiormq (for the benchmarks) needs pamqp 3, or Python 3.11 with pamqp 4;
    # no test imports it.
    test_group = [r for r in _group("test") if not r.startswith("aiormq")]
    requirements = ["-e", ".", *test_group]
    for version in versions:
        venv = ROOT / ".nox" / f"py{version}"
        python = venv / "bin" / "python"
        if not python.exists():
            if shutil.which("uv"):
                session.run("uv", "venv", "-q", "-p", found[version], str(venv))
            else:
                session.run(found[version], "-m", "venv", str(venv))
        if shutil.which("uv"):
            session.run("uv", "pip", "install", "-q", "-p", str(python), *requirements)
        else:
            session.run(str(python), "-m", "pip", "install", "-q", *requirements)
        session.log(f"Python {version}: {found[version]}")
        select = ["-m", OFFLINE]
        if version == "3.10":
            session.log(f"pamqp 3.3 on 3.10: deselected -k {PAMQP4_REFERENCE!r}")
            select += ["-k", f"not ({PAMQP4_REFERENCE})"]
        session.run(str(python), "-m", "pytest", *select, "-q", *args)


@nox.session
def soak(session: nox.Session) -> None:
    """The minutes-long reliability rows (L1, L2 at 100k, F5): ``pytest --soak``.

    ``nox -s soak -- --report`` runs every reliability row, soak included, through
    ``scripts/reliability_report.py`` and rewrites ``docs/reliability.md``.
    ``AMQP_BATCH_SOAK_SECONDS`` sets L1's duration (default 180 per backend).
    """
    session.install("-e", ".", *_group("test"), "aiormq")
    session.run("python", "-m", "tests.support.rabbit_node", "--ensure")
    args = [arg for arg in session.posargs if arg != "--report"]
    if "--report" in session.posargs:
        session.run("python", "scripts/reliability_report.py", "--soak", "--", *args)
    else:
        session.run("python", "-m", "pytest", "--soak", *args)


@nox.session
def lint(session: nox.Session) -> None:
    """Ruff lint and format check."""
    session.install(*_group("lint"))
    session.run("ruff", "check", *LINT_PATHS)
    session.run("ruff", "format", "--check", *LINT_PATHS)


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict (configured in pyproject.toml) on the library."""
    session.install("-e", ".", *_group("typecheck"))
    session.run("mypy", "src")


@nox.session
def docs(session: nox.Session) -> None:
    """Build the documentation site (Sphinx + MyST) into ``docs/_build/html``.

    Warnings are errors (``-W``, nitpicky). The diagrams are checked against
    ``docs/diagrams/render.py`` first; ``nox -s docs -- --render`` rewrites them.
    """
    session.install("-e", ".[prometheus,otel]", *_group("docs"))
    render = ["python", "docs/diagrams/render.py"]
    if "--render" in session.posargs:
        session.run(*render)
    else:
        session.run(*render, "--check")
    session.run(
        "sphinx-build",
        "-E",  # re-read every page, so no warning hides in a cached one
        "-W",
        "--keep-going",
        "-n",
        "-q",
        "-b",
        "html",
        "-d",
        "docs/_build/doctrees",
        "docs",
        "docs/_build/html",
    )


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks W1-W6 against aio-pika-batch and raw aiormq (``bench/run.py``).

    Needs a broker (``AMQP_BATCH_BENCH_URL``, default the local one). Options go
    after ``--``: ``--quick --runs 1``, ``--only W1,W3``, ``--soak``. The transport
    ceiling alone: ``nox -s bench -- --only W1`` or ``python bench/transport.py``.
    """
    session.install(
        "-e",
        ".[prometheus,otel]",
        "aiormq>=7,<8",
        "trio>=0.23",
        "matplotlib",
        "pyinstrument",
    )
    session.run("python", "bench/run.py", *session.posargs)
