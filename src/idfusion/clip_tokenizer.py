"""A real CLIP tokenizer, built offline from the BPE file that ships with the ``openai-clip`` package.

Stable Diffusion 1.5 uses OpenAI CLIP's tokenizer (``tokenizer/`` in the release: ``vocab.json``, ``merges.txt``,
``special_tokens_map.json``, ``tokenizer_config.json``). No model hub is reachable here, but the PyPI sdist
``openai-clip==1.0.1`` ships CLIP's own BPE file ``bpe_simple_vocab_16e6.txt.gz``, from which the release's
``vocab.json`` and ``merges.txt`` follow by a fixed conversion (the one CLIP's ``simple_tokenizer.py`` does in memory):

- the vocabulary is the 256 byte-level characters (GPT-2's reversible byte-to-unicode map, in its order), the same
  256 with ``</w>`` appended, one token per merge (the pair concatenated), then ``<|startoftext|>`` (49406) and
  ``<|endoftext|>`` (49407): 49,408 entries;
- the merges are lines 1 to 48,894 of the file (line 0 is a header).

With those files, ``transformers.CLIPTokenizer`` gives CLIP's ids on ordinary prompts. Known differences come from
text cleaning only: CLIP runs ``ftfy.fix_text`` and unescapes HTML entities twice before tokenizing, transformers
applies NFC and lowercasing. So ``"&amp;"``, curly quotes and full-width characters may tokenize differently.

The ``clip`` package is never imported: it imports torchvision, which is not installed. Its files are located with
:func:`importlib.util.find_spec`, which does not run the package.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ModelFilesError
from .paths import cache_root

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

__all__ = [
    "BOS_TOKEN",
    "EOS_TOKEN",
    "VOCAB_SIZE",
    "build_clip_vocab",
    "bytes_to_unicode",
    "clip_bpe_path",
    "load_clip_tokenizer",
    "save_clip_tokenizer",
]

logger = logging.getLogger(__name__)

BPE_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"
VOCAB_SIZE = 49408
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
# CLIP trained with a 49,152-token vocabulary: 512 byte tokens + merges + 2 specials, hence this many merges.
NUM_MERGES = 49152 - 256 - 2  # 48,894
TOKENIZER_FILES = ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json")


def clip_bpe_path() -> Path:
    """Locate CLIP's BPE vocabulary file shipped by the installed ``openai-clip`` distribution.

    Returns:
        `Path`: path of ``bpe_simple_vocab_16e6.txt.gz``.

    Raises:
        ModelFilesError: if the ``clip`` package, or the file inside it, is not installed.
    """
    # find_spec on a top-level name does not execute the package (importing `clip` would need torchvision).
    spec = importlib.util.find_spec("clip")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / BPE_FILE_NAME
        if candidate.is_file():
            return candidate
    where = f" (looked in {', '.join(locations)})" if locations else ""
    raise ModelFilesError(
        f"CLIP's BPE vocabulary {BPE_FILE_NAME} was not found{where}. "
        "It ships with the 'openai-clip' package: pip install openai-clip==1.0.1"
    )


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 byte values to printable unicode characters.

    Printable Latin-1 bytes map to themselves; the others (control characters, space, ...) map to code points from
    256 upwards, in byte order. The dict's insertion order is the order of CLIP's first 256 vocabulary entries.

    Returns:
        `dict[int, str]`: byte value -> character.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    byte_values = list(printable)
    code_points = list(printable)
    extra = 0
    for value in range(256):
        if value not in printable:
            byte_values.append(value)
            code_points.append(256 + extra)
            extra += 1
    return {value: chr(code) for value, code in zip(byte_values, code_points, strict=True)}


def build_clip_vocab(bpe_path: str | os.PathLike[str] | None = None) -> tuple[dict[str, int], list[str]]:
    """Convert CLIP's BPE file to the ``vocab.json`` mapping and the merge lines of ``merges.txt``.

    Args:
        bpe_path (`str` or `os.PathLike`, *optional*):
            The ``bpe_simple_vocab_16e6.txt.gz`` file; defaults to :func:`clip_bpe_path`.

    Returns:
        `tuple[dict[str, int], list[str]]`: the vocabulary (token -> id) and the merges, each a ``"left right"`` line
        without newline, in rank order: 49,408 entries and 48,894 merges for CLIP's file. A file in the same format
        with fewer merges (a reduced vocabulary, such as the test kit's) gives ``512 + merges + 2`` entries, the
        two special tokens last, as CLIP's own ``simple_tokenizer`` (which reads at most 48,894 merges) does.
    """
    path = Path(bpe_path) if bpe_path is not None else clip_bpe_path()
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [line for line in lines[1 : NUM_MERGES + 1] if line]  # a short file ends in one empty line
    if not merges or any(len(line.split()) != 2 for line in merges):
        raise ModelFilesError(f"{path}: not CLIP's BPE file (expected up to {NUM_MERGES} 'a b' lines after a header)")
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != len(tokens):  # a duplicate token would silently shift every later id
        raise ModelFilesError(f"{path}: conversion gave {len(vocab)} distinct tokens, expected {len(tokens)}")
    return vocab, merges


def _added_token(content: str) -> dict[str, object]:
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


def _special_tokens_map() -> dict[str, object]:
    # As in SD1.5's tokenizer/special_tokens_map.json: pad is a plain string there, the others are AddedToken dicts.
    return {
        "bos_token": _added_token(BOS_TOKEN),
        "eos_token": _added_token(EOS_TOKEN),
        "pad_token": EOS_TOKEN,
        "unk_token": _added_token(EOS_TOKEN),
    }


def _tokenizer_config(model_max_length: int) -> dict[str, object]:
    # As in SD1.5's tokenizer/tokenizer_config.json. model_max_length matters: without it transformers uses a huge
    # sentinel and StableDiffusionPipeline's padding to max_length overflows.
    return {
        "add_prefix_space": False,
        "bos_token": {"__type": "AddedToken", **_added_token(BOS_TOKEN)},
        "do_lower_case": True,
        "eos_token": {"__type": "AddedToken", **_added_token(EOS_TOKEN)},
        "errors": "replace",
        "model_max_length": model_max_length,
        "pad_token": EOS_TOKEN,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": {"__type": "AddedToken", **_added_token(EOS_TOKEN)},
    }


def save_clip_tokenizer(
    out_dir: str | os.PathLike[str], *, model_max_length: int = 77, bpe_path: str | os.PathLike[str] | None = None
) -> Path:
    """Write a tokenizer folder laid out like SD1.5's ``tokenizer/``.

    Files: ``vocab.json``, ``merges.txt`` (with the ``#version: 0.2`` header), ``special_tokens_map.json`` and
    ``tokenizer_config.json``. The folder loads with ``CLIPTokenizer``, ``CLIPTokenizerFast`` and ``AutoTokenizer``
    ``.from_pretrained``. Existing files of those names are replaced.

    Args:
        out_dir (`str` or `os.PathLike`): folder to write into (created if missing).
        model_max_length (`int`, *optional*, defaults to 77): CLIP's context length.
        bpe_path (`str` or `os.PathLike`, *optional*): CLIP's BPE file; defaults to :func:`clip_bpe_path`.

    Returns:
        `Path`: the folder.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_clip_vocab(bpe_path)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    for name, content in (
        ("special_tokens_map.json", _special_tokens_map()),
        ("tokenizer_config.json", _tokenizer_config(model_max_length)),
    ):
        (out / name).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
    logger.debug("wrote CLIP tokenizer files to %s", out)
    return out


def _is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in TOKENIZER_FILES)


def load_clip_tokenizer(cache_dir: str | os.PathLike[str] | None = None) -> CLIPTokenizer:
    """Return SD1.5's CLIP tokenizer, building its files on first use.

    The files are written once to ``<cache root>/clip-tokenizer`` and reused. They are written to a temporary folder
    and renamed into place, so concurrent processes (test workers) never read a half-written folder.

    Args:
        cache_dir (`str` or `os.PathLike`, *optional*):
            Cache root; defaults to :func:`idfusion.paths.cache_root` (``$IDFUSION_CACHE`` or ``~/.cache/idfusion``).

    Returns:
        `transformers.CLIPTokenizer`: loaded with ``from_pretrained`` from the cached folder.
    """
    from transformers import CLIPTokenizer

    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    folder = root / "clip-tokenizer"
    if not _is_complete(folder):
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".clip-tokenizer-", dir=root))
        try:
            save_clip_tokenizer(tmp)
            tmp.chmod(0o755)  # mkdtemp makes it private; the cache is ordinary user data
            if folder.exists() and not _is_complete(folder):
                # Left over by something other than this function (which only ever renames complete folders).
                shutil.rmtree(folder, ignore_errors=True)
            try:
                tmp.rename(folder)
                logger.info("built CLIP tokenizer files in %s", folder)
            except OSError:
                if not _is_complete(folder):  # not a concurrent writer that got there first
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return CLIPTokenizer.from_pretrained(folder)
