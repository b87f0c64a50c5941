"""Fixed-template portraits: repaint the faces of a template photo with an identity, generic over the inpainter.

The flow follows FaceChain-FACT's "Fixed Templates Portrait" (spec §5.2, ``facechain/inference_inpaint_fact.py``
L736-790): detect the template's faces, keep the ``num_faces`` largest and order them by their left edge, black out
the other kept faces' boxes in the picture the inpainter sees, cut a square crop around the chosen face (the face
box is ``face_fraction`` of the crop side, zero padding where the crop leaves the image), resize it to
``work_size``, let an inpainting callable repaint the release's dilated face region (:func:`inpaint_mask`) with
ControlNet conditions (by default the pipeline's ``template_controls()``: for FACT the release's [OpenPose of the
face and hands, Canny of the crop with the face removed (:func:`canny_condition`)] at scales [1.0, 0.2]), and paste
the result back through a feathered mask.

Differences from the official chain:

* no stage A (OpenPose text-to-image portrait, face fusion, similarity-warp paste of the generated face into the
  template) and no stage C refinement pass: the inpainting callable does all generation in one call. So the pose
  condition is estimated on the template crop (face and hands, as the release draws it in stage B), and the
  repaint mask's growth below the eyes is not cut to the warped generated face (``inpaint_mask(limit=)`` takes
  one where a caller has it);
* masks come from facial landmarks (:mod:`idfusion.faces.masks`), not from the M2FP human-parsing model; the
  release's morphology on them (square kernels, horizontal eye line) is kept;
* no ABPN skin retouching and no face fusion: ``retouch`` is an optional post-processing hook on the repainted crop;
* no edge/colour compensation ("auto" low-strength pass): the paste alpha is the feathered inpainting mask, and every
  pixel where it is 0 is copied from the template exactly, so there is no VAE drift to cancel;
* the paste mask is the feathered face mask, not the whole crop rectangle; as in the official code it excludes the
  other template faces (their boxes and face masks), so they stay unchanged;
* ``num_faces=None`` (the default) keeps every detected face (the release's app asks for the count, default 1);
  ``face_index="all"`` repaints them one after another on the running result (the release repaints one per run);
* the crop box is rounded, where the release truncates its half side and centre to integers (a pixel at most).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import PIL.Image

from ..errors import FaceIndexError, ModelFilesError, NoFaceError
from ..faces.analyzer import FaceAnalyzer
from ..faces.masks import dilate_square, face_mask, feather
from ..faces.types import Face
from ..images import ImageInput, LoadedImage, load_image

__all__ = [
    "Box",
    "ControlHook",
    "MaskFn",
    "TemplateCrop",
    "TemplateResult",
    "TemplatePortrait",
    "select_template_faces",
    "square_crop_box",
    "crop_with_padding",
    "crop_face",
    "place_mask",
    "paste_back",
    "eye_row",
    "inpaint_mask",
    "canny_condition",
    "default_feather_px",
    "check_face_index",
    "template_portraits",
]

logger = logging.getLogger(__name__)

Box = tuple[int, int, int, int]
MaskFn = Callable[[Face, tuple[int, int]], np.ndarray]
ControlHook = Callable[[PIL.Image.Image, Face], PIL.Image.Image]


@dataclass
class TemplateCrop:
    """What the inpainting callable receives for one template face.

    Attributes:
        image: ``work_size`` x ``work_size`` RGB crop of the (running) template around the face.
        mask_image: mode ``"L"`` mask of the same size, 255 = repaint, 0 = keep.
        face: the template face in crop coordinates (box and landmarks scaled to ``work_size``).
        index: the face's index in the template, counted from the left.
        control_images: ControlNet conditions by name, computed by the pipeline's ``control_hooks``.
        box: the square crop ``(x0, y0, x1, y1)`` in template pixels (may extend past the image).
        label: ``"face k of N"``: which of this result's repaints it is (progress bars show it).
    """

    image: PIL.Image.Image
    mask_image: PIL.Image.Image
    face: Face
    index: int
    control_images: dict[str, PIL.Image.Image] = field(default_factory=dict)
    box: Box = (0, 0, 0, 0)
    label: str = ""


@dataclass
class TemplateResult:
    """Result of :class:`TemplatePortrait`.

    Attributes:
        image: the finished portrait, exactly the template's size.
        faces: the repainted template faces (template coordinates), in the order they were repainted.
        boxes: their square crop boxes ``(x0, y0, x1, y1)`` in template pixels.
        masks: their paste alphas, ``(H, W)`` ``float32`` in ``[0, 1]`` at template size; wherever all of them are 0
            the output equals the template bit for bit.
    """

    image: PIL.Image.Image
    faces: list[Face]
    boxes: list[Box]
    masks: list[np.ndarray]


def select_template_faces(
    faces: list[Face], face_index: int | str, source: str, num_faces: int | None = None
) -> list[int]:
    """Which faces to repaint, as the release picks them: the ``num_faces`` largest boxes, ordered by left edge.

    Args:
        faces: the faces found in the template, in any order.
        face_index: ``"all"``, or the index of one of the kept faces counted from the left from 0 (negative counts
            from the right).
        source: the template's name, for messages.
        num_faces: keep only this many faces, the largest boxes (the release's ``num_faces``); ``None`` keeps all.

    Returns:
        Indices into ``faces``, ordered left to right by the box's left edge.

    Raises:
        NoFaceError: ``faces`` is empty.
        FaceIndexError: ``face_index`` is out of range, or the template has fewer than ``num_faces`` faces.
        ValueError: ``face_index`` is neither ``"all"`` nor an integer, or ``num_faces`` is not a positive integer.
    """
    if not faces:
        raise NoFaceError(source, "no face found in the template; a template needs at least one face to repaint")
    kept = list(range(len(faces)))
    if num_faces is not None:
        if isinstance(num_faces, bool) or not isinstance(num_faces, (int, np.integer)) or num_faces < 1:
            raise ValueError(f"num_faces must be a whole number >= 1 or None, got {num_faces!r}")
        if len(faces) < num_faces:
            raise FaceIndexError(source, f"num_faces is {num_faces}, but the template has {len(faces)} face(s)")
        kept = sorted(kept, key=lambda i: faces[i].area, reverse=True)[: int(num_faces)]
    order = sorted(kept, key=lambda i: float(faces[i].bbox[0]))
    if isinstance(face_index, str):
        if face_index != "all":
            raise ValueError(f"face_index must be 'all' or an integer, got {face_index!r}")
        return order
    if isinstance(face_index, bool) or not isinstance(face_index, (int, np.integer)):
        raise ValueError(f"face_index must be 'all' or an integer, got {face_index!r}")
    if not -len(order) <= face_index < len(order):
        which = f"{len(order)} face(s)" if num_faces is None else f"{len(order)} face(s) kept (num_faces)"
        raise FaceIndexError(
            source,
            f"face index {face_index} requested, but the template has {which} "
            f"(valid: 0 to {len(order) - 1}, 0 is leftmost, or 'all')",
        )
    return [order[face_index]]


def square_crop_box(face: Face, face_fraction: float = 0.7) -> Box:
    """Square crop centred on the face box, whose side is ``max(box w, h) / face_fraction``.

    The official half-side is ``max(w, h) / 0.7 / 2``. The box may extend beyond the image.

    Returns:
        ``(x0, y0, x1, y1)`` integers with ``x1 - x0 == y1 - y0 >= 1``.
    """
    if not 0 < face_fraction <= 1:
        raise ValueError(f"face_fraction must be in (0, 1], got {face_fraction}")
    x1, y1, x2, y2 = (float(v) for v in face.bbox)
    side = max(1, int(round(max(x2 - x1, y2 - y1) / face_fraction)))
    x0 = int(round((x1 + x2) / 2 - side / 2))
    y0 = int(round((y1 + y2) / 2 - side / 2))
    return (x0, y0, x0 + side, y0 + side)


def _overlap(box: Box, height: int, width: int) -> tuple[slice, slice, slice, slice] | None:
    """``(image rows, image cols, crop rows, crop cols)`` of the part of ``box`` inside the image, or ``None``."""
    x0, y0, x1, y1 = box
    ix0, iy0, ix1, iy1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
    if ix0 >= ix1 or iy0 >= iy1:
        return None
    return (
        slice(iy0, iy1),
        slice(ix0, ix1),
        slice(iy0 - y0, iy1 - y0),
        slice(ix0 - x0, ix1 - x0),
    )


def _resize(array: np.ndarray, width: int, height: int) -> np.ndarray:
    if array.shape[1] == width and array.shape[0] == height:
        return array
    shrinking = width < array.shape[1] and height < array.shape[0]
    return cv2.resize(array, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


def crop_with_padding(image: np.ndarray, box: Box, size: int | None = None) -> np.ndarray:
    """Cut ``box`` out of ``image``, with zeros where the box leaves the image.

    Args:
        image: ``(H, W)`` or ``(H, W, C)`` array.
        box: ``(x0, y0, x1, y1)`` integers, may extend past the image.
        size: resize the crop to ``size`` x ``size`` (for example the 512 working size); ``None`` keeps box size.

    Returns:
        ``(y1 - y0, x1 - x0[, C])`` array of ``image``'s dtype, or ``(size, size[, C])``.
    """
    x0, y0, x1, y1 = (int(v) for v in box)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"crop box must have positive size, got {box}")
    crop = np.zeros((y1 - y0, x1 - x0, *image.shape[2:]), dtype=image.dtype)
    overlap = _overlap((x0, y0, x1, y1), image.shape[0], image.shape[1])
    if overlap is not None:
        rows, cols, crop_rows, crop_cols = overlap
        crop[crop_rows, crop_cols] = image[rows, cols]
    return crop if size is None else _resize(crop, size, size)


def crop_face(face: Face, box: Box, size: int | None = None) -> Face:
    """``face`` in the coordinates of the crop ``box`` (resized to ``size`` when given); crops are dropped."""
    x0, y0, x1, _ = box
    scale = 1.0 if size is None else size / (x1 - x0)
    offset = np.array([x0, y0], dtype=np.float32)

    def move(points: np.ndarray) -> np.ndarray:
        return ((np.asarray(points, dtype=np.float32).reshape(-1, 2) - offset) * scale).astype(np.float32)

    return dataclasses.replace(
        face,
        bbox=move(face.bbox).reshape(4),  # (2, 2) corners -> x1, y1, x2, y2
        landmarks=move(face.landmarks),
        dense_landmarks=None if face.dense_landmarks is None else move(face.dense_landmarks),
        crops={},
    )


def _alpha_region(
    mask_crop: np.ndarray, box: Box, height: int, width: int
) -> tuple[np.ndarray, tuple[slice, slice]] | None:
    """The crop mask resized to the box and cut to the image: ``(alpha, (rows, cols))`` or ``None``."""
    x0, y0, x1, y1 = box
    overlap = _overlap(box, height, width)
    if overlap is None:
        return None
    rows, cols, crop_rows, crop_cols = overlap
    mask = np.asarray(mask_crop, dtype=np.float32)
    if mask.ndim != 2:
        raise ValueError(f"mask_crop must be (H, W), got shape {mask.shape}")
    alpha = np.clip(_resize(mask, x1 - x0, y1 - y0)[crop_rows, crop_cols], 0.0, 1.0)
    return alpha, (rows, cols)


def place_mask(mask_crop: np.ndarray, box: Box, shape: tuple[int, int]) -> np.ndarray:
    """The crop-space mask as a template-size alpha: resized to ``box`` and placed there, 0 elsewhere.

    Returns:
        ``(H, W)`` ``float32`` in ``[0, 1]``: exactly the alpha :func:`paste_back` blends with.
    """
    height, width = int(shape[0]), int(shape[1])
    full = np.zeros((height, width), dtype=np.float32)
    region = _alpha_region(mask_crop, box, height, width)
    if region is not None:
        alpha, (rows, cols) = region
        full[rows, cols] = alpha
    return full


def paste_back(template: np.ndarray, result_crop: np.ndarray, box: Box, mask_crop: np.ndarray) -> np.ndarray:
    """Blend a repainted crop into the template: ``template * (1 - a) + result * a`` inside the image.

    Args:
        template: ``(H, W, 3)`` ``uint8``.
        result_crop: ``(h, w, 3)`` ``uint8`` repainted crop (any size; resized to the box).
        box: the square crop box ``(x0, y0, x1, y1)`` in template pixels (may extend past the image).
        mask_crop: ``(h', w')`` alpha in ``[0, 1]`` in crop space (any size; resized to the box).

    Returns:
        A new ``(H, W, 3)`` ``uint8`` array. Every pixel where the resized alpha is exactly 0 (including everything
        outside the box) has the template's value bit for bit.
    """
    template = np.asarray(template)
    result_crop = np.asarray(result_crop)
    if template.ndim != 3 or template.dtype != np.uint8:
        raise ValueError(f"template must be an (H, W, C) uint8 array, got {template.dtype} {template.shape}")
    if result_crop.ndim != 3 or result_crop.shape[2] != template.shape[2]:
        raise ValueError(f"result_crop must be (h, w, {template.shape[2]}), got {result_crop.shape}")
    out = template.copy()
    region = _alpha_region(mask_crop, box, template.shape[0], template.shape[1])
    if region is None:
        return out
    alpha, (rows, cols) = region
    x0, y0, x1, y1 = box
    _, _, crop_rows, crop_cols = _overlap(box, template.shape[0], template.shape[1])
    result = _resize(result_crop, x1 - x0, y1 - y0)[crop_rows, crop_cols].astype(np.float32)
    original = template[rows, cols]
    a = alpha[..., None]  # (h, w, 1)
    blended = np.clip(np.round(original.astype(np.float32) * (1.0 - a) + result * a), 0, 255).astype(np.uint8)
    # alpha 0 keeps the template exactly, whatever the float arithmetic does
    out[rows, cols] = np.where(a > 0, blended, original)
    return out


def _below_eye_line(face: Face, shape: tuple[int, int]) -> np.ndarray:
    """``(H, W)`` ``bool``: the chin side of the line through the eye centres (perpendicular to eyes -> mouth)."""
    eye_left, eye_right = np.asarray(face.landmarks[:2], dtype=np.float64)
    eyes = (eye_left + eye_right) / 2
    mouth = np.asarray(face.landmarks[3:5], dtype=np.float64).mean(axis=0)
    down = mouth - eyes
    ys, xs = np.mgrid[0 : int(shape[0]), 0 : int(shape[1])]  # (H, W) each
    return ((xs - eyes[0]) * down[0] + (ys - eyes[1]) * down[1]) > 0


def eye_row(face: Face) -> int:
    """The release's eye line: the row ``int(mean of the two eyes' y)``."""
    return int((float(face.landmarks[0][1]) + float(face.landmarks[1][1])) / 2)


def inpaint_mask(
    face: Face,
    shape: tuple[int, int],
    *,
    dilation: float = 0.04,
    below_eyes_dilation: float = 0.1,
    limit: np.ndarray | None = None,
    eye_line: str = "horizontal",
) -> np.ndarray:
    """The repaint region, by the release's rule (``segment`` in ``inference_inpaint_fact.py`` L161-178, with
    ``ksize1`` = ``dilation`` and ``ksize`` = ``below_eyes_dilation``) on the landmark face mask:

    1. ``m`` = the face mask (:func:`~idfusion.faces.masks.face_mask`), dilated with a square all-ones kernel of
       side ``int(sqrt(area(m)) * dilation)`` (:func:`~idfusion.faces.masks.dilate_square`);
    2. ``w`` = ``m`` dilated with a kernel of side ``int(sqrt(area(m)) * below_eyes_dilation)`` (the area of the
       mask of step 1); with ``limit`` (the release passes the warped generated face) ``w`` is cut to
       ``m | limit``;
    3. rows above the eye line (:func:`eye_row`) come from ``m``, the rows from it down from ``w`` (all of ``w``
       when the eye row is not below the top), so the chin and jaw line are regenerated while hair and forehead
       stay. A step with a fraction of 0 is skipped, as there.

    Mirrored exactly: the kernels and their sizes, the horizontal eye row, the limit. What differs is the region
    the rule starts from: the landmark face (brows to chin) instead of M2FP's parsed "Face" (which reaches the
    hairline); and the template flow passes no ``limit``, having no generated face to warp.

    Args:
        face: the face in the mask's coordinates.
        shape: ``(H, W)``.
        dilation, below_eyes_dilation: the release's ``ksize1`` (0.04) and ``ksize`` (0.1).
        limit: ``(H, W)`` mask the growth below the eyes may reach beyond ``m`` (``None``: no limit).
        eye_line: ``"horizontal"`` (the release's image row) or ``"tilted"`` (idfusion's option: the line through
            the eye centres, perpendicular to the eyes-to-mouth axis, which follows a tilted head).

    Returns:
        ``(H, W)`` ``float32`` binary mask.
    """
    if dilation < 0 or below_eyes_dilation < 0:
        raise ValueError(f"dilation and below_eyes_dilation must be >= 0, got {dilation}, {below_eyes_dilation}")
    if eye_line not in ("horizontal", "tilted"):
        raise ValueError(f"eye_line must be 'horizontal' or 'tilted', got {eye_line!r}")
    mask = face_mask(face, shape, dilation=0.0)
    if not mask.any():
        return mask
    if dilation > 0:
        mask = dilate_square(mask, int(np.sqrt(mask.sum()) * dilation))
    if below_eyes_dilation <= 0:
        return mask
    wide = dilate_square(mask, int(np.sqrt(mask.sum()) * below_eyes_dilation))
    if limit is not None:
        limit = np.asarray(limit, dtype=np.float32)
        if limit.shape != mask.shape:
            raise ValueError(f"limit must have shape {mask.shape}, got {limit.shape}")
        wide = wide * np.clip(mask + limit, 0.0, 1.0)
    if eye_line == "tilted":
        return np.where(_below_eye_line(face, shape), wide, mask).astype(np.float32)
    row = eye_row(face)
    if row <= 0:
        return wide
    return np.concatenate([mask[:row], wide[row:]], axis=0)


def canny_condition(
    image: PIL.Image.Image, face: Face | None = None, *, low: int = 100, high: int = 200, dilation: float = 0.05
) -> PIL.Image.Image:
    """Canny edge map for a Canny ControlNet, with the face region removed (spec §5.2, stage B; release L339-345).

    Usable directly as a control hook. As the release, the edges are OpenCV's Canny of the RGB image itself (its
    multi-channel gradient, not a grey conversion), and the removed region is :func:`inpaint_mask` with no overall
    growth and ``dilation`` below the eye line, so the ControlNet does not pin the template's facial features.

    Args:
        image: RGB crop.
        face: the face in the crop's coordinates; ``None`` keeps all edges.
        low, high: Canny hysteresis thresholds (official 100, 200).
        dilation: growth of the removed region below the eyes (official 0.05).

    Returns:
        RGB image, white edges on black.
    """
    edges = cv2.Canny(np.ascontiguousarray(np.asarray(image.convert("RGB"))), low, high)
    if face is not None:
        region = inpaint_mask(face, edges.shape, dilation=0.0, below_eyes_dilation=dilation)
        edges[region > 0] = 0
    return PIL.Image.fromarray(np.stack([edges] * 3, axis=-1))


def default_feather_px(work_size: int) -> int:
    """Feather radius at the working size, scaled as the official paste mask.

    The official ``ksize = 10 * cropl / 256`` (``cropl`` = half the crop side, in template pixels) is
    ``10 * work_size / 512`` in working-size pixels; its blur kernel ``2 * floor(1.8 * ksize) + 1`` is a
    :func:`~idfusion.faces.masks.feather` radius of ``floor(1.8 * ksize)`` (18 px at 512).
    """
    return int(math.floor(1.8 * 10.0 * work_size / 512))


def check_face_index(face_index: int | str) -> None:
    """Raise ``ValueError`` unless ``face_index`` is ``"all"`` or an integer."""
    if face_index != "all" and (isinstance(face_index, bool) or not isinstance(face_index, (int, np.integer))):
        raise ValueError(f"face_index must be 'all' or an integer, got {face_index!r}")


class TemplatePortrait:
    """Repaint one or all faces of a template photo with any inpainting callable.

    Args:
        inpaint: called once per face with a :class:`TemplateCrop`; returns the repainted crop as a PIL image
            (any size; it is resized to the crop box). The identity lives in this callable (for example the FACT
            inpainting pipeline bound to a user photo).
        analyzer: finds the template's faces; the default is dlib HOG with 68 landmarks and no recognizer (the
            template needs no embeddings).
        control_hooks: ControlNet conditions by name, each called as ``hook(crop_image, crop_face)``;
            :func:`canny_condition` fits as is.
        mask_fn: ``mask_fn(crop_face, (work_size, work_size))`` -> ``(H, W)`` repaint mask; default
            :func:`inpaint_mask`.
        retouch: optional post-processing of each repainted crop (PIL -> PIL), for example skin retouching or face
            restoration; the official ABPN retoucher is not available, so the default is none.
        face_fraction: the face box's share of the square crop side (official 0.7).
        work_size: side of the crop the inpainter sees (official 512).
        feather_px: feather radius of the paste mask in working-size pixels; ``None`` uses
            :func:`default_feather_px` (18 at 512). The paste alpha is the repaint mask, blurred, with the other
            template faces cut out before and after blurring.
        num_faces: the release's ``num_faces``: only this many largest faces are template faces (indexed from
            the left, blacked out while another is repainted); ``None`` (default) takes every face found.
        black_out_others: as the release, set the other template faces' boxes to black in the crop the inpainter
            sees (they are never pasted back); ``False`` shows them as they are (idfusion's option).
    """

    def __init__(
        self,
        inpaint: Callable[[TemplateCrop], PIL.Image.Image],
        *,
        analyzer: FaceAnalyzer | None = None,
        control_hooks: Mapping[str, ControlHook] | None = None,
        mask_fn: MaskFn | None = None,
        retouch: Callable[[PIL.Image.Image], PIL.Image.Image] | None = None,
        face_fraction: float = 0.7,
        work_size: int = 512,
        feather_px: int | None = None,
        num_faces: int | None = None,
        black_out_others: bool = True,
    ) -> None:
        if not 0 < face_fraction <= 1:
            raise ValueError(f"face_fraction must be in (0, 1], got {face_fraction}")
        if work_size < 8:
            raise ValueError(f"work_size must be at least 8, got {work_size}")
        if feather_px is not None and feather_px < 0:
            raise ValueError(f"feather_px must be >= 0, got {feather_px}")
        self.inpaint = inpaint
        self._analyzer = analyzer
        self.control_hooks = dict(control_hooks or {})
        self.mask_fn = mask_fn or inpaint_mask
        self.retouch = retouch
        self.face_fraction = face_fraction
        self.work_size = work_size
        self.feather_px = default_feather_px(work_size) if feather_px is None else feather_px
        if num_faces is not None and (isinstance(num_faces, bool) or not isinstance(num_faces, int) or num_faces < 1):
            raise ValueError(f"num_faces must be a whole number >= 1 or None, got {num_faces!r}")
        self.num_faces = num_faces
        self.black_out_others = bool(black_out_others)

    @property
    def analyzer(self) -> FaceAnalyzer:
        if self._analyzer is None:
            self._analyzer = FaceAnalyzer("hog", None, dense_landmarks=True, crops=())
        return self._analyzer

    def _find_faces(self, pixels: np.ndarray, source: str) -> list[Face]:
        try:
            return self.analyzer.analyze(pixels, select="all", name=source)
        except NoFaceError as error:
            reason = str(error).removeprefix(f"{error.source}: ")
            raise NoFaceError(source, f"template has no face to repaint ({reason})") from error

    def _protected(self, others: list[Face], box: Box) -> np.ndarray:
        """``(S, S)`` mask (crop space) of the other template faces: their boxes and face masks."""
        size = self.work_size
        protected = np.zeros((size, size), dtype=np.float32)
        for other in others:
            local = crop_face(other, box, size)
            x1, y1, x2, y2 = local.bbox
            cv2.rectangle(
                protected, (int(math.floor(x1)), int(math.floor(y1))), (int(math.ceil(x2)), int(math.ceil(y2))), 1, -1
            )
            protected = np.maximum(protected, face_mask(local, (size, size)))
        return protected

    def _repaint(
        self, current: np.ndarray, face: Face, index: int, others: list[Face], blacked: list[Face], label: str = ""
    ) -> tuple[np.ndarray, Box, np.ndarray]:
        """Repaint one face of ``current``; returns the new image, the crop box and the template-size alpha.
        ``others`` are protected from the paste, ``blacked`` are blacked out in what the inpainter sees."""
        size = self.work_size
        box = square_crop_box(face, self.face_fraction)
        seen = current
        if blacked:
            seen = current.copy()
            for other in blacked:
                # the release's boxes are truncated to integers (int16); clipped at 0 so a box past the left or top
                # edge does not wrap around
                x1, y1, x2, y2 = (max(int(v), 0) for v in other.bbox)
                seen[y1:y2, x1:x2] = 0
        crop = PIL.Image.fromarray(crop_with_padding(seen, box, size))
        local = crop_face(face, box, size)

        keep = 1.0 - self._protected(others, box)
        mask = np.asarray(self.mask_fn(local, (size, size)), dtype=np.float32)
        if mask.shape != (size, size):
            raise ValueError(f"mask_fn returned shape {mask.shape}, expected {(size, size)}")
        repaint = ((mask > 0.5) & (keep > 0)).astype(np.float32)
        mask_image = PIL.Image.fromarray((repaint * 255).astype(np.uint8), mode="L")
        controls = {name: hook(crop, local) for name, hook in self.control_hooks.items()}

        result = self.inpaint(
            TemplateCrop(
                image=crop,
                mask_image=mask_image,
                face=local,
                index=index,
                control_images=controls,
                box=box,
                label=label,
            )  # fmt: skip
        )
        if not isinstance(result, PIL.Image.Image):
            raise TypeError(f"the inpaint callable must return a PIL image, got {type(result).__name__}")
        if self.retouch is not None:
            result = self.retouch(result)
        # blur inside the allowed area and cut the other faces again, so they stay exact
        alpha = feather(repaint, self.feather_px) * keep
        pasted = paste_back(current, np.asarray(result.convert("RGB")), box, alpha)
        return pasted, box, place_mask(alpha, box, current.shape[:2])

    def find_faces(self, template: ImageInput) -> tuple[LoadedImage, list[Face]]:
        """Load the template (EXIF orientation applied; a file is only read) and detect its faces.

        Raises:
            ImageError: the template cannot be read.
            NoFaceError: the template has no face.
        """
        loaded = load_image(template, max_pixels=self.analyzer.max_pixels)
        return loaded, self._find_faces(loaded.array, loaded.name)

    def __call__(self, template: ImageInput, face_index: int | str = 0) -> TemplateResult:
        """Repaint the template's face ``face_index`` (counted from the left from 0) or ``"all"`` of them.

        Args:
            template: path, bytes, PIL image or RGB array (EXIF orientation is applied; a file is only read).
            face_index: which face, or ``"all"`` to repaint every face one after another on the running result.

        Returns:
            :class:`TemplateResult` whose image has exactly the (EXIF-oriented) template's size.

        Raises:
            ImageError: the template cannot be read.
            NoFaceError: the template has no face.
            FaceIndexError: ``face_index`` is out of range.
        """
        check_face_index(face_index)
        loaded, faces = self.find_faces(template)
        return self.repaint(loaded, faces, face_index)

    def repaint(self, loaded: LoadedImage, faces: list[Face], face_index: int | str = 0) -> TemplateResult:
        """:meth:`__call__` on a template already loaded and analysed by :meth:`find_faces` (several results from
        one template detect its faces once)."""
        check_face_index(face_index)
        source = loaded.name
        chosen = select_template_faces(faces, face_index, source, self.num_faces)
        order = select_template_faces(faces, "all", source, self.num_faces)
        position = {face_id: rank for rank, face_id in enumerate(order)}

        current = loaded.array.copy()
        boxes: list[Box] = []
        masks: list[np.ndarray] = []
        for step, face_id in enumerate(chosen, start=1):
            face = faces[face_id]
            others = [other for i, other in enumerate(faces) if i != face_id]
            blacked = [faces[i] for i in order if i != face_id] if self.black_out_others else []
            logger.info(
                "template %s: repainting face %d (%d of %d), box %s",
                source,
                position[face_id],
                step,
                len(chosen),
                [round(float(v)) for v in face.bbox],
            )
            label = f"face {step} of {len(chosen)}"
            current, box, alpha = self._repaint(current, face, position[face_id], others, blacked, label)
            boxes.append(box)
            masks.append(alpha)
        return TemplateResult(
            image=PIL.Image.fromarray(current), faces=[faces[i] for i in chosen], boxes=boxes, masks=masks
        )


def _pose_hook(pipe: Any) -> ControlHook:
    """The OpenPose condition of a crop, drawn as the release draws its stage-B pose (face and hands, no body);
    a crop's pose is the same for every seed, so it is estimated once."""
    from ..pose import draw_openpose

    skeletons: dict[bytes, PIL.Image.Image] = {}

    def hook(crop: PIL.Image.Image, face: Face) -> PIL.Image.Image:
        key = hashlib.sha1(crop.tobytes()).digest()
        if key not in skeletons:
            estimator = pipe.pose_preprocessor.estimator  # raises naming the DWPose files when absent
            people = estimator(np.asarray(crop.convert("RGB")))
            skeletons[key] = draw_openpose(people, (crop.height, crop.width), body=False, hands=True, face=True)
        return skeletons[key]

    return hook


def _control_hooks(
    pipe: Any, controls: Sequence[str] | None, use_pose: bool, custom: Mapping[str, ControlHook]
) -> dict[str, ControlHook]:
    """The hooks for a template call: ``controls`` (default: the pipeline's ``template_controls()``, plus
    ``"pose"`` when ``use_pose``), then the custom hooks, which replace a built-in of the same name."""
    explicit = controls is not None
    if controls is None:
        defaults = getattr(pipe, "template_controls", None)
        controls = list(defaults()) if callable(defaults) else []
    names = list(dict.fromkeys([*controls, *(["pose"] if use_pose else [])]))
    hooks: dict[str, ControlHook] = {}
    for name in names:
        if name in custom:
            continue
        if name == "canny":
            hooks[name] = canny_condition
        elif name == "pose":
            pose_preprocessor = getattr(pipe, "pose_preprocessor", None)
            if pose_preprocessor is None:
                raise ValueError(f"{type(pipe).__name__} has no pose support: the 'pose' control cannot be used")
            if not (explicit or use_pose):
                try:
                    _ = pose_preprocessor.estimator  # a default condition: without DWPose, go on without it
                except ModelFilesError as error:
                    logger.warning("template: the pose condition needs DWPose; continuing without it (%s)", error)
                    continue
            hooks[name] = _pose_hook(pipe)
        else:
            raise ValueError(f"unknown control {name!r}: the built-in ones are 'pose' and 'canny'")
    hooks.update(custom)
    return hooks


def template_portraits(
    pipe: Any,
    template: ImageInput,
    faces: Any = None,
    *,
    identity: Mapping[str, Any] | None = None,
    face_index: int | str = 0,
    strength: float = 0.6,
    prompt: str | None = None,
    use_pose: bool = False,
    controls: Sequence[str] | None = None,
    num_images: int = 1,
    seed: int | Sequence[int] | None = None,
    max_images: int | None = None,
    flow_options: Mapping[str, Any] | None = None,
    **call_options: Any,
) -> Any:
    """Fixed-template portraits with any identity pipeline that inpaints (``image``, ``mask_image``, ``strength``).

    Each chosen template face (left to right, or ``"all"``) is cut out in a square crop at the model's native size,
    its face region is inpainted with the identity, and the crop is pasted back through a feathered mask; every pixel
    outside that mask is the template's. The identity is encoded once (``pipe.encode_identity(faces)``, with the
    pipeline's ``template_defaults["identity_options"]`` and those ``call_options`` it takes) for every face and
    result. Every control hook's image reaches the inpainting call as ``control_images`` (by name).

    Args:
        pipe: an :class:`~idfusion.pipelines.core.IdentityPipeline` whose ``__call__`` inpaints.
        template: the template photo (one or more faces).
        faces, identity: the identity photos, or the call arguments ``pipe.encode_identity`` made from them.
        face_index: template face to repaint, counted from the left (0 = leftmost), or ``"all"``.
        strength: inpainting strength (0, 1].
        prompt: default the pipeline's ``template_defaults["prompt"]``, else the pipeline's own default.
        use_pose: also keep the template's pose (the ``"pose"`` control) where the defaults do not already; it
            needs the pipeline's pose support and the DWPose models.
        controls: the ControlNet conditions to use, by name (``"pose"``: the crop's OpenPose face and hands,
            ``"canny"``: :func:`canny_condition`); default the pipeline's ``template_controls()`` (FACT: the
            release's [OpenPose, Canny], those whose ControlNet is loaded; a default pose without the DWPose models
            is skipped with a warning). ``()`` uses none.
        num_images: results, one seed each; ``max_images`` bounds it.
        flow_options: :class:`TemplatePortrait` options (``mask_fn``, ``retouch``, ``analyzer``, ``control_hooks``
            (custom hooks by name, added to ``controls``), ``face_fraction``, ``feather_px``, ``num_faces``,
            ``black_out_others``).
        call_options: further ``pipe(...)`` arguments (``negative_prompt``, ``adapter_scale``, steps, ...).

    Returns:
        ``IdentityPipelineOutput``: template-size images, metadata, reference crops.
    """
    import inspect
    import os

    from ..outputs import file_sha256
    from ..pipelines.core import IdentityPipelineOutput, check_one_identity, resolve_seeds

    if max_images is not None and not 1 <= num_images <= max_images:
        raise ValueError(f"num_images must be 1 to {max_images}, got {num_images}")
    check_face_index(face_index)
    check_one_identity(faces, identity, "identity")
    defaults = dict(getattr(pipe, "template_defaults", {}) or {})
    if identity is None:
        options = dict(defaults.pop("identity_options", {}))
        accepted = inspect.signature(pipe.encode_identity).parameters
        options.update({k: v for k, v in call_options.items() if k in accepted and k != "faces"})
        identity = pipe.encode_identity(faces, **options)
    else:
        defaults.pop("identity_options", None)
        identity = dict(identity)
    references = next((v.references for v in identity.values() if hasattr(v, "references")), [])
    from_file = isinstance(template, (str, os.PathLike))
    size = pipe.native_size()
    options = dict(flow_options or {})
    control_hooks = _control_hooks(pipe, controls, use_pose, dict(options.pop("control_hooks", None) or {}))
    if control_hooks and "control_images" not in inspect.signature(pipe.__call__).parameters:
        raise ValueError(
            f"{type(pipe).__name__} takes no ControlNet conditions, so the control hooks {sorted(control_hooks)} "
            "cannot be used"
        )
    options.setdefault("analyzer", pipe.default_face_analyzer())
    template_prompt = defaults.pop("prompt", None)
    text = prompt if prompt is not None else template_prompt
    call_defaults = {**defaults, **call_options}  # the pipeline's other template defaults, then the caller's

    calls: list[dict] = []  # each inpainting call's metadata, for the current result
    current = {"seed": 0}

    def inpaint(crop: TemplateCrop) -> PIL.Image.Image:
        extra = {"control_images": dict(crop.control_images)} if crop.control_images else {}
        # diffusers replaces the whole bar config: keep the caller's (disable=...) and restore it afterwards
        bar_config = dict(getattr(pipe, "_progress_bar_config", {}))
        pipe.set_progress_bar_config(**{**bar_config, "desc": crop.label or None})
        try:
            out = pipe(
                **identity, prompt=text, image=crop.image, mask_image=crop.mask_image, strength=strength,
                seed=current["seed"], height=size, width=size, **extra, **call_defaults,
            )  # fmt: skip
        finally:
            pipe.set_progress_bar_config(**bar_config)
        calls.append(out.metadata[0])
        return out.images[0]

    flow = TemplatePortrait(inpaint, control_hooks=control_hooks, work_size=size, **options)
    loaded, found = flow.find_faces(template)  # once for every result
    shared: dict[str, Any] = {"template": str(template) if from_file else "<image>", "face_index": face_index}
    if from_file:
        shared["template_sha256"] = file_sha256(template)
    images, metadata = [], []
    for total, image_seed in enumerate(resolve_seeds(seed, num_images), start=1):
        current["seed"] = image_seed
        calls.clear()
        logger.info("template result %d of %d (seed %d)", total, num_images, image_seed)
        result = flow.repaint(loaded, found, face_index)
        images.append(result.image)
        size_meta = {"width": result.image.width, "height": result.image.height, "crop_size": size}
        metadata.append({**calls[-1], **shared, "faces_repainted": len(calls), **size_meta})
    return IdentityPipelineOutput(images=images, metadata=metadata, references=list(references))
