"""A small CLIP tokenizer for the test kit: CLIP's own BPE, keeping only the merges that a few hundred words need.

The real vocabulary has 49,408 tokens, so every CLIP token table holds 49,408 rows: 6 MB at the kit's width 32 and
101 MB at width 512, which the Arc2Face and AdaFace kits need (the 512-d ArcFace embedding is zero-padded into the
token width). The tiny kits' tokenizers use this reduced vocabulary instead, and their token tables match it.

It is the same format and the same tokenizer: ``vocab.json`` + ``merges.txt`` for ``transformers.CLIPTokenizer``
(written by :func:`idfusion.clip_tokenizer.save_clip_tokenizer` from a reduced BPE file), and a reduced
``bpe_simple_vocab_16e6.txt.gz`` for FlashFace's own tokenizer. The vocabulary is, as in CLIP's:

- the 256 byte-level characters, then the same 256 with ``</w>`` (every text still tokenizes, into bytes at worst);
- one token per kept merge, in CLIP's rank order: exactly the merges CLIP's BPE applies to the words of
  :data:`TINY_CLIP_TEXT`, so those words become the same tokens as with the real tokenizer (BPE applies the
  lowest-ranked merge present at each step; keeping every merge a word uses, in rank order, replays its steps);
- ``<|startoftext|>`` and ``<|endoftext|>`` last (the largest id is EOS, so CLIP's argmax pooling still finds it).

The ids differ from the real ones (``photo`` is 1125 there), so tests ask the kit's tokenizer for ids.
"""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

__all__ = [
    "TINY_CLIP_TEXT",
    "save_tiny_clip_tokenizer",
    "tiny_clip_merges",
    "tiny_clip_tokenizer",
    "tiny_clip_vocab",
    "tiny_clip_vocab_size",
    "write_tiny_clip_bpe",
]

#: The words the tiny vocabulary keeps whole: each method's prompt template and placeholder, the pipelines' default
#: prompts and negative prompts (so a default run is not cut at 77 tokens), and the tests' prompts.
TINY_CLIP_TEXT = """
photo of a id person. a photo of z, , , in a garden at the beach. a person, a man, a woman, a castle.
a person, upper_body, upper body, raw photo, masterpiece, solo, medium shot, high detail face, photorealistic,
best quality, simple background, wearing t-shirt, plain backdrop, 1girl, rain, night.
(nsfw:2), paintings, sketches, (worst quality:2), (low quality:2), lowers, lowres, low res, normal quality,
((monochrome)), ((grayscale)), logo, word, character, bad hand, bad hands, tattoo, (username, watermark, signature,
time signature, timestamp, artist name, copyright name, copyright), skin spots, acne, acnes, skin blemishes, age spot,
glans, extra fingers, fewer fingers, strange fingers, mole, ((extra legs)), ((extra hands)), extra limbs, text.
flaws in the eyes, flaws in the face, non-hdri, artifacts, noise, glitch, mutated, ugly, disfigured, hands,
partially rendered objects, partially rendered eyes, deformed eyeballs, cross-eyed, blurry, mutation, duplicate,
out of frame, cropped, mutilated, bad anatomy, deformed, bad proportions, nude, naked, topless, bare breasts.
best quality, masterpiece,ultra-detailed, uhd 4k, photographic. tiling, poorly drawn hands, poorly drawn feet,
poorly drawn face, body out of frame, cut off, low contrast, underexposed, overexposed, bad art, beginner, amateur,
distorted face. font, bad eye, cross eye, bad composition, poor, low effort, poorly rendered face,
poor facial details, poorly rendered hands, mutated body parts, blurry image, oversaturated, deformed body features.
portrait of a smiling woman in the rain, wearing a red coat, a winter coat, a hat and glasses, soft light, film grain,
in the city street, blue, on, with, is, an, my own qipao, mine again, fine.
"""

