"""Project automation: ``nox -s tests``, ``lint``, ``typecheck``, ``docs``, ``bench``,
``soak``.

Every session runs on the interpreter that runs nox (``python3 -m nox``), in its own
virtualenv under ``.nox/`` (built with uv when it is installed, else venv).
"""

from __future__ import annotations

import shutil
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
        "docs/conf.py",
        "docs/diagrams",
        "noxfile.py",
    )
    if (ROOT / name).exists()
]


def _group(name: str) -> list[str]:
    """Requirements of a ``[dependency-groups]`` entry of pyproject.toml."""
    return list(nox.project.dependency_groups(PYPROJECT, name))


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite (a private RabbitMQ node is started for it)."""
    session.install("-e", ".", *_group("test"), "aiormq")
    # Installs Debian's rabbitmq-server when missing (root only; never starts or
    # stops the machine's own broker), else explains what to install.
    session.run("python", "-m", "tests.support.rabbit_node", "--ensure")
    # Debian's prometheus for the one real-scrape test; never fails (without apt
    # that test skips and says why).
    session.run("python", "-m", "tests.support.prometheus_server", "--ensure")
    session.run("python", "-m", "pytest", *session.posargs)


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
        "-e", ".", "aiormq>=7,<8", "trio>=0.23", "matplotlib", "pyinstrument"
    )
    session.run("python", "bench/run.py", *session.posargs)
