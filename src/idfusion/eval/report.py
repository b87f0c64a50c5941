"""The report folder of ``idfusion eval``: scores.csv/json, the trade-off plots, image grids, report.md/html.

Plots are drawn with matplotlib's object API on an Agg canvas (no pyplot, no global backend change).
"""

from __future__ import annotations

import csv
import html
import io
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["COLUMNS", "SUMMARY_COLUMNS", "write_report"]

logger = logging.getLogger(__name__)

ATTRIBUTES = ("background", "pattern", "hat", "glasses", "clothing", "expression", "people")
#: Every per-image column of scores.csv, in order (blank where a score does not apply).
COLUMNS = (
    "method", "method_name", "identity", "prompt_index", "prompt", "seed", "image", "face_found", "faces",
    "sim_target", "sim_ref", "paste", "copy_geo", "prompt_fidelity", "clip_t",
    *(f"attr_{name}" for name in ATTRIBUTES),
    "diversity", "generation_seconds", "peak_memory_mb", "peak_memory_kind", "error",
)  # fmt: skip
#: (key, header, format) of the per-method table.
SUMMARY_COLUMNS = (
    ("images", "images", "{:.0f}"),
    ("face_rate", "faces found", "{:.0%}"),
    ("sim_target", "SimTarget ↑", "{:.3f}"),
    ("sim_ref", "SimRef", "{:.3f}"),
    ("paste", "Paste ↓", "{:+.3f}"),
    ("copy_geo", "copy_geo ↓", "{:+.3f}"),
    ("prompt_fidelity", "prompt ↑", "{:.3f}"),
    ("diversity", "diversity", "{:.3f}"),
    ("quality", "quality ↓", "{:.3f}"),
    ("seconds_per_image", "s/image", "{:.2f}"),
    ("peak_memory_mb", "peak MB", "{:,.0f}"),
)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _cell(value: Any, fmt: str) -> str:
    return fmt.format(value) if _finite(value) else "–"


def _csv_value(value: Any) -> Any:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return _json_value(value.item())
    if isinstance(value, os.PathLike):
        return str(value)
    return value


def _write_text(path: Path, text: str) -> Path:
    from ..atomic import atomic_write_bytes

    return atomic_write_bytes(path, text.encode("utf-8"))


# ---- plots ---------------------------------------------------------------------------------------------------


def _scatter(rows: Sequence[Mapping[str, Any]], labels: Sequence[str], x: str, y: str, xlabel: str, ylabel: str,
             title: str, path: Path) -> Path | None:  # fmt: skip
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 4.8), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    colors = [f"C{k % 10}" for k in range(len(labels))]
    drawn = False
    for label, color in zip(labels, colors, strict=True):
        points = [(r[x], r[y]) for r in rows if r["method"] == label and _finite(r.get(x)) and _finite(r.get(y))]
        if not points:
            continue
        xs, ys = np.array(points).T
        axes.scatter(xs, ys, s=12, alpha=0.25, color=color, linewidths=0)
        mx, my = float(xs.mean()), float(ys.mean())
        sx = float(xs.std() / math.sqrt(len(xs)))
        sy = float(ys.std() / math.sqrt(len(ys)))
        axes.errorbar(mx, my, xerr=sx, yerr=sy, fmt="o", markersize=8, color=color, capsize=3, label=label)
        axes.annotate(label, (mx, my), textcoords="offset points", xytext=(6, 6), fontsize=9)
        drawn = True
    if not drawn:
        return None
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title, fontsize=11)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8, loc="best")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    from ..atomic import atomic_write_bytes

    return atomic_write_bytes(path, buffer.getvalue())