_HEADER = '"bpe_simple_vocab_16e6.txt#version: 0.2'  # the first line of CLIP's file
# CLIP's pre-tokenizer (simple_tokenizer.py; transformers' CLIPTokenizer uses the same pattern).
_WORD_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _merges_used(word: tuple[str, ...], ranks: dict[tuple[str, str], int]) -> set[int]:
    """The ranks of the merges CLIP's ``bpe()`` applies to one pre-tokenized, byte-encoded word."""
    used: set[int] = set()
    while len(word) > 1:
        best = min(zip(word[:-1], word[1:], strict=True), key=lambda pair: ranks.get(pair, len(ranks)))
        if best not in ranks:
            break
        used.add(ranks[best])
        merged: list[str] = []
        i = 0
        while i < len(word):  # every occurrence of the pair, left to right, as CLIP does
            if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                merged.append(word[i] + word[i + 1])
                i += 2
            else:
                merged.append(word[i])
                i += 1
        word = tuple(merged)
    return used


@lru_cache(maxsize=1)
def tiny_clip_merges() -> tuple[str, ...]:
    """The kept merge lines (``"left right"``), in CLIP's rank order, read from the real BPE file."""
    import regex

    from ..clip_tokenizer import build_clip_vocab, bytes_to_unicode

    _, merges = build_clip_vocab()
    ranks = {tuple(line.split()): rank for rank, line in enumerate(merges)}
    byte_chars = bytes_to_unicode()
    used: set[int] = set()
    for word in regex.findall(_WORD_PATTERN, TINY_CLIP_TEXT.lower()):
        chars = [byte_chars[b] for b in word.encode("utf-8")]
        used |= _merges_used((*chars[:-1], chars[-1] + "</w>"), ranks)  # type: ignore[arg-type]
    return tuple(merges[rank] for rank in sorted(used))


def tiny_clip_vocab_size() -> int:
    """Tokens of the tiny vocabulary: 512 byte tokens, the kept merges, BOS and EOS (the kit's ``vocab_size``)."""
    return 512 + len(tiny_clip_merges()) + 2


def write_tiny_clip_bpe(path: str | os.PathLike[str]) -> Path:
    """Write the reduced ``bpe_simple_vocab_16e6.txt.gz``: CLIP's header line, then the kept merges.

    The gzip header has no time stamp, so the file's bytes depend on nothing but the vocabulary.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join([_HEADER, *tiny_clip_merges()]) + "\n"
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as f:
        f.write(text.encode("utf-8"))
    return path


def save_tiny_clip_tokenizer(out_dir: str | os.PathLike[str], *, model_max_length: int = 77) -> Path:
    """Write an SD1.5-style ``tokenizer/`` folder (the files of :func:`~idfusion.clip_tokenizer.save_clip_tokenizer`)
    with the tiny vocabulary."""
    from ..clip_tokenizer import BPE_FILE_NAME, save_clip_tokenizer

    tmp = Path(tempfile.mkdtemp(prefix="idfusion-tiny-bpe-"))
    try:
        bpe = write_tiny_clip_bpe(tmp / BPE_FILE_NAME)
        return save_clip_tokenizer(out_dir, model_max_length=model_max_length, bpe_path=bpe)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def tiny_clip_tokenizer() -> CLIPTokenizer:
    """The kit's ``CLIPTokenizer``, for tests that pair a tiny text encoder with a tokenizer in memory."""
    from transformers import CLIPTokenizer

    tmp = Path(tempfile.mkdtemp(prefix="idfusion-tiny-tokenizer-"))
    try:
        return CLIPTokenizer.from_pretrained(save_tiny_clip_tokenizer(tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def tiny_clip_vocab() -> tuple[dict[str, int], list[str]]:
    """``vocab.json``'s mapping and the merge lines of the tiny vocabulary, as
    :func:`~idfusion.clip_tokenizer.build_clip_vocab` converts its BPE file."""
    from ..clip_tokenizer import BPE_FILE_NAME, build_clip_vocab

    tmp = Path(tempfile.mkdtemp(prefix="idfusion-tiny-bpe-"))
    try:
        return build_clip_vocab(write_tiny_clip_bpe(tmp / BPE_FILE_NAME))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
