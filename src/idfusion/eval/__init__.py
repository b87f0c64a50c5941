"""Evaluation: metrics as pure functions of face features, and the benchmark harness behind ``idfusion eval``.

- :mod:`~idfusion.eval.metrics` — cosine similarity and angles, FlashFace's SimTarget / SimRef / Paste, MultiID-Bench's
  ``copy_geo``, Hungarian matching of faces in multi-person images, diversity across seeds, attribute fidelity and
  CLIP-T.
- :mod:`~idfusion.eval.benchmark` — benchmark YAML files (``benchmarks/world.yaml``, ``photos-template.yaml``).
- :mod:`~idfusion.eval.harness` — :func:`~idfusion.eval.harness.run_eval`: generation through :mod:`idfusion.batch`,
  per-image scores (:mod:`~idfusion.eval.scoring`), the report folder (:mod:`~idfusion.eval.report`).

Importing this package is cheap (numpy only).
"""
