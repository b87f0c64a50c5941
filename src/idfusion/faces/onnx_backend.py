"""onnxruntime backends for the ONNX face models users download (insightface model packs, Arc2Face's recognizer).

- Detector: SCRFD (antelopev2 ``scrfd_10g_bnkps.onnx``, buffalo_l ``det_10g.onnx``), anchor-free distances per
  feature-map cell, decoded here in numpy.
- Recognizer: ArcFace-family ResNets (Arc2Face's ``arcface.onnx``, antelopev2 ``glintr100.onnx``, buffalo_l
  ``w600k_r50.onnx``) on the 112x112 ArcFace-aligned crop.

The insightface package is not used; pre- and post-processing are implemented here. onnxruntime and onnx are
imported lazily, so importing this module costs nothing.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from ..errors import ModelFilesError
from ..paths import cache_root
from .align import align_face
from .types import Detection

__all__ = [
    "anchor_centers",
    "distance2bbox",
    "distance2kps",
    "nms",
    "letterbox",
    "SCRFDDetector",
    "ArcFaceRecognizer",
    "find_onnx_models",
    "default_onnx_model_dirs",
    "resolve_onnx_model_dir",
    "FACE_MODELS_ENV",
]

logger = logging.getLogger(__name__)

FACE_MODELS_ENV = "IDFUSION_FACE_MODELS"

# Output count -> (strides, has keypoints). Outputs come grouped: all scores, then all boxes, then all keypoints.
_SCRFD_LAYOUTS: dict[int, tuple[tuple[int, ...], bool]] = {
    6: ((8, 16, 32), False),
    9: ((8, 16, 32), True),
    10: ((8, 16, 32, 64, 128), False),
    15: ((8, 16, 32, 64, 128), True),
}
_PREFERRED_DETECTORS = ("scrfd_10g_bnkps.onnx", "det_10g.onnx")
_PREFERRED_RECOGNIZER = "arcface.onnx"
_EXPECTED_FILES = (
    "scrfd_10g_bnkps.onnx and arcface.onnx, as in the antelopev2 pack "
    "(arcface.onnx is Arc2Face's WebFace42M recognizer from the Hugging Face repo FoivosPar/Arc2Face)"
)


# ----------------------------------------------------------------------------------------------------------------
# Pure helpers
# ----------------------------------------------------------------------------------------------------------------


def anchor_centers(height: int, width: int, stride: int, num_anchors: int) -> np.ndarray:
    """Anchor centres of one SCRFD feature map.

    Args:
        height: feature-map rows.
        width: feature-map columns.
        stride: pixels per feature-map cell.
        num_anchors: anchors per cell.

    Returns:
        ``(height * width * num_anchors, 2)`` float32 ``(x, y)`` = ``(col * stride, row * stride)``, row-major over
        the map, each centre repeated ``num_anchors`` times in a row (the order of the model's output rows).
    """
    rows, cols = np.mgrid[:height, :width]  # (height, width) each
    centers = np.stack([cols, rows], axis=-1).reshape(-1, 2).astype(np.float32) * stride  # (height*width, 2)
    if num_anchors > 1:
        centers = np.repeat(centers, num_anchors, axis=0)  # (height*width*num_anchors, 2)
    return centers


def distance2bbox(points: np.ndarray, distances: np.ndarray) -> np.ndarray:
    """Boxes from centres and (left, top, right, bottom) distances.

    Args:
        points: ``(N, 2)`` centres ``(cx, cy)``.
        distances: ``(N, 4)`` distances ``(d0, d1, d2, d3)`` in pixels.

    Returns:
        ``(N, 4)`` ``(cx - d0, cy - d1, cx + d2, cy + d3)``.
    """
    points = np.asarray(points)
    distances = np.asarray(distances)
    return np.stack(
        [
            points[:, 0] - distances[:, 0],
            points[:, 1] - distances[:, 1],
            points[:, 0] + distances[:, 2],
            points[:, 1] + distances[:, 3],
        ],
        axis=-1,
    )


def distance2kps(points: np.ndarray, distances: np.ndarray) -> np.ndarray:
    """Keypoints from centres and per-point offsets.

    Args:
        points: ``(N, 2)`` centres ``(cx, cy)``.
        distances: ``(N, 2K)`` offsets ``(dx0, dy0, dx1, dy1, ...)`` in pixels.

    Returns:
        ``(N, K, 2)`` points ``(cx + dx_i, cy + dy_i)``.
    """
    points = np.asarray(points)
    distances = np.asarray(distances)
    offsets = distances.reshape(distances.shape[0], distances.shape[1] // 2, 2)  # (N, 2K) -> (N, K, 2)
    return points[:, None, :] + offsets


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression.

    IoU uses the continuous-coordinate convention, area ``(x2 - x1) * (y2 - y1)``, not insightface's
    ``+1`` pixel convention: our boxes are float coordinates, and ``+1`` would inflate small boxes' overlap.

    Args:
        boxes: ``(N, 4)`` ``x1, y1, x2, y2``.
        scores: ``(N,)``.
        iou_threshold: a box is dropped when its IoU with an already kept, higher-scoring box exceeds this.

    Returns:
        ``(K,)`` int64 indices of the kept boxes, highest score first.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    x1, y1, x2, y2 = boxes.T
    areas = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    order = np.argsort(-scores, kind="stable")  # ties keep input order, so the result is deterministic
    keep: list[int] = []
    while order.size > 0:
        best, rest = order[0], order[1:]
        keep.append(int(best))
        inter_w = np.clip(np.minimum(x2[best], x2[rest]) - np.maximum(x1[best], x1[rest]), 0, None)
        inter_h = np.clip(np.minimum(y2[best], y2[rest]) - np.maximum(y1[best], y1[rest]), 0, None)
        inter = inter_w * inter_h
        union = areas[best] + areas[rest] - inter
        iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        order = rest[iou <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


def letterbox(image: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, float]:
    """Resize into a fixed canvas keeping the aspect ratio, SCRFD's preprocessing.

    The image is scaled to touch the canvas' limiting side, pasted at the top-left of a black canvas (so detector
    coordinates only need dividing by the scale), and normalised as ``(pixel - 127.5) / 128``.

    Args:
        image: ``(H, W, 3)`` uint8 RGB (kept in RGB order: the real models expect RGB).
        size: canvas ``(width, height)``.

    Returns:
        ``(1, 3, height, width)`` float32 blob and ``scale`` = resized height / ``H``.
    """
    target_w, target_h = int(size[0]), int(size[1])
    image_h, image_w = image.shape[:2]
    if image_h / image_w > target_h / target_w:
        new_h = target_h
        new_w = int(new_h / (image_h / image_w))
    else:
        new_w = target_w
        new_h = int(new_w * (image_h / image_w))
    new_w, new_h = max(new_w, 1), max(new_h, 1)
    canvas = np.zeros((target_h, target_w, 3), dtype=np.uint8)
    canvas[:new_h, :new_w] = cv2.resize(image, (new_w, new_h))
    blob = (canvas.astype(np.float32) - 127.5) / 128.0
    blob = np.ascontiguousarray(blob.transpose(2, 0, 1)[None])  # (H, W, 3) -> (1, 3, H, W)
    return blob, new_h / image_h


# ----------------------------------------------------------------------------------------------------------------
# Model files
# ----------------------------------------------------------------------------------------------------------------


def _check_file(path: str | Path, role: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelFilesError(f"{role} model file not found: {path}")
    return path


def _default_providers(ort) -> list[str]:
    # CUDA when this onnxruntime build has it; TensorRT is left out on purpose (slow engine builds on first use).
    available = ort.get_available_providers()
    preferred = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    return preferred or list(available)


def _open_session(path: Path, providers: Sequence[str] | None, role: str):
    try:
        import onnxruntime as ort
    except ImportError as error:  # pragma: no cover - onnxruntime is a core dependency
        raise ImportError("the ONNX face backend needs onnxruntime: pip install onnxruntime") from error
    options = ort.SessionOptions()
    options.log_severity_level = 3  # onnxruntime's own warnings (e.g. unused initializers) are noise to users
    try:
        session = ort.InferenceSession(
            str(path), sess_options=options, providers=list(providers or _default_providers(ort))
        )
    except Exception as error:  # onnxruntime raises its own untyped errors for bad files
        raise ModelFilesError(f"{path}: cannot load this {role} model with onnxruntime ({error})") from error
    return session


def _static(dim) -> int | None:
    """A fixed dimension as int; ``None`` for symbolic/unknown ones (``'?'``, ``'batch'``, ``None``, ``0``)."""
    return int(dim) if isinstance(dim, (int, np.integer)) and int(dim) > 0 else None


# ----------------------------------------------------------------------------------------------------------------
# Detector
# ----------------------------------------------------------------------------------------------------------------


class SCRFDDetector:
    """SCRFD face detector (insightface's ``scrfd_*.onnx`` / ``det_*.onnx``) run with onnxruntime.

    Args:
        model_path: the ``.onnx`` file.
        det_size: canvas ``(width, height)`` the image is letterboxed into, used when the model's input size is
            dynamic (a fixed input size in the model wins). Must be multiples of the largest stride.
        score_threshold: keep anchors scoring at least this (scores are probabilities).
        iou_threshold: NMS overlap threshold.
        providers: onnxruntime execution providers; default CUDA if available, then CPU.

    Raises:
        ModelFilesError: the file is missing, unreadable, or not an SCRFD-style detector.
    """

    def __init__(
        self,
        model_path: str | Path,
        *,
        det_size: tuple[int, int] = (640, 640),
        score_threshold: float = 0.5,
        iou_threshold: float = 0.4,
        providers: Sequence[str] | None = None,
    ):
        self.model_path = _check_file(model_path, "face detector")
        self.name = "onnx:" + self.model_path.stem
        self.score_threshold = float(score_threshold)
        self.iou_threshold = float(iou_threshold)
        self._session = _open_session(self.model_path, providers, "face detector")

        inputs, outputs = self._session.get_inputs(), self._session.get_outputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4 or len(outputs) not in _SCRFD_LAYOUTS:
            raise ModelFilesError(
                f"{self.model_path}: not an SCRFD-style face detector: expected one 4-D image input and 6, 9, 10 or "
                f"15 outputs, got {len(inputs)} input(s) of shape(s) {[i.shape for i in inputs]} and "
                f"{len(outputs)} outputs"
            )
        self._input_name = inputs[0].name
        self._output_names = [o.name for o in outputs]
        self.strides, self.has_keypoints = _SCRFD_LAYOUTS[len(outputs)]
        self.num_anchors = 2 if len(self.strides) == 3 else 1

        fixed_h, fixed_w = _static(inputs[0].shape[2]), _static(inputs[0].shape[3])
        if fixed_h is not None and fixed_w is not None:
            self.input_size = (fixed_w, fixed_h)
        else:
            self.input_size = (int(det_size[0]), int(det_size[1]))
            step = max(self.strides)
            if self.input_size[0] % step or self.input_size[1] % step or min(self.input_size) <= 0:
                raise ValueError(f"det_size must be positive multiples of {step}, got {det_size}")
        self._centers: dict[tuple[int, int, int], np.ndarray] = {}
        logger.debug(
            "loaded %s: strides %s, keypoints %s, input %s, providers %s",
            self.model_path,
            self.strides,
            self.has_keypoints,
            self.input_size,
            self._session.get_providers(),
        )

    def _anchor_centers(self, height: int, width: int, stride: int) -> np.ndarray:
        key = (height, width, stride)
        if key not in self._centers:
            self._centers[key] = anchor_centers(height, width, stride, self.num_anchors)
        return self._centers[key]

    def detect(self, image: np.ndarray) -> list[Detection]:
        """Detect faces.

        Args:
            image: ``(H, W, 3)`` uint8 RGB.

        Returns:
            Detections sorted by score, highest first, with ``(5, 2)`` ArcFace-order landmarks (SCRFD's keypoint
            order is the ArcFace order), or ``landmarks=None`` for models without keypoints.
        """
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) RGB image, got shape {image.shape}")
        blob, scale = letterbox(image, self.input_size)
        outputs = self._session.run(self._output_names, {self._input_name: blob})
        boxes, scores, kps = self._decode(outputs, blob.shape[2], blob.shape[3])
        if scores.size == 0:
            return []
        boxes /= scale
        keep = nms(boxes, scores, self.iou_threshold)
        detections = []
        for i in keep:
            landmarks = kps[i].astype(np.float32) / scale if kps is not None else None
            detections.append(Detection(bbox=boxes[i].astype(np.float32), score=float(scores[i]), landmarks=landmarks))
        return detections

    def _decode(
        self, outputs: list[np.ndarray], input_h: int, input_w: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Thresholded boxes ``(M, 4)``, scores ``(M,)`` and keypoints ``(M, 5, 2)`` in canvas pixels."""
        num_levels = len(self.strides)
        all_boxes, all_scores, all_kps = [], [], []
        for level, stride in enumerate(self.strides):
            # Batched exports give (1, N, C), unbatched ones (N, C); flatten both to (N, C).
            scores = np.asarray(outputs[level]).reshape(-1)  # (N,)
            distances = np.asarray(outputs[level + num_levels]).reshape(-1, 4) * stride  # (N, 4)
            height, width = input_h // stride, input_w // stride
            centers = self._anchor_centers(height, width, stride)
            if scores.shape[0] != centers.shape[0] or distances.shape[0] != centers.shape[0]:
                raise ModelFilesError(
                    f"{self.model_path}: stride-{stride} outputs have {scores.shape[0]} scores and "
                    f"{distances.shape[0]} boxes, expected {centers.shape[0]} ({height}x{width} cells x "
                    f"{self.num_anchors} anchors) for a {input_w}x{input_h} input; not an SCRFD layout"
                )
            selected = np.flatnonzero(scores >= self.score_threshold)
            all_scores.append(scores[selected])
            all_boxes.append(distance2bbox(centers[selected], distances[selected]))
            if self.has_keypoints:
                kps = np.asarray(outputs[level + 2 * num_levels]).reshape(scores.shape[0], -1) * stride  # (N, 10)
                all_kps.append(distance2kps(centers[selected], kps[selected]))
        scores = np.concatenate(all_scores).astype(np.float32)
        boxes = np.concatenate(all_boxes).astype(np.float32)
        kps = np.concatenate(all_kps).astype(np.float32) if self.has_keypoints else None
        return boxes, scores, kps


# ----------------------------------------------------------------------------------------------------------------
# Recognizer
# ----------------------------------------------------------------------------------------------------------------


def _load_graph(path: Path):
    import onnx

    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as error:  # protobuf decode errors are untyped
        raise ModelFilesError(f"{path}: not a readable ONNX model ({error})") from error


def _normalises_in_graph(model) -> bool:
    """Whether the graph normalises pixels itself: a ``Sub`` and a ``Mul``/``Div`` chained on the image input.

    Some ArcFace exports (typically MXNet conversions) take raw 0-255 pixels and start with
    ``(x - 127.5) * 0.0078125``; others expect ``(pixel - 127.5) / 127.5`` input. Only the first 8 nodes are
    looked at. Node names differ between converters (``_minusscalar0``, ``Sub_0``, ``node_sub``), so op types are
    checked, and the ops must consume the image input (not shape arithmetic that PyTorch exports put up front).
    """
    graph = model.graph
    weights = {init.name for init in graph.initializer}
    fed = {v.name for v in graph.input if v.name not in weights}  # tensors derived from the image so far
    seen: set[str] = set()
    for node in graph.node[:8]:
        if node.op_type in ("Sub", "Mul", "Div") and fed.intersection(node.input):
            seen.add("Sub" if node.op_type == "Sub" else "Scale")
            fed.update(node.output)
            if len(seen) == 2:
                return True
    return False


class ArcFaceRecognizer:
    """ArcFace-family recognizer (``arcface.onnx``, ``glintr100.onnx``, ``w600k_r50.onnx``) run with onnxruntime.

    Faces are aligned to the ArcFace template with :func:`~idfusion.faces.align.align_face` and fed as RGB.

    Args:
        model_path: the ``.onnx`` file.
        providers: onnxruntime execution providers; default CUDA if available, then CPU.

    Attributes:
        dim: embedding size, read from the model.
        input_size: side of the square aligned crop (112 for every known model).
        input_mean, input_std: pixel normalisation, ``(0, 1)`` when the graph normalises itself, else
            ``(127.5, 127.5)``.

    Raises:
        ModelFilesError: the file is missing, unreadable, or not an ArcFace-style recognizer.
    """

    def __init__(self, model_path: str | Path, *, providers: Sequence[str] | None = None):
        self.model_path = _check_file(model_path, "face recognizer")
        self.name = "onnx:" + self.model_path.stem
        in_graph = _normalises_in_graph(_load_graph(self.model_path))
        self.input_mean, self.input_std = (0.0, 1.0) if in_graph else (127.5, 127.5)
        self._session = _open_session(self.model_path, providers, "face recognizer")

        inputs, outputs = self._session.get_inputs(), self._session.get_outputs()
        shape = inputs[0].shape if len(inputs) == 1 else []
        size = _static(shape[2]) if len(shape) == 4 else None
        if (
            len(inputs) != 1
            or len(shape) != 4
            or _static(shape[1]) != 3
            or size is None
            or _static(shape[3]) != size
            or len(outputs) != 1
            or len(outputs[0].shape) != 2
        ):
            raise ModelFilesError(
                f"{self.model_path}: not an ArcFace-style face recognizer: expected one (N, 3, S, S) input and one "
                f"(N, D) output, got inputs {[i.shape for i in inputs]} and outputs {[o.shape for o in outputs]}"
            )
        self.input_size = size
        self._input_name = inputs[0].name
        self._output_name = outputs[0].name
        self._dynamic_batch = _static(shape[0]) is None
        dim = _static(outputs[0].shape[1])
        if dim is None:  # symbolic embedding size: ask the model once
            dim = int(self._run(np.zeros((1, 3, size, size), dtype=np.float32)).shape[1])
        self.dim = dim
        logger.debug(
            "loaded %s: %dx%d input, dim %d, mean/std %s/%s, dynamic batch %s",
            self.model_path,
            size,
            size,
            dim,
            self.input_mean,
            self.input_std,
            self._dynamic_batch,
        )

    def _run(self, blob: np.ndarray) -> np.ndarray:
        if self._dynamic_batch:
            return np.asarray(self._session.run([self._output_name], {self._input_name: blob})[0])
        # Fixed batch dimension (1): one face per call.
        parts = [
            self._session.run([self._output_name], {self._input_name: blob[i : i + 1]})[0] for i in range(len(blob))
        ]
        return np.concatenate(parts, axis=0)

    def preprocess(self, image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        """Aligned, normalised ``(N, 3, S, S)`` float32 batch for ``(N, 5, 2)`` landmarks in an RGB image."""
        landmarks = np.asarray(landmarks, dtype=np.float32).reshape(-1, 5, 2)  # (5, 2) is accepted as N = 1
        crops = [align_face(image, lm, size=self.input_size) for lm in landmarks]  # each (S, S, 3) RGB
        if not crops:
            return np.zeros((0, 3, self.input_size, self.input_size), dtype=np.float32)
        batch = (np.stack(crops).astype(np.float32) - self.input_mean) / self.input_std  # (N, S, S, 3)
        return np.ascontiguousarray(batch.transpose(0, 3, 1, 2))  # (N, S, S, 3) -> (N, 3, S, S)

    def embed(self, image: np.ndarray, landmarks: np.ndarray, boxes: np.ndarray | None = None) -> np.ndarray:
        """Embed faces.

        Args:
            image: ``(H, W, 3)`` uint8 RGB.
            landmarks: ``(N, 5, 2)`` ArcFace-order landmarks.
            boxes: unused (ArcFace aligns from the landmarks alone); accepted for the recognizer protocol.

        Returns:
            ``(N, dim)`` float32 embeddings, not normalised.
        """
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) RGB image, got shape {image.shape}")
        blob = self.preprocess(image, landmarks)
        if len(blob) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self._run(blob).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# Finding the model files
# ----------------------------------------------------------------------------------------------------------------


def _value_shape(value) -> list[int | str]:
    dims = value.type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]


