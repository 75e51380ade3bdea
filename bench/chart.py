"""A PNG of the benchmark table: throughput, CPU per message, latency and memory,
one panel each."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

COLOURS = {
    "aio-pika-batch": "#c44e52",
    "FastStream": "#dd8452",
    "aio-pika ": "#da8bc3",
    "pika ": "#937860",
    "raw aiormq": "#8172b2",
    "transport ceiling": "#999999",
    "amqp-batch (asyncio)": "#4c72b0",
    "amqp-batch (trio)": "#55a868",
    "amqp-batch @": "#a1c9f4",
}
THROUGHPUT = ("W1", "W2", "W3", "W4", "W1P", "W4P", "W1Q", "W2Q")


def colour(consumer: str) -> str:
    for prefix, value in COLOURS.items():
        if consumer.startswith(prefix):
            return value
    return "#333333"


def _bars(
    axis: Any, labels: list[str], values: list[float], colours: list[str], fmt: str
) -> None:
    positions = range(len(values))
    bars = axis.barh(list(positions), values, color=colours)
    axis.set_yticks(list(positions), labels, fontsize=8)
    axis.invert_yaxis()
    for bar, value in zip(bars, values, strict=True):
        axis.text(
            bar.get_width(),
            bar.get_y() + bar.get_height() / 2,
            " " + fmt.format(value),
            va="center",
            fontsize=7,
        )
    axis.margins(x=0.18)


def _cpu(axis: Any, rows: list[dict[str, Any]]) -> None:
    """Consumer CPU per message, the broker's stacked behind it (lighter)."""
    positions = list(range(len(rows)))
    own = [r["cpu_us"] or 0.0 for r in rows]
    broker = [r.get("broker_us") or 0.0 for r in rows]
    colours = [colour(r["consumer"]) for r in rows]
    axis.barh(positions, own, color=colours)
    axis.barh(positions, broker, left=own, color=colours, alpha=0.35, hatch="//")
    axis.set_yticks(
        positions, [f"{r['workload']}  {r['consumer']}" for r in rows], fontsize=8
    )
    axis.invert_yaxis()
    for position, mine, theirs in zip(positions, own, broker, strict=True):
        text = f" {mine:.1f}" + (f" + broker {theirs:.1f}" if theirs else "")
        axis.text(mine + theirs, position, text, va="center", fontsize=7)
    axis.margins(x=0.25)


def draw(rows: list[dict[str, Any]], path: Path, subtitle: str = "") -> None:
    """Draw ``rows`` (from ``run.summarise``) to ``path``."""
    throughput = [r for r in rows if r["workload"] in THROUGHPUT]
    cpu = [r for r in throughput if r.get("cpu_us") is not None]
    latency = [r for r in rows if r["workload"] == "W5"]
    memory = [r for r in rows if r["workload"] == "W6"]
    heights = [
        max(1, len(throughput)),
        max(1, len(cpu)),
        max(1, len(latency) * 2),
        max(1, len(memory)),
    ]
    figure, axes = plt.subplots(
        4,
        1,
        figsize=(10, 2.8 + 0.3 * sum(heights)),
        gridspec_kw={"height_ratios": heights},
        layout="constrained",
    )
    figure.suptitle(
        "amqp-batch benchmark (median of runs)\n" + textwrap.fill(subtitle, 140),
        fontsize=9,
    )

    axis = axes[0]
    if throughput:
        _bars(
            axis,
            [f"{r['workload']}  {r['consumer']}" for r in throughput],
            [r["value"] for r in throughput],
            [colour(r["consumer"]) for r in throughput],
            "{:,.0f}",
        )
    axis.set_xlabel("messages per second (higher is better)")
    axis.set_title(
        "Throughput: W1 drain, W2 mixed + requeue, W3 trio, W4 20 ms I/O handler,\n"
        "W1P/W4P 1 vs 2 processes, W1Q/W2Q W1/W2 on quorum queues",
        fontsize=9,
    )

    axis = axes[1]
    if cpu:
        _cpu(axis, cpu)
    axis.set_xlabel(
        "CPU µs per message: consumer process(es), then the broker (hatched); "
        "lower is better"
    )
    axis.set_title("CPU per message over the timed window", fontsize=9)

    axis = axes[2]
    if latency:
        labels, values, colours = [], [], []
        for r in latency:
            for name, value in zip(("p50", "p99"), r["value"], strict=True):
                labels.append(f"{r['consumer']} {name}")
                values.append(value)
                colours.append(colour(r["consumer"]))
        _bars(axis, labels, values, colours, "{:.1f} ms")
        axis.axvline(120, color="black", linestyle=":", linewidth=1)
        axis.text(119, len(values) - 0.7, "goal p99 ≤ 120 ms ", fontsize=7, ha="right")
    axis.set_xlabel("publish-to-handler delay, ms (lower is better)")
    axis.set_title("W5: latency at 200 msg/s, batch 100, timeout 0.1 s", fontsize=9)

    axis = axes[3]
    if memory:
        _bars(
            axis,
            [r["consumer"] for r in memory],
            [r["value"][0] for r in memory],
            [colour(r["consumer"]) for r in memory],
            "{:.1f} MiB",
        )
    axis.set_xlabel("peak RSS, MiB (lower is better)")
    axis.set_title("W6: peak RSS draining 4 KiB messages, prefetch 1000", fontsize=9)

    figure.savefig(path, dpi=110)
    plt.close(figure)
