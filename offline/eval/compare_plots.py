"""PNG plots of a comparison: one figure per benchmark, one panel per metric, each run's
difference from the baseline as a point with its bootstrap interval and a line at zero.

Metrics live on different scales (rates in [0, 1], token counts in thousands), so each metric has
its own panel and axis rather than sharing one.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from offline.eval.compare import Comparison

_COLUMNS = 4


def _file_name(benchmark: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", benchmark) + ".png"


def plot_deltas(comparison: Comparison, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, whatever the environment says
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    labels = [run.label for run in comparison.runs[1:]]
    written: list[Path] = []
    for table in comparison.tables:
        rows = [row for row in table.rows if any(d.value is not None for d in row.deltas)]
        if not rows:
            continue  # nothing to draw: every difference is missing
        columns = min(_COLUMNS, len(rows))
        lines = math.ceil(len(rows) / columns)
        figure, axes = plt.subplots(lines, columns, figsize=(3.2 * columns, 2.4 * lines + 0.6),
                                    squeeze=False)
        for panel, row in zip(axes.flat, rows, strict=False):
            for position, delta in enumerate(row.deltas):
                if delta.value is None:
                    continue
                if delta.interval is not None:
                    errors = [[delta.value - delta.interval.low],
                              [delta.interval.high - delta.value]]
                    panel.errorbar([position], [delta.value], yerr=errors, fmt="o", capsize=4,
                                   color="tab:gray" if delta.interval.within_noise
                                   else "tab:blue")
                else:
                    panel.plot([position], [delta.value], "x", color="tab:gray")
            panel.axhline(0.0, color="black", linewidth=0.8)
            panel.set_title(row.name, fontsize=9)
            panel.set_xticks(range(len(labels)), labels, fontsize=7, rotation=20)
            panel.set_xlim(-0.5, len(labels) - 0.5)
            panel.tick_params(axis="y", labelsize=7)
        for panel in list(axes.flat)[len(rows):]:
            panel.set_visible(False)
        level = round(comparison.confidence * 100)
        figure.suptitle(f"{table.name}: Δ against {comparison.runs[0].label} "
                        f"({level} % bootstrap CI; grey = within noise)", fontsize=10)
        figure.tight_layout()
        path = folder / _file_name(table.name)
        figure.savefig(path, dpi=100)
        plt.close(figure)
        written.append(path)
    return written