def _classify(path: Path) -> str:
    """``"detector"``, ``"recognizer"`` or ``"other"`` from the graph's inputs and outputs alone."""
    model = _load_graph(path)
    graph = model.graph
    # Old exports (MXNet) also list every weight as a graph input; only the others are fed.
    weights = {init.name for init in graph.initializer}
    inputs = [_value_shape(v) for v in graph.input if v.name not in weights]
    outputs = [_value_shape(v) for v in graph.output]
    if len(inputs) != 1 or len(inputs[0]) != 4:
        return "other"
    if len(outputs) in _SCRFD_LAYOUTS:
        return "detector"
    _, channels, height, width = inputs[0]
    if len(outputs) == 1 and len(outputs[0]) == 2 and channels == 3 and height == 112 and width == 112:
        return "recognizer"
    return "other"  # landmark (192x192) and gender/age (96x96) models


def find_onnx_models(model_dir: str | Path) -> tuple[Path, Path]:
    """Pick the detector and the recognizer among the ``*.onnx`` files of a folder, by their signatures.

    A detector has one 4-D input and 6, 9, 10 or 15 outputs (SCRFD); a recognizer has one ``(N, 3, 112, 112)``
    input and one 2-D output. Landmark and gender/age models are ignored. Among several recognizers
    ``arcface.onnx`` (Arc2Face's) is preferred; among several detectors ``scrfd_10g_bnkps.onnx``/``det_10g.onnx``.

    Args:
        model_dir: folder such as ``~/.insightface/models/antelopev2``.

    Returns:
        ``(detector_path, recognizer_path)``.

    Raises:
        ModelFilesError: the folder is missing, or lacks a detector or a recognizer.
    """
    model_dir = Path(model_dir).expanduser()
    if not model_dir.is_dir():
        raise ModelFilesError(f"face model folder not found: {model_dir}; it should hold {_EXPECTED_FILES}")
    found: dict[str, list[Path]] = {"detector": [], "recognizer": [], "other": []}
    for path in sorted(model_dir.glob("*.onnx")):
        try:
            role = _classify(path)
        except ModelFilesError as error:
            logger.warning("skipping unreadable model file: %s", error)
            role = "other"
        found[role].append(path)

    missing = [role for role in ("detector", "recognizer") if not found[role]]
    if missing:
        listing = ", ".join(f"{p.name} ({role})" for role, paths in found.items() for p in paths) or "no .onnx files"
        raise ModelFilesError(
            f"{model_dir}: no face {' and no face '.join(missing)} model found (found: {listing}); "
            f"expected {_EXPECTED_FILES}"
        )

    detector = _pick(found["detector"], _PREFERRED_DETECTORS, "detector")
    recognizer = _pick(found["recognizer"], (_PREFERRED_RECOGNIZER,), "recognizer")
    if recognizer.name == "glintr100.onnx":
        logger.warning(
            "%s: using glintr100.onnx as the face recognizer; Arc2Face-family methods need arcface.onnx from "
            "FoivosPar/Arc2Face (glintr100 embeddings give unrelated faces)",
            model_dir,
        )
    return detector, recognizer


