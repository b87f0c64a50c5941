"""A tiny UniDiffuser-v1 base for FeedFace: the official ``models/`` files, in the official key names and formats.

Layout written by :func:`write_unidiffuser_base` (paths relative to ``models_dir``)::

    uvit_v1.pth                        U-ViT state dict (torch.save), exactly UViTCondToken's key names and order
    autoencoder_kl.pth                 LDM KL autoencoder state dict (FrozenAutoencoderKL's key names)
    caption_decoder.pth                ClipCaptionModel state dict, every key prefixed 'module.', with GPT-2's
                                       attn.bias / attn.masked_bias buffers as transformers 4.23 saved them
    gpt2/config.json                   a tiny GPT-2 (GPT2LMHeadModel) config
    gpt2/generation_config.json
    gpt2/vocab.json, gpt2/merges.txt   a small byte-level BPE vocabulary built here (works offline)
    gpt2/tokenizer.json                the same tokenizer in the ``tokenizers`` format
    gpt2/pytorch_model.bin             GPT-2 weights (GPT2Model key names, like the Hub file)
    clip-vit-large-patch14/            a tiny CLIPModel folder in the layout of ``openai/clip-vit-large-patch14``
                                       (config.json, model.safetensors, the kit's CLIP tokenizer files,
                                       preprocessor_config.json); the official code loads it from the Hub

Shapes (full size in brackets):

- U-ViT: width 64 = 1 head x 64 [1536 = 24 x 64], depth 30 = 15 in-blocks + mid + 15 out-blocks [same], so
  every official block key (``in_blocks.0..14``, ``out_blocks.0..14``) exists; latent 8x8x4 in 2x2 patches = 16
  image tokens [64x64, 1024], 77 text tokens of width 16 [64], CLIP image token 32 [512], the data-type token.
- Autoencoder: SD's KL-f8 topology (4 levels, 2 res blocks, mid attention, 4 latent channels, GroupNorm 32) at
  widths (32, 64, 96, 96) [(128, 256, 512, 512)]: 32 groups make 32 the smallest width, and widths that grow where
  the real ones grow give the same shortcuts, so the key names equal the real file's.
- Caption decoder: prefix 77 x 32 [768] -> 16 [64] (= the U-ViT's text width), GPT-2 width 32, 2 layers, 2 heads,
  256 positions [768, 12, 12, 1024]; vocabulary = the tiny GPT-2 vocabulary + ``<|EOS|>``, as the official
  ``resize_token_embeddings(len(tokenizer))`` leaves it. (The official ``ClipCaptionModel`` hard-codes 768 for both
  prefix Linear layers, so only a full-width file fits that class; the key names are the same.)
- CLIP text tower: width 32 (= the caption decoder's prefix input), 3 layers, the kit's reduced CLIP vocabulary
  (:mod:`idfusion.testing.tiny_clip_tokenizer`) and 77 positions; a 2-layer vision tower of width 32 completes the
  CLIPModel.

``autoencoder_kl.pth`` stores its large tensors as slices of shared random pools
(:mod:`idfusion.testing.shared_storage`; 1 MB instead of 13 MB). The U-ViT's are plain: the FeedFace recipe trains a
model that holds the U-ViT, and accelerate cannot checkpoint parameters that share memory.

Weights are seeded random and not degenerate: norms, biases and the zero-initialised position/data-type embeddings
are perturbed, so tests can tell any two parameters apart.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "GPT2_WORDS",
    "TINY_CLIP_WIDTH",
    "TINY_TEXT_DIM",
    "TINY_UVIT_WIDTH",
    "tiny_caption_decoder",
    "tiny_clip_config",
    "tiny_gpt2_vocab",
    "tiny_text_decoder_config",
    "tiny_uvit",
    "tiny_uvit_config",
    "tiny_vae",
    "tiny_vae_config",
    "write_gpt2_folder",
    "write_unidiffuser_base",
]

TINY_UVIT_WIDTH = 64
TINY_TEXT_DIM = 16
TINY_CLIP_IMG_DIM = 32
TINY_CLIP_WIDTH = 32
TINY_GPT2 = {"n_embd": 32, "n_layer": 2, "n_head": 2, "n_inner": 128, "n_positions": 256}
GPT2_EOS = "<|endoftext|>"
#: Words whole-word merges are made for (with and without GPT-2's leading-space marker), so prompts tokenize into
#: a handful of tokens instead of single bytes.
GPT2_WORDS = (
    "a", "an", "the", "of", "in", "on", "with", "and", "is", "photo", "portrait", "person", "man", "woman", "face",
    "smiling", "wearing", "hat", "glasses", "beach", "city", "street", "red", "blue",
)  # fmt: skip


def tiny_uvit_config(**overrides: Any) -> dict[str, Any]:
    """UniDiffuser-v1's U-ViT (:data:`~idfusion.convert.feedface.UVIT_V1_CONFIG`) at toy size: width
    64 (1 head of 64, the head width the loader assumes), the full 30 layers, an 8x8 latent, text width 16."""
    from idfusion.convert.feedface import UVIT_HEAD_DIM, uvit_config

    return uvit_config(
        **{
            "num_attention_heads": TINY_UVIT_WIDTH // UVIT_HEAD_DIM,
            "attention_head_dim": UVIT_HEAD_DIM,
            "sample_size": 8,
            "text_dim": TINY_TEXT_DIM,
            "clip_img_dim": TINY_CLIP_IMG_DIM,
            **overrides,
        }
    )


def tiny_vae_config(**overrides: Any) -> dict[str, Any]:
    """UniDiffuser's KL-f8 autoencoder topology at widths (32, 64, 96, 96) (GroupNorm 32 divides them all)."""
    from idfusion.convert.feedface import vae_config

    return vae_config(**{"block_out_channels": [32, 64, 96, 96], "sample_size": 64, **overrides})


