"""Interleaved A/B of amqp-batch commits (or worktrees) on W2, same minutes.

    python bench/ab.py ROUNDS BACKEND NAME=PATH [NAME=PATH ...]

Each PATH is a checkout whose ``src`` the measurement child imports (a git
worktree of the commit to compare). Every round fills the W2 queue and runs the
bench's own W2 child (``bench/workloads.py``, 20,000 messages) once per
checkout, in an order that reverses every round, so each one follows each of
the others equally often; a full bench run measures rows in a fixed order, and
a measurement pays for the broker's background work left by the one before it.
Prints every measurement and the medians (msg/s, consumer CPU µs per message).
"""

from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as bench
import workloads

N = 20_000


def main(argv: list[str]) -> None:
    rounds, backend, *pairs = argv
    variants = [pair.split("=", 1) for pair in pairs]
    url = os.environ.get("AMQP_BATCH_BENCH_URL", "amqp://guest:guest@127.0.0.1/")
    results: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in variants}
    for turn in range(int(rounds)):
        for name, path in variants if turn % 2 == 0 else variants[::-1]:
            workloads.fill_mixed(url, N)
            command = bench.ours(
                "amqp-batch", url, N, queue=bench.MIXED_QUEUE, mode="mixed",
                expect_dlq=N // 5, backend=backend,
            )  # fmt: skip
            env = {**os.environ, "PYTHONPATH": str(Path(path) / "src")}
            result = bench.run_child(command, None, env)
            if not result["amqp_batch"].startswith(str(Path(path).resolve())):
                raise SystemExit(f"{name} imported {result['amqp_batch']}")
            bench.Bench.derive(result, N)
            results[name].append((result["rate"], result["cpu_us"]))
            print(turn, name, f"{result['rate']:,.0f} msg/s",
                  f"{result['cpu_us']:.1f} us/msg", flush=True)  # fmt: skip
    for name, values in results.items():
        rate = statistics.median(v[0] for v in values)
        cpu = statistics.median(v[1] for v in values)
        print(
            f"{name}: median {rate:,.0f} msg/s, {cpu:.1f} us/msg CPU, n={len(values)}"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