def _pick(paths: list[Path], preferred: Sequence[str], role: str) -> Path:
    for name in preferred:
        for path in paths:
            if path.name == name:
                return path
    if len(paths) > 1:
        logger.warning("several face %s models found (%s); using %s", role, ", ".join(p.name for p in paths), paths[0])
    return paths[0]


def default_onnx_model_dirs() -> list[Path]:
    """Where ONNX face models are looked for, in order.

    1. ``$IDFUSION_FACE_MODELS`` if set;
    2. ``<cache>/models/antelopev2``, the cache being ``$IDFUSION_CACHE`` or ``~/.cache/idfusion``;
    3. ``~/.insightface/models/antelopev2`` (where insightface users already have the pack).
    """
    dirs = []
    env = os.environ.get(FACE_MODELS_ENV)
    if env:
        dirs.append(Path(env).expanduser())
    dirs.append(cache_root() / "models" / "antelopev2")
    dirs.append(Path.home() / ".insightface" / "models" / "antelopev2")
    return dirs


def resolve_onnx_model_dir(model_dir: str | Path | None = None) -> Path:
    """The folder of ONNX face models to use.

    Args:
        model_dir: an explicit folder, or ``None`` to search :func:`default_onnx_model_dirs`.

    Returns:
        ``model_dir`` if given and a folder; otherwise the first default folder that holds ``.onnx`` files
        (an empty leftover folder does not hide a later, filled one).

    Raises:
        ModelFilesError: the given folder does not exist, or no default folder holds models. The message names
            every searched location and the files to put there.
    """
    if model_dir is not None:
        path = Path(model_dir).expanduser()
        if not path.is_dir():
            raise ModelFilesError(f"face model folder not found: {path}; it should hold {_EXPECTED_FILES}")
        return path
    searched = default_onnx_model_dirs()
    env = os.environ.get(FACE_MODELS_ENV)
    if env and not searched[0].is_dir():
        logger.warning("$%s=%s is not a folder; searching the default locations", FACE_MODELS_ENV, env)
    for path in searched:
        if path.is_dir() and any(path.glob("*.onnx")):
            return path
    locations = ", ".join(str(p) for p in searched)
    raise ModelFilesError(
        f"no ONNX face models found; searched {locations}. Put {_EXPECTED_FILES} in one of them, "
        f"or point ${FACE_MODELS_ENV} at the folder that holds them"
    )
