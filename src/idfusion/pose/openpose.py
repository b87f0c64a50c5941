"""OpenPose-format pose conditions: keypoint containers, the ControlNet skeleton drawing, and ``pose_condition``.

The drawing reproduces the ControlNet v1.1 OpenPose annotator (``annotator/openpose/util.py``; the DWPose
annotator draws the same way), which is the format ``lllyasviel/control_v11p_sd15_openpose`` was trained on:

- body: 18 OpenPose keypoints, 17 limbs drawn as filled ellipses (half-width 4 px) in the limb's colour, then the
  whole canvas scaled by 0.6, then a filled circle of radius 4 per joint in the joint's colour;
- hands: 20 edges per hand, 2 px lines coloured by hue ``edge / 20`` (HSV, full saturation and value), and a blue
  circle of radius 4 per joint;
- face (off by default, as in FaceChain-FACT): white circles of radius 3.

Colours are RGB; the canvas is black. Everything is drawn with OpenCV's default 8-connected rasterisation, so a
skeleton drawn here matches the annotator's pixel for pixel given the same keypoints.
"""

from __future__ import annotations

import colorsys
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import cv2
import numpy as np
from PIL import Image

from ..errors import IdfusionError
from ..images import ImageInput, LoadedImage, load_image

__all__ = [
    "BODY_COLORS",
    "DEFAULT_SCORE_THRESHOLD",
    "HAND_EDGES",
    "LIMB_SEQUENCE",
    "OPENPOSE_BODY_NAMES",
    "NoPoseError",
    "PoseKeypoints",
    "draw_openpose",
    "hand_edge_color",
    "looks_like_skeleton",
    "pad_geometry",
    "pad_to_size",
    "pose_condition",
]

logger = logging.getLogger(__name__)

OPENPOSE_BODY_NAMES = (
    "nose",
    "neck",
    "right_shoulder",
    "right_elbow",
    "right_wrist",
    "left_shoulder",
    "left_elbow",
    "left_wrist",
    "right_hip",
    "right_knee",
    "right_ankle",
    "left_hip",
    "left_knee",
    "left_ankle",
    "right_eye",
    "left_eye",
    "right_ear",
    "left_ear",
)

# The annotator's limbs (0-based joint pairs). Its table has two more (shoulder-ear) that it never draws.
LIMB_SEQUENCE = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10),
    (1, 11), (11, 12), (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17),
)  # fmt: skip

