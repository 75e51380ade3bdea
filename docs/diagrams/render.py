"""Render the design diagrams of the documentation as SVG (standard library only).

    python docs/diagrams/render.py          # rewrite docs/diagrams/*.svg
    python docs/diagrams/render.py --check  # fail if a committed SVG is stale

The pictures are described here in code (boxes, arrows, labels at fixed
coordinates) so they need no Graphviz or plotting library, render the same
everywhere, and change in reviewable diffs. ``nox -s docs`` runs ``--check``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from xml.sax.saxutils import escape

HERE = Path(__file__).parent

FONT = "font-family='DejaVu Sans, Helvetica, Arial, sans-serif'"
INK = "#1f2933"
MUTED = "#52606d"
BROKER = "#fff4e5"
CONSUMER = "#f5f7fa"
WORKER = "#e8f1fb"
SESSION = "#ffffff"
ACTOR = "#d6e9ff"
PUBLISH = "#e6f6ea"
DANGER = "#b44d12"


class Svg:
    """A tiny SVG writer: rectangles, text, lines and arrows."""

    def __init__(self, width: int, height: int, title: str) -> None:
        self.width = width
        self.height = height
        self.parts: list[str] = [
            f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' "
            f"height='{height}' viewBox='0 0 {width} {height}' {FONT} "
            f"font-size='13' fill='{INK}'>",
            f"<title>{escape(title)}</title>",
            "<defs><marker id='arrow' viewBox='0 0 10 10' refX='9' refY='5' "
            "markerWidth='7' markerHeight='7' orient='auto-start-reverse'>"
            f"<path d='M0,0 L10,5 L0,10 z' fill='{INK}'/></marker>"
            "<marker id='arrow-muted' viewBox='0 0 10 10' refX='9' refY='5' "
            "markerWidth='7' markerHeight='7' orient='auto-start-reverse'>"
            f"<path d='M0,0 L10,5 L0,10 z' fill='{MUTED}'/></marker></defs>",
            f"<rect width='{width}' height='{height}' fill='#ffffff'/>",
        ]

    def box(
        self,
        x: float,
        y: float,
        w: float,
        h: float,
        fill: str,
        *,
        dashed: bool = False,
        radius: int = 8,
    ) -> None:
        dash = " stroke-dasharray='6 4'" if dashed else ""
        self.parts.append(
            f"<rect x='{x}' y='{y}' width='{w}' height='{h}' rx='{radius}' "
            f"fill='{fill}' stroke='{INK}' stroke-width='1.2'{dash}/>"
        )

    def text(
        self,
        x: float,
        y: float,
        content: str,
        *,
        size: int = 13,
        weight: str = "normal",
        anchor: str = "start",
        color: str = INK,
        italic: bool = False,
    ) -> None:
        style = " font-style='italic'" if italic else ""
        self.parts.append(
            f"<text x='{x}' y='{y}' font-size='{size}' font-weight='{weight}' "
            f"text-anchor='{anchor}' fill='{color}'{style}>{escape(content)}</text>"
        )

    def lines(
        self, x: float, y: float, rows: list[str], *, step: int = 16, **style: object
    ) -> None:
        for number, row in enumerate(rows):
            self.text(x, y + number * step, row, **style)  # type: ignore[arg-type]

    def arrow(
        self,
        points: list[tuple[float, float]],
        *,
        dashed: bool = False,
        color: str = INK,
        both: bool = False,
        width: float = 1.4,
    ) -> None:
        path = " ".join(f"{x},{y}" for x, y in points)
        marker = "arrow" if color == INK else "arrow-muted"
        dash = " stroke-dasharray='5 4'" if dashed else ""
        start = f" marker-start='url(#{marker})'" if both else ""
        self.parts.append(
            f"<polyline points='{path}' fill='none' stroke='{color}' "
            f"stroke-width='{width}'{dash}{start} marker-end='url(#{marker})'/>"
        )

    def render(self) -> str:
        return "\n".join([*self.parts, "</svg>", ""])


def actor(svg: Svg, x: float, y: float, name: str, rows: list[str]) -> None:
    """One actor of a worker's session: a box with a bold name and notes."""
    svg.box(x, y, 130, 92, ACTOR)
    svg.text(x + 65, y + 22, name, weight="bold", anchor="middle")
    svg.lines(x + 65, y + 42, rows, size=11, anchor="middle", color=MUTED, step=14)


