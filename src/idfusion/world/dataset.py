"""Write a world training set to disk: PNG images, face masks and a JSON-lines metadata file.

Layout under ``out_dir``::

    metadata.jsonl                    one record per image (schema below)
    images/world-0000042/003.png      image 3 of identity 42
    masks/world-0000042/003.png       its face mask (white = face skin)
    images/scenes/000017.png          scene 17 (2-3 people), with masks/scenes/000017.png

Each record: ``{"image", "width", "height", "caption", "identity", "faces": [{"bbox", "landmarks", "score"}],
"references", "mask", "attributes"}``; paths are relative to the folder of ``metadata.jsonl``. ``references`` lists
the identity's other images. A scene's ``identity`` is its identities' names joined by ``"+"`` (left to right,
the order of ``faces``) and its ``references`` is empty. This is idfusion's training-set schema, the one
``idfusion prepare`` writes for real photos (``docs/training-data.md``); ``idfusion.training.prepare.check_dataset``
checks a written set against it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .attributes import is_heldout, sample_attributes
from .identity import identity_name
from .renderer import Render, render, render_scene

__all__ = ["write_dataset", "image_seed_for", "training_set", "METADATA_FILE"]

logger = logging.getLogger(__name__)

METADATA_FILE = "metadata.jsonl"


def image_seed_for(seed: int, index: int) -> int:
    """The image seed of the ``index``-th image of a dataset written with ``seed``."""
    return int(seed) * 1_000_000 + int(index)


def _record(result: Render, image: str, mask: str, identity: str, references: list[str]) -> dict:
    height, width = result.image.shape[:2]
    return {
        "image": image,
        "width": int(width),
        "height": int(height),
        "caption": result.caption,
        "identity": identity,
        "faces": [face.to_record() for face in result.faces],
        "references": references,
        "mask": mask,
        "attributes": result.attributes.to_dict(),
    }


def write_dataset(
    out_dir: str | os.PathLike,
    identities: Sequence[int],
    images_per_identity: int = 8,
    *,
    scenes: int = 0,
    size: int = 64,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    exclude_heldout: bool = False,
) -> Path:
    """Render and write a training set.

    Args:
        out_dir (`str` or `os.PathLike`): target folder (created if missing).
        identities (`Sequence[int]`): identity seeds, e.g. ``TRAIN_IDENTITIES[:500]``.
        images_per_identity (`int`, defaults to 8): images per identity, each with its own pose, lighting and
            sampled attributes.
        scenes (`int`, defaults to 0): number of extra 2-3 person scenes, their people drawn from ``identities``.
        size (`int`, defaults to 64): image side.
        seed (`int`, defaults to 0): dataset seed; image ``k`` of every identity uses image seed
            :func:`image_seed_for` ``(seed, k)``.
        overwrite (`bool`, defaults to `False`): replace existing files; otherwise any existing target raises
            :class:`FileExistsError` before anything is written.
        progress (`bool`, defaults to `True`): show a tqdm bar.
        exclude_heldout (`bool`, defaults to `False`): redraw the attributes of any image whose combination is held
            out (:func:`~idfusion.world.attributes.is_heldout`), so that evaluation captions stay unseen.

    Returns:
        Path of the written ``metadata.jsonl``.
    """
    from tqdm.auto import tqdm

    from ..images import atomic_write_bytes, save_image

    if images_per_identity < 1:
        raise ValueError(f"images_per_identity must be >= 1, got {images_per_identity}")
    if scenes and len(identities) < 3:
        raise ValueError("scenes need at least 3 identities to draw from")
    out = Path(out_dir)
    names = {int(i): identity_name(i) for i in identities}
    jobs: list[tuple[str, str, tuple]] = []  # (image path, mask path, render arguments)
    for seed_id, name in names.items():
        for k in range(images_per_identity):
            jobs.append((f"images/{name}/{k:03d}.png", f"masks/{name}/{k:03d}.png", (seed_id, k)))
    rng = np.random.default_rng([0x5E, int(seed)])
    pool = np.array(list(names))
    for k in range(scenes):
        people = int(rng.integers(2, 4))
        chosen = tuple(int(i) for i in rng.choice(pool, size=people, replace=False))
        jobs.append((f"images/scenes/{k:06d}.png", f"masks/scenes/{k:06d}.png", (chosen, k)))

    metadata = out / METADATA_FILE
    if not overwrite:
        existing = [p for p in [metadata] + [out / j[0] for j in jobs] + [out / j[1] for j in jobs] if p.exists()]
        if existing:
            raise FileExistsError(f"{len(existing)} target file(s) exist, e.g. {existing[0]}; pass overwrite=True")

    by_identity: dict[str, list[str]] = {}
    for image_path, _, (who, _) in jobs:
        if not isinstance(who, tuple):
            by_identity.setdefault(names[who], []).append(image_path)

    records = []
    for image_path, mask_path, (who, k) in tqdm(jobs, desc="world dataset", unit="image", disable=not progress):
        image_seed = image_seed_for(seed, k)
        if isinstance(who, tuple):
            result = render_scene(who, image_seed, size=size)
            identity, references = "+".join(identity_name(i) for i in who), []
        else:
            result = render(who, image_seed, size=size)
            identity = names[who]
            references = [p for p in by_identity[identity] if p != image_path]
        if exclude_heldout and is_heldout(result.attributes):
            redraw = np.random.default_rng([0xEC, *(who if isinstance(who, tuple) else (who,)), image_seed])
            attributes = result.attributes
            while is_heldout(attributes):
                attributes = sample_attributes(redraw, people=attributes.people)
            scene = isinstance(who, tuple)
            result = (render_scene if scene else render)(who, image_seed, attributes, size=size)
        save_image(out / image_path, result.image)
        save_image(out / mask_path, result.mask)
        records.append(_record(result, image_path, mask_path, identity, references))
    atomic_write_bytes(metadata, "".join(json.dumps(r) + "\n" for r in records).encode())
    logger.info("wrote %d records to %s", len(records), metadata)
    return metadata


def training_set(
    folder: Path, identities: int, images_per_identity: int, *, scenes: int = 0, seed: int = 0, progress: bool = True
) -> tuple[Path, float]:
    """The world training scripts' data: the first ``identities`` training identities, held-out caption combinations
    left out, written once into ``folder`` and reused by a re-run. Returns the metadata path and the seconds the
    writing took (recorded beside the folder, so a resumed run reports the first run's time)."""
    import time

    from .identity import TRAIN_IDENTITIES

    folder = Path(folder)
    metadata, record = folder / METADATA_FILE, folder.parent / "data.json"
    if metadata.is_file():
        return metadata, json.loads(record.read_text())["seconds"] if record.is_file() else 0.0
    start = time.time()
    write_dataset(
        folder,
        TRAIN_IDENTITIES[:identities],
        images_per_identity,
        scenes=scenes,
        seed=seed,
        overwrite=True,  # a partial folder from an interrupted run (no metadata yet)
        progress=progress,
        exclude_heldout=True,
    )
    seconds = round(time.time() - start, 1)
    record.write_text(json.dumps({"seconds": seconds}))
    return metadata, seconds
