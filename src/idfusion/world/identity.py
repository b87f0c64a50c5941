"""World identities: one fixed parameter set per identity seed, and the train / held-out split.

Every parameter is drawn from a limited range shared by all identities, so thousands of identities overlap on any
single parameter (skin tone, hair colour, eye spacing, ...) and telling two apart needs several of them jointly.
Lengths are in face units: the head's half-width is 1, ``x`` points to the image's right and ``y`` down, with the
origin at the centre of the head outline.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "Identity",
    "sample_identity",
    "identity_name",
    "identity_seed",
    "TRAIN_IDENTITIES",
    "HELDOUT_IDENTITIES",
    "HAIR_STYLES",
    "FACIAL_HAIR",
    "NOSE_STYLES",
]

# The generators and the world face models train on TRAIN_IDENTITIES only; HELDOUT_IDENTITIES are for evaluation.
# The ranges are disjoint and far apart so an off-by-a-few slice of one never reaches the other.
TRAIN_IDENTITIES = range(0, 10_000)
HELDOUT_IDENTITIES = range(1_000_000, 1_010_000)

HAIR_STYLES = ("bald", "short", "side-part", "long", "curly", "bun")
FACIAL_HAIR = ("none", "moustache", "beard", "goatee")
NOSE_STYLES = ("line", "triangle", "round")

# Natural palettes; a colour is a position along the palette (interpolated), so neighbours blend continuously.
_SKIN = np.array([[244, 214, 190], [226, 182, 150], [200, 150, 112], [160, 110, 78], [112, 74, 52]], np.float32)
_HAIR = np.array(
    [[30, 26, 24], [64, 42, 28], [104, 70, 42], [142, 66, 36], [196, 162, 96], [148, 146, 142], [206, 204, 198]],
    np.float32,
)
_IRIS = np.array(
    [[42, 30, 24], [92, 58, 32], [128, 98, 52], [84, 118, 70], [70, 108, 168], [118, 124, 132]], np.float32
)

# Seed-stream tags: identity parameters and per-image draws come from separate streams of the same seed.
_IDENTITY_STREAM = 0x1D


def identity_name(seed: int) -> str:
    """The identity's name in datasets and records, e.g. ``"world-0000042"``."""
    return f"world-{int(seed):07d}"


def identity_seed(name: str) -> int:
    """Inverse of :func:`identity_name`."""
    if not name.startswith("world-"):
        raise ValueError(f"not a world identity name: {name!r}")
    return int(name[len("world-") :])


def _palette(palette: np.ndarray, position: float) -> np.ndarray:
    """Colour at ``position`` in [0, 1] along a palette, linearly interpolated."""
    scaled = position * (len(palette) - 1)
    low = min(int(scaled), len(palette) - 2)
    frac = scaled - low
    return palette[low] * (1 - frac) + palette[low + 1] * frac


@dataclass(frozen=True)
class Identity:
    """The fixed face of one identity (face units; colours are RGB floats in 0..255)."""

    seed: int
    # Head outline: upper half an ellipse of half-height head_top, lower half a superellipse (jaw_power 2 is round,
    # larger is squarer) of half-height head_bottom; chin_depth is how far the chin sits in front (moves with yaw).
    head_top: float
    head_bottom: float
    jaw_power: float
    chin_depth: float
    skin: tuple[float, float, float]
    # Eyes: centres at (+-eye_spacing, eye_y); half-width eye_size, height ratio eye_aspect, outer corners raised
    # by eye_tilt radians.
    eye_spacing: float
    eye_y: float
    eye_size: float
    eye_aspect: float
    eye_tilt: float
    iris: tuple[float, float, float]
    brow_gap: float
    brow_length: float
    brow_thickness: float
    brow_arch: float
    brow_tilt: float
    brow_color: tuple[float, float, float]
    nose_style: str
    nose_length: float
    nose_width: float
    mouth_y: float
    mouth_width: float
    lip_thickness: float
    lip_color: tuple[float, float, float]
    ear_y: float
    ear_size: float
    ear_protrusion: float
    hair_style: str
    hair_part: float  # -1 or 1: the side a side-part fringe sweeps to
    hair_color: tuple[float, float, float]
    hairline: float
    hair_volume: float
    facial_hair: str
    # Marks in face units: moles as (x, y, radius), freckles as (x, y), a scar as a segment (x1, y1, x2, y2).
    moles: tuple[tuple[float, float, float], ...]
    freckles: tuple[tuple[float, float], ...]
    scar: tuple[float, float, float, float] | None


