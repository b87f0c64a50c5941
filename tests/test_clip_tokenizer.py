"""The offline CLIP tokenizer gives the ids of CLIP's own tokenizer.

The reference is a small, independent re-implementation of CLIP's ``simple_tokenizer.py`` (the ``clip`` package itself
cannot be imported: it needs torchvision). It reads the same ``bpe_simple_vocab_16e6.txt.gz``.
"""

from __future__ import annotations

import gzip
import html
import json
import sys
from functools import lru_cache
from pathlib import Path

import ftfy
import pytest
import regex
from transformers import AutoTokenizer, CLIPTokenizer, CLIPTokenizerFast

from idfusion import clip_tokenizer as ct
from idfusion.clip_tokenizer import (
    build_clip_vocab,
    clip_bpe_path,
    load_clip_tokenizer,
    save_clip_tokenizer,
)
from idfusion.errors import ModelFilesError

CONTEXT_LENGTH = 77
BOS, EOS = 49406, 49407


class ReferenceClipTokenizer:
    """CLIP's tokenization algorithm, written from its description (not from the library under test)."""

    PATTERN = regex.compile(
        r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
        regex.IGNORECASE,
    )

    def __init__(self, bpe_path: Path):
        with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
            merges = [tuple(line.split()) for line in f.read().split("\n")[1 : 49152 - 256 - 2 + 1]]
        keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
        others = [b for b in range(256) if b not in keep]
        self.byte_chars = {b: chr(b) for b in keep} | {b: chr(256 + i) for i, b in enumerate(others)}
        chars = list(self.byte_chars.values())
        tokens = (
            chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
        )
        self.encoder = {t: i for i, t in enumerate(tokens)}
        self.ranks = {m: i for i, m in enumerate(merges)}

    @staticmethod
    def clean(text: str) -> str:
        text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
        return regex.sub(r"\s+", " ", text).strip().lower()

    def bpe(self, token: str) -> list[str]:
        word = [*token[:-1], token[-1] + "</w>"]
        while len(word) > 1:
            pairs = set(zip(word, word[1:], strict=False))
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return word

    def encode(self, text: str) -> list[int]:
        ids = []
        for piece in self.PATTERN.findall(self.clean(text)):
            if piece in ("<|startoftext|>", "<|endoftext|>"):  # special tokens typed in the text stay whole
                ids.append(self.encoder[piece])
                continue
            chars = "".join(self.byte_chars[b] for b in piece.encode("utf-8"))
            ids += [self.encoder[t] for t in self.bpe(chars)]
        return [BOS, *ids, EOS]


PROMPTS = [
    "photo of a id person",
    "a photograph of an astronaut riding a horse",
    "A Portrait of a Woman, studio lighting, 85mm, f/1.8, highly detailed!!!",
    "UPPER CASE and MiXeD cAsE words",
    "numbers 1234567890 and 3.14159, 1e-5, 2024-11-21, 50% off, $100",
    "width 512x768, aspect 16:9",
    "it's, don't, we're, they've, I'm, we'll, he'd",
    "IT'S LOUD, DON'T SHOUT",
    "café, naïve, crème brûlée, São Paulo, Zürich, Ångström",
    "decomposed accent: cafe\u0301",
    "¿Qué tal? ¡Hola!",
    "emoji 😀🎉👩\u200d🚀 🇫🇷 ❤️",
    "日本語のテキスト、中文提示词。한국어",
    "Москва, Ελληνικά, עברית, العربية, हिन्दी",
    "   leading and trailing   whitespace\t\ttabs\nnew lines  ",
    "non\u00a0breaking space",
    "punctuation: (hello) [world] {braces} <angle> @#$%^&*_+=|\\/~`",
    "a---b...c!!!d???e,,,",
    "quotes \"double\" and 'single'",
    "snake_case, kebab-case, CamelCase, dotted.name",
    "masterpiece, best quality, (photorealistic:1.4), RAW photo, 8k uhd, dslr",
    "",
    "x",
    "<|startoftext|>",
    "text with <|endoftext|> inside",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "a close-up photo of sks dog wearing a red hat, in the style of van gogh",
    "a very long prompt that keeps going " * 20,
    " ".join(f"word{i}" for i in range(60)),
    "lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut labore et dolore "
    "magna aliqua. ut enim ad minim veniam, quis nostrud exercitation ullamco laboris nisi ut aliquip ex ea commodo "
    "consequat. duis aute irure dolor in reprehenderit in voluptate velit esse cillum dolore eu fugiat nulla pariatur",
]

# Known differences, by design of transformers' tokenizer: CLIP cleans text with ftfy.fix_text (which uncurls quotes
# and narrows full-width characters) and unescapes HTML entities twice; transformers only applies NFC and
# lowercasing. Such prompts are asserted to differ, and to agree once the text is cleaned CLIP's way beforehand.
KNOWN_DIFFERENCES = [
    "Tom &amp; Jerry",
    "it&#39;s &lt;b&gt;",
    "don’t “quote” me",
    "ＡＢＣ１２３，",
]


@lru_cache(maxsize=1)
def reference() -> ReferenceClipTokenizer:
    return ReferenceClipTokenizer(clip_bpe_path())


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_clip_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer")


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir: Path) -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(tokenizer_dir)