ROW = 150  # top of the row of actors in worker 0
ACKER_Y = 286  # top of the acker box


def actors() -> str:
    """Session -> batcher (intake) -> handler -> acker per worker, supervised."""
    svg = Svg(1040, 620, "amqp-batch: the actors of one consumer")
    _broker(svg)
    _consumer_and_worker(svg)
    _pipeline(svg)
    _publisher(svg)
    _other_workers(svg)
    return svg.render()


def _broker(svg: Svg) -> None:
    svg.box(16, 60, 170, 460, BROKER)
    svg.text(101, 86, "RabbitMQ", weight="bold", anchor="middle", size=15)
    svg.box(32, 150, 138, 58, "#ffffff")
    svg.lines(101, 172, ["queue", "(durable, prefetch)"], anchor="middle", size=12)
    svg.box(32, 330, 138, 58, "#ffffff")
    svg.lines(101, 352, ["dead-letter", "exchange → DLQ"], anchor="middle", size=12)
    svg.box(32, 430, 138, 58, "#ffffff", dashed=True)
    svg.lines(101, 452, ["copies go to the", "back of the queue"], anchor="middle")


def _consumer_and_worker(svg: Svg) -> None:
    """The consumer (supervisor of the workers), worker 0 and its session."""
    svg.box(206, 14, 818, 592, CONSUMER)
    svg.text(222, 38, "BatchConsumer", weight="bold", size=15)
    svg.text(
        356,
        38,
        "task group of N workers · on_start once before, on_stop once after · "
        "stop() / SIGINT / SIGTERM",
        size=12,
        color=MUTED,
    )

    # Worker 0 and its session.
    svg.box(222, 54, 786, 452, WORKER)
    svg.text(238, 78, "worker 0", weight="bold")
    svg.text(
        306,
        78,
        "cancel scope · own connection · on a retryable error: backoff "
        "(exponential, full jitter), next URL, new session",
        size=12,
        color=MUTED,
    )
    svg.box(238, 92, 754, 300, SESSION, dashed=True)
    svg.text(
        252,
        112,
        "session task group: one connection + channel; a lost connection ends "
        "it (results for its tags are dropped)",
        size=12,
        color=MUTED,
    )