# RGB; entry i colours joint i and limb i.
BODY_COLORS = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
    (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
    (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
)  # fmt: skip

# 21 hand points: 0 = wrist, then 4 per finger from thumb to little finger, base to tip.
HAND_EDGES = (
    (0, 1), (1, 2), (2, 3), (3, 4), (0, 5), (5, 6), (6, 7), (7, 8), (0, 9), (9, 10),
    (10, 11), (11, 12), (0, 13), (13, 14), (14, 15), (15, 16), (0, 17), (17, 18), (18, 19), (19, 20),
)  # fmt: skip

DEFAULT_SCORE_THRESHOLD = 0.3
STICK_WIDTH = 4
LIMB_INTENSITY = 0.6
JOINT_RADIUS = 4
HAND_LINE_WIDTH = 2
HAND_JOINT_COLOR = (0, 0, 255)
FACE_RADIUS = 3
FACE_COLOR = (255, 255, 255)

# Coordinates beyond this many pixels are treated as missing: OpenCV takes 32-bit ints, and such points are noise.
_MAX_COORD = 1 << 20


class NoPoseError(IdfusionError, ValueError):
    """The pose estimator found no person in an image that was supposed to show one."""

    def __init__(self, source: str, message: str):
        self.source = source
        super().__init__(f"{source}: {message}")


def _points(value, count: int, what: str) -> np.ndarray:
    array = np.asarray(value, dtype=np.float32)
    if array.shape != (count, 2):
        raise ValueError(f"{what} must have shape ({count}, 2); got {array.shape}")
    return array


def _scores(value, count: int, what: str) -> np.ndarray:
    if value is None:
        return np.ones(count, dtype=np.float32)
    array = np.asarray(value, dtype=np.float32)
    if array.shape != (count,):
        raise ValueError(f"{what} must have shape ({count},); got {array.shape}")
    return array


@dataclass
class PoseKeypoints:
    """One person's keypoints, in pixels of the image they were found in (x right, y down).

    A point is missing when its coordinates are NaN or its score is at or below the drawing threshold, so a
    hand-made pose can leave scores out and mark missing points with NaN.

    Attributes:
        body: ``(18, 2)`` float32, OpenPose-18 order (:data:`OPENPOSE_BODY_NAMES`).
        body_scores: ``(18,)`` float32; ones when not given.
        hands: ``(21, 2)`` float32 arrays, ``[left, right]`` for estimator output (the person's own left/right).
        hand_scores: ``(21,)`` float32 per hand; ones when not given.
        face: ``(68, 2)`` float32 or ``None``.
        face_scores: ``(68,)`` float32 or ``None``.
        box: ``(4,)`` float32 ``x1, y1, x2, y2`` of the person detection, or ``None``.
    """

    body: np.ndarray
    body_scores: np.ndarray | None = None
    hands: list[np.ndarray] = field(default_factory=list)
    hand_scores: list[np.ndarray] | None = None
    face: np.ndarray | None = None
    face_scores: np.ndarray | None = None
    box: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.body = _points(self.body, 18, "body")
        self.body_scores = _scores(self.body_scores, 18, "body_scores")
        self.hands = [_points(hand, 21, f"hands[{i}]") for i, hand in enumerate(self.hands)]
        given = self.hand_scores if self.hand_scores is not None else [None] * len(self.hands)
        if len(given) != len(self.hands):
            raise ValueError(f"hand_scores has {len(given)} entries for {len(self.hands)} hands")
        self.hand_scores = [_scores(s, 21, f"hand_scores[{i}]") for i, s in enumerate(given)]
        if self.face is not None:
            self.face = _points(self.face, 68, "face")
            self.face_scores = _scores(self.face_scores, 68, "face_scores")
        elif self.face_scores is not None:
            raise ValueError("face_scores given without face")
        if self.box is not None:
            self.box = np.asarray(self.box, dtype=np.float32).reshape(4)

    def visible_body(self, threshold: float = DEFAULT_SCORE_THRESHOLD) -> np.ndarray:
        """``(18,)`` bool: which body points would be drawn."""
        return _drawable(self.body, self.body_scores, threshold)

    def transformed(
        self, scale_x: float, scale_y: float, offset_x: float = 0.0, offset_y: float = 0.0
    ) -> PoseKeypoints:
        """A copy with every point (and the box) mapped by ``x * scale_x + offset_x``, ``y * scale_y + offset_y``."""
        factor = np.array([scale_x, scale_y], dtype=np.float32)
        shift = np.array([offset_x, offset_y], dtype=np.float32)

        def move(points):
            return None if points is None else points * factor + shift

        box = None if self.box is None else (self.box.reshape(2, 2) * factor + shift).reshape(4)  # (x1 y1, x2 y2)
        return PoseKeypoints(
            body=move(self.body),
            body_scores=self.body_scores.copy(),
            hands=[move(hand) for hand in self.hands],
            hand_scores=[s.copy() for s in self.hand_scores],
            face=move(self.face),
            face_scores=None if self.face_scores is None else self.face_scores.copy(),
            box=box,
        )


def _drawable(points: np.ndarray, scores: np.ndarray, threshold: float, *, inclusive: bool = False) -> np.ndarray:
    finite = np.isfinite(points).all(axis=1) & (np.abs(np.nan_to_num(points)) < _MAX_COORD).all(axis=1)
    passed = scores >= threshold if inclusive else scores > threshold
    return finite & passed


def hand_edge_color(edge: int) -> tuple[float, float, float]:
    """RGB colour (0-255 floats, as the annotator passes them to OpenCV) of hand edge ``edge``."""
    r, g, b = colorsys.hsv_to_rgb(edge / float(len(HAND_EDGES)), 1.0, 1.0)
    return (r * 255.0, g * 255.0, b * 255.0)


def _draw_bodies(canvas: np.ndarray, people: Sequence[PoseKeypoints], threshold: float) -> np.ndarray:
    visible = [person.visible_body(threshold) for person in people]
    # Limb-major then person, like the annotator, so overlapping limbs stack the same way.
    for limb, (a, b) in enumerate(LIMB_SEQUENCE):
        for person, seen in zip(people, visible, strict=True):
            if not (seen[a] and seen[b]):
                continue
            (x0, y0), (x1, y1) = person.body[a].astype(np.float64), person.body[b].astype(np.float64)
            length = math.hypot(x0 - x1, y0 - y1)
            angle = math.degrees(math.atan2(y0 - y1, x0 - x1))
            centre = (int((x0 + x1) / 2), int((y0 + y1) / 2))
            polygon = cv2.ellipse2Poly(centre, (int(length / 2), STICK_WIDTH), int(angle), 0, 360, 1)
            cv2.fillConvexPoly(canvas, polygon, BODY_COLORS[limb])
    # The annotator dims the limbs, not the joints drawn next.
    canvas = (canvas * LIMB_INTENSITY).astype(np.uint8)
    for joint in range(18):
        for person, seen in zip(people, visible, strict=True):
            if seen[joint]:
                x, y = person.body[joint]
                cv2.circle(canvas, (int(x), int(y)), JOINT_RADIUS, BODY_COLORS[joint], thickness=-1)
    return canvas


def _annotator_visible(points: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
    # Hands and faces are kept at score >= threshold and, as in the annotator, only where the truncated pixel
    # coordinates are both >= 1 (the annotator marks missing points with -1 and tests "x > 0.01" after int()).
    seen = _drawable(points, scores, threshold, inclusive=True)
    ints = np.trunc(np.nan_to_num(points, nan=-1.0))
    return seen & (ints[:, 0] > 0) & (ints[:, 1] > 0)


def _draw_hand(canvas: np.ndarray, points: np.ndarray, scores: np.ndarray, threshold: float) -> None:
    seen = _annotator_visible(points, scores, threshold)
    for index, (a, b) in enumerate(HAND_EDGES):
        if seen[a] and seen[b]:
            start = (int(points[a, 0]), int(points[a, 1]))
            end = (int(points[b, 0]), int(points[b, 1]))
            cv2.line(canvas, start, end, hand_edge_color(index), thickness=HAND_LINE_WIDTH)
    for (x, y), ok in zip(points, seen, strict=True):
        if ok:
            cv2.circle(canvas, (int(x), int(y)), JOINT_RADIUS, HAND_JOINT_COLOR, thickness=-1)


def draw_openpose(
    people: Sequence[PoseKeypoints],
    size: tuple[int, int],
    *,
    body: bool = True,
    hands: bool = True,
    face: bool = False,
    threshold: float = DEFAULT_SCORE_THRESHOLD,
) -> Image.Image:
    """Draw people as the ControlNet v1.1 OpenPose annotator does, on a black canvas.

    Args:
        people: keypoints in pixels of the canvas.
        size: canvas ``(height, width)``.
        body: draw the 18-point bodies.
        hands: draw the hands (FaceChain-FACT does).
        face: draw the 68 face points (FaceChain-FACT does not).
        threshold: points scoring at or below this are skipped (hands and faces: below it, as the annotator).

    Returns:
        An RGB ``PIL.Image`` of ``size``.
    """
    height, width = (int(v) for v in size)
    if height <= 0 or width <= 0:
        raise ValueError(f"size must be a positive (height, width); got {size}")
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    if body:
        canvas = _draw_bodies(canvas, people, threshold)
    if hands:
        # The annotator stacks all left hands, then all right hands.
        for slot in range(max((len(p.hands) for p in people), default=0)):
            for person in people:
                if slot < len(person.hands):
                    _draw_hand(canvas, person.hands[slot], person.hand_scores[slot], threshold)
    if face:
        for person in people:
            if person.face is None:
                continue
            seen = _annotator_visible(person.face, person.face_scores, threshold)
            for (x, y), ok in zip(person.face, seen, strict=True):
                if ok:
                    cv2.circle(canvas, (int(x), int(y)), FACE_RADIUS, FACE_COLOR, thickness=-1)
    return Image.fromarray(canvas)


# ----------------------------------------------------------------------------------------------------------------
# Fitting to the output size
# ----------------------------------------------------------------------------------------------------------------


def pad_geometry(source_hw: tuple[int, int], target_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """Where FaceChain-FACT's ``img_pad`` puts an image of ``source_hw`` inside ``target_hw``.

    The image is resized keeping its aspect ratio to touch the target's height (when it is relatively taller, or
    exactly as tall) or width. A tall image is centred with black on the left and right (the odd column going right);
    a wide image is padded **on top only**, so it sits on the bottom edge.

    Returns:
        ``(new_height, new_width, top, left)``: the resized image size and its offset in the target.
    """
    h, w = (int(v) for v in source_hw)
    target_h, target_w = (int(v) for v in target_hw)
    if h / float(target_h) >= w / float(target_w):
        new_w = max(1, int(w / (h / float(target_h))))
        return target_h, new_w, 0, int((target_w - new_w) / 2)
    new_h = max(1, int(h / (w / float(target_w))))
    return new_h, target_w, target_h - new_h, 0


def pad_to_size(
    image: Image.Image, size: tuple[int, int], *, resample: Image.Resampling = Image.Resampling.BILINEAR
) -> Image.Image:
    """Resize ``image`` into ``size`` ``(height, width)`` as :func:`pad_geometry` says, padding with black.

    An image already of ``size`` comes back with the same pixels.
    """
    new_h, new_w, top, left = pad_geometry((image.height, image.width), size)
    if (new_h, new_w) != (image.height, image.width):
        image = image.resize((new_w, new_h), resample)
    canvas = Image.new("RGB", (int(size[1]), int(size[0])))
    canvas.paste(image.convert("RGB"), (left, top))
    return canvas


def looks_like_skeleton(
    image: ImageInput | LoadedImage,
    *,
    dark_level: int = 16,
    dark_fraction: float = 0.85,
    colourful_fraction: float = 0.5,
) -> bool:
    """Whether an image is a rendered pose skeleton rather than a photo.

    A skeleton is mostly pure black with a few saturated colours: at least ``dark_fraction`` of its pixels have
    every channel below ``dark_level``, and at least ``colourful_fraction`` of the clearly lit pixels (max channel
    >= 64) are saturated (max - min >= max / 2), which rules out dark photos with skin or grey highlights. An all
    black image counts as an empty skeleton.
    """
    rgb = image.array if isinstance(image, LoadedImage) else load_image(image).array
    peak = rgb.max(axis=2)  # (H, W)
    if (peak < dark_level).mean() < dark_fraction:
        return False
    lit = peak >= 64
    if not lit.any():
        return True
    spread = peak.astype(np.int16) - rgb.min(axis=2).astype(np.int16)
    saturated = (2 * spread[lit]) >= peak[lit]
    return bool(saturated.mean() >= colourful_fraction)


PoseMode = Literal["auto", "skeleton", "photo"]


def pose_condition(
    image: ImageInput | LoadedImage,
    size: tuple[int, int] = (512, 512),
    *,
    estimator: Callable[[np.ndarray], Sequence[PoseKeypoints]] | None = None,
    mode: PoseMode = "auto",
    hands: bool = True,
    face: bool = False,
) -> Image.Image:
    """The OpenPose ControlNet condition image for a user's pose image.

    Both kinds of input are fitted to ``size`` as FaceChain-FACT's ``img_pad`` does (see :func:`pad_geometry`), so
    the skeleton lines up with the generated image.

    Args:
        image: a ready skeleton image or a photo of a person.
        size: output ``(height, width)``.
        estimator: maps an RGB ``(H, W, 3)`` uint8 array to people in its pixel coordinates, e.g. a
            :class:`~idfusion.pose.dwpose.DWPoseEstimator`. ``None`` loads the DWPose models from the default
            folder (:func:`~idfusion.pose.dwpose.resolve_pose_model_dir`) when a photo needs them.
        mode: ``"skeleton"`` passes the image through (fitted to ``size``); ``"photo"`` estimates the pose and
            draws it; ``"auto"`` picks ``"skeleton"`` when :func:`looks_like_skeleton` says so.
        hands: draw hands (FaceChain-FACT: yes).
        face: draw face points (FaceChain-FACT: no).

    Returns:
        An RGB ``PIL.Image`` of ``size``.

    Raises:
        ImageError: the image cannot be read.
        ModelFilesError: a photo needs the estimator and its model files are missing.
        NoPoseError: no person was found in the photo.
    """
    if mode not in ("auto", "skeleton", "photo"):
        raise ValueError(f"mode must be 'auto', 'skeleton' or 'photo'; got {mode!r}")
    height, width = (int(v) for v in size)
    if height <= 0 or width <= 0:
        raise ValueError(f"size must be a positive (height, width); got {size}")
    loaded = image if isinstance(image, LoadedImage) else load_image(image)
    if mode == "auto":
        mode = "skeleton" if looks_like_skeleton(loaded) else "photo"
        logger.debug("%s: pose image taken as a %s", loaded.name, mode)
    if mode == "skeleton":
        return pad_to_size(loaded.to_pil(), (height, width))

    if estimator is None:
        from .dwpose import default_pose_estimator

        estimator = default_pose_estimator()
    people = [p for p in estimator(loaded.array) if p.visible_body().any()]
    if not people:
        raise NoPoseError(
            loaded.name, "no person found for the pose condition; use a photo showing a person, or a skeleton image"
        )
    # Estimate on the full-resolution photo, then map the points to where img_pad puts the photo.
    new_h, new_w, top, left = pad_geometry((loaded.height, loaded.width), (height, width))
    scale_x, scale_y = new_w / loaded.width, new_h / loaded.height
    placed = [person.transformed(scale_x, scale_y, left, top) for person in people]
    return draw_openpose(placed, (height, width), hands=hands, face=face)
