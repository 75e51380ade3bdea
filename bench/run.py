"""The amqp-batch benchmark: workloads W1-W6 with every peer in the same run.

    python bench/run.py [--runs 3] [--quick] [--soak] [--only W1,W2] [--url ...]

(``nox -s bench`` runs this.) Peers, side by side on one broker:

- aio-pika-batch 0.1.0, in its own Python 3.12 virtual environment
  (``bench/.venvs/aio-pika-batch``, created on first use), driven by
  ``bench/peers/aio_pika_batch_driver.py``;
- raw aiormq 7 and our transport's bare ceiling (``bench/transport.py``'s
  consumers: consume + ``ack(multiple=True)`` every 100);
- amqp-batch on asyncio and on trio.

Every measurement runs in a fresh child process after the queue was filled with
confirms (persistent messages, durable queue). Each figure is the median of
``--runs`` runs; the consumers are interleaved within each run. Writes
``bench/results/latest.md`` and ``bench/results/latest.png``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import workloads  # noqa: E402
from workloads import (  # noqa: E402
    DRAIN_QUEUE,
    LATENCY_QUEUE,
    MIXED_DLQ,
    MIXED_DLX,
    MIXED_QUEUE,
)

PEER_VENV = HERE / ".venvs" / "aio-pika-batch"
PEER_PYTHON = PEER_VENV / "bin" / "python"
PEER_DRIVER = HERE / "peers" / "aio_pika_batch_driver.py"
PEER_REQUIREMENT = "aio-pika-batch==0.1.0"


def _find_python312() -> str:
    """A Python 3.12 that runs: $AMQP_BATCH_BENCH_PYTHON312, pyenv's own
    installs, then ``python3.12`` on PATH (a pyenv shim on PATH may exist without
    the version being selected, so every candidate is tried)."""
    candidates = [os.environ.get("AMQP_BATCH_BENCH_PYTHON312", "")]
    pyenv_root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    candidates += sorted(
        (str(p) for p in pyenv_root.glob("versions/3.12*/bin/python3.12")),
        reverse=True,
    )
    candidates.append(shutil.which("python3.12") or "")
    for candidate in filter(None, candidates):
        probe = subprocess.run(
            [candidate, "-c", "import sys; assert sys.version_info[:2] == (3, 12)"],
            capture_output=True,
            check=False,
        )
        if probe.returncode == 0:
            return candidate
    return "python3.12"


PYTHON312 = _find_python312()
CHILD_TIMEOUT = 900.0

APB = "aio-pika-batch 0.1.0"
AIORMQ = "raw aiormq 7"
CEIL_AIO = "transport ceiling (asyncio)"
CEIL_TRIO = "transport ceiling (trio)"
AB_AIO = "amqp-batch (asyncio)"
AB_TRIO = "amqp-batch (trio)"


# -- sizes --------------------------------------------------------------------------


def sizes(quick: bool) -> dict[str, Any]:
    if quick:
        return {"W1": 5_000, "W2": 2_000, "W4": 4_000, "W5_seconds": 5, "W6": 10_000}
    return {"W1": 50_000, "W2": 20_000, "W4": 20_000, "W5_seconds": 30, "W6": 100_000}


# -- the aio-pika-batch environment -------------------------------------------------


def ensure_peer_venv() -> None:
    """Create bench/.venvs/aio-pika-batch with python3.12 (once)."""
    if PEER_PYTHON.exists():
        check = subprocess.run(
            [str(PEER_PYTHON), "-c", "import aio_pika_batch"], capture_output=True
        )
        if check.returncode == 0:
            return
    print(f"creating {PEER_VENV} with {PYTHON312} ...", flush=True)
    PEER_VENV.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([PYTHON312, "-m", "venv", "--clear", str(PEER_VENV)], check=True)
    subprocess.run(
        [str(PEER_PYTHON), "-m", "pip", "install", "-q", PEER_REQUIREMENT], check=True
    )


# -- one measurement ----------------------------------------------------------------


class ChildFailed(RuntimeError):
    pass


def run_child(
    command: list[str], on_ready: Callable[[], None] | None = None
) -> dict[str, Any]:
    """Run one measurement process; ``on_ready`` runs once it consumes."""
    with tempfile.TemporaryFile("w+") as errors:
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=errors, text=True
        )
        assert process.stdout is not None
        result: dict[str, Any] | None = None
        try:
            if on_ready is not None:
                line = process.stdout.readline()
                if not line.strip().startswith('{"ready"'):
                    raise ChildFailed(f"no ready line, got {line!r}")
                on_ready()
            output, _ = process.communicate(timeout=CHILD_TIMEOUT)
        except BaseException:
            process.kill()
            process.wait()
            raise
        finally:
            errors.seek(0)
            stderr = errors.read()
        lines = [line for line in output.splitlines() if line.startswith("{")]
        if process.returncode != 0 or not lines:
            tail = "\n".join(stderr.strip().splitlines()[-15:])
            raise ChildFailed(f"exit {process.returncode}: {tail}")
        result = json.loads(lines[-1])
        return result


def ours(consumer: str, url: str, count: int, **options: Any) -> list[str]:
    command = [
        sys.executable,
        str(HERE / "workloads.py"),
        "--consumer",
        consumer,
        "--url",
        url,
        "--count",
        str(count),
    ]
    for key, value in options.items():
        command += [f"--{key.replace('_', '-')}", str(value)]
    return command


def peer(url: str, count: int, **options: Any) -> list[str]:
    command = [str(PEER_PYTHON), str(PEER_DRIVER), "--url", url, "--count", str(count)]
    for key, value in options.items():
        command += [f"--{key.replace('_', '-')}", str(value)]
    return command


# -- workloads ------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.url: str = args.url
        self.n = sizes(args.quick)
        #: (workload, consumer) -> list of per-run values (dicts).
        self.values: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
        self.failures: list[str] = []

    def record(
        self,
        workload: str,
        consumer: str,
        fill: Callable[[], None],
        command: list[str],
        on_ready: Callable[[], None] | None = None,
        count: int | None = None,
    ) -> None:
        try:
            fill()
            result = run_child(command, on_ready)
        except Exception as exc:  # a failed measurement is reported, not fatal
            message = f"{workload} / {consumer}: {type(exc).__name__}: {exc}"
            print("  FAILED", message, flush=True)
            self.failures.append(message)
            return
        if count is not None:
            result["rate"] = count / result["seconds"]
        latencies = sorted(result.pop("latencies", None) or [])
        if latencies:
            result["p50"] = percentile(latencies, 0.50)
            result["p99"] = percentile(latencies, 0.99)
            result["max"] = latencies[-1]
        self.values[(workload, consumer)].append(result)
        if "rate" in result:
            shown = f"{result['rate']:>10,.0f} msg/s"
        elif "p50" in result:
            shown = (
                f"p50 {result['p50'] * 1000:.1f} ms, p99 {result['p99'] * 1000:.1f} ms,"
                f" max {result['max'] * 1000:.1f} ms"
            )
        else:
            shown = f"RSS growth {result.get('soak_growth_kib', 0) / 1024:.1f} MiB"
        print(
            f"  {workload:<3} {consumer:<34} {shown}  "
            f"(peak RSS {result['peak_rss_kib'] / 1024:.1f} MiB)",
            flush=True,
        )

    def drain_fill(self, count: int, size: int = 256) -> Callable[[], None]:
        return lambda: workloads.fill_drain(self.url, count, size)

    def w1(self) -> None:
        n, url = self.n["W1"], self.url
        fill = self.drain_fill(n)
        self.record("W1", APB, fill, peer(url, n, queue=DRAIN_QUEUE), count=n)
        self.record("W1", AIORMQ, fill, ours("aiormq", url, n), count=n)
        self.record("W1", CEIL_AIO, fill, ours("ceiling", url, n), count=n)
        self.record("W1", AB_AIO, fill, ours("amqp-batch", url, n), count=n)

    def w2(self) -> None:
        n, url = self.n["W2"], self.url
        dlq = n // 5
        fill = lambda: workloads.fill_mixed(url, n)  # noqa: E731
        common = {"queue": MIXED_QUEUE, "mode": "mixed", "expect_dlq": dlq}
        self.record(
            "W2",
            APB,
            fill,
            peer(url, n, dlx=MIXED_DLX, dlq=MIXED_DLQ, **common),
            count=n,
        )
        self.record("W2", AB_AIO, fill, ours("amqp-batch", url, n, **common), count=n)
        self.record(
            "W2",
            AB_TRIO,
            fill,
            ours("amqp-batch", url, n, backend="trio", **common),
            count=n,
        )

    def w3(self) -> None:
        n, url = self.n["W1"], self.url
        fill = self.drain_fill(n)
        self.record(
            "W3", CEIL_TRIO, fill, ours("ceiling", url, n, backend="trio"), count=n
        )
        self.record(
            "W3", AB_TRIO, fill, ours("amqp-batch", url, n, backend="trio"), count=n
        )

    def w4(self) -> None:
        n, url = self.n["W4"], self.url
        fill = self.drain_fill(n)
        for workers in (1, 4):
            suffix = f", {workers} worker{'s' if workers > 1 else ''}"
            options = {"mode": "io", "sleep": 0.02, "workers": workers}
            self.record(
                "W4",
                APB + suffix,
                fill,
                peer(url, n, queue=DRAIN_QUEUE, **options),
                count=n,
            )
            self.record(
                "W4",
                AB_AIO + suffix,
                fill,
                ours("amqp-batch", url, n, **options),
                count=n,
            )
            self.record(
                "W4",
                AB_TRIO + suffix,
                fill,
                ours("amqp-batch", url, n, backend="trio", **options),
                count=n,
            )

    def w5(self) -> None:
        rate, seconds = 200, self.n["W5_seconds"]
        n, url = rate * seconds, self.url
        fill = lambda: anyio.run(workloads.reset_latency_queue, url)  # noqa: E731
        publish = lambda: anyio.run(workloads.publish_paced, url, rate, n)  # noqa: E731
        options = {"queue": LATENCY_QUEUE, "mode": "latency", "batch_timeout": 0.1}
        for consumer, command in (
            (APB, peer(url, n, **options)),
            (AB_AIO, ours("amqp-batch", url, n, **options)),
            (AB_TRIO, ours("amqp-batch", url, n, backend="trio", **options)),
        ):
            self.record("W5", consumer, fill, command, on_ready=publish)

    def w6(self) -> None:
        n, url = self.n["W6"], self.url
        fill = self.drain_fill(n, 4096)
        self.record("W6", APB, fill, peer(url, n, queue=DRAIN_QUEUE), count=n)
        self.record("W6", AIORMQ, fill, ours("aiormq", url, n), count=n)
        self.record("W6", CEIL_AIO, fill, ours("ceiling", url, n), count=n)
        self.record("W6", AB_AIO, fill, ours("amqp-batch", url, n), count=n)
        self.record(
            "W6", AB_TRIO, fill, ours("amqp-batch", url, n, backend="trio"), count=n
        )

    def soak(self, minutes: float) -> None:
        """W6 sustained: amqp-batch consuming 4 KiB messages at 1,000 msg/s."""
        rate, url = 1000, self.url
        n = int(rate * minutes * 60)
        fill = lambda: anyio.run(workloads.reset_latency_queue, url)  # noqa: E731
        publish = lambda: anyio.run(  # noqa: E731
            workloads.publish_paced, url, rate, n, 4096
        )
        options = {"queue": LATENCY_QUEUE, "mode": "soak", "batch_timeout": 0.1}
        self.record(
            "W6 soak",
            AB_AIO,
            fill,
            ours("amqp-batch", url, n, **options),
            on_ready=publish,
        )


def percentile(ordered: list[float], q: float) -> float:
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


# -- report ---------------------------------------------------------------------------


def git_commit() -> str:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=HERE,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", "src"],
            capture_output=True,
            text=True,
            cwd=HERE,
        ).stdout.strip()
        return commit + (" (src modified)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> str:
    model = "unknown CPU"
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    broker = "RabbitMQ (version unknown)"
    if shutil.which("rabbitmqctl"):
        version = subprocess.run(
            ["rabbitmqctl", "version"], capture_output=True, text=True
        ).stdout.strip()
        if version:
            broker = f"RabbitMQ {version}"
    return (
        f"{platform.node()}, {os.cpu_count()} cores ({model}), "
        f"{platform.system()} {platform.release()}, {broker} on the same host"
    )


def med(values: list[dict[str, Any]], key: str) -> float:
    return statistics.median(v[key] for v in values)


def summarise(bench: Bench) -> list[dict[str, Any]]:
    """Rows: workload, consumer, metric, median, ratios, per-run values."""
    v = bench.values
    rows: list[dict[str, Any]] = []

    def rate(w: str, c: str) -> float | None:
        return med(v[(w, c)], "rate") if v.get((w, c)) else None

    apb_w1 = rate("W1", APB)
    for workload in ("W1", "W2", "W3", "W4"):
        for (w, consumer), runs in v.items():
            if w != workload:
                continue
            value = med(runs, "rate")
            if workload == "W4":
                reference = rate("W4", APB + consumer[consumer.index(",") :])
                ceiling = None
            else:
                reference = rate(workload, APB) if workload != "W3" else apb_w1
                ceiling = (
                    rate("W1", CEIL_AIO)
                    if workload == "W1"
                    else rate("W3", CEIL_TRIO)
                    if workload == "W3"
                    else None
                )
            rows.append(
                {
                    "workload": workload,
                    "consumer": consumer,
                    "unit": "msg/s",
                    "value": value,
                    "vs_peer": value / reference if reference else None,
                    "vs_ceiling": value / ceiling if ceiling else None,
                    "runs": [r["rate"] for r in runs],
                }
            )
    for (w, consumer), runs in v.items():
        if w == "W5":
            peer_p99 = med(v[("W5", APB)], "p99") if v.get(("W5", APB)) else None
            p99 = med(runs, "p99")
            rows.append(
                {
                    "workload": "W5",
                    "consumer": consumer,
                    "unit": "ms p50 / p99",
                    "value": (med(runs, "p50") * 1000, p99 * 1000),
                    "vs_peer": p99 / peer_p99 if peer_p99 else None,
                    "vs_ceiling": None,
                    "runs": [(r["p50"] * 1000, r["p99"] * 1000) for r in runs],
                }
            )
    for (w, consumer), runs in v.items():
        if w == "W6":
            peer_peak = (
                med(v[("W6", APB)], "peak_rss_kib") if v.get(("W6", APB)) else None
            )
            peak = med(runs, "peak_rss_kib")
            growth = statistics.median(
                r["peak_rss_kib"] - r["baseline_rss_kib"] for r in runs
            )
            rows.append(
                {
                    "workload": "W6",
                    "consumer": consumer,
                    "unit": "MiB peak RSS (growth)",
                    "value": (peak / 1024, growth / 1024),
                    "vs_peer": peak / peer_peak if peer_peak else None,
                    "vs_ceiling": None,
                    "runs": [r["peak_rss_kib"] / 1024 for r in runs],
                }
            )
        if w == "W6 soak":
            for r in runs:
                rows.append(
                    {
                        "workload": "W6 soak",
                        "consumer": consumer,
                        "unit": "MiB RSS growth after warm-up",
                        "value": r.get("soak_growth_kib", 0) / 1024,
                        "vs_peer": None,
                        "vs_ceiling": None,
                        "runs": [],
                    }
                )
    return rows


def fmt_value(row: dict[str, Any]) -> str:
    value = row["value"]
    if row["workload"] == "W5":
        return f"{value[0]:.1f} / {value[1]:.1f} ms"
    if row["workload"] == "W6":
        return f"{value[0]:.1f} MiB (+{value[1]:.1f})"
    if row["workload"] == "W6 soak":
        return f"+{value:.1f} MiB"
    return f"{value:,.0f} msg/s"


def fmt_ratio(ratio: float | None) -> str:
    return "—" if ratio is None else f"{ratio:.2f}x"


def goals(bench: Bench) -> list[str]:
    """The issue's goals, checked against this run's medians."""
    v = bench.values
    out = []

    def rate(w: str, c: str) -> float | None:
        return med(v[(w, c)], "rate") if v.get((w, c)) else None

    def line(text: str, ok: bool | None) -> None:
        mark = "n/a" if ok is None else ("met" if ok else "**not met**")
        out.append(f"| {text} | {mark} |")

    w1, apb1, ceil1 = rate("W1", AB_AIO), rate("W1", APB), rate("W1", CEIL_AIO)
    if w1 and apb1 and ceil1:
        line(
            f"W1: {w1 / apb1:.2f}x aio-pika-batch (goal ≥ 4x), {w1 / ceil1:.2f}x "
            "the transport ceiling (goal ≥ 0.85x)",
            w1 >= 4 * apb1 and w1 >= 0.85 * ceil1,
        )
    w2, apb2 = rate("W2", AB_AIO), rate("W2", APB)
    if w2 and apb2:
        line(f"W2: {w2 / apb2:.2f}x aio-pika-batch (goal ≥ 8x)", w2 >= 8 * apb2)
    w3 = rate("W3", AB_TRIO)
    if w3 and w1:
        line(
            f"W3: trio at {w3 / w1:.2f}x W1 asyncio (goal within 10%)",
            abs(w3 / w1 - 1) <= 0.10,
        )
    for name in (AB_AIO, AB_TRIO):
        one, four = rate("W4", name + ", 1 worker"), rate("W4", name + ", 4 workers")
        if one and four:
            line(
                f"W4 {name}: 4 workers {four / one:.2f}x 1 worker (goal ≥ 3.5x)",
                four >= 3.5 * one,
            )
    for name in (AB_AIO, AB_TRIO):
        if v.get(("W5", name)):
            p99 = med(v[("W5", name)], "p99") * 1000
            line(f"W5 {name}: p99 {p99:.1f} ms (goal ≤ 100 + 20 ms)", p99 <= 120)
    if v.get(("W6", AB_AIO)):
        peak = med(v[("W6", AB_AIO)], "peak_rss_kib") / 1024
        growth = statistics.median(
            (r["peak_rss_kib"] - r["baseline_rss_kib"]) / 1024
            for r in v[("W6", AB_AIO)]
        )
        line(
            f"W6: peak RSS {peak:.1f} MiB, +{growth:.1f} MiB over the idle process "
            "(bound: prefetch × body = 1000 × 4 KiB = 3.9 MiB plus a constant)",
            None,
        )
    return out


def render(bench: Bench, args: argparse.Namespace, elapsed: float) -> str:
    rows = summarise(bench)
    n = bench.n
    lines = [
        "# amqp-batch benchmark: latest run",
        "",
        f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}, commit "
        f"`{git_commit()}`, {machine()}.",
        f"amqp-batch and the bare consumers on Python {platform.python_version()}, "
        f"aio-pika-batch 0.1.0 on Python 3.12 (its own venv). "
        f"Median of {args.runs} run(s){' (quick sizes)' if args.quick else ''}; "
        f"bench took {elapsed / 60:.1f} min.",
        "",
        f"W1/W3 {n['W1']:,} × 256 B, W2 {n['W2']:,}, W4 {n['W4']:,} (handler sleeps "
        f"20 ms per batch), W5 200 msg/s for {n['W5_seconds']} s, W6 {n['W6']:,} × 4 KiB. "
        "Batch 100, timeout 0.5 s (W5: 0.1 s), prefetch 1000. Throughput counts the "
        "consumer from start until every message is settled and it has stopped "
        "(W2: until the queue is empty and the DLQ holds 20%); the bare consumers "
        "(bench/transport.py) time from consume to the last ack.",
        "",
        "| workload | consumer | median | vs aio-pika-batch | vs transport ceiling | runs |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]
    for row in rows:
        runs = ", ".join(
            f"{r[0]:.0f}/{r[1]:.0f}"
            if isinstance(r, tuple)
            else (f"{r:.1f}" if row["workload"] == "W6" else f"{r:,.0f}")
            for r in row["runs"]
        )
        lines.append(
            f"| {row['workload']} | {row['consumer']} | {fmt_value(row)} | "
            f"{fmt_ratio(row['vs_peer'])} | {fmt_ratio(row['vs_ceiling'])} | {runs} |"
        )
    lines += [
        "",
        "W3's \"vs aio-pika-batch\" is against aio-pika-batch's W1 (it has no trio "
        "mode); W4's is against aio-pika-batch with the same number of workers; W5 "
        "and W6 ratios compare p99 and peak RSS (lower is better).",
        "",
        "## Performance goals",
        "",
        "| goal | status |",
        "| --- | --- |",
        *goals(bench),
    ]
    if bench.failures:
        lines += ["", "## Failed measurements", ""]
        lines += [f"- `{failure}`" for failure in bench.failures]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--url",
        default=os.environ.get("AMQP_BATCH_BENCH_URL", "amqp://guest:guest@127.0.0.1/"),
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="small counts, smoke run")
    parser.add_argument(
        "--only", default="W1,W2,W3,W4,W5,W6", help="comma-separated workloads"
    )
    parser.add_argument(
        "--soak", action="store_true", help="also W6's 10-minute sustained run"
    )
    parser.add_argument("--soak-minutes", type=float, default=10.0)
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args()
    ensure_peer_venv()
    bench = Bench(args)
    selected = [w.strip().upper() for w in args.only.split(",") if w.strip()]
    started = time.monotonic()
    try:
        for run in range(args.runs):
            print(f"run {run + 1}/{args.runs}", flush=True)
            for workload in selected:
                getattr(bench, workload.lower())()
        if args.soak:
            bench.soak(args.soak_minutes)
    finally:
        anyio.run(workloads.delete_all, args.url)
    table = render(bench, args, time.monotonic() - started)
    print()
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest.md").write_text(table)
    (out / "latest.json").write_text(
        json.dumps(
            {f"{w}|{c}": runs for (w, c), runs in bench.values.items()}, indent=1
        )
    )
    try:
        import chart
    except ImportError as exc:
        print(f"no chart ({exc}); install matplotlib", file=sys.stderr)
    else:
        chart.draw(summarise(bench), out / "latest.png", table.splitlines()[2])
        print(f"wrote {out / 'latest.md'} and {out / 'latest.png'}")


if __name__ == "__main__":
    main()