def _pipeline(svg: Svg) -> None:
    """The actors of worker 0's session and the streams between them."""
    row, acker_y = ROW, ACKER_Y
    actor(
        svg,
        254,
        row,
        "session",
        ["deliveries stream", "buffer ≥ prefetch", "reader never blocks"],
    )
    actor(
        svg,
        500,
        row,
        "batcher",
        ["the intake: tags, retry", "count; flush on size,", "timeout or bytes"],
    )
    actor(
        svg,
        800,
        row,
        "handler",
        ["your code, at most", "max_concurrent_", "batches at once"],
    )
    svg.box(800, acker_y, 130, 92, ACTOR)
    svg.text(865, acker_y + 22, "acker", weight="bold", anchor="middle")
    svg.lines(
        865,
        acker_y + 42,
        ["the only settler:", "tag order, ACK runs", "→ ack(multiple)"],
        size=11,
        anchor="middle",
        color=MUTED,
        step=14,
    )

    mid = row + 46
    svg.arrow([(384, mid), (500, mid)])
    svg.text(442, mid - 8, "taken in bulk,", size=10, anchor="middle", color=MUTED)
    svg.text(442, mid + 16, "no switch each", size=10, anchor="middle", color=MUTED)
    svg.arrow([(630, mid), (800, mid)])
    svg.text(715, mid - 8, "batches, buffer 0", size=10, anchor="middle", color=MUTED)
    svg.arrow([(865, row + 92), (865, acker_y)])
    svg.text(858, row + 112, "results", size=11, color=MUTED, anchor="end")
    svg.text(
        858,
        row + 126,
        "buffer: max_concurrent_batches",
        size=10,
        color=MUTED,
        anchor="end",
    )

    # Bad retry header: straight from the batcher to the acker.
    svg.arrow(
        [(565, row + 92), (565, acker_y + 46), (800, acker_y + 46)],
        dashed=True,
        color=MUTED,
    )
    svg.text(
        574,
        acker_y + 38,
        "bad x-retry-count: never handled",
        size=11,
        color=MUTED,
    )

    # Settling frames go back on the worker's own channel.
    svg.arrow([(800, acker_y + 76), (319, acker_y + 76), (319, row + 92)])
    svg.text(330, acker_y + 70, "ack / nack / reject frames, in tag order", size=11)

    # Broker <-> session.
    svg.arrow([(170, 179), (254, 179)])
    svg.text(192, 172, "deliver", size=11, anchor="start")
    svg.arrow([(254, 213), (170, 213)])
    svg.text(192, 228, "settle", size=11, anchor="start")


def _publisher(svg: Svg) -> None:
    """The republish connection and what it sends."""
    acker_y = ACKER_Y
    svg.box(554, 404, 238, 86, PUBLISH)
    svg.text(673, 426, "publisher connection", weight="bold", anchor="middle")
    svg.lines(
        673,
        446,
        [
            "lazy, one per worker (…-w0-publisher)",
            "REQUEUE copies + library",
            "dead-letters, confirmed",
        ],
        size=11,
        anchor="middle",
        color=MUTED,
        step=14,
    )
    svg.arrow([(865, acker_y + 92), (865, 447), (792, 447)])
    svg.text(872, 420, "publish, await confirms,", size=11)
    svg.text(872, 434, "then ack the originals", size=11)
    svg.arrow([(554, 460), (170, 460)])
    svg.text(
        362, 454, "copy with x-retry-count + 1 (mandatory)", size=11, anchor="middle"
    )
    svg.arrow([(554, 480), (300, 480), (300, 360), (170, 360)])
    svg.text(308, 418, "dead letter, original", size=11)
    svg.text(308, 432, "exchange + routing key", size=11)


def _other_workers(svg: Svg) -> None:
    for offset in (16, 8, 0):
        svg.box(238 + offset, 522 + offset, 400, 50, WORKER)
    svg.text(258, 552, "workers 1 … N-1: the same shape, own connections", size=12)
    svg.text(
        676,
        550,
        "one worker's reconnect never stalls another",
        size=12,
        color=MUTED,
        italic=True,
    )
    svg.text(
        676,
        566,
        "a non-retryable error drains the others, then is raised",
        size=12,
        color=MUTED,
        italic=True,
    )