def tiny_text_decoder_config(vocab_size: int, **overrides: Any) -> dict[str, Any]:
    """The caption decoder at toy size (see the module docstring); ``vocab_size`` includes ``<|EOS|>``."""
    from idfusion.convert.feedface import text_decoder_config

    return text_decoder_config(
        **{
            "prefix_inner_dim": TINY_CLIP_WIDTH,
            "prefix_hidden_dim": TINY_TEXT_DIM,
            "vocab_size": vocab_size,
            **TINY_GPT2,
            **overrides,
        }
    )


def tiny_clip_config() -> dict[str, Any]:
    """A ``CLIPConfig`` dict: SD1.5-style text tower of width 32 (the kit's CLIP vocabulary, 77 positions, the old
    special-token ids of ``openai/clip-vit-large-patch14``) and a 2-layer ViT of width 32 on 224x224 images."""
    from idfusion.testing.components import tiny_safety_checker_config, tiny_text_encoder_config

    text = tiny_text_encoder_config(hidden_size=TINY_CLIP_WIDTH, projection_dim=TINY_CLIP_WIDTH)
    text = {k: v for k, v in text.items() if k not in ("architectures", "model_type", "projection_dim")}
    config = tiny_safety_checker_config()
    config["text_config"] = text
    config["projection_dim"] = TINY_CLIP_WIDTH
    return config


def _perturb(module: torch.nn.Module, generator: torch.Generator, scale: float = 0.1) -> None:
    """Make 1-D parameters (norms, biases) and zero-initialised embeddings non-trivial, as trained weights are."""
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if parameter.ndim == 1 or name in ("data_type_pos_embed_token", "pos_embed"):
                parameter.add_(scale * torch.randn(parameter.shape, generator=generator))