def test_bpe_file_is_found_without_importing_clip():
    path = clip_bpe_path()
    assert path.name == "bpe_simple_vocab_16e6.txt.gz" and path.is_file()
    assert "clip" not in sys.modules


def test_missing_package_gives_clear_error(monkeypatch):
    monkeypatch.setattr(ct.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelFilesError, match=r"pip install openai-clip==1\.0\.1"):
        clip_bpe_path()


def test_vocab_conversion():
    vocab, merges = build_clip_vocab()
    assert len(vocab) == 49408 and len(merges) == 48894
    assert list(vocab.values()) == list(range(49408))
    assert vocab == reference().encoder
    assert vocab["!"] == 0 and vocab["!</w>"] == 256 and vocab["in"] == 512
    assert vocab["<|startoftext|>"] == BOS and vocab["<|endoftext|>"] == EOS
    assert merges[0] == "i n" and merges[1] == "t h"


def test_folder_layout(tokenizer_dir: Path):
    assert sorted(p.name for p in tokenizer_dir.iterdir()) == [
        "merges.txt",
        "special_tokens_map.json",
        "tokenizer_config.json",
        "vocab.json",
    ]
    lines = (tokenizer_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "#version: 0.2" and len(lines) == 1 + 48894
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    assert config["model_max_length"] == 77 and config["tokenizer_class"] == "CLIPTokenizer"
    assert config["do_lower_case"] is True and config["add_prefix_space"] is False
    special = json.loads((tokenizer_dir / "special_tokens_map.json").read_text())
    assert special["bos_token"]["content"] == "<|startoftext|>"
    assert special["pad_token"] == "<|endoftext|>" and special["unk_token"]["content"] == "<|endoftext|>"


@pytest.mark.parametrize("cls", [CLIPTokenizer, CLIPTokenizerFast, AutoTokenizer])
def test_loads_with_every_tokenizer_class(tokenizer_dir: Path, cls):
    tok = cls.from_pretrained(tokenizer_dir)
    assert len(tok) == 49408 and tok.model_max_length == 77
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (BOS, EOS, EOS, EOS)
    assert tok("photo of a id person").input_ids == [49406, 1125, 539, 320, 1014, 2533, 49407]


def test_sd_style_padding(tokenizer: CLIPTokenizer):
    # What StableDiffusionPipeline and Arc2Face do: pad with <|endoftext|> to 77, truncate.
    ids = tokenizer("photo of a id person", padding="max_length", max_length=77, truncation=True).input_ids
    assert ids == [49406, 1125, 539, 320, 1014, 2533] + [EOS] * 71


@pytest.mark.parametrize("prompt", PROMPTS, ids=range(len(PROMPTS)))
def test_ids_match_clip(tokenizer: CLIPTokenizer, prompt: str):
    expected = reference().encode(prompt)
    assert tokenizer(prompt, truncation=False).input_ids == expected
    # clip.tokenize(truncate=True) keeps the first 76 tokens and ends with <|endoftext|>; so does transformers.
    truncated = expected[: CONTEXT_LENGTH - 1] + [EOS] if len(expected) > CONTEXT_LENGTH else expected
    assert tokenizer(prompt, truncation=True, max_length=CONTEXT_LENGTH).input_ids == truncated


def test_prompt_set_covers_long_prompts():
    assert sum(len(reference().encode(p)) > CONTEXT_LENGTH for p in PROMPTS) >= 3


@pytest.mark.parametrize("prompt", KNOWN_DIFFERENCES)
def test_known_differences_come_from_text_cleaning(tokenizer: CLIPTokenizer, prompt: str):
    expected = reference().encode(prompt)
    assert tokenizer(prompt).input_ids != expected
    assert tokenizer(ReferenceClipTokenizer.clean(prompt)).input_ids == expected


def test_load_clip_tokenizer_caches(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("IDFUSION_CACHE", str(tmp_path / "root"))
    tok = load_clip_tokenizer()
    folder = tmp_path / "root" / "clip-tokenizer"
    assert sorted(p.name for p in folder.iterdir()) == sorted(ct.TOKENIZER_FILES)
    assert [p.name for p in (tmp_path / "root").iterdir()] == ["clip-tokenizer"]  # no temp folder left behind
    assert tok("photo of a id person").input_ids == [49406, 1125, 539, 320, 1014, 2533, 49407]

    # A second call reuses the folder instead of rebuilding it.
    with monkeypatch.context() as m:
        m.setattr(ct, "save_clip_tokenizer", lambda *a, **k: pytest.fail("rebuilt a cached tokenizer"))
        assert load_clip_tokenizer().get_vocab() == tok.get_vocab()
    # An explicit cache_dir wins over $IDFUSION_CACHE.
    load_clip_tokenizer(tmp_path / "explicit")
    assert (tmp_path / "explicit" / "clip-tokenizer" / "vocab.json").is_file()


def test_incomplete_cache_is_rebuilt(tmp_path: Path):
    folder = tmp_path / "clip-tokenizer"
    folder.mkdir()
    (folder / "vocab.json").write_text("{}")
    tok = load_clip_tokenizer(tmp_path)
    assert len(tok) == 49408
