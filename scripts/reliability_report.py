# ruff: noqa: RUF001 - the matrix keeps its multiplication signs
"""Run the reliability rows against a private RabbitMQ node and write the report.

    python scripts/reliability_report.py            # the rows of `nox -s tests`
    python scripts/reliability_report.py --soak     # ... and the soak rows (minutes)
    python scripts/reliability_report.py --keep DIR     # keep the raw results
    python scripts/reliability_report.py --no-run --figures FILE --junit FILE ...

It runs pytest on the reliability test files with ``AMQP_BATCH_FIGURES`` set, so
every test appends its measured figures (``figures.record(...)``, one JSON line
each), then renders ``docs/reliability.md``: the reliability matrix (``MATRIX``)
with the outcome of each row on asyncio and trio (the native transport) and on
the aiormq transport (asyncio; test ids with ``aiormq``), the headline figures
and every row's figures, the date and the commit. A row without figures is shown as "not
measured in this run", never filled in. Exits non-zero if a test failed (the
report is written anyway).

Arguments after ``--`` go to pytest (e.g. ``-- -k f1``).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

ROOT = Path(__file__).resolve().parent.parent
TEST_FILES = [
    "tests/test_reliability_faults.py",
    "tests/test_reliability_rows.py",
    "tests/test_secrets.py",
    "tests/test_soak.py",
    "tests/test_cluster.py",
    "tests/test_outage.py",
    "tests/test_publisher.py",
]
BACKENDS = ("asyncio", "trio")
#: Rows that do not run on the aiormq transport, and why (its column says so).
AIORMQ_NOT_RUN: dict[str, str] = {
    "L1": "soak row (minutes, `nox -s soak`): native only",
    "F5": "soak row (minutes, `nox -s soak`): native only; R3 is a kill -9 on aiormq",
    "B2": "aiormq gives the REQUEUE copy of a message without properties a "
    "`message_id` (docs/how-to/transports.md)",
}

#: The reliability matrix: row -> (scenario, what must hold).
MATRIX: dict[str, tuple[str, str]] = {
    "L1": (
        "sustained load, several workers, minutes",
        "invariant; no duplicates; memory flat after warm-up",
    ),
    "L2": ("backlog of 100k", "unacked at the broker ≤ workers × prefetch; invariant"),
    "F1": (
        "connection cut mid-batch, repeatedly (FIN and RST)",
        'invariant; duplicates ≤ in-flight at each cut; no "unknown delivery tag"',
    ),
    "F2": ("cut after N bytes, N = 64·2^k", "invariant at every offset"),
    "F3": ("stalled connection", "detected within 2 × heartbeat + 1 s; no hung task"),
    "F4": (
        "broker stop_app / start_app",
        "invariant; consuming again within ~2 s of start",
    ),
    "F5": (
        "broker kill -9 and restart",
        "invariant for confirmed persistent messages",
    ),
    "F6": ("worker process SIGKILL", "only its unacked ids come back"),
    "F7": (
        "SIGTERM with batches in flight",
        "no new deliveries; in-flight batches finish and settle; exit within "
        "shutdown_timeout + 1 s; nothing unfinished is acked",
    ),
    "F8": (
        "handler slower than consumer_timeout",
        "channel reopened; old tags never acked on the new channel; invariant",
    ),
    "F9": (
        "memory alarm during REQUEUE traffic",
        "acks keep flowing; republishes resume after the alarm",
    ),
    "F10": (
        "cut between a republish confirm and the original's ack",
        "≤ 1 duplicate, 0 lost",
    ),
    "F11": (
        "quorum queue with `x-delivery-limit`",
        "poison message dead-lettered after the limit",
    ),
    "F12": (
        "queue deleted under the consumer",
        "cancellation surfaced; bounded redeclare; no tight loop",
    ),
    "F13": (
        "redeclare with different arguments",
        "fails fast, clear error, no reconnect storm",
    ),
    "C1": (
        "3-node cluster, quorum queue: kill -9 of the consumer's node mid-batch",
        "consuming on another node within 2 × heartbeat + back-off; invariant",
    ),
    "C2": (
        "3-node cluster: kill -9 of the quorum queue's leader",
        "a new leader is elected, consuming resumes; invariant",
    ),
    "C3": (
        "3-node cluster: rolling restart while the library's Publisher publishes",
        "every confirmed id acked or dead-lettered; the publisher never raises",
    ),
    "C4": (
        "3-node cluster: the consumer's node cut off by its proxy (stall)",
        "detected within 2 × heartbeat; consuming on another node; invariant",
    ),
    "R1": (
        "a dependency outage (the handler fails everything for a stretch) with "
        "delayed retries and the kill switch, classic and quorum work queues",
        "nothing dead-lettered; every id acked once after the recovery; attempts "
        "spaced by at least their delays; invariant",
    ),
    "R2": (
        "the same outage with immediate retries (today's default)",
        "every id dead-lettered during the outage, exactly once; invariant",
    ),
    "R3": (
        "broker kill -9 with NACKs and REQUEUE copies in flight "
        "(`dead_letter_strategy=publish`); and with copies waiting in quorum "
        "delay queues",
        "every NACKed id reaches the dead-letter queue; every waiting copy "
        "comes back; invariant",
    ),
    "R4": (
        "a hung handler past `handler_timeout`",
        "cancelled; its messages get `unhandled_exception_action`; invariant",
    ),
    "R5": (
        "`max_messages_per_second` over several workers",
        "the rate is shared by all workers of the consumer",
    ),
    "R6": (
        "an idempotency store and redelivered ids",
        "ids already handled are acked without reaching the handler, counted",
    ),
    "R7": (
        "forged `x-original-*` headers from a producer",
        "never choose where a dead letter goes",
    ),
    "P1": (
        "the library's `Publisher` under FIN/RST cuts, `close_connection` and "
        "a broker restart",
        "every `publish()` that returned is in the queue; duplicates carry "
        "one `message_id`",
    ),
    "B1": (
        '`x-retry-count` = "3", -1, 3.5, True, 2^63-1, [1], {}, None, b"\\xff", absent',
        "no crash, no loop, no silent reset; absent = 0",
    ),
    "B2": (
        "no properties, empty body, invalid UTF-8, 1 MiB of headers",
        "invariant",
    ),
    "B3": (
        "handler yields too few / too many / non-results / raises / is cancelled",
        "every delivery settled exactly once",
    ),
    "S1": (
        "TLS: right CA, wrong CA, hostname mismatch, verification off",
        "only the right CA connects; turning verification off is explicit and logged",
    ),
    "S2": (
        "a marker password in the URL and settings",
        "never in logs, `repr`, `str`, exceptions or tracebacks",
    ),
    "S3": (
        "URLs: `http://`, empty host, bad port, `[::1`, unknown vhost, bad credentials",
        "rejected before a socket opens, or a clearly named error; bad "
        "credentials are not retried forever",
    ),
}

#: Per row, the figures shown in the matrix's summary column (when measured).
KEY_FIGURES: dict[str, Sequence[str]] = {
    "L1": ("duration_s", "rate_per_s", "rss_growth_mib", "duplicates"),
    "L2": ("backlog", "max_unacked", "bound", "msgs_per_s"),
    "F1": ("cuts", "recovery_s_max", "duplicates_per_cut", "in_flight_bound"),
    "F2": ("offsets", "duplicates"),
    "F3": ("detection_s", "bound_s", "recovery_after_resume_s"),
    "F4": ("recovery_after_start_s", "duplicates"),
    "F5": ("outage_s", "recovery_after_restart_s", "duplicates"),
    "F6": ("held_in_handler", "redelivered_after_kill", "duplicates"),
    "F7": ("case", "exit_s", "bound_s"),
    "F10": ("copies_confirmed_at_cut", "max_copies_per_message"),
    "R1": ("dead_lettered", "drained_after_recovery_s", "min_attempt_gap_s", "lost"),
    "R2": ("dead_lettered", "calls_during_outage", "lost"),
    "R3": ("nacked", "dead_letter_duplicates", "lost"),
    "P1": ("faults", "confirmed", "republished", "duplicates"),
    "C1": ("recovery_s", "bound_s", "duplicates", "lost"),
    "C2": ("leader_seen_s", "nacks_while_electing", "duplicates", "lost"),
    "C3": ("restarts_s", "republished", "duplicates", "lost"),
    "C4": ("recovery_s", "bound_s", "duplicates", "lost"),
}
#: Figures every row shares (shown in the details, not repeated in the summary).
COMMON = ("row", "test", "backend")

Outcomes = dict[str, dict[str, list[str]]]  # row -> backend -> outcomes


# --------------------------------------------------------------------- running


def run_pytest(
    files: Sequence[str], figures: Path, junit: Path, soak: bool, extra: Sequence[str]
) -> int:
    """Run pytest on ``files``; figures and results go to the given files."""
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "-q",
        "-rfE",
        f"--junitxml={junit}",
        "-o",
        "junit_family=xunit2",
        *(["--soak"] if soak else []),
        *files,
        *extra,
    ]
    print("+", " ".join(command), flush=True)
    env = dict(os.environ, AMQP_BATCH_FIGURES=str(figures))
    return subprocess.run(command, cwd=ROOT, env=env, check=False).returncode


# --------------------------------------------------------------------- reading


def row_of(test_name: str) -> str | None:
    """``test_f10_cut_...[trio]`` -> ``F10``; None for tests of no row."""
    name = test_name.removeprefix("test_")
    prefix = name.split("_", 1)[0].upper()
    return prefix if prefix in MATRIX else None


def backend_of(test_name: str) -> str:
    """The matrix column of a test id: ``aiormq`` for a row on the aiormq
    transport, else the anyio backend in its parameters, or ``sync``."""
    params = test_name.partition("[")[2].rstrip("]").split("-")
    if "aiormq" in params:
        return "aiormq"
    return next((p for p in params if p in BACKENDS), "sync")


def label_of(entry: dict[str, Any]) -> str:
    """A figures entry's column: its backend, or ``aiormq`` for that transport."""
    test = str(entry.get("test", "")).rsplit("::", 1)[-1]
    if backend_of(test) == "aiormq":
        return "aiormq"
    return str(entry.get("backend") or "sync")