def _plots(rows: Sequence[Mapping[str, Any]], labels: Sequence[str], folder: Path, prompt_name: str,
           notes: list[str]) -> dict[str, Path]:  # fmt: skip
    plots: dict[str, Path] = {}
    made = _scatter(
        rows, labels, "prompt_fidelity", "sim_target", f"prompt fidelity ({prompt_name})", "identity (SimTarget)",
        "identity vs prompt fidelity (dots: images; markers: mean ± s.e.)", folder / "identity_vs_prompt.png",
    )  # fmt: skip
    if made is None:
        notes.append("plot identity_vs_prompt.png not drawn: no image has both a face and a prompt-fidelity score")
    else:
        plots["identity_vs_prompt"] = made
    made = _scatter(
        rows, labels, "copy_geo", "sim_target", "copy-paste (copy_geo: 1 = on the reference, -1 = on the target)",
        "identity (SimTarget)", "identity vs copy-paste", folder / "copy_vs_identity.png",
    )  # fmt: skip
    if made is None:
        notes.append("plot copy_vs_identity.png not drawn: no image has a face with a copy_geo score")
    else:
        plots["copy_vs_identity"] = made
    return plots


# ---- image grids ---------------------------------------------------------------------------------------------


def _grid(header: Sequence[tuple[str, np.ndarray]], rows: Sequence[tuple[str, Sequence[tuple[str, np.ndarray | None]]]],
          cell: int) -> Any:  # fmt: skip
    """Reference/target photos on top, then one row per method (its label on the left), one column per seed."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    gap, text = 4, 12
    label_width = 110
    columns = max([len(header)] + [len(cells) for _, cells in rows])
    width = label_width + columns * (cell + gap) + gap
    height = (len(rows) + 1) * (cell + text + gap) + gap + 4
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)

    def put(image: np.ndarray | None, caption: str, x: int, y: int) -> None:
        if image is None:
            draw.rectangle((x, y, x + cell - 1, y + cell - 1), outline=(180, 180, 180))
            draw.text((x + 4, y + cell // 2 - 6), "missing", fill=(150, 150, 150), font=font)
        else:
            picture = Image.fromarray(np.asarray(image)).convert("RGB")
            scale = cell / max(picture.size)
            size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
            resample = Image.Resampling.NEAREST if scale >= 2 else Image.Resampling.LANCZOS
            picture = picture.resize(size, resample)
            sheet.paste(picture, (x + (cell - size[0]) // 2, y + (cell - size[1]) // 2))
        while caption and draw.textlength(caption, font=font) > cell:
            caption = caption[:-1]
        draw.text((x, y + cell + 1), caption, fill=(0, 0, 0), font=font)

    y = gap
    draw.text((gap, y + cell // 2 - 6), "photos", fill=(0, 0, 0), font=font)
    for k, (caption, image) in enumerate(header):
        put(image, caption, label_width + gap + k * (cell + gap), y)
    y += cell + text + gap
    draw.rectangle((0, y, width - 1, y + 1), fill=(160, 160, 160))
    y += 4
    for label, cells in rows:
        name = label
        while name and draw.textlength(name, font=font) > label_width - 2 * gap:
            name = name[:-1]
        draw.text((gap, y + cell // 2 - 6), name, fill=(0, 0, 0), font=font)
        for k, (caption, image) in enumerate(cells):
            put(image, caption, label_width + gap + k * (cell + gap), y)
        y += cell + text + gap
    return sheet


def _grids(rows: Sequence[Mapping[str, Any]], labels: Sequence[str], photos: Mapping[str, Sequence[tuple[str, Path]]],
           prompts: Sequence[str], out: Path, progress: bool) -> list[tuple[str, int, Path]]:  # fmt: skip
    from tqdm.auto import tqdm

    from ..atomic import atomic_write_bytes
    from ..images import load_image

    cache: dict[str, np.ndarray | None] = {}

    def pixels(path: str | Path | None) -> np.ndarray | None:
        if not path:
            return None
        key = str(path)
        if key not in cache:
            full = Path(path) if Path(path).is_absolute() else out / path
            try:
                cache[key] = load_image(full, max_pixels=None).array
            except (OSError, ValueError):
                cache[key] = None
        return cache[key]

    by_group: dict[tuple[str, int], list[Mapping[str, Any]]] = {}
    for row in rows:
        by_group.setdefault((row["identity"], int(row["prompt_index"])), []).append(row)
    written = []
    for (identity, index), group in tqdm(sorted(by_group.items()), desc="grids", unit="grid", disable=not progress):
        header = [(caption, pixels(path)) for caption, path in photos.get(identity, [])]
        grid_rows = []
        for label in labels:
            cells = []
            for row in sorted((r for r in group if r["method"] == label), key=lambda r: r["seed"]):
                score = "no face" if not row.get("face_found") else f"{row['sim_target']:.2f}"
                cells.append(
                    (f"s{row['seed']} {score}" if row.get("image") else f"s{row['seed']}", pixels(row.get("image")))
                )
            if cells:
                grid_rows.append((label, cells))
        cell = 96
        sheet = _grid(header, grid_rows, cell)
        buffer = io.BytesIO()
        sheet.save(buffer, format="PNG")
        path = atomic_write_bytes(out / "grids" / f"{identity}__p{index:02d}.png", buffer.getvalue())
        written.append((identity, index, path))
    return written


# ---- tables --------------------------------------------------------------------------------------------------


def _summary_table(summary: Mapping[str, Mapping[str, Any]], prompt_name: str, quality_name: str) -> list[list[str]]:
    headers = ["method"] + [
        header.replace("prompt", f"prompt ({prompt_name})").replace("quality", quality_name)
        for _, header, _ in SUMMARY_COLUMNS
    ]
    table = [headers]
    for label, values in summary.items():
        table.append([label] + [_cell(values.get(key), fmt) for key, _, fmt in SUMMARY_COLUMNS])
    return table


def _markdown_table(table: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(table[0]) + " |", "|" + "|".join(" --- " for _ in table[0]) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in table[1:]]
    return "\n".join(lines)


def _html_table(table: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in table[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in table[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _attribute_table(summary: Mapping[str, Mapping[str, Any]]) -> list[list[str]] | None:
    present = [name for name in ATTRIBUTES if any(_finite(v.get(f"attr_{name}")) for v in summary.values())]
    if not present:
        return None
    table = [["method", *present]]
    for label, values in summary.items():
        table.append([label] + [_cell(values.get(f"attr_{name}"), "{:.2f}") for name in present])
    return table


def write_report(
    out: Path,
    *,
    bench: Any,
    rows: Sequence[Mapping[str, Any]],
    summary: Mapping[str, Mapping[str, Any]],
    notes: list[str],
    photos: Mapping[str, Sequence[tuple[str, Path]]],
    settings: Mapping[str, Any],
    progress: bool = True,
) -> dict[str, Path]:
    """Write ``scores.csv``, ``scores.json``, ``plots/*.png``, ``grids/*.png``, ``report.md`` and ``report.html``.

    Args:
        out: the report folder.
        bench: the :class:`~idfusion.eval.benchmark.Benchmark`.
        rows: the per-image scores (keys of :data:`COLUMNS`).
        summary: per method label, its aggregated scores (keys of :data:`SUMMARY_COLUMNS`, ``attr_*``).
        notes: what was skipped and why (extended with the plots' notes).
        photos: per identity, its ``(caption, path)`` reference and target photos for the grids' top row.
        settings: judge, detector and other run facts for the report's header and scores.json.
    """
    labels = list(summary)
    files: dict[str, Path] = {}
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(COLUMNS), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: _csv_value(row.get(key)) for key in COLUMNS})
    files["scores.csv"] = _write_text(out / "scores.csv", buffer.getvalue())

    prompt_name = "attribute accuracy" if bench.kind == "world" else "CLIP-T"
    quality_name = "FD judge" if bench.kind == "world" else "FID"
    plots = _plots(rows, labels, out / "plots", prompt_name, notes)
    grids = _grids(rows, labels, photos, bench.prompts, out, progress)
    document = {
        "benchmark": bench.name,
        "kind": bench.kind,
        "settings": settings,
        "prompts": bench.prompts,
        "seeds": bench.seeds,
        "identities": {name: [str(p) for _, p in items] for name, items in photos.items()},
        "summary": summary,
        "notes": notes,
        "columns": list(COLUMNS),
        "rows": [{key: row.get(key) for key in COLUMNS} for row in rows],
    }
    files["scores.json"] = _write_text(out / "scores.json", json.dumps(_json_value(document), indent=1))

    table = _summary_table(summary, prompt_name, quality_name)
    attributes = _attribute_table(summary)
    facts = ", ".join(f"{k}: {v}" for k, v in settings.items() if v not in (None, "", []))
    quality_text = (
        "FD judge = Fréchet distance between judge features of the generated faces and of the held-out target "
        "renders (lower is better; compare with the renders row, the floor at this sample size)"
        if bench.kind == "world"
        else "FID between the generated images and the held-out target photos (torchmetrics, Inception-v3)"
    )
    legend = [
        "SimTarget: mean judge cosine similarity to the held-out photos of the person (the key identity score); "
        "SimRef: the largest similarity to a reference; Paste = SimRef - SimTarget (FlashFace).",
        "copy_geo = (θ(gen, target) - θ(gen, ref)) / θ(target, ref) (MultiID-Bench): 1 = a copy of the references, "
        "-1 = on the held-out person, 0 = half-way.",
        f"prompt: {prompt_name}"
        + (
            " of the prompt's attributes (the world's attribute checkers; no face = wrong person attributes)"
            if bench.kind == "world"
            else " (100 · cos, CLIP)"
        ),
        "diversity: mean pairwise 1 - cos of judge embeddings across seeds of one identity and prompt.",
        f"quality: {quality_text}.",
        "s/image: generation wall time per image without model loading; peak MB: see scores.csv peak_memory_kind.",
    ]
    md = [f"# {bench.name}: identity evaluation", "", facts, "", _markdown_table(table), ""]
    if attributes:
        md += ["Attribute accuracy by attribute:", "", _markdown_table(attributes), ""]
    md += [f"- {line}" for line in legend] + [""]
    if notes:
        md += ["## Notes", ""] + [f"- {note}" for note in notes] + [""]
    if plots:
        md += ["## Plots", ""] + [f"![{name}]({path.relative_to(out).as_posix()})" for name, path in plots.items()]
        md += [""]
    md += ["## Images", ""]
    for identity, index, path in grids:
        md += [
            f"### {identity}, prompt {index}: {bench.prompts[index]}",
            "",
            f"![]({path.relative_to(out).as_posix()})",
            "",
        ]
    md += ["Per-image scores: [scores.csv](scores.csv), [scores.json](scores.json)", ""]
    files["report.md"] = _write_text(out / "report.md", "\n".join(md))

    style = (
        "body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child,th:first-child{text-align:left}"
        "img{max-width:100%}"
    )
    body = [f"<h1>{html.escape(bench.name)}: identity evaluation</h1>", f"<p>{html.escape(facts)}</p>",
            _html_table(table)]  # fmt: skip
    if attributes:
        body += ["<p>Attribute accuracy by attribute:</p>", _html_table(attributes)]
    body += ["<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in legend) + "</ul>"]
    if notes:
        body += ["<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>"]
    if plots:
        body += ["<h2>Plots</h2>"] + [
            f'<img src="{html.escape(p.relative_to(out).as_posix())}" alt="{html.escape(n)}">'
            for n, p in plots.items()
        ]
    body += ["<h2>Images</h2>"]
    for identity, index, path in grids:
        body += [
            f"<h3>{html.escape(identity)}, prompt {index}: {html.escape(bench.prompts[index])}</h3>",
            f'<img src="{html.escape(path.relative_to(out).as_posix())}">',
        ]
    body += ['<p>Per-image scores: <a href="scores.csv">scores.csv</a>, <a href="scores.json">scores.json</a></p>']
    page = f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(bench.name)}</title><style>{style}</style></head><body>{''.join(body)}</body></html>"
    files["report.html"] = _write_text(out / "report.html", page)
    files.update({f"plots/{p.name}": p for p in plots.values()})
    return files
