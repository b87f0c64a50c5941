"""Seconds per photo for detect + align + embed with the dlib backend, on CPU.

Usage:
    python benchmarks/bench_faces.py [FACES_DIR] [--repeats N] [--threads N]

FACES_DIR defaults to ``shared/data/faces`` beside the checkout. Each photo is analysed once to warm up, then
``--repeats`` times; the median is reported, per photo and per megapixel. Goal: 0.5 s or less per megapixel.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("faces_dir", nargs="?", type=Path)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--detector", default="hog", choices=("hog", "mmod"))
    args = parser.parse_args()

    faces_dir = args.faces_dir or next(
        (p for p in (ROOT / "shared/data/faces", ROOT.parent / "shared/data/faces") if p.is_dir()), None
    )
    if faces_dir is None:
        parser.error("pass the folder of face photos (shared/data/faces was not found beside the checkout)")

    from idfusion.faces import FaceAnalyzer
    from idfusion.images import load_image

    analyzer = FaceAnalyzer(args.detector, "dlib")
    photos = sorted(p for p in faces_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    print(f"detector {analyzer.detector.name}, recognizer {analyzer.embedding_model}, {os.cpu_count()} CPU cores")
    print(f"{'photo':<28}{'size':>11}{'MP':>7}{'faces':>7}{'s/photo':>10}{'s/MP':>8}")
    per_mp, per_photo = [], []
    for photo in photos:
        image = load_image(photo)  # decoding is not part of the measurement
        megapixels = image.width * image.height / 1e6
        faces = analyzer.analyze(image.array)  # warm-up
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            analyzer.analyze(image.array)
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        per_photo.append(seconds)
        if megapixels >= 0.25:  # s/MP is meaningless for thumbnails such as a 112x112 crop
            per_mp.append(seconds / megapixels)
        print(
            f"{photo.name:<28}{image.width:>5}x{image.height:<5}{megapixels:>7.2f}{len(faces):>7}"
            f"{seconds:>10.3f}{seconds / megapixels if megapixels >= 0.25 else float('nan'):>8.3f}"
        )
    print(f"mean {statistics.mean(per_photo):.3f} s/photo; mean {statistics.mean(per_mp):.3f} s/MP, "
          f"worst {max(per_mp):.3f} s/MP over photos of 0.25 MP or more (goal: <= 0.5 s/MP)")  # fmt: skip


if __name__ == "__main__":
    main()
