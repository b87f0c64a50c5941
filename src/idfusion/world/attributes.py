"""Prompt-controlled attributes of a world image and their caption grammar.

Canonical caption (every field is always written, so :func:`parse_caption` inverts :func:`caption` exactly)::

    a photo of <subject>[ wearing <item>[ and <item>]], in <a >?<colour> shirt<s>?, <expression>,
    on a <colour> <pattern> background

``subject`` is "a person", "two people" or "three people"; items are "<a >?<colour> hat<s>?", "glasses" and
"sunglasses"; a plain background is written "on a plain <colour> background". In a scene every person wears the
same attributes. :func:`parse_caption` also reads free prompts that use the same words; a field the text does not
mention is ``None`` (unspecified), except hat and glasses, which are ``"none"`` when not mentioned.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass, fields

import numpy as np

__all__ = [
    "COLORS",
    "PATTERNS",
    "HATS",
    "GLASSES",
    "EXPRESSIONS",
    "ATTRIBUTE_VALUES",
    "Attributes",
    "sample_attributes",
    "complete_attributes",
    "caption",
    "parse_caption",
    "is_heldout",
    "sample_heldout_attributes",
]

COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "white", "black")
PATTERNS = ("plain", "striped", "dotted", "checkered")
HATS = ("none", *COLORS)
GLASSES = ("none", "glasses", "sunglasses")
EXPRESSIONS = ("neutral", "smiling", "surprised", "angry")

# Field -> its values, in the order the attribute checker's class indices use.
ATTRIBUTE_VALUES: dict[str, tuple[str, ...]] = {
    "background": COLORS,
    "pattern": PATTERNS,
    "hat": HATS,
    "glasses": GLASSES,
    "clothing": COLORS,
    "expression": EXPRESSIONS,
}

_NUMBERS = {1: "a person", 2: "two people", 3: "three people"}
_EXPRESSION_TEXT = {
    "neutral": "with a neutral expression",
    "smiling": "smiling",
    "surprised": "surprised",
    "angry": "angry",
}
_ATTRIBUTE_STREAM = 0xA7
_HELDOUT_STREAM = 0xA8


@dataclass(frozen=True)
class Attributes:
    """What a prompt controls. ``None`` means unspecified (only :func:`parse_caption` produces it).

    Attributes:
        background: background colour, one of :data:`COLORS`.
        pattern: background pattern, one of :data:`PATTERNS`.
        hat: hat colour, or ``"none"``.
        glasses: ``"none"``, ``"glasses"`` or ``"sunglasses"``.
        clothing: shirt colour, one of :data:`COLORS`.
        expression: one of :data:`EXPRESSIONS`.
        people: number of people, 1 to 3.
    """

    background: str | None = None
    pattern: str | None = None
    hat: str | None = None
    glasses: str | None = None
    clothing: str | None = None
    expression: str | None = None
    people: int | None = 1

    def __post_init__(self) -> None:
        for name, values in ATTRIBUTE_VALUES.items():
            value = getattr(self, name)
            if value is not None and value not in values:
                raise ValueError(f"{name} must be one of {', '.join(values)}; got {value!r}")
        if self.people is not None and self.people not in _NUMBERS:
            raise ValueError(f"people must be 1, 2 or 3; got {self.people!r}")

    @property
    def complete(self) -> bool:
        """Every field is specified (the attributes can be rendered)."""
        return all(getattr(self, f.name) is not None for f in fields(self))

    def specified(self) -> dict[str, str | int]:
        """The specified fields as a dictionary."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    def to_dict(self) -> dict[str, str | int | None]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Attributes:
        return cls(**{f.name: data.get(f.name) for f in fields(cls)})


def sample_attributes(rng: np.random.Generator | int, **fixed: str | int) -> Attributes:
    """Draw complete attributes (the training distribution); ``fixed`` fields are kept as given.

    Args:
        rng (`np.random.Generator` or `int`): a generator, or a seed for one.
        fixed: field values to keep, e.g. ``hat="red", people=2``.
    """
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng([_ATTRIBUTE_STREAM, int(rng)])
    # Draw every field even when fixed, so fixing one field does not change the others for the same seed.
    drawn = {
        "background": COLORS[rng.integers(len(COLORS))],
        "pattern": PATTERNS[rng.integers(len(PATTERNS))],
        "hat": "none" if rng.uniform() < 0.4 else COLORS[rng.integers(len(COLORS))],
        "glasses": GLASSES[rng.choice(3, p=[0.5, 0.25, 0.25])],
        "clothing": COLORS[rng.integers(len(COLORS))],
        "expression": EXPRESSIONS[rng.integers(len(EXPRESSIONS))],
        "people": 1,
    }
    unknown = set(fixed) - set(drawn)
    if unknown:
        raise TypeError(f"unknown attribute(s): {', '.join(sorted(unknown))}")
    drawn.update({k: v for k, v in fixed.items() if v is not None})
    return Attributes(**drawn)