def shutdown() -> str:
    """The graceful stop, as a sequence over the actors of one worker."""
    lanes = {
        "caller": ("stop / SIGTERM", 96),
        "consumer": ("consumer", 236),
        "worker": ("worker", 376),
        "batcher": ("batcher", 516),
        "handler": ("handler", 656),
        "acker": ("acker", 796),
        "broker": ("RabbitMQ", 950),
    }
    top, bottom = 70, 640
    svg = Svg(1040, 700, "amqp-batch: graceful shutdown sequence")
    svg.text(20, 28, "Graceful stop of one worker", weight="bold", size=15)
    svg.text(
        262,
        28,
        "(every worker does the same in parallel; all of it within shutdown_timeout)",
        size=12,
        color=MUTED,
    )
    for name, x in lanes.values():
        outside = name in ("stop / SIGTERM", "RabbitMQ")
        svg.box(x - 56, top - 26, 112, 30, BROKER if outside else ACTOR)
        svg.text(x, top - 6, name, anchor="middle", weight="bold", size=12)
        svg.parts.append(
            f"<line x1='{x}' y1='{top + 4}' x2='{x}' y2='{bottom}' stroke='{MUTED}' "
            "stroke-width='1' stroke-dasharray='3 4'/>"
        )

    def x_of(lane: str) -> int:
        return lanes[lane][1]

    def step(
        y: int,
        source: str,
        target: str,
        label: str,
        *,
        number: str = "",
        dashed: bool = False,
    ) -> None:
        x1, x2 = x_of(source), x_of(target)
        svg.arrow([(x1, y), (x2 + (-4 if x2 > x1 else 4), y)], dashed=dashed)
        middle = (x1 + x2) / 2
        svg.text(middle, y - 7, label, size=11, anchor="middle")
        if number:  # in a gutter left of the first lane
            svg.parts.append(f"<circle cx='14' cy='{y}' r='9' fill='{INK}'/>")
            svg.text(
                14,
                y + 4,
                number,
                size=11,
                anchor="middle",
                color="#ffffff",
                weight="bold",
            )

    def note(y: int, lane: str, rows: list[str]) -> None:
        x = x_of(lane)
        svg.box(x - 56, y - 14, 112, 18 + 14 * (len(rows) - 1), "#ffffff", radius=4)
        svg.lines(x, y, rows, size=10, anchor="middle", color=MUTED, step=14)

    step(104, "caller", "consumer", "stop requested", number="1")
    step(134, "consumer", "worker", "stop event")
    step(164, "worker", "batcher", "stop intake", number="2")
    step(194, "worker", "broker", "basic.cancel → cancel-ok: no new deliveries")
    step(250, "batcher", "handler", "flush partial batch", number="3")
    note(300, "handler", ["batches in the", "handler finish"])
    step(350, "handler", "acker", "results", number="4")
    step(390, "acker", "broker", "settle, confirms", number="5")
    step(
        430,
        "worker",
        "broker",
        "channel.close: prefetched, never batched → requeued",
        number="6",
    )
    step(460, "worker", "broker", "connection.close")
    step(500, "worker", "consumer", "worker stopped", dashed=True)
    note(536, "consumer", ["every worker", "stopped → on_stop", "runs once"])
    step(
        590,
        "consumer",
        "caller",
        "stop() returns / run() returns",
        dashed=True,
        number="7",
    )

    # The deadline.
    svg.parts.append(
        f"<rect x='470' y='220' width='540' height='188' rx='6' fill='none' "
        f"stroke='{DANGER}' stroke-width='1.5' stroke-dasharray='7 4'/>"
    )
    svg.lines(
        20,
        650,
        [
            "Past shutdown_timeout (the dashed box): handler, batcher and acker are "
            "cancelled;",
            "unsettled messages go back to the queue on channel close — never acked. "
            "A second",
            "SIGINT/SIGTERM cancels at once. on_stop still runs (shielded, bounded).",
        ],
        size=11,
        color=DANGER,
        step=15,
    )
    return svg.render()


DELAY_ROWS = [
    ("orders.retry.1s", "1000", "attempt 1"),
    ("orders.retry.10s", "10000", "attempt 2"),
    ("orders.retry.60s", "60000", "attempt 3, 4, …"),
]


def delays() -> str:
    """The delay queues of retry_delays=(1, 10, 60): a REQUEUEd copy waits in
    the queue of its attempt, then the broker sends it back to the work queue."""
    svg = Svg(960, 490, "amqp-batch: delayed retries through delay queues")
    svg.box(16, 14, 600, 462, BROKER)
    svg.text(32, 40, "RabbitMQ", weight="bold", size=15)
    svg.box(40, 64, 120, 52, "#ffffff")
    svg.lines(100, 86, ["producer's", "exchange"], anchor="middle", size=12)
    svg.box(236, 60, 190, 60, "#ffffff")
    svg.text(331, 84, "orders", weight="bold", anchor="middle")
    svg.text(331, 102, "work queue (classic or quorum)", anchor="middle", size=11)
    svg.arrow([(160, 90), (236, 90)])
    _delay_queues(svg)
    _delay_consumer(svg)
    return svg.render()


