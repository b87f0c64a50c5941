"""Run records that live beside the checkpoints: a CSV of per-step values, its loss plot, and validation grids."""

from __future__ import annotations

import csv
import io
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from PIL import Image

from ..images import atomic_write_bytes

__all__ = ["MetricsCSV", "image_grid", "plot_losses", "read_metrics"]

logger = logging.getLogger(__name__)


def read_metrics(path: Path) -> list[dict[str, float]]:
    """Rows of a metrics CSV as floats; a torn last line (a crash mid-write) is skipped."""
    if not path.is_file():
        return []
    rows = []
    with path.open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            try:
                rows.append({k: float(v) for k, v in row.items() if k is not None and v not in (None, "")})
            except ValueError:
                continue
    return [row for row in rows if "step" in row]


class MetricsCSV:
    """``metrics.csv`` with one row per optimiser step. On resume, rows after the resumed step are dropped first,
    so the file of a resumed run reads like the file of an uninterrupted one."""

    def __init__(self, path: Path, *, resume_step: int | None = None):
        self.path = path
        self.columns: list[str] | None = None
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            path.unlink(missing_ok=True)
            return
        kept = [row for row in read_metrics(path) if row["step"] <= resume_step]
        if kept:
            self.columns = list(kept[0])
            buffer = io.StringIO()
            writer = csv.DictWriter(buffer, fieldnames=self.columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows({k: _format(v) for k, v in row.items()} for row in kept)
            atomic_write_bytes(path, buffer.getvalue().encode())
        else:
            path.unlink(missing_ok=True)

    def write(self, row: Mapping[str, float]) -> None:
        new = self.columns is None
        if new:
            self.columns = list(row)
        extra = set(row) - set(self.columns)
        if extra:
            logger.debug("metrics.csv: columns %s appeared after the header; not written", sorted(extra))
        with self.path.open("a", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.columns, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow({k: _format(v) for k, v in row.items()})


def _format(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 2**53 else f"{value:.6g}"


def plot_losses(csv_path: Path, png_path: Path, *, keys: Sequence[str] | None = None) -> Path | None:
    """Plot the loss columns of ``csv_path`` against the step (raw, and smoothed) into ``png_path``.

    Columns plotted: ``keys``, else ``loss`` and any column ending in ``_loss``. Returns None when there is nothing to
    plot yet. Uses matplotlib's object API with the Agg canvas, so no global backend is switched.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = read_metrics(csv_path)
    if not rows:
        return None
    columns = list(keys) if keys else [k for k in rows[0] if k == "loss" or k.endswith("_loss")]
    figure = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    steps = [row["step"] for row in rows]
    for index, column in enumerate(columns):
        values = [row.get(column, math.nan) for row in rows]
        color = f"C{index}"
        axes.plot(steps, values, color=color, alpha=0.3, linewidth=0.8)
        axes.plot(steps, _smooth(values), color=color, linewidth=1.6, label=column)
    if all(row.get(c, 1.0) > 0 for row in rows for c in columns):
        axes.set_yscale("log")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return atomic_write_bytes(png_path, buffer.getvalue())


def _smooth(values: Sequence[float], weight: float = 0.9) -> list[float]:
    """TensorBoard-style debiased exponential smoothing."""
    smoothed, last, count = [], 0.0, 0
    for value in values:
        if math.isnan(value):
            smoothed.append(math.nan)
            continue
        count += 1
        last = weight * last + (1 - weight) * value
        smoothed.append(last / (1 - weight**count))
    return smoothed


def image_grid(images: Sequence[Image.Image], columns: int | None = None) -> Image.Image:
    """Paste images left to right, top to bottom into one grid (cells sized to the largest image)."""
    if not images:
        raise ValueError("no images for the grid")
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    width = max(image.width for image in images)
    height = max(image.height for image in images)
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for index, image in enumerate(images):
        grid.paste(image.convert("RGB"), ((index % columns) * width, (index // columns) * height))
    return grid
