"""Consumer-CPU shares by component from a cProfile file of a bench child.

    python bench/workloads.py --consumer amqp-batch ... --profile w2.prof
    python bench/profile_shares.py w2.prof

Self time (``tottime``) grouped by where it is spent; a builtin's time is charged
to the components of its callers, in proportion (socket and poll calls are a
group of their own). ``--profile x.prof`` profiles on the process's CPU clock,
so waiting is not counted; profiling stretches the run several times and weighs
code with many small calls more, so these are shares, not costs.
"""

from __future__ import annotations

import collections
import pstats
import sys

_PARSE = "transport: frame parsing (deliveries, confirms)"
_ENCODE = "transport: publish encoding"
_ENCODERS = {
    "encode_publish",
    "_encode_properties",
    "_encode_values",
    "_encode_short_str",
    "start_publish",
    "publish_arguments",
    "encode_ack",
    "encode_nack",
    "encode_reject",
    "encode_table",
    "_sorted_keys",
    "_str_entry",
    "_key_head",
    "_encode_value",
}
_MODULES = {
    "_framing.py": _PARSE,
    "_table.py": _PARSE,
    "_channel.py": "transport: channel dispatch, confirms, acks",
    "_session.py": "transport: channel dispatch, confirms, acks",
    "_connection.py": "transport: connection reader/writer loops",
    "_retry.py": "library: copy / dead-letter properties (_retry)",
    "planner.py": "library: planner",
    "acker.py": "library: acker",
    "ledger.py": "library: ack ledger",
    "batcher.py": "library: batcher, Message",
    "_message.py": "library: batcher, Message",
    "handler.py": "library: handler runner",
    "guards.py": "library: handler runner",
}
_LOOP = ("anyio", "asyncio", "selectors", "/trio/", "outcome", "sniffio")
_SYSCALLS = ("'send'", "'recv'", "poll", "select", "recv_into")


def component(path: str, name: str) -> str | None:
    """The component of function ``name`` in ``path`` (``None``: a builtin)."""
    if path == "~":
        return None
    if "<attrs generated" in path:
        return "attrs __init__ (Delivery, Properties, ...)"
    if "amqp_batch" in path:
        if name in _ENCODERS:
            return _ENCODE
        module = path.rsplit("/", 1)[-1]
        return _MODULES.get(module, "library: other")
    if path.endswith(("workloads.py", "transport.py")):
        return "bench handler / ceiling loop"
    if any(part in path for part in _LOOP):
        return "event loop, anyio streams and tasks"
    return "other (imports, setup, pamqp, typing, ...)"


def shares(path: str) -> tuple[float, collections.Counter[str]]:
    """Total profiled seconds and seconds per component."""
    stats = pstats.Stats(path).stats  # type: ignore[attr-defined]
    totals: collections.Counter[str] = collections.Counter()
    total = 0.0
    for (file, _, name), (_, _, tottime, _, callers) in stats.items():
        total += tottime
        found = component(file, name)
        if found is not None:
            totals[found] += tottime
        elif any(call in name for call in _SYSCALLS):
            totals["socket and poll syscalls"] += tottime
        else:
            weight = sum(caller[2] for caller in callers.values()) or 1.0
            for (caller_file, _, caller_name), caller in callers.items():
                owner = component(caller_file, caller_name) or "other (builtins)"
                totals[owner] += tottime * caller[2] / weight
    return total, totals


def main() -> None:
    """Print a Markdown table of the shares of each file given."""
    for path in sys.argv[1:]:
        total, totals = shares(path)
        print(
            f"{path}: {total:.2f} s profiled\n\n| component | share |\n| --- | ---: |"
        )
        for name, seconds in totals.most_common():
            print(f"| {name} | {100 * seconds / total:.1f}% |")
        print()


if __name__ == "__main__":
    main()
