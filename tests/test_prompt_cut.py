"""A prompt longer than the text encoder reads is cut, and says so (every method tokenizes through one helper)."""

from __future__ import annotations

import logging

from idfusion.clip_tokenizer import load_clip_tokenizer
from idfusion.prompt_encoders import tokenize_prompts


def test_a_cut_prompt_warns_with_the_cut_point(caplog):
    tokenizer = load_clip_tokenizer()
    long = " ".join(f"word{i}" for i in range(200))
    with caplog.at_level(logging.WARNING, logger="idfusion.prompt_encoders"):
        ids = tokenize_prompts(tokenizer, ["a short prompt", long])
    assert ids.shape == (2, 77)
    assert ids.tolist() == tokenizer(["a short prompt", long], padding="max_length", max_length=77,
                                     truncation=True).input_ids  # fmt: skip
    (record,) = caplog.records  # the short prompt says nothing
    assert "tokens; the text encoder reads 77" in record.getMessage()
    assert len(record.getMessage()) < 200  # never echoes the whole prompt