def sample_identity(seed: int) -> Identity:
    """The identity of ``seed``: the same parameters every time, on every machine.

    Args:
        seed (`int`): identity seed, ``>= 0``. Seeds in :data:`TRAIN_IDENTITIES` are for training,
            :data:`HELDOUT_IDENTITIES` for evaluation.
    """
    if seed < 0:
        raise ValueError(f"identity seed must be >= 0, got {seed}")
    rng = np.random.default_rng([_IDENTITY_STREAM, int(seed)])
    u = rng.uniform

    skin = _palette(_SKIN, u()) + rng.normal(0, 4, 3)
    hair = _palette(_HAIR, u()) + rng.normal(0, 5, 3)
    iris = _palette(_IRIS, u()) + rng.normal(0, 6, 3)
    # Brows are a darker version of the hair (light-haired people have visible brows too).
    brow = hair * u(0.45, 0.8)
    lip = skin * (1 - (redness := u(0.18, 0.42))) + np.array([178, 62, 66]) * redness

    head_top = u(1.18, 1.42)
    eye_y = u(-0.06, 0.08)
    mouth_y = u(0.72, 0.9)
    n_moles = min(int(rng.poisson(0.9)), 3)
    moles = tuple(
        (float(u(0.25, 0.75) * rng.choice([-1, 1])), float(u(-0.25, 1.0)), float(u(0.045, 0.075)))
        for _ in range(n_moles)
    )
    freckles: tuple[tuple[float, float], ...] = ()
    if u() < 0.3:
        count = int(rng.integers(8, 16))
        freckles = tuple((float(u(-0.7, 0.7)), float(u(0.2, 0.55))) for _ in range(count))
    scar = None
    if u() < 0.12:
        x, y, angle, length = u(-0.7, 0.7), u(-0.35, 0.6), u(0, np.pi), u(0.18, 0.32)
        dx, dy = np.cos(angle) * length / 2, np.sin(angle) * length / 2
        scar = (float(x - dx), float(y - dy), float(x + dx), float(y + dy))

    def color(c: np.ndarray) -> tuple[float, float, float]:
        c = np.clip(c, 0, 255)
        return (float(c[0]), float(c[1]), float(c[2]))

    return Identity(
        seed=int(seed),
        head_top=float(head_top),
        head_bottom=float(u(1.15, 1.4)),
        jaw_power=float(u(1.9, 3.2)),
        chin_depth=float(u(0.15, 0.45)),
        skin=color(skin),
        eye_spacing=float(u(0.33, 0.46)),
        eye_y=float(eye_y),
        eye_size=float(u(0.14, 0.2)),
        eye_aspect=float(u(0.42, 0.68)),
        eye_tilt=float(u(-0.12, 0.12)),
        iris=color(iris),
        brow_gap=float(u(0.17, 0.28)),
        brow_length=float(u(0.2, 0.32)),
        brow_thickness=float(u(0.045, 0.095)),
        brow_arch=float(u(0.0, 0.08)),
        brow_tilt=float(u(-0.06, 0.06)),
        brow_color=color(brow),
        nose_style=str(rng.choice(NOSE_STYLES)),
        nose_length=float(u(0.36, 0.56)),
        nose_width=float(u(0.1, 0.2)),
        mouth_y=float(mouth_y),
        mouth_width=float(u(0.21, 0.34)),
        lip_thickness=float(u(0.04, 0.085)),
        lip_color=color(lip),
        ear_y=float(u(0.0, 0.2)),
        ear_size=float(u(0.2, 0.32)),
        ear_protrusion=float(u(0.08, 0.2)),
        hair_style=str(rng.choice(HAIR_STYLES, p=[0.1, 0.22, 0.2, 0.2, 0.14, 0.14])),
        hair_part=float(rng.choice([-1.0, 1.0])),
        hair_color=color(hair),
        hairline=float(u(-1.0, -0.72)),
        hair_volume=float(u(0.08, 0.22)),
        facial_hair=str(rng.choice(FACIAL_HAIR, p=[0.6, 0.14, 0.14, 0.12])),
        moles=moles,
        freckles=freckles,
        scar=scar,
    )
