"""The headline metric (accuracy, Rouge-L or perplexity) against round and against cumulative
megabytes sent, with a reference line (chance, or the untuned model)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

LABELS = {
    "accuracy": ("global test accuracy (%)", 100.0),
    "rouge_l": ("Rouge-L F (%) of greedy answers", 100.0),
    "perplexity": ("test perplexity", 1.0),
}


def plot_metric(
    metrics: list[dict[str, Any]],
    out: Path,
    title: str,
    metric: str = "accuracy",
    baseline: tuple[str, float] | None = None,
) -> Path | None:
    key = f"test_{metric}"
    points = [m for m in metrics if m.get(key) is not None]
    if not points:
        return None
    label, scale = LABELS.get(metric, (metric, 1.0))
    rounds = [m["round"] for m in points]
    values = [scale * m[key] for m in points]
    mb = [m["total_mb"] for m in points]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    left.plot(rounds, values, marker="o")
    left.set_xlabel("round")
    left.set_ylabel(label)
    right.plot(mb, values, marker="o", color="tab:orange")
    right.set_xlabel("cumulative MB sent (up + down)")
    left.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (left, right):
        ax.grid(alpha=0.3)
        if baseline is not None:
            ax.axhline(
                scale * baseline[1], color="grey", linestyle="--", linewidth=1, label=baseline[0]
            )
    if baseline is not None:
        left.legend(loc="best")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