def _delay_queues(svg: Svg) -> None:
    for row, (name, ttl, attempt) in enumerate(DELAY_ROWS):
        y = 170 + row * 76
        svg.box(236, y, 190, 60, "#ffffff", dashed=True)
        svg.text(331, y + 24, name, weight="bold", anchor="middle", size=12)
        svg.text(331, y + 42, f"x-message-ttl {ttl}", anchor="middle", size=11)
        # Expired copies: dead-lettered to the default exchange, key "orders".
        svg.arrow([(236, y + 30), (200, y + 30), (200, 108), (236, 108)], color=MUTED)
        # The consumer publishes the copy of each attempt to its queue.
        svg.arrow([(700, 140), (700, y + 30), (426, y + 30)])
        svg.text(440, y + 24, attempt, size=11, color=MUTED)
    svg.lines(
        40,
        190,
        ["expired:", "x-dead-letter-", 'exchange ""', "routing key", "orders"],
        size=11,
        color=MUTED,
        step=14,
    )
    svg.box(236, 400, 190, 40, "#ffffff")
    svg.text(331, 425, "orders.dlx → orders.dead", anchor="middle", size=12)
    svg.arrow([(760, 140), (760, 420), (426, 420)], color=DANGER)
    svg.lines(
        440,
        440,
        ["exhausted or NACK:", "published, confirmed, then acked"],
        size=11,
        color=DANGER,
        step=14,
    )


def _delay_consumer(svg: Svg) -> None:
    svg.box(640, 50, 300, 90, ACTOR)
    svg.text(790, 74, "amqp-batch worker", weight="bold", anchor="middle")
    svg.lines(
        790,
        94,
        [
            "REQUEUE: copy with x-retry-count + 1,",
            "every property and header kept;",
            "original acked after the confirm",
        ],
        size=11,
        anchor="middle",
        color=MUTED,
        step=14,
    )
    svg.arrow([(426, 90), (640, 90)])
    svg.text(470, 82, "deliveries", size=11, color=MUTED)


def _probes(svg: Svg) -> None:
    """Panel 1: the kubelet's probes on the pod's HTTP port."""
    svg.text(20, 58, "1. Probes", weight="bold", size=14)
    svg.box(20, 76, 150, 70, BROKER)
    svg.text(95, 104, "kubelet", anchor="middle", weight="bold")
    svg.text(95, 124, "every 5-10 s", anchor="middle", size=11, color=MUTED)
    svg.box(250, 70, 300, 170, CONSUMER)
    svg.text(400, 92, "pod: amqp-batch run", anchor="middle", weight="bold")
    svg.text(400, 110, "--http-port 9464 --http-host 0.0.0.0", anchor="middle",
             size=11, color=MUTED)  # fmt: skip
    svg.box(270, 124, 260, 44, WORKER)
    svg.text(400, 143, "GET /healthz: 200 while the process", anchor="middle",
             size=11)  # fmt: skip
    svg.text(400, 158, "runs (liveness: else restart)", anchor="middle", size=11)
    svg.box(270, 178, 260, 44, WORKER)
    svg.text(400, 197, "GET /readyz: 200 while consuming", anchor="middle", size=11)
    svg.text(400, 212, "(readiness: not while draining)", anchor="middle", size=11)
    svg.arrow([(170, 100), (210, 100), (210, 146), (270, 146)])
    svg.arrow([(170, 120), (196, 120), (196, 200), (270, 200)])
    svg.box(620, 96, 130, 70, BROKER)
    svg.text(685, 126, "RabbitMQ", anchor="middle", weight="bold")
    svg.text(685, 146, "queue: orders", anchor="middle", size=11, color=MUTED)
    svg.arrow([(620, 131), (550, 131)], both=True)
    svg.text(585, 122, "AMQP", anchor="middle", size=11, color=MUTED)


