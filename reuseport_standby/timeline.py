"""A PNG timeline of a load run: who served each 100 ms, what failed, and when restarts happened."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence


#: the restart demo's series: who answered (the first word of the body), its legend and colour
ROLES = (("primary", "served by primary", "#2f6db5"), ("standby", "served by standby", "#f0a030"))


def draw(events: Sequence[tuple[float, str, str]], marks: Sequence[tuple[float, str]], path: Path,
         title: str, bucket: float = 0.1, groups: Sequence[tuple[str, str, str]] = ROLES) -> Path:
    """``events``: (t, outcome, who) per request; ``marks``: (t, label) per restart; ``groups``:
    (who, legend, colour) of the answered requests, stacked in that order.  Error responses
    (``http_*``) are stacked on top in their version's colour, hatched; connection failures in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    end = max([e[0] for e in events] + [m[0] for m in marks] + [bucket])
    n = int(end / bucket) + 1
    ok = {who: [0] * n for who, _, _ in groups}
    errors = {who: [0] * n for who, _, _ in groups}
    failed = [0] * n
    for t, kind, who in events:
        i = int(t / bucket)
        if kind == "ok" and who in ok:
            ok[who][i] += 1
        elif kind.startswith("http_") and who in errors:
            errors[who][i] += 1
        elif kind != "ok":
            failed[i] += 1
    xs = [i * bucket for i in range(n)]
    fig, ax = plt.subplots(figsize=(11, 4.2), dpi=110)
    bottom = [0] * n
    for who, label, colour in groups:
        ax.bar(xs, ok[who], width=bucket, align="edge", bottom=bottom, color=colour, label=label)
        bottom = [b + v for b, v in zip(bottom, ok[who])]
    for who, label, colour in groups:
        if any(errors[who]):
            at = [i for i in range(n) if errors[who][i]]  # only where there are some: an empty bar still has an edge
            ax.bar([xs[i] for i in at], [errors[who][i] for i in at], width=bucket, align="edge",
                   bottom=[bottom[i] for i in at], color=colour, hatch="////", edgecolor="#d62728",
                   label=f"error responses ({who})")
            bottom = [b + v for b, v in zip(bottom, errors[who])]
    if any(failed):
        ax.bar(xs, failed, width=bucket, align="edge", bottom=bottom, color="#d62728", label="failed")
        bottom = [b + v for b, v in zip(bottom, failed)]
    top = max(bottom) or 1
    for t, label in marks:
        ax.axvline(t, color="#444", linestyle="--", linewidth=1)
        ax.text(t + 0.05, top * 1.02, label, rotation=90, va="bottom", ha="left", fontsize=8)
    ax.set_ylim(0, top * 1.45)
    ax.set_xlim(0, end)
    ax.set_xlabel("seconds")
    ax.set_ylabel(f"requests per {int(bucket * 1000)} ms")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper right", fontsize=8, ncol=3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
