"""DWPose whole-body pose estimation with onnxruntime: YOLOX-L person boxes, then RTMPose (SimCC) per person.

The two released ONNX files (Hugging Face Hub repo ``yzd-v/DWPose``) are used as the DWPose ControlNet annotator
uses them (``ControlNet-v1-1-nightly/annotator/dwpose`` in IDEA-Research/DWPose):

- ``yolox_l.onnx``: input ``(1, 3, 640, 640)`` float32 raw 0-255 pixels, letterboxed (resized into the top-left
  corner, padded with 114); output ``(1, 8400, 85)``: per anchor of the stride 8/16/32 grids, centre offsets and
  log sizes in units of the stride, then objectness and 80 COCO class probabilities (already sigmoid). A person is
  class 0, scored objectness x class probability.
- ``dw-ll_ucoco_384.onnx``: input ``(1, 3, 384, 288)`` float32, a person crop normalised with mmpose's ImageNet
  mean/std; outputs ``simcc_x (1, 133, 576)`` and ``simcc_y (1, 133, 768)``: per COCO-WholeBody keypoint, a score
  per half pixel of the crop (SimCC split ratio 2).

Channel order: the annotator passes the RGB image it is given straight to both models, and so does this module.
That is right for the pose model (mmpose normalises RGB with these means); YOLOX was trained on BGR frames, but the
annotator's RGB is kept so skeletons match the ones the OpenPose ControlNet pipelines produce.

COCO-WholeBody's 133 points are 17 body, 6 feet, 68 face, 21 left hand, 21 right hand; the body becomes
OpenPose-18 with a neck at the shoulders' midpoint (:func:`wholebody_to_openpose`).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from ..errors import ModelFilesError
from ..images import ImageInput, load_image
from ..paths import cache_root
from .openpose import DEFAULT_SCORE_THRESHOLD, PoseKeypoints

__all__ = [
    "BOX_PADDING",
    "COCO_TO_OPENPOSE",
    "DETECTOR_FILE",
    "DWPoseEstimator",
    "HUB_REPO",
    "POSE_FILE",
    "POSE_MODELS_ENV",
    "RTMPOSE_MEAN",
    "RTMPOSE_STD",
    "SIMCC_SPLIT_RATIO",
    "YOLOX_STRIDES",
    "box_to_center_scale",
    "crop_matrix",
    "crop_to_image",
    "default_pose_estimator",
    "default_pose_model_dir",
    "find_pose_models",
    "fix_aspect_ratio",
    "nms",
    "resolve_pose_model_dir",
    "rtmpose_input",
    "simcc_decode",
    "wholebody_to_openpose",
    "yolox_decode",
    "yolox_letterbox",
    "yolox_person_boxes",
]

logger = logging.getLogger(__name__)

DETECTOR_FILE = "yolox_l.onnx"
POSE_FILE = "dw-ll_ucoco_384.onnx"
HUB_REPO = "yzd-v/DWPose"
POSE_MODELS_ENV = "IDFUSION_POSE_MODELS"

YOLOX_INPUT_HW = (640, 640)
YOLOX_STRIDES = (8, 16, 32)
YOLOX_PAD_VALUE = 114
YOLOX_NMS_THRESHOLD = 0.45

RTMPOSE_INPUT_HW = (384, 288)
RTMPOSE_MEAN = (123.675, 116.28, 103.53)  # RGB
RTMPOSE_STD = (58.395, 57.12, 57.375)
BOX_PADDING = 1.25
SIMCC_SPLIT_RATIO = 2.0

# OpenPose-18 joint -> COCO-17 index; None is the neck, which COCO lacks.
COCO_TO_OPENPOSE = (0, None, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3)
_COCO_SHOULDERS = (5, 6)
_WHOLEBODY_FACE = slice(23, 91)
_WHOLEBODY_LEFT_HAND = slice(91, 112)
_WHOLEBODY_RIGHT_HAND = slice(112, 133)
_WHOLEBODY_POINTS = 133


# ----------------------------------------------------------------------------------------------------------------
# Model files
# ----------------------------------------------------------------------------------------------------------------


def default_pose_model_dir() -> Path:
    """``$IDFUSION_POSE_MODELS`` if set, else ``<cache>/dwpose`` (the cache: ``$IDFUSION_CACHE`` or
    ``~/.cache/idfusion``)."""
    env = os.environ.get(POSE_MODELS_ENV)
    return Path(env).expanduser() if env else cache_root() / "dwpose"


def _needed_files_message(folder: Path) -> str:
    return (
        f"the pose estimator needs {DETECTOR_FILE} (YOLOX-L person detector) and {POSE_FILE} (DWPose whole-body "
        f"keypoints) from the Hugging Face Hub repo {HUB_REPO}; put both in {folder} or point ${POSE_MODELS_ENV} "
        "at the folder holding them (a ready OpenPose skeleton image needs no models)"
    )


def find_pose_models(folder: str | os.PathLike) -> dict[str, Path]:
    """The DWPose files in ``folder``.

    Returns:
        ``{"detector": folder/yolox_l.onnx, "pose": folder/dw-ll_ucoco_384.onnx}``.

    Raises:
        ModelFilesError: either file is missing; the message names both files, the Hub repo and the folder.
    """
    folder = Path(folder).expanduser()
    paths = {"detector": folder / DETECTOR_FILE, "pose": folder / POSE_FILE}
    missing = [path.name for path in paths.values() if not path.is_file()]
    if missing:
        where = "folder not found" if not folder.is_dir() else f"missing {', '.join(missing)}"
        raise ModelFilesError(f"{folder}: {where}; {_needed_files_message(folder)}")
    return paths


def resolve_pose_model_dir(folder: str | os.PathLike | None = None) -> Path:
    """The folder of DWPose models: ``folder`` if given, else :func:`default_pose_model_dir`.

    Raises:
        ModelFilesError: the folder lacks either model file (see :func:`find_pose_models`).
    """
    path = Path(folder).expanduser() if folder is not None else default_pose_model_dir()
    find_pose_models(path)
    return path


def _open_session(path: Path, providers: Sequence[str] | None, role: str):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # onnxruntime's warnings about unused initializers are noise to users
    if providers is None:
        # CUDA when this build has it; TensorRT is left out on purpose (slow engine builds on first use).
        available = ort.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available] or available
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=list(providers))
    except Exception as error:  # onnxruntime raises its own untyped errors for bad files
        raise ModelFilesError(f"{path}: cannot load this {role} model with onnxruntime ({error})") from error


def _static_hw(shape: Sequence, default: tuple[int, int]) -> tuple[int, int]:
    dims = list(shape)[2:4]
    if len(dims) == 2 and all(isinstance(d, (int, np.integer)) and int(d) > 0 for d in dims):
        return int(dims[0]), int(dims[1])
    return default


# ----------------------------------------------------------------------------------------------------------------
# YOLOX person detection
# ----------------------------------------------------------------------------------------------------------------


def yolox_letterbox(image: np.ndarray, input_hw: tuple[int, int] = YOLOX_INPUT_HW) -> tuple[np.ndarray, float]:
    """YOLOX input: the image resized into the top-left corner of a canvas filled with 114.

    Args:
        image: ``(H, W, 3)`` uint8, fed in the channel order given (RGB in this module).
        input_hw: model input ``(height, width)``.

    Returns:
        ``(blob, ratio)``: ``(1, 3, h, w)`` float32 raw pixel values, and the resize factor (input / image).
    """
    target_h, target_w = input_hw
    h, w = image.shape[:2]
    ratio = min(target_h / h, target_w / w)
    new_w, new_h = max(1, int(w * ratio)), max(1, int(h * ratio))
    canvas = np.full((target_h, target_w, 3), YOLOX_PAD_VALUE, dtype=np.uint8)
    canvas[:new_h, :new_w] = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    blob = np.ascontiguousarray(canvas.transpose(2, 0, 1)[None], dtype=np.float32)  # (h, w, 3) -> (1, 3, h, w)
    return blob, ratio


def _yolox_grid(input_hw: tuple[int, int], strides: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    cells, steps = [], []
    for stride in strides:
        rows, cols = input_hw[0] // stride, input_hw[1] // stride
        xs, ys = np.meshgrid(np.arange(cols), np.arange(rows))  # row-major, x fastest, like the model's output
        cells.append(np.stack([xs, ys], axis=-1).reshape(-1, 2))  # (rows, cols, 2) -> (rows*cols, 2)
        steps.append(np.full((rows * cols, 1), stride))
    return np.concatenate(cells).astype(np.float32), np.concatenate(steps).astype(np.float32)


def yolox_decode(
    raw: np.ndarray, input_hw: tuple[int, int] = YOLOX_INPUT_HW, strides: Sequence[int] = YOLOX_STRIDES
) -> tuple[np.ndarray, np.ndarray]:
    """Decode YOLOX's raw anchor rows into boxes and person scores.

    Args:
        raw: ``(A, 5 + C)`` rows in the model's order (stride 8 grid, then 16, then 32, each row-major):
            ``dx, dy, log w, log h`` in strides, objectness, ``C`` class probabilities.
        input_hw: the model input ``(height, width)``.
        strides: the grid strides.

    Returns:
        ``(boxes, scores)``: ``(A, 4)`` float32 ``x1, y1, x2, y2`` in model-input pixels, and ``(A,)`` float32
        objectness x person (class 0) probability.
    """
    raw = np.asarray(raw, dtype=np.float32)
    cells, steps = _yolox_grid(input_hw, strides)
    if raw.ndim != 2 or raw.shape[0] != len(cells) or raw.shape[1] < 6:
        raise ValueError(
            f"expected YOLOX rows of shape ({len(cells)}, 5 + classes) for input {input_hw}; got {raw.shape}"
        )
    centres = (raw[:, :2] + cells) * steps
    with np.errstate(over="ignore"):  # absurd log sizes become inf-sized boxes, which never score
        sizes = np.exp(raw[:, 2:4]) * steps
    boxes = np.concatenate([centres - sizes / 2, centres + sizes / 2], axis=1)
    return boxes, raw[:, 4] * raw[:, 5]


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression, highest score first.

    Uses YOLOX's inclusive-pixel areas (``x2 - x1 + 1``). A box is dropped when its IoU with a kept box exceeds
    ``iou_threshold``.

    Returns:
        Indices of the kept boxes, best first.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(-np.asarray(scores), kind="stable")
    keep = []
    while order.size:
        best, rest = order[0], order[1:]
        keep.append(best)
        w = np.maximum(0.0, np.minimum(x2[best], x2[rest]) - np.maximum(x1[best], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[best], y2[rest]) - np.maximum(y1[best], y1[rest]) + 1)
        inter = w * h
        iou = inter / (areas[best] + areas[rest] - inter)
        order = rest[iou <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


def yolox_person_boxes(
    raw: np.ndarray,
    ratio: float,
    input_hw: tuple[int, int] = YOLOX_INPUT_HW,
    *,
    score_threshold: float = 0.3,
    nms_threshold: float = YOLOX_NMS_THRESHOLD,
) -> tuple[np.ndarray, np.ndarray]:
    """Person boxes in original-image pixels from YOLOX's raw output.

    The annotator runs class-aware NMS on everything above 0.1 and then keeps persons above 0.3; boxes scoring
    less can only ever be suppressed, so thresholding first gives the same boxes.

    Args:
        raw: ``(1, A, 5 + C)`` or ``(A, 5 + C)`` model output.
        ratio: the letterbox resize factor from :func:`yolox_letterbox`.
        input_hw: model input ``(height, width)``.
        score_threshold: keep persons scoring above this.
        nms_threshold: IoU above which a lower-scoring box is dropped.

    Returns:
        ``(boxes, scores)``: ``(N, 4)`` float32 ``x1, y1, x2, y2`` and ``(N,)`` float32, best first.
    """
    raw = np.asarray(raw, dtype=np.float32)
    raw = raw[0] if raw.ndim == 3 else raw  # (1, A, 5+C) -> (A, 5+C)
    boxes, scores = yolox_decode(raw, input_hw)
    candidates = np.flatnonzero(scores > score_threshold)
    boxes, scores = boxes[candidates] / ratio, scores[candidates]
    keep = nms(boxes, scores, nms_threshold)
    return boxes[keep].astype(np.float32).reshape(-1, 4), scores[keep].astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# RTMPose top-down keypoints
# ----------------------------------------------------------------------------------------------------------------


def box_to_center_scale(box: Sequence[float], padding: float = BOX_PADDING) -> tuple[np.ndarray, np.ndarray]:
    """``x1, y1, x2, y2`` -> ``(centre (2,), scale (2,))`` with the box's width and height times ``padding``."""
    x1, y1, x2, y2 = (float(v) for v in box)
    return np.array([(x1 + x2) / 2, (y1 + y2) / 2]), np.array([x2 - x1, y2 - y1]) * padding