def complete_attributes(partial: Attributes, rng: np.random.Generator | int) -> Attributes:
    """Fill the unspecified fields of ``partial`` (e.g. from :func:`parse_caption`) with sampled values."""
    return sample_attributes(rng, **partial.specified())


def caption(attributes: Attributes) -> str:
    """The canonical caption of complete ``attributes``."""
    if not attributes.complete:
        missing = [f.name for f in fields(attributes) if getattr(attributes, f.name) is None]
        raise ValueError(f"caption needs complete attributes; unspecified: {', '.join(missing)}")
    plural = attributes.people > 1
    items = []
    if attributes.hat != "none":
        items.append(f"{attributes.hat} hats" if plural else f"a {attributes.hat} hat")
    if attributes.glasses != "none":
        items.append(attributes.glasses)
    wearing = f" wearing {' and '.join(items)}" if items else ""
    shirt = f"{attributes.clothing} shirts" if plural else f"a {attributes.clothing} shirt"
    pattern = "plain " if attributes.pattern == "plain" else ""
    suffix = "" if attributes.pattern == "plain" else f" {attributes.pattern}"
    return (
        f"a photo of {_NUMBERS[attributes.people]}{wearing}, in {shirt}, {_EXPRESSION_TEXT[attributes.expression]}, "
        f"on a {pattern}{attributes.background}{suffix} background"
    )


# One attribute combination in HELDOUT_BUCKETS is held out: the base model never trains on it, so its evaluation
# captions (sample_heldout_attributes) test composition of values it saw only in other combinations.
HELDOUT_BUCKETS = 8


def is_heldout(attributes: Attributes) -> bool:
    """Whether complete ``attributes`` are a held-out combination (about 1 in :data:`HELDOUT_BUCKETS`)."""
    digest = hashlib.sha256(caption(attributes).encode()).digest()
    return digest[0] % HELDOUT_BUCKETS == 0


def sample_heldout_attributes(seed: int, people: int = 1) -> Attributes:
    """Attributes drawn as :func:`sample_attributes` draws them, redrawn until :func:`is_heldout` (deterministic)."""
    rng = np.random.default_rng([_HELDOUT_STREAM, int(seed), int(people)])
    while True:
        attributes = sample_attributes(rng, people=people)
        if is_heldout(attributes):
            return attributes


_COLOR = "|".join(COLORS)
_PATTERN = "|".join(PATTERNS)
_HAT_RE = re.compile(rf"\b(?:({_COLOR})\s+)?(?:hat|hats|cap|caps)\b")
_SHIRT_RE = re.compile(rf"\b({_COLOR})\s+(?:shirt|shirts|t-shirt|t-shirts|clothes|top|tops|sweater|sweaters)\b")
_BACKGROUND_RE = re.compile(rf"\b(?:({_PATTERN})\s+)?({_COLOR})\s+(?:({_PATTERN})\s+)?(?:background|backdrop)\b")
_PATTERN_ONLY_RE = re.compile(rf"\b({_PATTERN})\s+(?:background|backdrop)\b")
_PEOPLE = (
    (3, re.compile(r"\b(?:three|3)\s+(?:people|persons|men|women|faces)\b")),
    (2, re.compile(r"\b(?:two|2)\s+(?:people|persons|men|women|faces)\b|\ba couple\b")),
    (1, re.compile(r"\b(?:a|one|1)\s+(?:person|man|woman|face)\b")),
)
_EXPRESSION_RE = (
    ("smiling", re.compile(r"\bsmil(?:e|es|ing)\b")),
    ("surprised", re.compile(r"\bsurprised?\b")),
    ("angry", re.compile(r"\bangry\b|\bfrown(?:ing)?\b")),
    ("neutral", re.compile(r"\bneutral\b")),
)


def parse_caption(text: str) -> Attributes:
    """The attributes a caption or prompt asks for; the inverse of :func:`caption`.

    Fields the text does not mention are ``None``, except ``hat`` and ``glasses`` (``"none"`` when not mentioned)
    and ``people`` (``None`` when no count is given). "a hat" without a colour leaves ``hat`` unspecified.
    """
    text = text.lower()
    hat_match = _HAT_RE.search(text)
    hat = "none" if hat_match is None else hat_match.group(1)
    if re.search(r"\bsunglasses\b", text):
        glasses = "sunglasses"
    elif re.search(r"\b(?:glasses|spectacles|eyeglasses)\b", text):
        glasses = "glasses"
    else:
        glasses = "none"
    shirt = _SHIRT_RE.search(text)
    background = pattern = None
    if (match := _BACKGROUND_RE.search(text)) is not None:
        background = match.group(2)
        pattern = match.group(1) or match.group(3) or "plain"
    elif (match := _PATTERN_ONLY_RE.search(text)) is not None:
        pattern = match.group(1)
    people = next((n for n, regex in _PEOPLE if regex.search(text)), None)
    expression = next((name for name, regex in _EXPRESSION_RE if regex.search(text)), None)
    return Attributes(
        background=background,
        pattern=pattern,
        hat=hat,
        glasses=glasses,
        clothing=None if shirt is None else shirt.group(1),
        expression=expression,
        people=people,
    )
