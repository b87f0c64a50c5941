"""Model pieces shared by several methods. Methods never import each other; what two of them need lives here.

- :func:`inject_token_embeddings`: run a CLIP text encoder with some token-embedding rows replaced by given
  vectors, through the library's own forward (masks and position embeddings stay the library's).
- :func:`encode_arcface_id_prompt`: Arc2Face's identity prompt, ``"photo of a id person"`` with the ArcFace
  embedding in place of the ``id`` token (Papantoniou et al., Arc2Face, ECCV 2024, Sec. 3.2). AdaFace uses the same
  encoding as its first stage.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

__all__ = [
    "tokenize_prompts",
    "ARC2FACE_PROMPT",
    "ARC2FACE_PLACEHOLDER",
    "inject_token_embeddings",
    "normalize_id_embeds",
    "encode_arcface_id_prompt",
    "encode_text",
]

ARC2FACE_PROMPT = "photo of a id person"
ARC2FACE_PLACEHOLDER = "id"  # token 1014 in CLIP's vocabulary, position 4 after BOS


@contextmanager
def inject_token_embeddings(
    text_encoder: torch.nn.Module, mask: torch.Tensor, vectors: torch.Tensor
) -> Iterator[None]:
    """Within the context, token-embedding rows where ``mask`` is true are replaced by ``vectors``.

    Args:
        text_encoder: a transformers text model (anything with ``get_input_embeddings()``).
        mask: ``(B, L)`` bool, the positions to overwrite in the next forward's ``input_ids``.
        vectors: ``(mask.sum(), D)`` replacement rows, in row-major order of the true positions.

    Position embeddings are still added afterwards by the model, as for ordinary tokens.
    """
    embedding = text_encoder.get_input_embeddings()
    if vectors.shape[0] != int(mask.sum()):
        raise ValueError(f"{int(mask.sum())} positions to replace but {vectors.shape[0]} vectors were given")

    def replace(module, args, output):
        if output.shape[:2] != mask.shape:
            raise ValueError(
                f"token embeddings of shape {tuple(output.shape)} do not match the mask {tuple(mask.shape)}"
            )
        output = output.clone()
        output[mask.to(output.device)] = vectors.to(device=output.device, dtype=output.dtype)
        return output

    handle = embedding.register_forward_hook(replace)
    try:
        yield
    finally:
        handle.remove()


def normalize_id_embeds(id_embeds: torch.Tensor, *, expected_dim: int = 512) -> torch.Tensor:
    """Validate ``(N, D)`` ArcFace embeddings and L2-normalise each row."""
    if id_embeds.ndim != 2 or id_embeds.shape[1] != expected_dim:
        raise ValueError(
            f"identity embeddings must have shape (N, {expected_dim}) (ArcFace); got {tuple(id_embeds.shape)}"
        )
    if not torch.isfinite(id_embeds).all():
        raise ValueError("identity embeddings contain NaN or infinite values")
    norms = id_embeds.float().norm(dim=1, keepdim=True)
    if (norms < 1e-6).any():
        raise ValueError("an identity embedding is all zeros")
    return id_embeds.float() / norms


def encode_arcface_id_prompt(
    text_encoder: torch.nn.Module,
    tokenizer,
    id_embeds: torch.Tensor,
    *,
    max_length: int | None = None,
) -> torch.Tensor:
    """Arc2Face's identity conditioning: ``(N, 512)`` ArcFace embeddings to ``(N, L, D)`` prompt embeddings.

    Each L2-normalised embedding is zero-padded to the text width ``D`` (768 for CLIP-L) and replaces the token
    embedding of ``id`` in ``"photo of a id person"``; the Arc2Face text encoder then runs as usual (position
    embeddings added, causal mask, final LayerNorm). Its ``last_hidden_state`` is the prompt embedding.

    Args:
        text_encoder: the Arc2Face encoder (a CLIPTextModel).
        tokenizer: the SD1.5 CLIP tokenizer.
        id_embeds: ``(N, 512)`` embeddings (normalised here).
        max_length: tokenizer length; defaults to the tokenizer's (77). The encoder is causal, so rows before
            ``max_length`` do not depend on it (AdaFace uses 22).
    """
    width = text_encoder.get_input_embeddings().embedding_dim
    id_embeds = normalize_id_embeds(id_embeds)
    if id_embeds.shape[1] > width:
        raise ValueError(f"identity embeddings are {id_embeds.shape[1]}-d, wider than the text encoder ({width})")
    vectors = F.pad(id_embeds, (0, width - id_embeds.shape[1]))  # (N, 512) -> (N, D), zeros on the right

    (placeholder_id,) = tokenizer(ARC2FACE_PLACEHOLDER, add_special_tokens=False).input_ids  # "id</w>" = 1014
    input_ids = tokenizer(
        [ARC2FACE_PROMPT] * id_embeds.shape[0],
        padding="max_length",
        max_length=max_length or tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    mask = input_ids == placeholder_id  # exactly one true position per row: 4
    if not bool((mask.sum(dim=1) == 1).all()):
        raise ValueError(f"the tokenizer does not map {ARC2FACE_PLACEHOLDER!r} to a single token")
    device = text_encoder.device
    with inject_token_embeddings(text_encoder, mask, vectors):
        return text_encoder(input_ids.to(device))[0]


def tokenize_prompts(tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """``(N, L)`` CLIP input ids padded and cut to the tokenizer's length (77), as every SD1.5 pipeline does; a
    prompt that is cut logs a warning saying how many tokens were dropped and where the cut falls."""
    length = tokenizer.model_max_length
    for prompt in prompts:
        ids = tokenizer(prompt, truncation=False).input_ids
        if len(ids) > length:
            kept = tokenizer.decode(ids[1 : length - 1]).strip()
            logger.warning(
                "the prompt is %d tokens; the text encoder reads %d, so it is cut after ...%r",
                len(ids), length, kept[-40:],
            )  # fmt: skip
    return tokenizer(
        list(prompts), padding="max_length", max_length=length, truncation=True, return_tensors="pt"
    ).input_ids


def encode_text(text_encoder: torch.nn.Module, tokenizer, prompts: list[str]) -> torch.Tensor:
    """Ordinary CLIP prompt encoding, ``(N, 77, D)`` ``last_hidden_state`` (no clip-skip), as SD1.5 pipelines do."""
    input_ids = tokenize_prompts(tokenizer, prompts)
    return text_encoder(input_ids.to(text_encoder.device))[0]