def fix_aspect_ratio(scale: np.ndarray, aspect: float) -> np.ndarray:
    """Grow ``scale`` ``(w, h)`` along one axis so that ``w / h == aspect``."""
    w, h = (float(v) for v in scale)
    return np.array([w, w / aspect]) if w > h * aspect else np.array([h * aspect, h])


def crop_matrix(center: np.ndarray, scale: np.ndarray, input_wh: tuple[int, int]) -> np.ndarray:
    """``(2, 3)`` affine map from image pixels to crop pixels: the ``scale``-sized region around ``center`` fills
    the ``input_wh`` crop (no rotation; ``scale`` already has the crop's aspect ratio)."""
    factor = input_wh[0] / float(scale[0])
    return np.array(
        [
            [factor, 0.0, input_wh[0] / 2 - factor * center[0]],
            [0.0, factor, input_wh[1] / 2 - factor * center[1]],
        ]
    )


def rtmpose_input(
    image: np.ndarray, box: Sequence[float], input_wh: tuple[int, int] = RTMPOSE_INPUT_HW[::-1]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The RTMPose input for one person.

    Args:
        image: ``(H, W, 3)`` uint8 RGB.
        box: the person's ``x1, y1, x2, y2``.
        input_wh: model input ``(width, height)``.

    Returns:
        ``(blob, center, scale)``: ``(1, 3, h, w)`` float32 normalised crop, and the crop region in image pixels
        (centre and aspect-fixed size), for :func:`crop_to_image`.
    """
    center, scale = box_to_center_scale(box)
    scale = fix_aspect_ratio(scale, input_wh[0] / input_wh[1])
    crop = cv2.warpAffine(image, crop_matrix(center, scale, input_wh), tuple(input_wh), flags=cv2.INTER_LINEAR)
    crop = (crop.astype(np.float32) - np.float32(RTMPOSE_MEAN)) / np.float32(RTMPOSE_STD)
    blob = np.ascontiguousarray(crop.transpose(2, 0, 1)[None], dtype=np.float32)  # (h, w, 3) -> (1, 3, h, w)
    return blob, center, scale


def simcc_decode(
    simcc_x: np.ndarray, simcc_y: np.ndarray, split_ratio: float = SIMCC_SPLIT_RATIO
) -> tuple[np.ndarray, np.ndarray]:
    """Argmax SimCC decoding.

    Args:
        simcc_x: ``(K, Wx)`` scores per horizontal bin (``split_ratio`` bins per crop pixel).
        simcc_y: ``(K, Wy)`` scores per vertical bin.
        split_ratio: bins per pixel.

    Returns:
        ``(points, scores)``: ``(K, 2)`` float32 crop pixels (NaN where the score is not positive) and ``(K,)``
        float32 scores, the smaller of the two axes' peaks.
    """
    simcc_x, simcc_y = np.asarray(simcc_x, np.float32), np.asarray(simcc_y, np.float32)
    points = np.stack([simcc_x.argmax(axis=1), simcc_y.argmax(axis=1)], axis=1).astype(np.float32)
    scores = np.minimum(simcc_x.max(axis=1), simcc_y.max(axis=1))
    points /= split_ratio
    points[scores <= 0] = np.nan
    return points, scores


def crop_to_image(points: np.ndarray, center: np.ndarray, scale: np.ndarray, input_wh: tuple[int, int]) -> np.ndarray:
    """Map crop pixels back to image pixels (the inverse of :func:`crop_matrix`); ``(K, 2)`` float32."""
    mapped = points / np.asarray(input_wh, np.float64) * scale + center - scale / 2
    return mapped.astype(np.float32)


def wholebody_to_openpose(points: np.ndarray, scores: np.ndarray, box: Sequence[float] | None = None) -> PoseKeypoints:
    """One person's COCO keypoints as OpenPose: body 18 (with a neck), hands ``[left, right]``, face 68.

    Args:
        points: ``(K, 2)`` image pixels, COCO-WholeBody order (``K == 133``) or COCO body only (``K == 17``,
            then no hands or face).
        scores: ``(K,)``.
        box: the person's detection box, kept on the result.

    The neck is the shoulders' midpoint, scored by the weaker shoulder: it is drawn exactly when both shoulders
    are, as in the annotator.
    """
    points, scores = np.asarray(points, np.float32), np.asarray(scores, np.float32)
    if points.ndim != 2 or points.shape[1] != 2 or len(points) < 17 or scores.shape != (len(points),):
        raise ValueError(f"expected (K, 2) points and (K,) scores with K >= 17; got {points.shape}, {scores.shape}")
    body = np.empty((18, 2), np.float32)
    body_scores = np.empty(18, np.float32)
    for joint, coco in enumerate(COCO_TO_OPENPOSE):
        if coco is None:
            body[joint] = points[list(_COCO_SHOULDERS)].mean(axis=0)
            body_scores[joint] = scores[list(_COCO_SHOULDERS)].min()
        else:
            body[joint], body_scores[joint] = points[coco], scores[coco]
    hands, hand_scores, face, face_scores = [], [], None, None
    if len(points) >= _WHOLEBODY_POINTS:
        for part in (_WHOLEBODY_LEFT_HAND, _WHOLEBODY_RIGHT_HAND):
            hands.append(points[part])
            hand_scores.append(scores[part])
        face, face_scores = points[_WHOLEBODY_FACE], scores[_WHOLEBODY_FACE]
    return PoseKeypoints(body, body_scores, hands, hand_scores, face, face_scores, box=box)


# ----------------------------------------------------------------------------------------------------------------
# The estimator
# ----------------------------------------------------------------------------------------------------------------


class DWPoseEstimator:
    """Whole-body pose of every person in a photo, from the two DWPose ONNX models.

    Args:
        model_dir: folder holding ``yolox_l.onnx`` and ``dw-ll_ucoco_384.onnx``; ``None`` for
            :func:`default_pose_model_dir`.
        providers: onnxruntime execution providers; ``None`` picks CUDA when available, else CPU.
        det_threshold: minimum person score (objectness x person probability), 0.3 in the annotator.
        nms_threshold: IoU above which overlapping person boxes are merged, 0.45 in the annotator.
        whole_image_fallback: when no person box is found, run the pose model on the whole image as the annotator
            does; the result is kept only if a body keypoint scores above ``keypoint_threshold``.
        keypoint_threshold: see ``whole_image_fallback``.

    Raises:
        ModelFilesError: a file is missing, unreadable, or does not have the expected inputs and outputs.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike | None = None,
        *,
        providers: Sequence[str] | None = None,
        det_threshold: float = 0.3,
        nms_threshold: float = YOLOX_NMS_THRESHOLD,
        whole_image_fallback: bool = True,
        keypoint_threshold: float = DEFAULT_SCORE_THRESHOLD,
    ):
        self.model_dir = resolve_pose_model_dir(model_dir)
        paths = find_pose_models(self.model_dir)
        self.det_threshold = det_threshold
        self.nms_threshold = nms_threshold
        self.whole_image_fallback = whole_image_fallback
        self.keypoint_threshold = keypoint_threshold

        self._detector = _open_session(paths["detector"], providers, "YOLOX person detector")
        det_input = self._detector.get_inputs()[0]
        det_outputs = self._detector.get_outputs()
        if len(det_input.shape) != 4 or len(det_outputs) != 1 or len(det_outputs[0].shape) != 3:
            raise ModelFilesError(
                f"{paths['detector']}: not a YOLOX detector (expected one (1, 3, H, W) input and one (1, A, 85) "
                f"output; got inputs {[i.shape for i in self._detector.get_inputs()]}, outputs "
                f"{[o.shape for o in det_outputs]})"
            )
        self._det_input_name = det_input.name
        self.det_input_hw = _static_hw(det_input.shape, YOLOX_INPUT_HW)

        self._pose = _open_session(paths["pose"], providers, "DWPose whole-body")
        pose_input = self._pose.get_inputs()[0]
        outputs = [o.name for o in self._pose.get_outputs()]
        if len(pose_input.shape) != 4 or len(outputs) != 2:
            raise ModelFilesError(
                f"{paths['pose']}: not an RTMPose SimCC model (expected one (N, 3, H, W) input and two outputs "
                f"simcc_x, simcc_y; got inputs {[i.shape for i in self._pose.get_inputs()]}, outputs {outputs})"
            )
        self._pose_input_name = pose_input.name
        # Outputs by name when they are named as mmdeploy names them, else in order (x first), as the annotator.
        self._simcc_names = ["simcc_x", "simcc_y"] if set(outputs) == {"simcc_x", "simcc_y"} else outputs
        self.pose_input_hw = _static_hw(pose_input.shape, RTMPOSE_INPUT_HW)
        batch = pose_input.shape[0]
        self._pose_batched = not (isinstance(batch, (int, np.integer)) and int(batch) == 1)
        logger.debug(
            "DWPose from %s: detector input %s, pose input %s", self.model_dir, self.det_input_hw, self.pose_input_hw
        )

    def detect(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Person boxes in an RGB ``(H, W, 3)`` uint8 image: ``(N, 4)`` ``x1, y1, x2, y2`` and ``(N,)`` scores."""
        blob, ratio = yolox_letterbox(image, self.det_input_hw)
        (raw,) = self._detector.run(None, {self._det_input_name: blob})
        return yolox_person_boxes(
            raw, ratio, self.det_input_hw, score_threshold=self.det_threshold, nms_threshold=self.nms_threshold
        )

    def keypoints(self, image: np.ndarray, boxes: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """COCO-WholeBody keypoints per box: ``[(points (K, 2) image pixels, scores (K,)), ...]``."""
        input_wh = self.pose_input_hw[::-1]
        prepared = [rtmpose_input(image, box, input_wh) for box in boxes]
        if not prepared:
            return []
        blobs = [blob for blob, _, _ in prepared]
        if self._pose_batched:
            simcc_x, simcc_y = self._pose.run(self._simcc_names, {self._pose_input_name: np.concatenate(blobs)})
        else:
            runs = [self._pose.run(self._simcc_names, {self._pose_input_name: blob}) for blob in blobs]
            simcc_x = np.concatenate([x for x, _ in runs])  # N x (1, K, Wx) -> (N, K, Wx)
            simcc_y = np.concatenate([y for _, y in runs])
        results = []
        for (_, center, scale), sx, sy in zip(prepared, simcc_x, simcc_y, strict=True):
            points, scores = simcc_decode(sx, sy)
            results.append((crop_to_image(points, center, scale, input_wh), scores))
        return results

    def __call__(self, image: ImageInput) -> list[PoseKeypoints]:
        """Everyone's pose in ``image`` (a path, bytes, PIL image or RGB array), in its pixel coordinates.

        Returns:
            One :class:`PoseKeypoints` per person, best detection first (empty when nobody is found).
        """
        rgb = load_image(image).array
        boxes, _ = self.detect(rgb)
        fallback = len(boxes) == 0 and self.whole_image_fallback
        if fallback:
            boxes = np.array([[0, 0, rgb.shape[1], rgb.shape[0]]], np.float32)
        people = [
            wholebody_to_openpose(p, s, box) for (p, s), box in zip(self.keypoints(rgb, boxes), boxes, strict=True)
        ]
        if fallback:
            people = [p for p in people if p.visible_body(self.keypoint_threshold).any()]
        logger.debug("DWPose: %d person box(es), %d pose(s)%s", len(boxes), len(people), " (whole image)" * fallback)
        return people


@functools.lru_cache(maxsize=2)
def _cached_estimator(folder: str) -> DWPoseEstimator:
    return DWPoseEstimator(folder)


def default_pose_estimator(model_dir: str | os.PathLike | None = None) -> DWPoseEstimator:
    """A shared :class:`DWPoseEstimator` for ``model_dir`` (default: :func:`default_pose_model_dir`).

    Raises:
        ModelFilesError: the model files are missing; the message says which and where to put them.
    """
    folder = resolve_pose_model_dir(model_dir)
    return _cached_estimator(str(folder.resolve()))
