"""A PNG timeline of a load run: who served each 100 ms, what failed, and when restarts happened."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence


def draw(events: Sequence[tuple[float, str, str]], marks: Sequence[tuple[float, str]], path: Path,
         title: str, bucket: float = 0.1) -> Path:
    """``events``: (t, outcome, who) per request; ``marks``: (t, label) per restart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    end = max([e[0] for e in events] + [m[0] for m in marks] + [bucket])
    n = int(end / bucket) + 1
    series = {"primary": [0] * n, "standby": [0] * n, "failed": [0] * n}
    for t, kind, who in events:
        i = int(t / bucket)
        if kind != "ok":
            series["failed"][i] += 1
        elif who in series:
            series[who][i] += 1
    xs = [i * bucket for i in range(n)]
    fig, ax = plt.subplots(figsize=(11, 4.2), dpi=110)
    ax.bar(xs, series["primary"], width=bucket, align="edge", color="#2f6db5", label="served by primary")
    ax.bar(xs, series["standby"], width=bucket, align="edge", bottom=series["primary"], color="#f0a030",
           label="served by standby")
    if any(series["failed"]):
        ax.bar(xs, series["failed"], width=bucket, align="edge", color="#d62728", label="failed")
    top = max(p + s for p, s in zip(series["primary"], series["standby"])) or 1
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
