"""A tiny procedural training set of coloured shapes with captions, for smoke tests of training setups.

``write_shapes_dataset(folder)`` draws ``count`` images (a circle, square or triangle of one colour on a background of
another) and writes them with a ``train.jsonl`` in idfusion's record format. Deterministic for a given ``seed``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..images import atomic_write_bytes, save_image

__all__ = ["COLOURS", "SHAPES", "write_shapes_dataset"]

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle")


def write_shapes_dataset(folder: str | Path, *, count: int = 16, size: int = 64, seed: int = 0) -> Path:
    """Write ``count`` shape images of ``size`` pixels and ``folder/train.jsonl``; returns the jsonl's path."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    lines = []
    for index in range(count):
        shape = SHAPES[index % len(SHAPES)]
        colour, background = rng.choice(len(names), size=2, replace=False)
        image = Image.new("RGB", (size, size), COLOURS[names[background]])
        draw = ImageDraw.Draw(image)
        half = size * float(rng.uniform(0.2, 0.35))
        cx, cy = (float(v) for v in rng.uniform(half, size - half, size=2))
        box = (cx - half, cy - half, cx + half, cy + half)
        fill = COLOURS[names[colour]]
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=fill)
        name = f"images/{index:04d}.png"
        save_image(folder / name, image)
        caption = f"a {names[colour]} {shape} on a {names[background]} background"
        lines.append({"image": name, "width": size, "height": size, "caption": caption, "identity": None})
    path = folder / "train.jsonl"
    atomic_write_bytes(path, "".join(json.dumps(line) + "\n" for line in lines).encode())
    return path
