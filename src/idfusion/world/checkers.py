"""Attribute checkers: which prompt-controlled attributes an image shows.

One small trained network (:class:`~idfusion.world.nets.AttributeNet`) reads three crops: the whole image
(background colour and pattern), a context square around each face (hat colour, shirt colour) and the aligned face
(glasses, expression). It was trained on renders of training identities, half of them blurred, noised and
JPEG-compressed, so it also reads imperfect generated images. Faces come from the world detector unless given.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .attributes import ATTRIBUTE_VALUES, Attributes, parse_caption
from .crops import attribute_face_crop, context_crop, scene_input

__all__ = ["AttributeChecker", "AttributeReport", "SCENE_ATTRIBUTES", "PERSON_ATTRIBUTES"]

SCENE_ATTRIBUTES = ("background", "pattern")
PERSON_ATTRIBUTES = ("hat", "glasses", "clothing", "expression")


@dataclass
class AttributeReport:
    """What the checker sees in one image.

    Attributes:
        attributes: the predicted attributes; person fields are the majority over faces (``None`` without faces)
            and ``people`` is the number of faces (``None`` outside 1..3).
        faces: per-face predictions (person fields), left to right.
        boxes: the faces' ``(4,)`` boxes, in the same order.
        probabilities: per attribute, the class probabilities (person fields averaged over faces), in the order of
            :data:`~idfusion.world.attributes.ATTRIBUTE_VALUES`.
    """

    attributes: Attributes
    faces: list[dict[str, str]] = field(default_factory=list)
    boxes: list[np.ndarray] = field(default_factory=list)
    probabilities: dict[str, np.ndarray] = field(default_factory=dict)


class AttributeChecker:
    """Predict background, pattern, hat, glasses, clothing and expression from an image.

    Args:
        weights (`str`, *optional*): an ``attributes.safetensors``; defaults to the shipped file.
        detector (*optional*): a face detector with ``detect(image)``, used when faces are not passed; defaults to
            :class:`~idfusion.world.backends.WorldDetector`.
    """

    def __init__(self, weights: str | os.PathLike | None = None, detector=None) -> None:
        from .backends import _net, weights_path

        path = Path(weights) if weights is not None else weights_path("attributes")
        self._net, _ = _net(path)
        self._detector = detector

    @property
    def detector(self):
        if self._detector is None:
            from .backends import WorldDetector

            self._detector = WorldDetector()
        return self._detector

    def predict_batch(self, images: list[np.ndarray], faces: list[list] | None = None) -> list[AttributeReport]:
        """:meth:`predict` for several images; ``faces[i]`` are objects with ``bbox`` and ``landmarks``."""
        import torch

        from .backends import _to_tensor

        images = [np.asarray(image, dtype=np.uint8) for image in images]
        if faces is None:
            faces = self.detector.detect_batch(images) if hasattr(self.detector, "detect_batch") else None
            faces = faces or [self.detector.detect(image) for image in images]
        faces = [sorted(f, key=lambda face: float(face.bbox[0] + face.bbox[2])) for f in faces]
        owners = [n for n, image_faces in enumerate(faces) for _ in image_faces]
        flat = [face for image_faces in faces for face in image_faces]
        scenes = np.stack([scene_input(image) for image in images])
        if flat:
            contexts = np.stack([context_crop(images[n], face.bbox) for n, face in zip(owners, flat, strict=True)])
            crops = np.stack(
                [attribute_face_crop(images[n], face.landmarks) for n, face in zip(owners, flat, strict=True)]
            )
        with torch.no_grad():
            scene_logits = self._net(scene=_to_tensor(scenes))
            person_logits = self._net(context=_to_tensor(contexts), face=_to_tensor(crops)) if flat else {}
        scene_probs = {k: torch.softmax(v, -1).numpy() for k, v in scene_logits.items()}
        person_probs = {k: torch.softmax(v, -1).numpy() for k, v in person_logits.items()}

        reports = []
        for n in range(len(images)):
            indices = [k for k, owner in enumerate(owners) if owner == n]
            per_face = [
                {name: ATTRIBUTE_VALUES[name][int(person_probs[name][k].argmax())] for name in PERSON_ATTRIBUTES}
                for k in indices
            ]
            probabilities = {name: scene_probs[name][n] for name in SCENE_ATTRIBUTES}
            values: dict[str, str | int | None] = {
                name: ATTRIBUTE_VALUES[name][int(scene_probs[name][n].argmax())] for name in SCENE_ATTRIBUTES
            }
            for name in PERSON_ATTRIBUTES:
                if indices:
                    probabilities[name] = person_probs[name][indices].mean(0)
                    votes = Counter(face[name] for face in per_face).most_common()
                    # Ties go to the value with the higher mean probability.
                    best = max(votes, key=lambda v: (v[1], probabilities[name][ATTRIBUTE_VALUES[name].index(v[0])]))
                    values[name] = best[0]
                else:
                    values[name] = None
            values["people"] = len(indices) if 1 <= len(indices) <= 3 else None
            boxes = [np.asarray(flat[k].bbox, dtype=np.float32) for k in indices]
            reports.append(AttributeReport(Attributes(**values), per_face, boxes, probabilities))
        return reports

    def predict(self, image: np.ndarray, faces: list | None = None) -> AttributeReport:
        """The attributes an RGB ``uint8`` image shows.

        Args:
            image: ``(H, W, 3)`` uint8 RGB.
            faces: faces (objects with ``bbox`` and ``landmarks``: :class:`~idfusion.faces.types.Face`,
                ``Detection`` or a render's ``FaceTruth``); detected when omitted.
        """
        return self.predict_batch([image], None if faces is None else [faces])[0]

    def check(self, image: np.ndarray, wanted: Attributes | str, faces: list | None = None) -> dict[str, bool]:
        """For each attribute ``wanted`` specifies (a prompt is parsed with ``parse_caption``), whether it shows.

        Returns:
            Field name -> ``True`` when the prediction matches; ``people`` compares the number of detected faces.
        """
        if isinstance(wanted, str):
            wanted = parse_caption(wanted)
        predicted = self.predict(image, faces).attributes
        return {name: getattr(predicted, name) == value for name, value in wanted.specified().items()}
