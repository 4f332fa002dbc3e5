"""Run the benchmarks and write docs/benchmarks.md: `python benchmarks/run.py [section ...]`."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import causal_speed  # noqa: E402
import dp_recipe  # noqa: E402
import lora_aggregation  # noqa: E402
import scale_clients  # noqa: E402
import secure_aggregation  # noqa: E402

import client_memory  # noqa: E402
import demo_noniid  # noqa: E402
import dp_sst2  # noqa: E402
import engines  # noqa: E402
import fedpft_sst2  # noqa: E402
import fedpt_generate  # noqa: E402
import fedpt_text  # noqa: E402
import generate_headlines  # noqa: E402
import methods_sst2  # noqa: E402
import seeds  # noqa: E402
import sfprompt_text  # noqa: E402
import zo_learns  # noqa: E402
import zo_memory  # noqa: E402
import zo_sst2  # noqa: E402

SECTIONS = {
    "methods": methods_sst2.run,
    "demo": demo_noniid.run,
    "engines": engines.run,
    "zo-memory": zo_memory.run,
    "client-memory": client_memory.run,
    "zo-sweep": zo_sst2.sweep,
    "zo": zo_sst2.run,
    "dp": dp_sst2.run,
    "dp-recipe": dp_recipe.run,
    "sfprompt": sfprompt_text.run,
    "fedpft": fedpft_sst2.run,
    "fedpt": fedpt_text.run,
    "generate": generate_headlines.run,
    "generate-memory": generate_headlines.memory,
    "zo-learns-sweep": zo_learns.sweep,
    "zo-learns": zo_learns.run,
    "zo-learns-smollm2": zo_learns.run_smollm2,
    "fedpt-generate": fedpt_generate.run,
    "scale": scale_clients.run,
    "causal-speed": causal_speed.run,
    "lora-aggregation": lora_aggregation.run,
    "lora-aggregation-smollm2": lora_aggregation.run_smollm2,
    "secure-aggregation": secure_aggregation.run,
    **seeds.sections(),
}


def main(argv: list[str]) -> int:
    chosen = argv or list(SECTIONS)
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown:
        print(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    runs = (
        Path(__file__).resolve().parents[1] / "runs" / "bench"
    )  # kept for inspection; git ignores runs/
    for name in chosen:
        print(SECTIONS[name](runs / name))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