def read_outcomes(junit_files: Iterable[Path]) -> tuple[Outcomes, list[str]]:
    """Per row and backend, the outcome of each test; and the failed test ids."""
    outcomes: Outcomes = collections.defaultdict(lambda: collections.defaultdict(list))
    failed: list[str] = []
    for path in junit_files:
        if not path.exists() or path.stat().st_size == 0:
            continue
        for case in ElementTree.parse(path).iter("testcase"):
            name = case.get("name", "")
            row = row_of(name)
            if row is None:
                continue
            if case.find("failure") is not None or case.find("error") is not None:
                outcome = "failed"
                failed.append(f"{case.get('classname')}::{name}")
            elif case.find("skipped") is not None:
                outcome = "skipped"
            else:
                outcome = "passed"
            outcomes[row][backend_of(name)].append(outcome)
    return outcomes, failed


def read_figures(paths: Iterable[Path]) -> dict[str, list[dict[str, Any]]]:
    """Figures per row, in the order they were recorded."""
    figures: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for path in paths:
        if not path.exists():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                entry = json.loads(line)
                figures[str(entry.get("row"))].append(entry)
    return figures


# --------------------------------------------------------------------- rendering


def cell(value: Any) -> str:
    """A value as Markdown table-cell text."""
    if isinstance(value, float):
        text = f"{value:g}"
    elif isinstance(value, (list, tuple)):
        text = ", ".join(cell(v) for v in value)
    elif isinstance(value, dict):
        text = json.dumps(value, sort_keys=True, default=str)
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def outcome_cell(results: list[str]) -> str:
    if not results:
        return "not run"
    if "failed" in results:
        return f"**failed** ({results.count('failed')}/{len(results)})"
    if all(r == "skipped" for r in results):
        return "skipped"
    skipped = results.count("skipped")
    return f"passed ({skipped} skipped)" if skipped else "passed"


