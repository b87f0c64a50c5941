"""Evaluation: identity, copy-paste, prompt-fidelity and diversity metrics as pure functions of face features.

- :mod:`~idfusion.eval.metrics` — cosine similarity and angles, FlashFace's SimTarget / SimRef / Paste, MultiID-Bench's
  ``copy_geo``, Hungarian matching of faces in multi-person images, diversity across seeds.

Importing this package is cheap (numpy only).
"""
