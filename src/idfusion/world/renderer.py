"""The world renderer: identity + image seed + attributes -> an RGB image with its ground truth.

Faces are drawn as anti-aliased polygons (PIL on a 4x supersampled canvas, box-filtered down). Each face point has
a depth, so a head turn (yaw) moves the features sideways by ``depth * sin(yaw)`` while the head outline stays put;
then the head is rolled, scaled and placed. Everything is a pure function of ``(identity seed, image seed)`` and the
attributes: the same arguments give the same pixels (with the same numpy and Pillow versions).

Image coordinates follow OpenCV: pixel ``(i, j)`` has its centre at ``x = j, y = i``.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .attributes import Attributes, caption, sample_attributes
from .identity import Identity, sample_identity

__all__ = [
    "COLOR_RGB",
    "Pose",
    "Lighting",
    "FaceTruth",
    "Render",
    "sample_pose",
    "sample_lighting",
    "render",
    "render_scene",
    "degrade",
    "landmarks68_to_5",
]

COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (205, 45, 45),
    "orange": (240, 140, 35),
    "yellow": (235, 215, 60),
    "green": (60, 165, 70),
    "blue": (45, 90, 210),
    "purple": (135, 60, 180),
    "white": (238, 238, 238),
    "black": (28, 28, 30),
}
_SUPERSAMPLE = 4
_NUISANCE_STREAM = 0x1A
_SCENE_STREAM = 0x5C
_DARK = (24, 20, 22)


@dataclass(frozen=True)
class Pose:
    """Where and how one head appears (the per-image nuisance of a face).

    Attributes:
        center: head-outline centre ``(x, y)`` as fractions of the image side.
        scale: the head's half-width as a fraction of the image side.
        roll: in-plane rotation in radians (positive turns clockwise on screen).
        yaw: head turn in radians (positive moves the features to the image's right).
        expression_strength: 0..1 (sampled in 0.75..1), how strongly the expression shows.
        color_jitter: ``(3,)`` RGB offsets added to hat and shirt colours.
    """

    center: tuple[float, float]
    scale: float
    roll: float
    yaw: float
    expression_strength: float
    color_jitter: tuple[float, float, float]


@dataclass(frozen=True)
class Lighting:
    """Image-wide nuisance: brightness, a directional light gradient, a colour tint, sensor noise, pattern layout."""

    brightness: float
    angle: float
    strength: float
    tint: tuple[float, float, float]
    noise: float
    pattern_period: float
    pattern_angle: float
    pattern_phase: tuple[float, float]
    background_jitter: tuple[float, float, float]


@dataclass
class FaceTruth:
    """Ground truth for one rendered face (pixel coordinates of the returned image).

    Attributes:
        identity: identity seed.
        bbox: ``(4,)`` float32 ``x1, y1, x2, y2``: the head outline, skull top to chin, cheek to cheek.
        landmarks: ``(5, 2)`` float32, ArcFace order (image-left eye, image-right eye, nose tip, mouth corners).
        dense_landmarks: ``(68, 2)`` float32 in dlib's 68-point layout.
        pose: the pose it was drawn with.
    """

    identity: int
    bbox: np.ndarray
    landmarks: np.ndarray
    dense_landmarks: np.ndarray
    pose: Pose

    def to_record(self) -> dict:
        """The face entry of a dataset record."""
        return {
            "bbox": [round(float(v), 3) for v in self.bbox],
            "landmarks": [[round(float(x), 3), round(float(y), 3)] for x, y in self.landmarks],
            "score": 1.0,
        }


@dataclass
class Render:
    """One rendered image and its ground truth.

    Attributes:
        image: ``(H, W, 3)`` uint8 RGB.
        mask: ``(H, W)`` uint8, 255 on visible face skin (the head outline minus hair and hat in front of it).
        faces: one :class:`FaceTruth` per person, left to right.
        attributes: the complete attributes drawn.
        image_seed: the image seed.
    """

    image: np.ndarray
    mask: np.ndarray
    faces: list[FaceTruth]
    attributes: Attributes
    image_seed: int

    @property
    def caption(self) -> str:
        return caption(self.attributes)

    @property
    def size(self) -> int:
        return int(self.image.shape[0])


def _jitter(rng: np.random.Generator, amount: float) -> tuple[float, float, float]:
    values = rng.normal(0, amount, 3)
    return (float(values[0]), float(values[1]), float(values[2]))


def sample_pose(rng: np.random.Generator, people: int = 1, slot: int = 0) -> Pose:
    """Draw the pose of the ``slot``-th (from the left) of ``people`` heads."""
    if people == 1:
        center = (0.5 + rng.uniform(-0.07, 0.07), 0.46 + rng.uniform(-0.04, 0.04))
        scale = rng.uniform(0.19, 0.24)
    else:
        # Slots are wide enough that heads (with hair and hat) never overlap: face boxes stay disjoint.
        center = ((slot + 0.5) / people + rng.uniform(-0.025, 0.025), 0.45 + rng.uniform(-0.05, 0.05))
        scale = rng.uniform(0.11, 0.135) if people == 2 else rng.uniform(0.085, 0.1)
    return Pose(
        center=(float(center[0]), float(center[1])),
        scale=float(scale),
        roll=float(rng.uniform(-0.17, 0.17)),
        yaw=float(rng.uniform(-0.4, 0.4)),
        expression_strength=float(rng.uniform(0.75, 1.0)),
        color_jitter=_jitter(rng, 8.0),
    )


def sample_lighting(rng: np.random.Generator) -> Lighting:
    """Draw image-wide lighting and background-pattern nuisance."""
    tint = rng.uniform(0.95, 1.05, 3)
    return Lighting(
        brightness=float(rng.uniform(0.84, 1.1)),
        angle=float(rng.uniform(0, 2 * np.pi)),
        strength=float(rng.uniform(0.0, 0.25)),
        tint=(float(tint[0]), float(tint[1]), float(tint[2])),
        noise=float(rng.uniform(0.0, 3.0)),
        pattern_period=float(rng.uniform(0.09, 0.15)),
        pattern_angle=float(rng.choice([0.0, 0.25, 0.5, 0.75]) * np.pi),
        pattern_phase=(float(rng.uniform()), float(rng.uniform())),
        background_jitter=_jitter(rng, 8.0),
    )


# ----------------------------------------------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------------------------------------------


def _ellipse(cx: float, cy: float, rx: float, ry: float, n: int = 24, start: float = 0.0, stop: float = 2 * np.pi):
    t = np.linspace(start, stop, n, endpoint=stop - start < 2 * np.pi - 1e-9)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=-1)  # (n, 2)


def _face_depth(x: np.ndarray) -> np.ndarray:
    """Depth of the face surface at ``x`` (a cylinder of radius 1 seen from the front)."""
    return np.sqrt(np.clip(1.0 - np.asarray(x) ** 2, 0.05, None))


class _Projector:
    """Face units -> image pixels: yaw (by depth), then roll, scale and placement."""

    def __init__(self, pose: Pose, size: int) -> None:
        self.sin_yaw, self.cos_yaw = np.sin(pose.yaw), np.cos(pose.yaw)
        self.unit = pose.scale * size  # pixels per face unit
        cos_r, sin_r = np.cos(pose.roll), np.sin(pose.roll)
        self.rotation = np.array([[cos_r, -sin_r], [sin_r, cos_r]]) * self.unit
        self.center = np.array(pose.center) * size - 0.5  # fractions of the side -> pixel-centre coordinates

    def __call__(self, points: np.ndarray, depth: np.ndarray | float | None = None) -> np.ndarray:
        """``(N, 2)`` face points (and their depth; default: on the face surface) -> ``(N, 2)`` pixels."""
        points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        if depth is None:
            depth = _face_depth(points[:, 0])
        x = points[:, 0] * self.cos_yaw + np.broadcast_to(depth, points[:, 0].shape) * self.sin_yaw
        turned = np.stack([x, points[:, 1]], axis=-1)
        return turned @ self.rotation.T + self.center

    def flat(self, points: np.ndarray) -> np.ndarray:
        """Points that ignore yaw and roll (neck and shoulders)."""
        return np.asarray(points, dtype=np.float64).reshape(-1, 2) * self.unit + self.center


def _head_outline(identity: Identity, n: int = 72) -> tuple[np.ndarray, np.ndarray]:
    """``(n, 2)`` outline points (angle 0 = image right, increasing downwards) and their yaw shift weights."""
    phi = np.linspace(0, 2 * np.pi, n, endpoint=False)
    cos, sin = np.cos(phi), np.sin(phi)
    power = 2.0 / identity.jaw_power
    lower = sin > 0
    x = np.where(lower, np.sign(cos) * np.abs(cos) ** power, cos)
    y = np.where(lower, identity.head_bottom * np.abs(sin) ** power, identity.head_top * sin)
    # Only the chin is in front of the silhouette: it alone follows the head turn.
    shift = identity.chin_depth * np.clip(sin, 0, None) ** 3
    return np.stack([x, y], axis=-1), shift


def _jaw_points(identity: Identity) -> np.ndarray:
    """dlib points 0-16: the lower outline from the image-left side (eye level) through the chin to the right."""
    phi = np.linspace(np.pi, 0, 17)
    cos, sin = np.cos(phi), np.clip(np.sin(phi), 0, None)
    power = 2.0 / identity.jaw_power
    x = np.sign(cos) * np.abs(cos) ** power
    y = identity.head_bottom * sin**power
    return np.stack([x, y], axis=-1), identity.chin_depth * sin**3


@dataclass
class _Expression:
    eye_open: float
    brow_raise: float
    brow_frown: float
    mouth_lift: float  # corners move up (negative) or down (positive)
    mouth_open: float
    mouth_scale: float
    teeth: bool


def _expression(name: str, strength: float) -> _Expression:
    s = strength
    if name == "smiling":
        return _Expression(1 - 0.2 * s, 0.02 * s, 0.0, -0.13 * s, 0.07 * s, 1 + 0.16 * s, True)
    if name == "surprised":
        return _Expression(1 + 0.3 * s, 0.09 * s, 0.0, 0.0, 0.17 * s, 1 - 0.35 * s, False)
    if name == "angry":
        return _Expression(1 - 0.3 * s, -0.04 * s, 0.22 * s, 0.15 * s, 0.0, 1 - 0.05 * s, False)
    return _Expression(1.0, 0.0, 0.0, 0.0, 0.0, 1.0, False)


# ----------------------------------------------------------------------------------------------------------------
# Drawing
# ----------------------------------------------------------------------------------------------------------------


def _rgb(color: Sequence[float], factor: float = 1.0, offset: Sequence[float] = (0, 0, 0)) -> tuple[int, int, int]:
    c = np.clip(np.asarray(color, dtype=np.float64) * factor + np.asarray(offset), 0, 255)
    return (int(c[0]), int(c[1]), int(c[2]))


def _mix(a: Sequence[float], b: Sequence[float], t: float) -> tuple[float, ...]:
    return tuple(float(x) * (1 - t) + float(y) * t for x, y in zip(a, b, strict=True))


class _Canvas:
    """An RGB and a mask canvas at ``_SUPERSAMPLE`` x resolution, addressed in output pixel coordinates."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.factor = _SUPERSAMPLE
        side = size * self.factor
        self.rgb = Image.new("RGB", (side, side))
        self.mask = Image.new("L", (side, side), 0)
        self.draw = ImageDraw.Draw(self.rgb)
        self.mask_draw = ImageDraw.Draw(self.mask)

    def _xy(self, points: np.ndarray) -> list[float]:
        # Output pixel centre j covers supersampled pixels factor*j .. factor*j + factor-1 (centres at integers).
        return (np.asarray(points) * self.factor + (self.factor - 1) / 2).ravel().tolist()

    def polygon(self, points: np.ndarray, color: tuple[int, int, int], mask: int | None = None) -> None:
        xy = self._xy(points)
        self.draw.polygon(xy, fill=color)
        if mask is not None:
            self.mask_draw.polygon(xy, fill=mask)

    def line(self, points: np.ndarray, color: tuple[int, int, int], width: float) -> None:
        self.draw.line(self._xy(points), fill=color, width=max(1, int(round(width * self.factor))), joint="curve")

    def background(self, pixels: np.ndarray) -> None:
        self.rgb.paste(Image.fromarray(pixels))

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        out = (self.size, self.size)
        rgb = np.asarray(self.rgb.resize(out, Image.Resampling.BOX), dtype=np.float32)
        mask = np.asarray(self.mask.resize(out, Image.Resampling.BOX))
        return rgb, np.where(mask >= 128, 255, 0).astype(np.uint8)


def _pattern_shade(color: tuple[int, int, int]) -> tuple[float, ...]:
    # Dark colours get a lighter second tone, light ones a darker one, so the pattern shows on every colour.
    luminance = 0.3 * color[0] + 0.59 * color[1] + 0.11 * color[2]
    return _mix(color, (255, 255, 255), 0.4) if luminance < 110 else _mix(color, (0, 0, 0), 0.3)


def _background(attributes: Attributes, lighting: Lighting, side: int, size: int) -> np.ndarray:
    base = np.asarray(_rgb(COLOR_RGB[attributes.background], offset=lighting.background_jitter), np.uint8)
    if attributes.pattern == "plain":
        return np.broadcast_to(base, (side, side, 3)).copy()
    grid = (np.arange(side, dtype=np.float32) + 0.5) / (lighting.pattern_period * side)
    u = grid[None, :] + lighting.pattern_phase[0]  # (1, side): x along columns
    v = grid[:, None] + lighting.pattern_phase[1]  # (side, 1)
    if attributes.pattern == "striped":
        on = np.mod(u * np.cos(lighting.pattern_angle) + v * np.sin(lighting.pattern_angle), 1.0) < 0.5
    elif attributes.pattern == "dotted":
        on = (np.mod(u, 1.0) - 0.5) ** 2 + (np.mod(v, 1.0) - 0.5) ** 2 < 0.27**2
    else:  # checkered
        on = (np.floor(u * 2).astype(np.int64) + np.floor(v * 2).astype(np.int64)) % 2 == 0
    shade = np.asarray(_pattern_shade(tuple(int(c) for c in base)), np.float32).astype(np.uint8)
    return np.where(on[..., None], shade, base)  # (side, side, 3)


def _draw_body(canvas: _Canvas, project: _Projector, identity: Identity, attributes: Attributes, pose: Pose) -> None:
    hb = identity.head_bottom
    skin = identity.skin
    if identity.hair_style == "long":
        vol = identity.hair_volume
        back = np.array(
            [[-1 - vol, -0.3], [-1.05 - vol, hb + 0.75], [1.05 + vol, hb + 0.75], [1 + vol, -0.3], [0, -1.0]]
        )
        canvas.polygon(project(back, depth=0.0), _rgb(identity.hair_color, 0.85))
    neck = np.array([[-0.42, 0.3], [-0.46, hb + 0.8], [0.46, hb + 0.8], [0.42, 0.3]])
    canvas.polygon(project.flat(neck), _rgb(skin, 0.82))
    shirt_color = _rgb(COLOR_RGB[attributes.clothing], offset=pose.color_jitter)
    top = hb + 0.55
    shoulder = np.concatenate(
        [
            [[-2.0, top + 6.0]],
            _ellipse(-1.25, top + 0.45, 0.55, 0.45, n=10, start=np.pi, stop=1.5 * np.pi),
            [[-0.45, top], [0.0, top + 0.42], [0.45, top]],  # a V collar shows the neck
            _ellipse(1.25, top + 0.45, 0.55, 0.45, n=10, start=1.5 * np.pi, stop=2 * np.pi),
            [[2.0, top + 6.0]],
        ]
    )
    canvas.polygon(project.flat(shoulder), shirt_color)


def _eye_contour(identity: Identity, side: int, openness: float) -> tuple[np.ndarray, np.ndarray, float]:
    """Upper and lower lid curves ``(9, 2)`` each (image-left to image-right) and the lid half-height."""
    cx, cy = side * identity.eye_spacing, identity.eye_y
    w = identity.eye_size
    h = w * identity.eye_aspect * openness
    t = np.linspace(-1, 1, 9)
    upper = np.stack([cx + t * w, cy - h * (1 - t**2) ** 0.8], axis=-1)
    lower = np.stack([cx + t * w, cy + 0.85 * h * (1 - t**2) ** 0.9], axis=-1)
    # Tilt raises the outer corners: the outer end is on the image-left for the left eye.
    angle = -identity.eye_tilt * side
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    center = np.array([cx, cy])
    upper = (upper - center) @ rot.T + center
    lower = (lower - center) @ rot.T + center
    return upper, lower, h


def _draw_face(
    canvas: _Canvas,
    project: _Projector,
    identity: Identity,
    attributes: Attributes,
    pose: Pose,
) -> np.ndarray:
    """Draw one head; return its ``(68, 2)`` dense landmarks in pixels."""
    skin = identity.skin
    sin_yaw = project.sin_yaw
    expr = _expression(attributes.expression, pose.expression_strength)
    outline, shift = _head_outline(identity)
    outline_px = project(outline, depth=shift)

    # Ears: behind the head; the one on the side the face turns away from is hidden more.
    for side in (-1, 1):
        ear = _ellipse(
            side * (1 + 0.35 * identity.ear_protrusion),
            identity.ear_y,
            identity.ear_protrusion + 0.05,
            identity.ear_size / 2,
            n=16,
        )
        canvas.polygon(project(ear, depth=-0.25), _rgb(skin, 0.9))
        inner = _ellipse(
            side * (1 + 0.35 * identity.ear_protrusion),
            identity.ear_y,
            identity.ear_protrusion * 0.5,
            identity.ear_size / 3.5,
            n=12,
        )
        canvas.polygon(project(inner, depth=-0.25), _rgb(skin, 0.75))

    canvas.polygon(outline_px, _rgb(skin), mask=255)

    # Marks first: features drawn later cover any that land on them.
    for x, y, radius in identity.moles:
        canvas.polygon(project(_ellipse(x, y, radius, radius, n=10)), (86, 52, 40))
    for x, y in identity.freckles:
        canvas.polygon(project(_ellipse(x, y, 0.03, 0.03, n=6)), _rgb(skin, 0.78))
    if identity.scar is not None:
        x1, y1, x2, y2 = identity.scar
        canvas.line(
            project(np.array([[x1, y1], [x2, y2]])), _rgb(_mix(skin, (235, 160, 160), 0.6)), 0.03 * project.unit
        )

    dense = np.zeros((68, 2))
    jaw, jaw_shift = _jaw_points(identity)
    dense[0:17] = project(jaw, depth=jaw_shift)

    # Eyes: sclera, iris, pupil, then lids clipping the iris to the almond.
    eye_points = []
    for side in (-1, 1):
        upper, lower, h = _eye_contour(identity, side, expr.eye_open)
        almond = np.concatenate([upper, lower[::-1][1:-1]])
        canvas.polygon(project(almond), (236, 234, 228))
        center = np.array([side * identity.eye_spacing, identity.eye_y])
        r = min(identity.eye_size * 0.55, max(h, 0.02) * 1.05)
        canvas.polygon(project(_ellipse(*center, r, r, n=14)), _rgb(identity.iris))
        canvas.polygon(project(_ellipse(*center, r * 0.45, r * 0.45, n=10)), _DARK)
        lid = _rgb(skin, 0.93)
        canvas.polygon(project(np.concatenate([upper, upper[::-1] + [0, -r - 0.03]])), lid)
        canvas.polygon(project(np.concatenate([lower, lower[::-1] + [0, r + 0.03]])), lid)
        canvas.line(project(upper), _DARK, 0.035 * project.unit)
        # dlib order, the same for both eyes read left to right: left corner, upper lid at t = -1/3 and 1/3 (curve
        # indices 3, 5), right corner, lower lid at 1/3 and -1/3 (36 is the left eye's outer corner, 42 the right
        # eye's inner one).
        pts = [upper[0], upper[3], upper[5], upper[8], lower[5], lower[3]]
        eye_points.append(project(np.array(pts)))
    dense[36:42], dense[42:48] = eye_points

    # Brows: a tapered band; expression raises them or pulls the inner ends down.
    for side, index in ((-1, 17), (1, 22)):
        t = np.linspace(-1, 1, 9)  # image-left to image-right
        inner_t = -side * t  # 1 at the inner end
        cx = side * (identity.eye_spacing + 0.02)
        x = cx + t * identity.brow_length
        y = (
            identity.eye_y
            - identity.brow_gap
            - expr.brow_raise
            - identity.brow_arch * (1 - t**2)
            + (identity.brow_tilt * 0.5 + expr.brow_frown * 0.5) * inner_t
        )
        thick = identity.brow_thickness * (0.75 + 0.25 * inner_t)
        band = np.concatenate([np.stack([x, y - thick / 2], -1), np.stack([x, y + thick / 2], -1)[::-1]])
        canvas.polygon(project(band), _rgb(identity.brow_color))
        dense[index : index + 5] = project(np.stack([x, y], -1)[::2])

    # Nose: bridge points gain depth towards the tip, so a head turn bends them sideways.
    tip_y = identity.eye_y + identity.nose_length
    bridge = np.stack([np.zeros(4), np.linspace(identity.eye_y - 0.1, tip_y, 4)], -1)
    bridge_depth = np.linspace(1.0, 1.28, 4)
    dense[27:31] = project(bridge, depth=bridge_depth)
    nw = identity.nose_width
    nostrils = np.array(
        [[-nw, tip_y + 0.02], [-nw / 2, tip_y + 0.05], [0, tip_y + 0.06], [nw / 2, tip_y + 0.05], [nw, tip_y + 0.02]]
    )
    dense[31:36] = project(nostrils, depth=np.array([1.05, 1.12, 1.18, 1.12, 1.05]))
    shade = _rgb(skin, 0.8)
    if identity.nose_style == "triangle":
        tri = np.array([[0, identity.eye_y + 0.08], [-nw * 1.1, tip_y + 0.03], [nw * 1.1, tip_y + 0.03]])
        canvas.polygon(project(tri, depth=np.array([1.02, 1.05, 1.05])), _rgb(skin, 0.9))
    elif identity.nose_style == "round":
        canvas.polygon(project(_ellipse(0, tip_y - 0.02, nw * 0.75, nw * 0.6, n=14), depth=1.2), _rgb(skin, 0.9))
    side = 1.0 if sin_yaw < 0 else -1.0  # shade the nose side that turns towards the viewer
    edge = np.array([[side * 0.06, identity.eye_y + 0.05], [side * 0.08, tip_y - 0.05], [side * nw * 0.8, tip_y]])
    canvas.line(project(edge, depth=np.array([1.05, 1.2, 1.12])), shade, 0.03 * project.unit)
    for sx in (-1, 1):
        hole = _ellipse(sx * nw * 0.5, tip_y + 0.035, nw * 0.28, 0.03, n=10)
        canvas.polygon(project(hole, depth=1.15), _rgb(skin, 0.45))

    # Facial hair, under the mouth.
    beard = _rgb(identity.hair_color, 0.9)
    mouth_w = identity.mouth_width * expr.mouth_scale
    my = identity.mouth_y
    if identity.facial_hair in ("beard", "goatee"):
        if identity.facial_hair == "beard":
            # The outline's lower points run right to left (angles 0..pi); come back along the cheeks and mouth.
            jaw_band = outline[outline[:, 1] > 0.15]
            inner = np.array([[-0.9, 0.2], [-0.5, my + 0.05], [0.0, my + 0.2], [0.5, my + 0.05], [0.9, 0.2]])
            shape = np.concatenate([jaw_band, inner])
        else:
            shape = _ellipse(0, my + 0.3, 0.3, 0.22, n=16)
        canvas.polygon(project(shape), beard)
    if identity.facial_hair != "none":
        moustache = np.array(
            [[-mouth_w - 0.06, my - 0.01], [0, my - 0.11], [mouth_w + 0.06, my - 0.01], [0, my - 0.05]]
        )
        canvas.polygon(project(moustache), beard)

    # Mouth: a centre line bent by the expression, lips around it, the inside when open.
    t = np.linspace(-1, 1, 13)
    centre = my + expr.mouth_lift * t**2
    bulge = np.sqrt(1 - t**2)
    half_open = expr.mouth_open / 2 * (1 - t**2) ** 0.7
    lip = identity.lip_thickness * (0.55 if attributes.expression == "angry" else 1.0)  # pressed lips
    x = t * mouth_w
    upper_outer = np.stack([x, centre - half_open - lip * bulge], -1)
    lower_outer = np.stack([x, centre + half_open + 1.2 * lip * bulge], -1)
    upper_inner = np.stack([x, centre - half_open], -1)
    lower_inner = np.stack([x, centre + half_open], -1)
    canvas.polygon(project(np.concatenate([upper_outer, lower_outer[::-1]])), _rgb(identity.lip_color))
    if expr.mouth_open > 0.01:
        canvas.polygon(project(np.concatenate([upper_inner, lower_inner[::-1]])), (70, 24, 28))
        if expr.teeth:
            teeth = np.concatenate([upper_inner, (upper_inner + lower_inner)[::-1] / 2])
            canvas.polygon(project(teeth), (236, 232, 222))
    canvas.line(
        project(upper_inner if expr.mouth_open <= 0.01 else lower_inner),
        _rgb(identity.lip_color, 0.4),
        0.03 * project.unit,
    )
    outer_idx = [0, 2, 4, 6, 8, 10, 12]  # t = -1, -2/3, ..., 1
    dense[48:55] = project(upper_outer[outer_idx])
    dense[55:60] = project(lower_outer[[10, 8, 6, 4, 2]])
    dense[60] = project(upper_inner[1:2])[0]
    dense[61:64] = project(upper_inner[[4, 6, 8]])
    dense[64] = project(upper_inner[11:12])[0]
    dense[65:68] = project(lower_inner[[8, 6, 4]])

    _draw_hair(canvas, project, identity)
    return dense


def _draw_hair(canvas: _Canvas, project: _Projector, identity: Identity) -> None:
    style = identity.hair_style
    if style == "bald":
        return
    color = _rgb(identity.hair_color)
    vol = identity.hair_volume
    # The cap: the top of the head outline grown by the volume, down to the temples, back along the hairline.
    phi = np.linspace(np.pi + 0.12, 2 * np.pi - 0.12, 24)
    cap_outer = np.stack([(1 + vol) * np.cos(phi), (identity.head_top + vol) * np.sin(phi)], -1)
    cap_outer[0, 1], cap_outer[-1, 1] = 0.05, 0.05  # sideburns reach to eye level
    x = np.linspace(0.98, -0.98, 17)
    hairline = np.stack([x, identity.hairline + (-0.05 - identity.hairline) * np.abs(x / 0.98) ** 2.5], -1)
    cap = np.concatenate([cap_outer, hairline])
    depth = np.concatenate([np.zeros(len(cap_outer)), 0.8 * _face_depth(x)])
    canvas.polygon(project(cap, depth=depth), color, mask=0)
    if style == "side-part":
        s = identity.hair_part
        fringe = np.array(
            [
                [-s * 0.3, identity.hairline - 0.15],
                [s * 0.98, -0.3],
                [s * 0.6, identity.hairline + 0.3],
                [-s * 0.05, identity.hairline + 0.1],
            ]
        )
        canvas.polygon(project(fringe, depth=0.85), _rgb(identity.hair_color, 1.06), mask=0)
    elif style == "curly":
        for angle in np.linspace(np.pi - 0.25, 2 * np.pi + 0.25, 11):
            c = np.array([(1 + vol * 0.6) * np.cos(angle), (identity.head_top + vol * 0.6) * np.sin(angle)])
            curl = _ellipse(*c, 0.27 + vol, 0.27 + vol, n=12)
            canvas.polygon(project(curl, depth=0.0), color, mask=0)
    elif style == "bun":
        bun = _ellipse(0, -identity.head_top - vol - 0.18, 0.3, 0.26, n=14)
        canvas.polygon(project(bun, depth=0.0), _rgb(identity.hair_color, 0.92))


def _draw_glasses(canvas: _Canvas, project: _Projector, identity: Identity, kind: str) -> None:
    frame = (34, 34, 38)
    width = 0.045 * project.unit
    w = max(identity.eye_size + 0.07, 0.2)
    h = 0.14
    inner_ends = []
    for side in (-1, 1):
        cx, cy = side * identity.eye_spacing, identity.eye_y + 0.01
        lens = _ellipse(cx, cy, w, h, n=20)
        # A rounded rectangle: push the ellipse's points towards its bounding box.
        lens = np.array([cx, cy]) + np.sign(lens - [cx, cy]) * np.abs(lens - [cx, cy]) ** 0.8 * [w**0.2, h**0.2]
        px = project(lens, depth=1.05)
        if kind == "sunglasses":
            canvas.polygon(px, (22, 22, 28))
        canvas.line(np.concatenate([px, px[:1]]), frame, width)
        inner_ends.append(project(np.array([[cx - side * w, cy - 0.02]]), depth=1.05)[0])
        temple = np.array([[cx + side * w, cy - 0.02], [side * 1.0, cy - 0.04]])
        canvas.line(project(temple, depth=np.array([1.0, 0.0])), frame, width)
    canvas.line(np.array(inner_ends), frame, width)


def _draw_hat(canvas: _Canvas, project: _Projector, identity: Identity, color: tuple[int, int, int]) -> None:
    vol = identity.hair_volume if identity.hair_style in ("short", "side-part", "long", "bun", "curly") else 0.0
    band = -0.55
    rx, ry = 1.06 + vol * 0.5, identity.head_top + vol * 0.5 + 0.06
    start = np.pi + np.arcsin(min(-band / ry, 0.999))
    phi = np.linspace(start, 3 * np.pi - start, 24)
    dome = np.stack([rx * np.cos(phi), ry * np.sin(phi)], -1)
    dome = np.concatenate([dome, [[rx * np.cos(phi[-1]), band], [rx * np.cos(phi[0]), band]]])
    canvas.polygon(project(dome, depth=0.0), color, mask=0)
    stripe = np.array([[-rx * 0.99, band - 0.16], [rx * 0.99, band - 0.16], [rx * 0.99, band], [-rx * 0.99, band]])
    canvas.polygon(project(stripe, depth=0.0), _rgb(color, 0.72), mask=0)
    brim = _ellipse(0, band + 0.02, 1.4, 0.11, n=20)
    canvas.polygon(project(brim, depth=0.35), _rgb(color, 0.88), mask=0)


def landmarks68_to_5(points68: np.ndarray) -> np.ndarray:
    """The 5 ArcFace points from 68 dlib-layout points (eye contour means, nose tip, mouth corners)."""
    points68 = np.asarray(points68, dtype=np.float32)
    return np.stack(
        [points68[36:42].mean(0), points68[42:48].mean(0), points68[30], points68[48], points68[54]]
    ).astype(np.float32)


def _lighting(rgb: np.ndarray, lighting: Lighting, rng: np.random.Generator) -> np.ndarray:
    size = rgb.shape[0]
    grid = (np.arange(size) + 0.5) / size - 0.5
    u, v = np.meshgrid(grid, grid)  # (size, size) each
    gradient = 1 + lighting.strength * (u * np.cos(lighting.angle) + v * np.sin(lighting.angle))
    out = rgb * (lighting.brightness * gradient)[..., None] * np.asarray(lighting.tint, np.float32)
    if lighting.noise > 0:
        out = out + rng.normal(0, lighting.noise, out.shape)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _draw_scene(
    identities: list[Identity],
    poses: list[Pose],
    attributes: Attributes,
    lighting: Lighting,
    size: int,
    rng: np.random.Generator,
    image_seed: int,
) -> Render:
    canvas = _Canvas(size)
    canvas.background(_background(attributes, lighting, size * canvas.factor, size))
    projectors = [_Projector(pose, size) for pose in poses]
    for identity, project, pose in zip(identities, projectors, poses, strict=True):
        _draw_body(canvas, project, identity, attributes, pose)
    faces = []
    for identity, project, pose in zip(identities, projectors, poses, strict=True):
        dense = _draw_face(canvas, project, identity, attributes, pose)
        if attributes.glasses != "none":
            _draw_glasses(canvas, project, identity, attributes.glasses)
        if attributes.hat != "none":
            _draw_hat(canvas, project, identity, _rgb(COLOR_RGB[attributes.hat], offset=pose.color_jitter))
        outline, shift = _head_outline(identity)
        outline_px = project(outline, depth=shift)
        bbox = np.concatenate([outline_px.min(0), outline_px.max(0)]).astype(np.float32)
        faces.append(
            FaceTruth(
                identity=identity.seed,
                bbox=bbox,
                landmarks=landmarks68_to_5(dense),
                dense_landmarks=dense.astype(np.float32),
                pose=pose,
            )
        )
    rgb, mask = canvas.finish()
    return Render(
        image=_lighting(rgb, lighting, rng), mask=mask, faces=faces, attributes=attributes, image_seed=image_seed
    )


def _identity(identity: int | Identity) -> Identity:
    return identity if isinstance(identity, Identity) else sample_identity(int(identity))


def render(
    identity: int | Identity,
    image_seed: int,
    attributes: Attributes | None = None,
    *,
    size: int = 64,
    pose: Pose | None = None,
    lighting: Lighting | None = None,
) -> Render:
    """Render one person.

    Args:
        identity (`int` or `Identity`): identity seed (or its sampled parameters).
        image_seed (`int`): seeds the pose, lighting and (when not given) the attributes.
        attributes (`Attributes`, *optional*): complete attributes with ``people=1``; sampled from the image seed
            when omitted.
        size (`int`, defaults to 64): image side in pixels (64 and 128 are the world's sizes; any size >= 32 works).
        pose (`Pose`, *optional*): override the sampled pose (e.g. a frontal reference).
        lighting (`Lighting`, *optional*): override the sampled lighting.

    Returns:
        A :class:`Render`; the same arguments always give the same pixels.
    """
    identity = _identity(identity)
    rng = np.random.default_rng([_NUISANCE_STREAM, identity.seed, int(image_seed)])
    sampled_pose, sampled_lighting = sample_pose(rng), sample_lighting(rng)
    if attributes is None:
        attributes = sample_attributes(np.random.default_rng([_NUISANCE_STREAM, identity.seed, int(image_seed), 1]))
    _check(attributes, 1, size)
    return _draw_scene(
        [identity], [pose or sampled_pose], attributes, lighting or sampled_lighting, size, rng, int(image_seed)
    )


def render_scene(
    identities: Sequence[int | Identity],
    image_seed: int,
    attributes: Attributes | None = None,
    *,
    size: int = 64,
) -> Render:
    """Render two or three people side by side, faces never overlapping; all wear the same ``attributes``.

    Args:
        identities (`Sequence[int]`): 1 to 3 identity seeds, left to right.
        image_seed (`int`): seeds poses, lighting and (when not given) the attributes.
        attributes (`Attributes`, *optional*): complete attributes; ``people`` is set to ``len(identities)``.
        size (`int`, defaults to 64): image side in pixels.
    """
    people = len(identities)
    if not 1 <= people <= 3:
        raise ValueError(f"a scene has 1 to 3 people, got {people}")
    resolved = [_identity(i) for i in identities]
    rng = np.random.default_rng([_SCENE_STREAM, *(i.seed for i in resolved), int(image_seed)])
    poses = [sample_pose(rng, people, slot) for slot in range(people)]
    lighting = sample_lighting(rng)
    if attributes is None:
        attributes = sample_attributes(np.random.default_rng([_SCENE_STREAM, int(image_seed), people]))
    attributes = replace(attributes, people=people)
    _check(attributes, people, size)
    return _draw_scene(resolved, poses, attributes, lighting, size, rng, int(image_seed))


def _check(attributes: Attributes, people: int, size: int) -> None:
    if not attributes.complete:
        raise ValueError(f"render needs complete attributes (see complete_attributes); got {attributes}")
    if attributes.people != people:
        raise ValueError(f"attributes say {attributes.people} people but {people} are drawn; use render_scene")
    if size < 32:
        raise ValueError(f"size must be >= 32, got {size}")


def degrade(image: np.ndarray, seed: int, *, blur: float = 0.8, noise: float = 6.0, jpeg: int = 50) -> np.ndarray:
    """Blur, noise and JPEG-compress an image, like an imperfect generated image (deterministic from ``seed``).

    Args:
        image: ``(H, W, 3)`` uint8 RGB.
        seed: noise seed.
        blur: Gaussian blur radius in pixels of a 64 px image (scaled with the image side).
        noise: Gaussian noise standard deviation (0..255 scale).
        jpeg: JPEG quality (1..95); 0 skips compression.
    """
    rng = np.random.default_rng([0xDE, int(seed)])
    pil = Image.fromarray(image)
    if blur > 0:
        pil = pil.filter(ImageFilter.GaussianBlur(blur * image.shape[0] / 64))
    out = np.asarray(pil, dtype=np.float32)
    if noise > 0:
        out = out + rng.normal(0, noise, out.shape)
    pil = Image.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8))
    if jpeg > 0:
        buffer = io.BytesIO()
        pil.save(buffer, format="JPEG", quality=int(jpeg))
        buffer.seek(0)
        pil = Image.open(buffer).convert("RGB")
    return np.asarray(pil)
