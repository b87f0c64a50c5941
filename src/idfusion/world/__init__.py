"""The synthetic identity world: a procedural face renderer, its caption grammar, and face models trained on it.

Small enough that a tiny SD1.5-architecture model and every identity method train on a CPU in minutes, and
measurable: identity (world recognizers), prompt fidelity (attribute checkers) and copy-paste all have ground
truth. Identities are :data:`TRAIN_IDENTITIES` (seeds 0-9,999) for training and :data:`HELDOUT_IDENTITIES`
(seeds 1,000,000-1,009,999) for evaluation.

- Renderer (``renderer.py``): :func:`render`, :func:`render_scene`, :func:`degrade`; ground truth per face
  (box, 5 ArcFace-order landmarks, 68 dlib-layout landmarks, face mask).
- Captions (``attributes.py``): :class:`Attributes`, :func:`sample_attributes`, :func:`caption`,
  :func:`parse_caption`.
- Datasets (``dataset.py``): :func:`write_dataset` (PNG + ``metadata.jsonl``).
- Face models (``backends.py``, weights in ``weights/`` with ``MANIFEST.json``): :class:`WorldDetector`,
  :class:`WorldRecognizer` (``"world"`` conditions, ``"world-judge"`` scores), also reachable as
  ``FaceAnalyzer("world", "world")``; :class:`AttributeChecker` (``checkers.py``).
- Training and measurement: ``python -m idfusion.world.train_faces``, :mod:`idfusion.world.evaluate`.
- Base model (``base.py``, a ``StableDiffusionPipeline`` folder in ``weights/base``): :func:`load_base_pipeline`,
  :func:`evaluate_base`, :func:`frechet_distance`; trained by ``python -m idfusion.world.train_base`` on captions
  that leave out the held-out attribute combinations (:func:`is_heldout`, :func:`sample_heldout_attributes`).
- The offline main job (``demo.py``, ``idfusion demo``): :func:`run_demo`.

Names are imported lazily: ``import idfusion.world`` loads neither torch nor any weights.

>>> from idfusion.world import render, parse_caption
>>> result = render(7, image_seed=0)
>>> parse_caption(result.caption) == result.attributes
True
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Identity": "identity",
    "sample_identity": "identity",
    "identity_name": "identity",
    "identity_seed": "identity",
    "TRAIN_IDENTITIES": "identity",
    "HELDOUT_IDENTITIES": "identity",
    "Attributes": "attributes",
    "ATTRIBUTE_VALUES": "attributes",
    "COLORS": "attributes",
    "PATTERNS": "attributes",
    "HATS": "attributes",
    "GLASSES": "attributes",
    "EXPRESSIONS": "attributes",
    "sample_attributes": "attributes",
    "complete_attributes": "attributes",
    "caption": "attributes",
    "parse_caption": "attributes",
    "is_heldout": "attributes",
    "sample_heldout_attributes": "attributes",
    "Pose": "renderer",
    "Lighting": "renderer",
    "FaceTruth": "renderer",
    "Render": "renderer",
    "render": "renderer",
    "render_scene": "renderer",
    "sample_pose": "renderer",
    "sample_lighting": "renderer",
    "degrade": "renderer",
    "landmarks68_to_5": "renderer",
    "write_dataset": "dataset",
    "WorldDetector": "backends",
    "WorldRecognizer": "backends",
    "weights_dir": "backends",
    "weights_path": "backends",
    "AttributeChecker": "checkers",
    "AttributeReport": "checkers",
    "base_model_dir": "base",
    "load_base_pipeline": "base",
    "evaluate_base": "base",
    "frechet_distance": "base",
    "run_demo": "demo",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