def tiny_uvit(seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A seeded random tiny ``UniDiffuserModel`` (:func:`tiny_uvit_config`), eval mode."""
    from diffusers import UniDiffuserModel

    from idfusion.testing.components import _seeded

    with _seeded(seed):
        model = UniDiffuserModel(**tiny_uvit_config(**overrides))
    _perturb(model, torch.Generator().manual_seed(seed))
    # keep the unused duplicate patch embedding equal to the used one, as the conversion makes it
    model.transformer.pos_embed.proj.load_state_dict(model.vae_img_in.proj.state_dict())
    return model.eval()


def tiny_vae(seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A seeded random tiny ``AutoencoderKL`` (:func:`tiny_vae_config`), eval mode."""
    from diffusers import AutoencoderKL

    from idfusion.testing.components import _seeded

    with _seeded(seed):
        model = AutoencoderKL(**tiny_vae_config(**overrides))
    _perturb(model, torch.Generator().manual_seed(seed))
    return model.eval()


def tiny_caption_decoder(seed: int = 0, *, vocab_size: int | None = None) -> torch.nn.Module:
    """A seeded random tiny ``UniDiffuserTextDecoder`` (its ``lm_head`` tied to ``wte``), eval mode."""
    from diffusers import UniDiffuserTextDecoder
    from transformers.utils import logging as hf_logging

    from idfusion.testing.components import _seeded

    if vocab_size is None:
        vocab_size = len(tiny_gpt2_vocab()[0]) + 1  # + <|EOS|>
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # GPT2Config warns that GPT-2's default token ids exceed the toy vocabulary
    try:
        with _seeded(seed):
            model = UniDiffuserTextDecoder(**tiny_text_decoder_config(vocab_size))
    finally:
        hf_logging.set_verbosity(verbosity)
    _perturb(model, torch.Generator().manual_seed(seed))
    return model.eval()


def tiny_gpt2_vocab() -> tuple[dict[str, int], list[str]]:
    """A byte-level BPE vocabulary in GPT-2's format: GPT-2's 256 byte tokens (in GPT-2's order), then whole-word
    merges for :data:`GPT2_WORDS` (each word merged left to right, with and without the ``Ġ`` space marker), then
    ``<|endoftext|>`` last, as in GPT-2 (id 50256 there).

    Returns:
        `tuple[dict[str, int], list[str]]`: ``vocab.json`` contents and the ``merges.txt`` lines (without header).
    """
    from idfusion.clip_tokenizer import bytes_to_unicode

    tokens = list(bytes_to_unicode().values())
    known = set(tokens)
    merges: list[str] = []
    for word in GPT2_WORDS:
        for form in ("Ġ" + word, word):
            # What the merges so far make of the word, then new (highest-rank) merges joining it left to right:
            # BPE applies lower ranks first, so later words never change how earlier ones tokenize.
            pieces = _bpe(form, merges)
            while len(pieces) > 1:
                merged = pieces[0] + pieces[1]
                if merged not in known:
                    merges.append(f"{pieces[0]} {pieces[1]}")
                    tokens.append(merged)
                    known.add(merged)
                pieces = [merged, *pieces[2:]]
    tokens.append(GPT2_EOS)
    return {token: index for index, token in enumerate(tokens)}, merges


def _bpe(word: str, merges: list[str]) -> list[str]:
    """GPT-2's BPE on one pre-tokenized word: repeatedly apply the lowest-rank merge present."""
    ranks = {tuple(m.split()): rank for rank, m in enumerate(merges)}
    pieces = list(word)
    while len(pieces) > 1:
        pairs = [(ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(pieces[:-1], pieces[1:], strict=True))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        pieces[i : i + 2] = [pieces[i] + pieces[i + 1]]
    return pieces


def write_gpt2_folder(out_dir: Path, decoder: torch.nn.Module) -> list[Path]:
    """Write the ``models/gpt2`` folder: tokenizer files built by :func:`tiny_gpt2_vocab`, a GPT-2 config matching
    ``decoder``'s GPT-2, and its weights without the ``<|EOS|>`` row (the Hub's ``gpt2`` predates it)."""
    import transformers
    from transformers import GPT2Tokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    vocab, merges = tiny_gpt2_vocab()
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tokenizer = GPT2Tokenizer(vocab=vocab, merges=[tuple(m.split()) for m in merges])
    tokenizer.backend_tokenizer.save(str(out_dir / "tokenizer.json"))

    gpt = decoder.transformer.config
    eos = vocab[GPT2_EOS]
    config = {
        "activation_function": gpt.activation_function,
        "architectures": ["GPT2LMHeadModel"],
        "attn_pdrop": gpt.attn_pdrop,
        "bos_token_id": eos,
        "embd_pdrop": gpt.embd_pdrop,
        "eos_token_id": eos,
        "initializer_range": gpt.initializer_range,
        "layer_norm_epsilon": gpt.layer_norm_epsilon,
        "model_type": "gpt2",
        "n_ctx": gpt.n_positions,
        "n_embd": gpt.n_embd,
        "n_head": gpt.n_head,
        "n_inner": gpt.n_inner,
        "n_layer": gpt.n_layer,
        "n_positions": gpt.n_positions,
        "resid_pdrop": gpt.resid_pdrop,
        "vocab_size": len(vocab),
    }
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    generation = {"bos_token_id": eos, "eos_token_id": eos, "transformers_version": transformers.__version__}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
    weights = {
        k[len("transformer.transformer.") :]: v.detach().clone()
        for k, v in decoder.state_dict().items()
        if k.startswith("transformer.transformer.")
    }
    weights["wte.weight"] = weights["wte.weight"][: len(vocab)].clone()
    torch.save(weights, out_dir / "pytorch_model.bin")
    return sorted(p for p in out_dir.iterdir() if p.is_file())


def _write_clip(out_dir: Path, seed: int) -> None:
    from transformers import CLIPConfig, CLIPModel

    from idfusion.testing.components import _seeded, tiny_feature_extractor
    from idfusion.testing.tiny_clip_tokenizer import save_tiny_clip_tokenizer

    with _seeded(seed):
        model = CLIPModel(CLIPConfig(**tiny_clip_config())).eval()
    _perturb(model, torch.Generator().manual_seed(seed))
    model.save_pretrained(out_dir, safe_serialization=True)  # CLIPModel keys are already the official ones
    save_tiny_clip_tokenizer(out_dir)
    tiny_feature_extractor().save_pretrained(out_dir)


def write_unidiffuser_base(models_dir: Path, seed: int) -> list[Path]:
    """Write the tiny UniDiffuser-v1 files FeedFace expects in ``models/`` (layout in this module's docstring).

    Args:
        models_dir (`Path`): the folder to fill (created if missing).
        seed (`int`): seeds every model; each model gets its own derived seed.

    Returns:
        `list[Path]`: the files written, sorted.
    """
    from idfusion.convert.feedface import (
        AUTOENCODER_FILE,
        CAPTION_DECODER_FILE,
        CLIP_TEXT_DIR,
        GPT2_DIR,
        UVIT_FILE,
        save_official_autoencoder,
        save_official_caption_decoder,
        save_official_uvit,
    )
    from idfusion.testing.make_tiny import _quiet_progress_bars
    from idfusion.testing.shared_storage import pool_saved_state_dict

    models_dir = Path(models_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    # The autoencoder's tensors share pools (testing.shared_storage): it is the largest file and always frozen, outside
    # any trained model. The U-ViT's do not: the FeedFace recipe trains a model that holds it, and a checkpoint of
    # tensors that share memory cannot be saved and restored.
    written = [
        save_official_uvit(tiny_uvit(seed), models_dir / UVIT_FILE),
        pool_saved_state_dict(save_official_autoencoder(tiny_vae(seed + 1), models_dir / AUTOENCODER_FILE), seed + 1),
    ]
    decoder = tiny_caption_decoder(seed + 2)
    written.append(save_official_caption_decoder(decoder, models_dir / CAPTION_DECODER_FILE))
    written += write_gpt2_folder(models_dir / GPT2_DIR, decoder)
    with _quiet_progress_bars():
        _write_clip(models_dir / CLIP_TEXT_DIR, seed + 3)
    written += [p for p in (models_dir / CLIP_TEXT_DIR).rglob("*") if p.is_file()]
    return sorted(written)