def summary(row: str, entries: list[dict[str, Any]]) -> str:
    if not entries:
        return "not measured in this run"
    keys = KEY_FIGURES.get(row)
    parts = []
    for entry in entries:
        shown = keys or [k for k in entry if k not in COMMON][:4]
        values = "; ".join(f"{k} {cell(entry[k])}" for k in shown if k in entry)
        parts.append(f"{label_of(entry)}: {values}")
    return cell(" / ".join(parts))


def _values(
    figures: dict[str, list[dict[str, Any]]], row: str, key: str
) -> list[tuple[str, Any]]:
    return [
        (label_of(entry), entry[key]) for entry in figures.get(row, []) if key in entry
    ]


def headline(figures: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The figures the issue asks for, one bullet each."""
    wanted = [
        (
            "Recovery after a connection cut (F1, s, per cut kind)",
            "F1",
            "recovery_s_max",
        ),
        (
            "Duplicates per cut (F1; bound: workers × prefetch)",
            "F1",
            "duplicates_per_cut",
        ),
        (
            "Recovery after the broker's start_app (F4, s)",
            "F4",
            "recovery_after_start_s",
        ),
        (
            "Recovery after a kill -9 and restart (F5, s)",
            "F5",
            "recovery_after_restart_s",
        ),
        ("Stall detection with heartbeat 1 s (F3, s; bound 3 s)", "F3", "detection_s"),
        ("RSS growth over the soak after warm-up (L1, MiB)", "L1", "rss_growth_mib"),
        ("Most unacked at the broker with a backlog (L2)", "L2", "max_unacked"),
    ]
    lines = []
    for label, row, key in wanted:
        values = _values(figures, row, key)
        if key == "recovery_s_max":
            values = [
                (
                    backend,
                    "; ".join(
                        f"{kind} {cell(entry[f'recovery_s_{kind}'])}"
                        for kind in ("fin", "rst", "close")
                        if f"recovery_s_{kind}" in entry
                    ),
                )
                for backend, entry in ((label_of(e), e) for e in figures.get("F1", []))
            ]
        text = (
            ", ".join(f"{backend}: {cell(value)}" for backend, value in values)
            if values
            else "not measured in this run"
        )
        lines.append(f"- {label}: {text}")
    entries = [entry for rows in figures.values() for entry in rows]
    lost = [entry["lost"] for entry in entries if "lost" in entry]
    if lost:
        lines.append(
            f"- **Messages lost, summed over every row and backend: {sum(lost)}** "
            f"({len(lost)} measurements)"
        )
    else:
        lines.append("- Messages lost: not measured in this run")
    return lines


def details(figures: dict[str, list[dict[str, Any]]]) -> list[str]:
    lines: list[str] = []
    for row in MATRIX:
        entries = figures.get(row, [])
        if not entries:
            continue
        lines += [
            "",
            f"### {row}",
            "",
            "| backend | test | figures |",
            "| --- | --- | --- |",
        ]
        for entry in entries:
            test = str(entry.get("test", "")).rsplit("::", 1)[-1]
            values = "; ".join(
                f"{key} {cell(value)}"
                for key, value in entry.items()
                if key not in COMMON
            )
            lines.append(f"| {label_of(entry)} | `{cell(test)}` | {cell(values)} |")
    return lines


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _rabbitmq_version() -> str:
    try:
        result = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", "rabbitmq-server"],
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return result.stdout.strip() or "unknown"


def render(
    outcomes: Outcomes,
    figures: dict[str, list[dict[str, Any]]],
    *,
    soak: bool,
    duration_s: float | None,
    failed: Sequence[str],
) -> str:
    now = datetime.datetime.now(datetime.timezone.utc)
    commit = _git("rev-parse", "--short=12", "HEAD")
    dirty = (
        " (with uncommitted changes)"
        if _git("status", "--porcelain", "--", "src")
        else ""
    )
    soak_seconds = os.environ.get("AMQP_BATCH_SOAK_SECONDS", "180")
    lines = [
        "# Reliability",
        "",
        "What amqp-batch guarantees about every message: each delivery is settled "
        "exactly once per session; a message is acknowledged only after its handler "
        "gave it a result (and, for a REQUEUE, after its copy was confirmed); "
        "whatever is not settled when a connection is lost or a stop times out goes "
        "back to the queue. Delivery is therefore at least once: handlers must be "
        "idempotent. The rules are in the [design notes](design.md) and the "
        "[shutdown guide](how-to/shutdown.md).",
        "",
        "This page is generated by `scripts/reliability_report.py` (`nox -s soak -- "
        "--report`) from one run of the reliability tests against a private "
        "RabbitMQ node. Do not edit it by hand.",
        "",
        f"- Date: {now:%Y-%m-%d %H:%M} UTC",
        f"- Commit: `{commit}`{dirty}",
        f"- RabbitMQ {_rabbitmq_version()}, Python {platform.python_version()}, "
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs",
        "- Soak rows (L1, L2 at 100k, F5): "
        + (
            f"included (L1 ran {soak_seconds} s per backend)"
            if soak
            else "not run (run with `--soak`)"
        ),
    ]
    if duration_s is not None:
        lines.append(f"- Test time: {duration_s / 60:.1f} min")
    lines += [
        "",
        "## How every row is checked",
        "",
        "Each test publishes numbered, persistent messages with publisher confirms, "
        "runs a consumer whose handler records every delivery, injects its fault, "
        "waits until every confirmed id has a final result, then drains the work "
        "queue (and the dead-letter queue) and classifies every id — the "
        "*total-queue* check of Jepsen's RabbitMQ analysis "
        "(`tests/support/invariant.py`): **lost** (confirmed, yet neither acked, "
        "dead-lettered nor still queued) must be 0; **unexpected** ids must be 0; "
        "no id is both acked and dead-lettered; a duplicate (the handler saw the "
        "same id at the same retry count again) must arrive with `redelivered=true` "
        "and is counted, never hidden. Faults come from a private node "
        "(`rabbitmqctl close_connection`, `stop_app`, `kill -9`, alarms) and an "
        "in-process TCP proxy (FIN, RST, stall, cut after N bytes). Every async "
        "test runs on asyncio and on trio; the rows that apply to a transport run "
        "on the aiormq transport too (asyncio only), with the same assertions "
        "(the rows that do not, and why: "
        "[Choosing a transport](how-to/transports.md)).",
        "",
        "## Headline figures",
        "",
        *headline(figures),
        "",
        "## The matrix",
        "",
        "| # | scenario | must hold | asyncio | trio | aiormq (asyncio) | figures |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row, (scenario, must_hold) in MATRIX.items():
        by_backend = outcomes.get(row, {})
        results = [
            outcome_cell([*by_backend.get(backend, []), *by_backend.get("sync", [])])
            for backend in BACKENDS
        ]
        aiormq = by_backend.get("aiormq", [])
        if aiormq or row not in AIORMQ_NOT_RUN:
            results.append(outcome_cell([*aiormq, *by_backend.get("sync", [])]))
        else:
            results.append(f"not run: {cell(AIORMQ_NOT_RUN[row])}")
        lines.append(
            f"| {row} | {cell(scenario)} | {cell(must_hold)} | "
            + " | ".join(results)
            + f" | {summary(row, figures.get(row, []))} |"
        )
    if failed:
        lines += ["", "## Failed tests", ""]
        lines += [f"- `{name}`" for name in failed]
    lines += [
        "",
        "## Notes on the figures",
        "",
        "- F1 recovery is measured from the cut (proxy FIN or RST) to every "
        "worker consuming again; for `close_connection` it starts when the "
        "broker had closed both connections and the batch held in the handler "
        "was let go (the CLI itself takes about a second).",
        "- F4 and F5 recovery start when the broker's AMQP port accepts "
        "connections again.",
        "- F5 duplicates come from the broker: after a `kill -9` a classic queue "
        "redelivers (flagged `redelivered`) messages whose acks it had not yet "
        "written to disk.",
        "- F7 (handler past shutdown_timeout): the unfinished batch goes back to "
        "the queue; a batch that finished behind it in delivery-tag order is "
        "still settled (`decided_but_requeued` must be 0).",
        "- F6 and F7 run the consumer in a process of its own "
        "(`tests/support/consumer_process.py`); its decisions are replayed into "
        "the invariant's recorder.",
        "- F10 counts a copy published twice (the original was redelivered after "
        "its copy was confirmed, and requeued again) as the one allowed duplicate.",
        "",
        "## Figures per row",
        *details(figures),
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in args:
        index = args.index("--")
        args, extra = args[:index], args[index + 1 :]
    parser = argparse.ArgumentParser(prog="scripts/reliability_report.py")
    parser.add_argument("--soak", action="store_true", help="also run the soak rows")
    parser.add_argument(
        "--no-run", action="store_true", help="only render from --figures/--junit"
    )
    parser.add_argument("--figures", type=Path, action="append", default=[])
    parser.add_argument("--junit", type=Path, action="append", default=[])
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "reliability.md")
    parser.add_argument(
        "--keep",
        type=Path,
        help="keep the run's figures and JUnit files in this directory "
        "(to render again with --no-run)",
    )
    options = parser.parse_args(args)
    files = [name for name in TEST_FILES if (ROOT / name).exists()]
    code = 0
    duration: float | None = None
    with tempfile.TemporaryDirectory(prefix="amqp-batch-report-") as tmp:
        figure_files = list(options.figures)
        junit_files = list(options.junit)
        if not options.no_run:
            started = time.monotonic()
            figures_path = Path(tmp) / "figures.jsonl"
            figure_files.append(figures_path)
            runs = [False, True] if options.soak else [False]
            for soak in runs:
                junit = Path(tmp) / f"junit-{'soak' if soak else 'rows'}.xml"
                junit_files.append(junit)
                code = run_pytest(files, figures_path, junit, soak, extra) or code
                if code not in (0, 1):  # no run at all: keep the last report
                    sys.exit(f"pytest exited {code} (not a run with results)")
            duration = time.monotonic() - started
        outcomes, failed = read_outcomes(junit_files)
        figures = read_figures(figure_files)
        if options.keep is not None:
            options.keep.mkdir(parents=True, exist_ok=True)
            for path in [*figure_files, *junit_files]:
                if path.exists() and path.parent == Path(tmp):
                    shutil.copy(path, options.keep / path.name)
        text = render(
            outcomes,
            figures,
            soak=options.soak,
            duration_s=duration,
            failed=failed,
        )
    options.output.write_text(text, encoding="utf-8")
    print(f"wrote {options.output}", flush=True)
    return 1 if code or failed else 0


if __name__ == "__main__":
    sys.exit(main())
