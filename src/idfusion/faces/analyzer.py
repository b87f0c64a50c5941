"""FaceAnalyzer: image in, :class:`~idfusion.faces.types.Face` records out.

A detector (boxes, scores, 5 landmarks), an optional recognizer (identity embeddings) and named crops, chosen
independently. dlib is the offline default; the ONNX models users download (SCRFD, ArcFace) are the other choice.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Literal

import cv2
import numpy as np

from ..errors import FaceIndexError, FaceTooSmallError, ImageError, NoFaceError
from ..images import DEFAULT_MAX_PIXELS, ImageInput, load_image
from .align import align_face, arcface_template
from .types import Detection, Face, FaceDetector, FaceRecognizer, split_face_photo

__all__ = ["FaceAnalyzer", "CropFn", "register_crop", "available_crops", "DETECTORS", "RECOGNIZERS"]

logger = logging.getLogger(__name__)

DETECTORS = ("hog", "mmod", "onnx", "world")
RECOGNIZERS = ("dlib", "onnx", "world", "world-judge", "none")

CropFn = Callable[[np.ndarray, Face], np.ndarray]
_CROPS: dict[str, CropFn] = {"arcface": lambda image, face: align_face(image, face.landmarks, size=112)}

Selection = Literal["all", "largest"] | int


def register_crop(name: str, fn: CropFn | None = None):
    """Register a named crop, computed for every face when a FaceAnalyzer asks for it.

    Methods add their reference crops this way (for example FlashFace's rotated, padded 224 crop). ``fn`` takes the
    RGB image and the :class:`Face` and returns an image array. Usable as a decorator.
    """

    def register(fn: CropFn) -> CropFn:
        _CROPS[name] = fn
        return fn

    return register(fn) if fn is not None else register


def available_crops() -> list[str]:
    return sorted(_CROPS)


def _onnx_models(model_dir: str | os.PathLike | None):
    from .onnx_backend import find_onnx_models, resolve_onnx_model_dir

    return find_onnx_models(resolve_onnx_model_dir(model_dir))


def _build_backends(
    detector: str | FaceDetector,
    recognizer: str | FaceRecognizer | None,
    model_dir: str | os.PathLike | None,
    upsample: int | None,
) -> tuple[FaceDetector, FaceRecognizer | None]:
    if isinstance(detector, str) and detector not in DETECTORS:
        raise ValueError(f"detector must be one of {', '.join(DETECTORS)} or a FaceDetector; got {detector!r}")
    if isinstance(recognizer, str) and recognizer not in RECOGNIZERS:
        raise ValueError(f"recognizer must be one of {', '.join(RECOGNIZERS)} or a FaceRecognizer; got {recognizer!r}")
    # The ONNX folder is read once even when both roles come from it (real recognizers are ~250 MB files).
    onnx_paths = _onnx_models(model_dir) if "onnx" in (detector, recognizer) else None

    if detector in ("hog", "mmod"):
        from .dlib_backend import DlibDetector

        detector = DlibDetector(detector, upsample=upsample)
    elif detector == "onnx":
        from .onnx_backend import SCRFDDetector
        from .stand_in import StandInDetector, is_stand_in

        # The tiny kit's random SCRFD would "find" a face anywhere: real detectors stand in for it.
        detector = StandInDetector() if is_stand_in(onnx_paths[0]) else SCRFDDetector(onnx_paths[0])
    elif detector == "world":
        from ..world.backends import WorldDetector

        detector = WorldDetector()

    if recognizer is None or recognizer == "none":
        recognizer = None
    elif recognizer == "dlib":
        from .dlib_backend import DlibRecognizer

        recognizer = DlibRecognizer()
    elif recognizer == "onnx":
        from .onnx_backend import ArcFaceRecognizer

        recognizer = ArcFaceRecognizer(onnx_paths[1])
    elif recognizer in ("world", "world-judge"):
        from ..world.backends import WorldRecognizer

        recognizer = WorldRecognizer(recognizer)
    return detector, recognizer


class FaceAnalyzer:
    """Detect, landmark, embed and crop faces.

    Args:
        detector (`str` or `FaceDetector`, defaults to `"hog"`): ``"hog"`` or ``"mmod"`` (dlib, offline),
            ``"onnx"`` (an SCRFD model from ``model_dir``), ``"world"`` (the synthetic world's detector, shipped),
            or any object with a ``detect`` method.
        recognizer (`str`, `FaceRecognizer` or `None`, defaults to `"dlib"`): ``"dlib"`` (128-d ResNet, offline),
            ``"onnx"`` (an ArcFace model from ``model_dir``, 512-d), ``"world"`` / ``"world-judge"`` (the synthetic
            world's conditioning and scoring recognizers, 512-d, shipped), ``"none"``/``None`` for no embeddings.
        model_dir (`str`, *optional*): folder of ONNX face models (for example insightface's ``antelopev2`` with
            Arc2Face's ``arcface.onnx``). When omitted, ``$IDFUSION_FACE_MODELS``,
            ``~/.cache/idfusion/models/antelopev2`` and ``~/.insightface/models/antelopev2`` are searched.
        min_face_size (`int`, *optional*): faces whose box is narrower or shorter than this many pixels are
            dropped; if that drops every face, :class:`FaceTooSmallError` is raised. Defaults to the detector's
            ``min_face_size`` attribute if it has one (the world detector's is 8: its faces are 12-60 px), else 32.
        dense_landmarks (`bool`, defaults to `False`): also return dlib's 68 landmarks.
        crops (`Sequence[str]`, defaults to `("arcface",)`): named crops to compute (see :func:`register_crop`).
        max_pixels (`int`, *optional*): refuse larger images (decompression-bomb guard).
        upsample (`int`, *optional*): dlib detector upsampling; ``None`` chooses by image size.
    """

    def __init__(
        self,
        detector: str | FaceDetector = "hog",
        recognizer: str | FaceRecognizer | None = "dlib",
        *,
        model_dir: str | os.PathLike | None = None,
        min_face_size: int | None = None,
        dense_landmarks: bool = False,
        crops: Sequence[str] = ("arcface",),
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        upsample: int | None = None,
    ) -> None:
        unknown = [c for c in crops if c not in _CROPS]
        if unknown:
            raise ValueError(f"unknown crop(s) {unknown}; available: {available_crops()}")
        if min_face_size is not None and min_face_size < 0:
            raise ValueError(f"min_face_size must be >= 0, got {min_face_size}")
        self.detector, self.recognizer = _build_backends(detector, recognizer, model_dir, upsample)
        if min_face_size is None:
            min_face_size = int(getattr(self.detector, "min_face_size", 32))
        self.min_face_size = min_face_size
        self.dense_landmarks = dense_landmarks
        self.crops = tuple(crops)
        self.max_pixels = max_pixels
        self._landmarker = None

    def __repr__(self) -> str:
        recognizer = self.recognizer.name if self.recognizer else None
        return f"FaceAnalyzer(detector={self.detector.name!r}, recognizer={recognizer!r})"

    @property
    def embedding_model(self) -> str | None:
        return self.recognizer.name if self.recognizer else None

    @property
    def embedding_dim(self) -> int | None:
        return self.recognizer.dim if self.recognizer else None

    def _dlib_landmarks(self, image: np.ndarray, box: np.ndarray) -> np.ndarray:
        if self._landmarker is None:
            from .dlib_backend import DlibLandmarker

            self._landmarker = DlibLandmarker()
        return self._landmarker(image, box)

    def _detect(self, image: np.ndarray) -> list[Detection]:
        detections = self.detector.detect(image)
        if detections:
            return detections
        # Tightly cropped faces (an aligned 112 crop, a passport photo) often fail detection because the detector
        # never sees the face outline against background; a border fixes most of them.
        pad = max(image.shape[:2]) // 4
        padded = cv2.copyMakeBorder(image, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=(0, 0, 0))
        detections = self.detector.detect(padded)
        for det in detections:
            det.bbox = det.bbox - pad
            if det.landmarks is not None:
                det.landmarks = det.landmarks - pad
            if det.dense_landmarks is not None:
                det.dense_landmarks = det.dense_landmarks - pad
        if detections:
            logger.debug("found %d face(s) only after padding the image by %d px", len(detections), pad)
        return detections

    def _aligned_face(self, image: np.ndarray, name: str) -> Face:
        height, width = image.shape[:2]
        if height != width:
            raise ImageError(name, f"an aligned face crop must be square, got {width}x{height}")
        return Face(
            bbox=np.array([0, 0, width, height], dtype=np.float32),
            det_score=1.0,
            landmarks=arcface_template(width).astype(np.float32),
            detector="aligned-input",
            source=name,
        )

    def analyze(
        self,
        image: ImageInput,
        *,
        select: Selection = "all",
        aligned: bool = False,
        name: str | None = None,
    ) -> list[Face]:
        """Analyse one image.

        Args:
            image: a path, encoded bytes, a PIL image or an RGB array.
            select: ``"all"`` faces (ordered left to right), the ``"largest"`` by true box area, or the face at an
                index counted from the left (negative indices count from the right).
            aligned: the image is already an ArcFace-aligned square crop (for example 112x112): skip detection and
                use the template landmarks.
            name: a name for messages, defaults to the file path.

        Returns:
            The selected faces (a list of one unless ``select="all"``).

        Raises:
            ImageError: the image cannot be read or used.
            NoFaceError: no face was detected.
            FaceTooSmallError: faces were found, but none reaches ``min_face_size``.
            FaceIndexError: ``select`` is an index the image does not have.
        """
        loaded = load_image(image, max_pixels=self.max_pixels, name=name)
        pixels, source = loaded.array, loaded.name

        if aligned:
            faces = [self._aligned_face(pixels, source)]
        else:
            detections = self._detect(pixels)
            if not detections:
                raise NoFaceError(source, f"no face found by the {self.detector.name} detector")
            faces = [
                Face(
                    bbox=np.asarray(d.bbox, dtype=np.float32),
                    det_score=float(d.score),
                    landmarks=d.landmarks,
                    detector=self.detector.name,
                    dense_landmarks=d.dense_landmarks,
                    source=source,
                )
                for d in detections
            ]
            large = [f for f in faces if f.size >= self.min_face_size]
            if not large:
                biggest = max(faces, key=lambda f: f.area)
                raise FaceTooSmallError(
                    source,
                    f"{len(faces)} face(s) found by {self.detector.name}, the largest is "
                    f"{biggest.width:.0f}x{biggest.height:.0f} px; the minimum face size is {self.min_face_size} px",
                )
            faces = sorted(large, key=lambda f: (f.bbox[0] + f.bbox[2]) / 2)

        faces = self._select(faces, select, source)
        self._complete(pixels, faces)
        return faces

    def get(
        self, image: ImageInput, *, index: int | None = None, aligned: bool = False, name: str | None = None
    ) -> Face:
        """The one face a method should use: the largest, or the ``index``-th from the left (also given by a
        :class:`~idfusion.faces.types.FacePhoto`). With several faces and no index, a warning says which one was
        used and how to choose another."""
        image, chosen_index = split_face_photo(image)
        index = chosen_index if index is None else index
        if index is not None:
            return self.analyze(image, select=index, aligned=aligned, name=name)[0]
        faces = self.analyze(image, select="all", aligned=aligned, name=name)
        position = max(range(len(faces)), key=lambda i: faces[i].area)
        chosen = faces[position]
        if len(faces) > 1:
            x0, y0, x1, y1 = (int(round(float(v))) for v in chosen.bbox)
            logger.warning(
                "%s: %d faces found; using the largest, face %d from the left (box %d,%d-%d,%d); choose another "
                "with --face-index (FacePhoto in the API)",
                chosen.source or name or "photo", len(faces), position, x0, y0, x1, y1,
            )  # fmt: skip
        return chosen

    @staticmethod
    def _select(faces: list[Face], select: Selection, source: str) -> list[Face]:
        if select == "all":
            return faces
        if select == "largest":
            return [max(faces, key=lambda f: f.area)]
        if isinstance(select, (int, np.integer)) and not isinstance(select, bool):
            if not -len(faces) <= select < len(faces):
                raise FaceIndexError(
                    source, f"face index {select} requested, but the image has {len(faces)} face(s) (0 is leftmost)"
                )
            return [faces[select]]
        raise ValueError(f"select must be 'all', 'largest' or an integer index, got {select!r}")

    def _complete(self, image: np.ndarray, faces: list[Face]) -> None:
        """Fill landmarks the detector did not give, embeddings and crops, in place."""
        for face in faces:
            if face.landmarks is None or (self.dense_landmarks and face.dense_landmarks is None):
                from .dlib_backend import landmarks68_to_arcface5

                points68 = self._dlib_landmarks(image, face.bbox)
                if face.landmarks is None:
                    face.landmarks = landmarks68_to_arcface5(points68)
                face.dense_landmarks = points68
            if not self.dense_landmarks:
                face.dense_landmarks = None
            face.landmarks = np.asarray(face.landmarks, dtype=np.float32)
        if self.recognizer is not None and faces:
            embeddings = self.recognizer.embed(
                image, np.stack([f.landmarks for f in faces]), np.stack([f.bbox for f in faces])
            )
            for face, embedding in zip(faces, embeddings, strict=True):
                face.embedding = np.asarray(embedding, dtype=np.float32)
                face.embedding_model = self.recognizer.name
        for face in faces:
            face.crops = {crop: _CROPS[crop](image, face) for crop in self.crops}
