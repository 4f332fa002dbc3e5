"""The table printed at the end of a run (and by `fedft report`)."""

from __future__ import annotations

from typing import Any


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _bytes(value: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= size:
            return f"{value / size:.2f} {unit}"
    return f"{value:.0f} B"


NAMES = {"accuracy": "accuracy", "rouge_l": "Rouge-L", "perplexity": "perplexity"}


def _metric(name: str, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if name in ("perplexity", "loss") else _pct(value)


def headline_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """The run's headline metric (accuracy, Rouge-L or perplexity): final, best, and the untuned
    model's where it was scored; for generation also the response loss and perplexity."""
    metric = summary.get("headline", "accuracy")
    name = NAMES.get(metric, metric)
    rows = [
        (f"final {name}", _metric(metric, summary.get(f"final_{metric}"))),
        (
            f"best {name}",
            f"{_metric(metric, summary.get(f'best_{metric}'))} (round {summary['best_round']})",
        ),
    ]
    initial = summary.get("initial") or {}
    if initial.get(f"test_{metric}") is not None:
        rows.append((f"untuned model's {name}", _metric(metric, initial[f"test_{metric}"])))
    if metric != "accuracy" and summary.get("final_accuracy") is not None:
        rows.append(("final accuracy (label words)", _pct(summary["final_accuracy"])))
    if summary.get("final_perplexity") is not None and metric != "perplexity":
        before = initial.get("test_perplexity")
        rows.append(
            (
                "test loss, perplexity",
                f"{summary['final_loss']:.3f}, {summary['final_perplexity']:.2f}"
                + (f" (untuned {before:.2f})" if before is not None else ""),
            )
        )
    return rows


def summary_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    rows = [
        ("run", summary["name"]),
        ("method / model / data", f"{summary['method']} / {summary['model']} / {summary['data']}"),
        ("rounds completed", str(summary["rounds_completed"])),
        *headline_rows(summary),
        ("trainable parameters", f"{summary['trainable_params']:,}"),
        ("uplink per client per round", _bytes(summary["bytes_up_per_client_per_round"])),
        ("downlink per client per round", _bytes(summary["bytes_down_per_client_per_round"])),
        ("total sent (up + down)", _bytes(summary["total_bytes"])),
        ("client peak memory (RSS)", f"{summary['client_peak_rss_mb']:.0f} MB"),
        ("time", f"{summary['seconds']:.1f} s ({summary['seconds_per_round']:.1f} s/round)"),
    ]
    sub = summary.get("fedpft")
    if sub:
        rows.insert(
            4, ("sub-model accuracy (clients' model)", _pct(summary.get("submodel_final_accuracy")))
        )
        rows.append(
            (
                "sub-model download, once per client",
                f"{_bytes(sub['submodel_download_bytes'])} "
                f"(sub-model {_bytes(sub['submodel_bytes'])}, full {_bytes(sub['full_model_bytes'])})",
            )
        )
    steered = summary.get("fedpt")
    if steered:
        metric = summary.get("headline", "accuracy")

        def final(prefix: str) -> str:
            return _metric(metric, summary.get(f"{prefix}_final_{metric}"))

        rows[4:4] = [
            ("small model alone (tuned)", final("small")),
            ("large model alone", final("large")),
        ]
        if summary.get(f"distilled_final_{metric}") is not None:  # scored apart from the deployed
            rows[6:6] = [
                ("after distillation: proxy", final("distilled")),
                ("after distillation: small", final("distilled_small")),
            ]
        chosen = " (chosen on the server's validation rows)" if steered.get("alpha_chosen") else ""
        rows.append(("steering alpha", f"{steered['alpha']:g}{chosen}"))
        rows.append(
            (
                "large-model queries (server only)",
                f"{steered['large_queries']:,} inputs, {_bytes(steered['large_query_bytes'])}",
            )
        )
    if summary.get("client_peak_cuda_mb"):
        rows.append(("client peak CUDA memory", f"{summary['client_peak_cuda_mb']:.0f} MB"))
    ce = summary.get("client_eval") or {}
    metric = summary.get("headline", "accuracy")
    if f"weighted_{metric}" in ce:
        worst = ce[f"min_{metric}"] if metric != "perplexity" else ce[f"max_{metric}"]
        rows.append(
            (
                f"clients' local test {NAMES.get(metric, metric)}",
                f"{_metric(metric, ce[f'weighted_{metric}'])} (worst client {_metric(metric, worst)})",
            )
        )
    privacy = summary.get("privacy")
    if privacy:
        target = privacy["target_epsilon"]
        spent = f"epsilon spent {privacy['epsilon_max']:.3g} (worst client)" + (
            f" of {target:g}" if target is not None else ""
        )
        if not privacy.get("private", True):
            spent = f"NOT PRIVATE (reproducible noise); {spent}, no guarantee"
        rows.append((f"privacy ({privacy['mode']}-level, delta {privacy['delta']:g})", spent))
        if "noise_multiplier_min" in privacy:
            low, high = privacy["noise_multiplier_min"], privacy["noise_multiplier_max"]
            sigma = f"{low:.3g}" if low == high else f"{low:.3g} to {high:.3g}"
            rows.append(("noise multiplier, clip", f"{sigma}, C = {privacy['clip']:g}"))
    if summary.get("stopped"):
        rows.append(("stopped early", summary["stopped"]))
    if summary.get("failed_client_updates"):
        rows.append(("failed client updates", str(summary["failed_client_updates"])))
    return rows


def format_summary(summary: dict[str, Any]) -> str:
    rows = summary_rows(summary)
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 3 + max(len(v) for _, v in rows))
    return "\n".join([line, *(f"{k.ljust(width)} | {v}" for k, v in rows), line])
