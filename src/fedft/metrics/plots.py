"""accuracy.png: test accuracy against round and against cumulative megabytes sent."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def plot_accuracy(
    metrics: list[dict[str, Any]], out: Path, title: str, chance: float | None = None
) -> Path | None:
    points = [m for m in metrics if m.get("test_accuracy") is not None]
    if not points:
        return None
    rounds = [m["round"] for m in points]
    acc = [100 * m["test_accuracy"] for m in points]
    mb = [m["total_mb"] for m in points]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    left.plot(rounds, acc, marker="o")
    left.set_xlabel("round")
    left.set_ylabel("global test accuracy (%)")
    right.plot(mb, acc, marker="o", color="tab:orange")
    right.set_xlabel("cumulative MB sent (up + down)")
    left.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (left, right):
        ax.grid(alpha=0.3)
        if chance is not None:
            ax.axhline(100 * chance, color="grey", linestyle="--", linewidth=1, label="chance")
    if chance is not None:
        left.legend(loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