def _drain(svg: Svg) -> None:
    """Panel 2: SIGTERM, the drain, and the grace period around it."""
    svg.text(20, 290, "2. SIGTERM: drain, then exit 0", weight="bold", size=14)
    left, right, y = 40, 1000, 350
    svg.arrow([(left, y), (right, y)], color=MUTED)
    steps = [
        (40, "SIGTERM", "pod deleted, scale-down, rollout"),
        (180, "not ready", "/readyz 503; basic.cancel"),
        (380, "batches in the handler", "finish; results settled"),
        (600, "prefetched messages", "back to the queue, in order"),
        (790, "exit 0", "within shutdown_timeout (30 s)"),
    ]
    for number, (x, title, note) in enumerate(steps):
        svg.parts.append(
            f"<line x1='{x}' y1='{y - 8}' x2='{x}' y2='{y + 8}' stroke='{INK}' "
            "stroke-width='2'/>"
        )
        svg.text(x + 4, y - 16, title, weight="bold", size=12)
        svg.text(x + 4, y + 26 + 16 * (number % 2), note, size=11, color=MUTED)
    svg.box(40, 404, 750, 26, PUBLISH, radius=4)
    svg.text(415, 422, "shutdown_timeout: the drain's bound (then the handler is "
             "cancelled, its messages requeued)", anchor="middle", size=11)  # fmt: skip
    svg.box(40, 436, 920, 26, BROKER, radius=4, dashed=True)
    svg.text(500, 454, "terminationGracePeriodSeconds (45 s) > shutdown_timeout + "
             "margin: SIGKILL only after it", anchor="middle", size=11,
             color=DANGER)  # fmt: skip


def _scaling(svg: Svg) -> None:
    """Panel 3: KEDA scales the Deployment on the queue's length."""
    svg.text(20, 510, "3. Scaling on queue length", weight="bold", size=14)
    boxes = [
        (20, "RabbitMQ", "ready messages in 'orders'"),
        (270, "KEDA ScaledObject", "rabbitmq trigger, QueueLength 1000"),
        (520, "HorizontalPodAutoscaler", "1..10 replicas; down slowly"),
        (770, "Deployment", "pods drain as in 2; PDB: 1 at a time"),
    ]
    for x, title, note in boxes:
        svg.box(x, 530, 220, 64, WORKER if x else BROKER)
        svg.text(x + 110, 556, title, anchor="middle", weight="bold")
        svg.text(x + 110, 576, note, anchor="middle", size=11, color=MUTED)
    for x in (240, 490, 740):
        svg.arrow([(x, 562), (x + 30, 562)])


def containers() -> str:
    """Probes, the drain on SIGTERM and scaling of a consumer in Kubernetes."""
    svg = Svg(1040, 620, "amqp-batch in Kubernetes: probes, drain, scaling")
    svg.text(20, 28, "amqp-batch in Kubernetes", weight="bold", size=16)
    _probes(svg)
    _drain(svg)
    _scaling(svg)
    return svg.render()


DIAGRAMS: dict[str, Callable[[], str]] = {
    "actors.svg": actors,
    "shutdown.svg": shutdown,
    "containers.svg": containers,
    "delays.svg": delays,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="fail if a committed SVG is stale"
    )
    args = parser.parse_args(argv)
    stale = []
    for name, draw in DIAGRAMS.items():
        path = HERE / name
        content = draw()
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != content:
                stale.append(name)
        else:
            path.write_text(content, encoding="utf-8")
            print(f"wrote {path}")
    if stale:
        print(
            f"stale diagrams: {', '.join(stale)}; run python docs/diagrams/render.py",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
