"""AdaFace (Li et al., "AdaFace: A Versatile Face Encoder for Zero-Shot Diffusion Model Personalization"): the model
pieces, the official checkpoint loader and the prompt helpers.

AdaFace maps a face into the *input token-embedding space* of SD1.5's own CLIP text encoder, in two steps:

A. Arc2Face's frozen encoder turns the ArcFace embedding into ID image-prompt embeddings ``X_img``: the output rows
   4..19 of ``"photo of a id person"`` (:func:`idfusion.prompt_encoders.encode_arcface_id_prompt` with ``max_length=22``,
   then ``[:, 4:20]``).
B. The *inverse projector* ``prompt2token_proj`` (:class:`AdaFaceProjector`), a CLIP ViT-L/14 text transformer whose
   attention keys/values may be widened (:class:`CLIPAttentionMKV`), reads the template
   ``"photo of a " + ", " * n`` with token-embedding rows ``4 .. 4+N_ID-1`` replaced by ``X_img``, mixes its last
   three hidden states with learned weights, applies the final LayerNorm and returns rows ``4 .. 4+N_ID-1``: the
   "ada embeddings" ``X_ada``, which become the token embeddings of new tokens (``z_1_0 .. z_1_15``).

Checkpoints (pickled ``nn.Module`` objects in a ``torch.save`` dict; read without running code by
:func:`idfusion.serialization.load_pickled_state`):

- **v1** (2024 paper era, Arc2Face only): ``subjects-celebrity2024-05-16T17-22-46_zero3-ada-30000.pt``. Top-level
  keys include ``string_to_token``, ``token2num_vectors`` and ``string_to_subj_basis_generator_dict`` =
  ``{'z': subject generator, 'y': background generator}``; the background generator is not used for generation.
- **v2** (2025, joint): ``VGGface2_HQ_masks2024-10-14T16-09-24_zero3-ada-3500.pt``. Top-level keys
  ``string_to_subj_basis_generator_dict`` (``{'z': generator}`` or ``{'z': ModuleList([ConsistentID, Arc2Face])}``),
  ``placeholder_strings``, ``subject_strings`` and optionally ``unet_lora_modules`` (the release's save); the dev
  repo's save of the same date also wrote ``token2num_vectors``, ``background_strings``, ``ca_q_bns`` and
  ``ca_outfeat_lns``. Each v2 generator pickles a CLIP tokenizer as an attribute.

A v2 joint checkpoint has two branches: ConsistentID (4 tokens ``z_0_0..z_0_3``, ID-CFG 6) and Arc2Face (16 tokens
``z_1_0..z_1_15``, ID-CFG 1), in that order. The Arc2Face branch is computed here; the ConsistentID branch's inputs
(``ConsistentID-v1.bin``'s ``ProjPlusModel``, insightface ``buffalo_l`` and CLIP-ViT-H-14) are in
:mod:`idfusion.methods.adaface_consistentid`, which uses :attr:`AdaFaceCheckpoint.consistentid_projector`.

:func:`official_face_image` is the release's face preprocessing (pad to a square, 512 NEAREST) and
:func:`official_face_index` its choice of "the largest" face.

:func:`convert_adaface_checkpoint` rewrites a ``.pt`` as a ``.safetensors`` file that :func:`load_adaface_checkpoint`
also reads, with identical outputs and without any pickle.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FaceIndexError, ImageError, ModelFilesError
from ..serialization import PickledStub, load_pickled_state, module_state_dict, stub_qualified_name

if TYPE_CHECKING:
    from ..faces.types import Detection

__all__ = [
    "ADAFACE_V1",
    "ADAFACE_V2",
    "ARC2FACE_NUM_ID_TOKENS",
    "CONSISTENTID_NUM_ID_TOKENS",
    "ID_PROMPT_MAX_LENGTH",
    "ID_TOKEN_START",
    "OFFICIAL_FACE_SIZE",
    "PICKLE_GLOBALS",
    "PICKLE_MODULE_PREFIXES",
    "V1_CHECKPOINT_NAME",
    "V2_CHECKPOINT_NAME",
    "AdaFaceCheckpoint",
    "AdaFaceProjector",
    "CLIPAttentionMKV",
    "CLIPEncoderLayerMKV",
    "OfficialFaceEmbedder",
    "adaface_projector_config",
    "adaface_template_ids",
    "compose_prompt",
    "convert_adaface_checkpoint",
    "load_adaface_checkpoint",
    "official_face_image",
    "official_face_index",
    "official_pad_offset",
    "official_to_original",
    "projector_config_from_state_dict",
    "subject_tokens",
    "template_num_commas",
]

logger = logging.getLogger(__name__)

ADAFACE_V1 = "v1"
ADAFACE_V2 = "v2"
V1_CHECKPOINT_NAME = "subjects-celebrity2024-05-16T17-22-46_zero3-ada-30000.pt"
V2_CHECKPOINT_NAME = "VGGface2_HQ_masks2024-10-14T16-09-24_zero3-ada-3500.pt"

ARC2FACE_NUM_ID_TOKENS = 16
CONSISTENTID_NUM_ID_TOKENS = 4
ID_TOKEN_START = 4  # BOS, "photo", "of", "a", then the ID rows
ID_PROMPT_MAX_LENGTH = 22  # step A's tokenizer length (v2 and the v1 wrapper); rows 0..19 do not depend on it
EOS_TOKEN_ID = 49407
INITIAL_LAYER_WEIGHTS = (1.0, 2.0, 4.0)  # hidden_state_layer_weights at initialisation
NUM_MIXED_LAYERS = 3

# Modules whose classes appear in the official pickles. They are never imported (stubs stand in for them).
PICKLE_MODULE_PREFIXES: tuple[str, ...] = (
    "adaface",  # v2: adaface.subj_basis_generator, adaface.arc2face_models, adaface.util
    "ldm",  # v1: ldm.modules.subj_basis_generator, ldm.modules.arc2face_models, ldm.modules.embedding_manager
    "transformers",  # CLIPTextModel internals (transformers 4 module paths) and their configs
    "torch.nn.modules",  # Linear, LayerNorm, Embedding, ModuleList, ModuleDict, Sequential, Identity, ...
    "einops.layers",  # Rearrange inside obj_proj_in
    "peft",  # optional v2 UNet LoRA modules
    "diffusers",
)
# Single globals the official v2 pickles hold outside those modules: each v2 SubjBasisGenerator keeps a transformers 4
# (slow) CLIPTokenizer as an attribute, whose pickle has its compiled regex (``regex._regex.compile`` with the
# compiled pattern's data), its special ``tokenizers.AddedToken`` s and its text fixer ``ftfy.fix_text``. They become
# inert stubs that record their arguments; regex is never called and nothing is imported.
PICKLE_GLOBALS: tuple[str, ...] = ("regex._regex.compile", "tokenizers.AddedToken", "ftfy.fix_text")

_TEXT_PREFIX = "prompt2token_proj.text_model."
_LAYER_WEIGHTS_KEY = "hidden_state_layer_weights"
# Keys of a generator's state dict that generation does not use (see the module docstring of the spec, §2.8).
_IGNORED_KEY_PATTERNS = (
    re.compile(r"obj_proj_in\..*"),  # DINO input path for non-face objects
    re.compile(r"pos_embs(_ln\..*)?"),  # v1 only
    re.compile(r"static_img_suffix_embs"),  # v2 optional suffix embeddings, off at inference by default
    re.compile(r"layerwise_proj\..*"),  # v2 LayerwiseMLPProjWithSkip, not used by default
    re.compile(re.escape(_TEXT_PREFIX) + r"embeddings\.position_ids"),  # a buffer some transformers versions save
)


# ----------------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------------


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """CLIP's activation, ``x * sigmoid(1.702 x)``."""
    return x * torch.sigmoid(1.702 * x)


class CLIPAttentionMKV(nn.Module):
    """CLIP self-attention with multi-KV ("MKV") keys and values, as in AdaFace's ``prompt2token_proj``.

    ``k_proj`` and ``v_proj`` map ``D`` to ``D * M``: each token yields ``M`` virtual key/value tokens, in the order
    ``t0c0 .. t0c(M-1), t1c0, ..``. Queries attend over all ``L * M`` of them with the causal mask broadcast over the
    copies (query ``i`` sees every copy of key ``j <= i``), softmax over the ``L * M`` logits, scale
    ``head_dim ** -0.5``. With ``M = 1`` this is CLIP's causal attention.

    Args:
        embed_dim (`int`): the width ``D``.
        num_heads (`int`): attention heads; ``D`` must be divisible by it.
        multiplier (`int`, *optional*, defaults to 1): ``M``, the number of key/value copies per token.
    """

    def __init__(self, embed_dim: int, num_heads: int, multiplier: int = 1):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        if multiplier < 1:
            raise ValueError(f"attention multiplier must be >= 1, got {multiplier}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.multiplier = multiplier
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.k_proj = nn.Linear(embed_dim, embed_dim * multiplier)
        self.v_proj = nn.Linear(embed_dim, embed_dim * multiplier)
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Causal multi-KV attention: ``(B, L, D) -> (B, L, D)``."""
        batch, length, _ = hidden_states.shape
        heads, head_dim, copies = self.num_heads, self.head_dim, self.multiplier
        # (B, L, D) -> (B, L, H, hd) -> (B, H, L, hd)
        query = self.q_proj(hidden_states).view(batch, length, heads, head_dim).transpose(1, 2)
        # (B, L, D*M) -> (B, L*M, H, hd): token t's copy c is virtual token t*M + c -> (B, H, L*M, hd)
        key = self.k_proj(hidden_states).view(batch, length * copies, heads, head_dim).transpose(1, 2)
        value = self.v_proj(hidden_states).view(batch, length * copies, heads, head_dim).transpose(1, 2)
        # (L, L) lower-triangular -> (L, L*M): virtual key t*M + c is visible to query i iff t <= i
        causal = torch.ones(length, length, dtype=torch.bool, device=hidden_states.device).tril()
        mask = causal.repeat_interleave(copies, dim=1)
        # softmax(q k^T / sqrt(hd) + mask) v over the L*M keys -> (B, H, L, hd)
        attended = F.scaled_dot_product_attention(query, key, value, attn_mask=mask)
        # (B, H, L, hd) -> (B, L, H, hd) -> (B, L, D)
        attended = attended.transpose(1, 2).reshape(batch, length, heads * head_dim)
        return self.out_proj(attended)


class CLIPMLP(nn.Module):
    """CLIP's feed-forward block: ``fc2(quick_gelu(fc1(x)))``."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.fc2 = nn.Linear(intermediate_size, hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(quick_gelu(self.fc1(hidden_states)))


class CLIPEncoderLayerMKV(nn.Module):
    """A pre-LayerNorm CLIP transformer layer with :class:`CLIPAttentionMKV` self-attention."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_heads: int, multiplier: int, eps: float):
        super().__init__()
        self.self_attn = CLIPAttentionMKV(hidden_size, num_heads, multiplier)
        self.layer_norm1 = nn.LayerNorm(hidden_size, eps=eps)
        self.mlp = CLIPMLP(hidden_size, intermediate_size)
        self.layer_norm2 = nn.LayerNorm(hidden_size, eps=eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.self_attn(self.layer_norm1(hidden_states))
        return hidden_states + self.mlp(self.layer_norm2(hidden_states))


class _CLIPTextEmbeddings(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, max_position_embeddings: int):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, hidden_size)
        self.position_embedding = nn.Embedding(max_position_embeddings, hidden_size)


class _CLIPEncoder(nn.Module):
    def __init__(self, layers: list[CLIPEncoderLayerMKV]):
        super().__init__()
        self.layers = nn.ModuleList(layers)


class _CLIPTextTransformer(nn.Module):
    """Holds the weights under the official key names ``text_model.{embeddings,encoder,final_layer_norm}``."""

    def __init__(self, embeddings: _CLIPTextEmbeddings, encoder: _CLIPEncoder, hidden_size: int, eps: float):
        super().__init__()
        self.embeddings = embeddings
        self.encoder = encoder
        self.final_layer_norm = nn.LayerNorm(hidden_size, eps=eps)


class _CLIPTextModelWrapper(nn.Module):
    """Only the ``text_model`` nesting of the original ``CLIPTextModelWrapper`` (transformers 4 layout)."""

    def __init__(self, text_model: _CLIPTextTransformer):
        super().__init__()
        self.text_model = text_model


def adaface_projector_config(**overrides: Any) -> dict[str, Any]:
    """Full-size ``AdaFaceProjector`` settings: CLIP ViT-L/14's text tower (openai/clip-vit-large-patch14).

    The defaults have no widened attention (``attention_multipliers`` all 1) and 16 ID tokens (Arc2Face branch);
    the official checkpoints widen some layers, which :func:`projector_config_from_state_dict` reads.
    """
    config: dict[str, Any] = {
        "vocab_size": 49408,
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_layers": 12,
        "num_heads": 12,
        "max_position_embeddings": 77,
        "layer_norm_eps": 1e-5,
        "attention_multipliers": [1] * 12,
        "num_id_tokens": ARC2FACE_NUM_ID_TOKENS,
        "eos_token_id": EOS_TOKEN_ID,
    }
    unknown = set(overrides) - set(config)
    if unknown:
        raise TypeError(f"unknown AdaFace projector settings {sorted(unknown)}; known: {sorted(config)}")
    config.update(overrides)
    if "num_layers" in overrides and "attention_multipliers" not in overrides:
        config["attention_multipliers"] = [1] * config["num_layers"]
    return config


class AdaFaceProjector(nn.Module):
    """AdaFace's inverse projector ``prompt2token_proj`` with its hidden-state mixing weights.

    Its ``state_dict`` keys are those of the official generator (minus unused parts):
    ``prompt2token_proj.text_model.embeddings.{token,position}_embedding.weight``,
    ``prompt2token_proj.text_model.encoder.layers.{i}.{self_attn.{q,k,v,out}_proj,layer_norm1,mlp.fc1,mlp.fc2,
    layer_norm2}.*``, ``prompt2token_proj.text_model.final_layer_norm.*`` and ``hidden_state_layer_weights``
    ``[3, 1]``. ``k_proj``/``v_proj`` of layer ``i`` have ``hidden_size * attention_multipliers[i]`` rows.

    Args:
        vocab_size (`int`): token-embedding rows (49408).
        hidden_size (`int`): width ``D`` (768).
        intermediate_size (`int`): MLP width (3072).
        num_layers (`int`): transformer layers (12); at least 3, since the last three are mixed.
        num_heads (`int`): attention heads (12).
        max_position_embeddings (`int`): positions (77).
        layer_norm_eps (`float`): LayerNorm epsilon (1e-5).
        attention_multipliers (`Sequence[int]`): per-layer key/value multipliers ``M_i``.
        num_id_tokens (`int`): ``N_ID``, the ID rows injected at and read from ``4 .. 4+N_ID-1``: 16 for the Arc2Face
            branch, 4 for ConsistentID.
        eos_token_id (`int`, *optional*, defaults to 49407): the token whose embedding forms :meth:`pad_embeddings`.
    """

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        intermediate_size: int,
        num_layers: int,
        num_heads: int,
        max_position_embeddings: int,
        layer_norm_eps: float,
        attention_multipliers: Sequence[int],
        num_id_tokens: int,
        eos_token_id: int = EOS_TOKEN_ID,
    ):
        super().__init__()
        multipliers = [int(m) for m in attention_multipliers]
        if len(multipliers) != num_layers:
            raise ValueError(f"{len(multipliers)} attention multipliers for {num_layers} layers")
        if num_layers < NUM_MIXED_LAYERS:
            raise ValueError(f"the projector mixes its last {NUM_MIXED_LAYERS} layers; got {num_layers} layers")
        if not 0 < num_id_tokens <= max_position_embeddings - ID_TOKEN_START - 1:
            raise ValueError(f"num_id_tokens {num_id_tokens} does not fit in {max_position_embeddings} positions")
        if not 0 <= eos_token_id < vocab_size:
            raise ValueError(f"eos_token_id {eos_token_id} is outside the vocabulary of {vocab_size}")
        self.config = {
            "vocab_size": vocab_size,
            "hidden_size": hidden_size,
            "intermediate_size": intermediate_size,
            "num_layers": num_layers,
            "num_heads": num_heads,
            "max_position_embeddings": max_position_embeddings,
            "layer_norm_eps": layer_norm_eps,
            "attention_multipliers": multipliers,
            "num_id_tokens": num_id_tokens,
            "eos_token_id": eos_token_id,
        }
        self.num_id_tokens = num_id_tokens
        self.eos_token_id = eos_token_id
        layers = [
            CLIPEncoderLayerMKV(hidden_size, intermediate_size, num_heads, m, layer_norm_eps) for m in multipliers
        ]
        text_model = _CLIPTextTransformer(
            _CLIPTextEmbeddings(vocab_size, hidden_size, max_position_embeddings),
            _CLIPEncoder(layers),
            hidden_size,
            layer_norm_eps,
        )
        self.prompt2token_proj = _CLIPTextModelWrapper(text_model)
        self.hidden_state_layer_weights = nn.Parameter(torch.tensor(INITIAL_LAYER_WEIGHTS).unsqueeze(1))  # (3, 1)

    # ------------------------------------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> AdaFaceProjector:
        """Build from a dict such as :func:`adaface_projector_config` (random weights; use ``torch.device("meta")``
        as a context manager to build a full-size one without memory)."""
        return cls(**dict(config))

    @classmethod
    def from_state_dict(
        cls,
        state_dict: Mapping[str, torch.Tensor],
        *,
        num_id_tokens: int,
        num_heads: int | None = None,
        layer_norm_eps: float = 1e-5,
        dtype: torch.dtype | None = None,
    ) -> AdaFaceProjector:
        """Build a projector whose every size comes from the tensors of a generator's state dict.

        Keys that generation does not use (``obj_proj_in.*``, ``pos_embs*``, ``static_img_suffix_embs``,
        ``layerwise_proj.*``, ``...embeddings.position_ids``) are ignored; anything else missing or unexpected is an
        error. Meta tensors give a meta projector (shape checks at full size).

        Args:
            state_dict (`Mapping[str, torch.Tensor]`): the generator's flat state dict.
            num_id_tokens (`int`): ``N_ID`` of this generator (16 Arc2Face, 4 ConsistentID); not in the tensors.
            num_heads (`int`, *optional*): attention heads; not in the tensors. Defaults to ``hidden_size // 64``
                (CLIP's head width).
            layer_norm_eps (`float`, *optional*, defaults to 1e-5): CLIP's LayerNorm epsilon.
            dtype (`torch.dtype`, *optional*): cast the weights; by default they keep the file's dtype.

        Raises:
            ValueError: missing, unexpected or inconsistently shaped tensors (the message names the keys).
        """
        config = projector_config_from_state_dict(state_dict, num_heads=num_heads, layer_norm_eps=layer_norm_eps)
        config["num_id_tokens"] = num_id_tokens
        used = {k: v for k, v in state_dict.items() if not _is_ignored(k)}
        with torch.device("meta"):  # no random initialisation; the tensors are assigned below
            projector = cls.from_config(config)
        expected = projector.state_dict()
        missing = sorted(set(expected) - set(used))
        unexpected = sorted(set(used) - set(expected))
        problems = [f"missing keys {missing}"] if missing else []
        problems += [f"unexpected keys {unexpected}"] if unexpected else []
        if problems:
            raise ValueError(f"AdaFace projector state dict does not match the official layout: {'; '.join(problems)}")
        wrong = [
            f"{k}: {tuple(used[k].shape)} != {tuple(v.shape)}" for k, v in expected.items() if used[k].shape != v.shape
        ]
        if wrong:
            raise ValueError(f"AdaFace projector tensors have inconsistent shapes: {wrong}")
        projector.load_state_dict(dict(used), strict=True, assign=True)
        if dtype is not None:
            projector.to(dtype)
        return projector.eval()

    # ------------------------------------------------------------------------------------------------------------------
    @property
    def text_model(self) -> _CLIPTextTransformer:
        return self.prompt2token_proj.text_model

    @property
    def attention_multipliers(self) -> list[int]:
        return list(self.config["attention_multipliers"])

    def forward(self, id_prompt_embeds: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Map ID image-prompt embeddings to ada embeddings.

        Args:
            id_prompt_embeds (`torch.Tensor`): ``(N, N_ID, D)``, step A's ``X_img`` (Arc2Face encoder rows 4..19).
            input_ids (`torch.LongTensor`): ``(N, L)`` or ``(1, L)`` template ids (:func:`adaface_template_ids`).

        Returns:
            `torch.Tensor`: ``(N, N_ID, D)`` ada embeddings ``X_ada``, in the projector's dtype.
        """
        text = self.text_model
        n_id, start = self.num_id_tokens, ID_TOKEN_START
        width = text.embeddings.token_embedding.embedding_dim
        if id_prompt_embeds.ndim != 3 or id_prompt_embeds.shape[1:] != (n_id, width):
            raise ValueError(
                f"id_prompt_embeds must have shape (N, {n_id}, {width}); got {tuple(id_prompt_embeds.shape)}"
            )
        batch = id_prompt_embeds.shape[0]
        if input_ids.ndim != 2 or input_ids.shape[0] not in (1, batch):
            raise ValueError(f"input_ids must have shape (1 or {batch}, L); got {tuple(input_ids.shape)}")
        length = input_ids.shape[1]
        if not start + n_id <= length <= text.embeddings.position_embedding.num_embeddings:
            raise ValueError(
                f"template length {length} must lie in [{start + n_id}, {self.config['max_position_embeddings']}]"
            )
        weight = text.embeddings.token_embedding.weight
        input_ids = input_ids.to(weight.device).expand(batch, length)
        token_embeds = text.embeddings.token_embedding(input_ids)  # (N, L, D)
        # Rows 4 .. 4+N_ID-1 are replaced by the ID embeddings: (N, 4, D) ++ (N, N_ID, D) ++ (N, L-4-N_ID, D)
        token_embeds = torch.cat(
            [token_embeds[:, :start], id_prompt_embeds.to(weight), token_embeds[:, start + n_id :]], dim=1
        )
        hidden = token_embeds + text.embeddings.position_embedding.weight[:length]  # (N, L, D) + (L, D)
        hidden_states = [hidden]
        for layer in text.encoder.layers:
            hidden = layer(hidden)
            hidden_states.append(hidden)
        # The outputs of the last three layers, mixed with w / sum(w): (3, N, L, D) * (3, 1, 1, 1) summed over dim 0
        stacked = torch.stack(hidden_states[-NUM_MIXED_LAYERS:], dim=0)
        weights = self.hidden_state_layer_weights / self.hidden_state_layer_weights.sum()  # (3, 1)
        mixed = (stacked * weights.to(stacked.dtype).view(NUM_MIXED_LAYERS, 1, 1, -1)).sum(dim=0)
        return text.final_layer_norm(mixed)[:, start : start + n_id]

    def pad_embeddings(self) -> torch.Tensor:
        """``(L_max, D)``: the embedding-module output of an all-EOS prompt, ``tok_emb(49407) + pos_emb[0:L_max]``.

        This is ID-CFG's "unconditional" point (v1 computes it from the projector's embeddings, v2 from openai CLIP-L's,
        which v2's frozen projector embeddings equal).
        """
        embeddings = self.text_model.embeddings
        eos = embeddings.token_embedding.weight[self.eos_token_id]  # (D,)
        return eos + embeddings.position_embedding.weight  # (D,) + (L_max, D) -> (L_max, D)

    def apply_id_cfg(self, ada_embeds: torch.Tensor, scale: float) -> torch.Tensor:
        """AdaFace's "ID CFG": ``scale * X_ada + (1 - scale) * PAD[4 : 4+N_ID]``; ``scale = 1`` leaves it unchanged.

        Args:
            ada_embeds (`torch.Tensor`): ``(N, N_ID, D)`` output of :meth:`forward`.
            scale (`float`): above 1 extrapolates away from the padding embedding (stronger identity).
        """
        start = ID_TOKEN_START
        pad = self.pad_embeddings()[start : start + self.num_id_tokens]  # (N_ID, D)
        return scale * ada_embeds + (1.0 - scale) * pad.to(ada_embeds)


def _is_ignored(key: str) -> bool:
    return any(p.fullmatch(key) for p in _IGNORED_KEY_PATTERNS)


def projector_config_from_state_dict(
    state_dict: Mapping[str, torch.Tensor], *, num_heads: int | None = None, layer_norm_eps: float = 1e-5
) -> dict[str, Any]:
    """Read a projector's sizes from its tensors (``num_id_tokens`` is left at 16; set it from the checkpoint).

    ``hidden_size`` and ``vocab_size`` come from the token table, positions from the position table, layers from the
    ``encoder.layers.{i}`` keys, ``intermediate_size`` from ``fc1``, and each layer's multiplier from
    ``k_proj.weight.shape[0] / hidden_size``.

    Raises:
        ValueError: a required tensor is missing or the sizes do not fit together.
    """
    prefix = _TEXT_PREFIX
    token_key = f"{prefix}embeddings.token_embedding.weight"
    position_key = f"{prefix}embeddings.position_embedding.weight"
    for key in (token_key, position_key):
        if key not in state_dict:
            raise ValueError(f"AdaFace projector state dict has no {key!r}")
    vocab_size, hidden_size = state_dict[token_key].shape
    max_positions = state_dict[position_key].shape[0]
    layer_ids = sorted(
        {int(m.group(1)) for k in state_dict if (m := re.match(re.escape(prefix) + r"encoder\.layers\.(\d+)\.", k))}
    )
    if layer_ids != list(range(len(layer_ids))) or not layer_ids:
        raise ValueError(f"AdaFace projector layers must be numbered 0..n-1; found {layer_ids}")
    multipliers = []
    for i in layer_ids:
        rows = {}
        for name in ("k_proj", "v_proj"):
            key = f"{prefix}encoder.layers.{i}.self_attn.{name}.weight"
            if key not in state_dict:
                raise ValueError(f"AdaFace projector state dict has no {key!r}")
            rows[name] = state_dict[key].shape[0]
        if rows["k_proj"] != rows["v_proj"] or rows["k_proj"] % hidden_size:
            raise ValueError(f"layer {i}: k_proj/v_proj rows {rows} are not a common multiple of {hidden_size}")
        multipliers.append(rows["k_proj"] // hidden_size)
    fc1_key = f"{prefix}encoder.layers.0.mlp.fc1.weight"
    if fc1_key not in state_dict:
        raise ValueError(f"AdaFace projector state dict has no {fc1_key!r}")
    heads = num_heads if num_heads is not None else hidden_size // 64
    if heads < 1 or hidden_size % heads:
        raise ValueError(f"hidden size {hidden_size} is not divisible into {heads} heads")
    return adaface_projector_config(
        vocab_size=int(vocab_size),
        hidden_size=int(hidden_size),
        intermediate_size=int(state_dict[fc1_key].shape[0]),
        num_layers=len(layer_ids),
        num_heads=int(heads),
        max_position_embeddings=int(max_positions),
        layer_norm_eps=float(layer_norm_eps),
        attention_multipliers=multipliers,
    )


# ----------------------------------------------------------------------------------------------------------------------
# Templates, tokens and prompts
# ----------------------------------------------------------------------------------------------------------------------


def template_num_commas(version: str, num_id_tokens: int) -> int:
    """Commas in the projector template ``"photo of a " + ", " * n``: 16 in v1, ``N_ID + 2`` in v2."""
    _check_version(version)
    return 16 if version == ADAFACE_V1 else num_id_tokens + 2


def adaface_template_ids(tokenizer: Any, num_commas: int) -> torch.Tensor:
    """``(1, L)`` ids of the projector template ``"photo of a " + ", " * num_commas``, padded to the tokenizer's length.

    Tokens: BOS, ``photo``, ``of``, ``a``, then ``,`` (267) per comma, EOS, padding (SD1.5 pads with EOS).
    """
    return tokenizer(
        "photo of a " + ", " * num_commas,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def subject_tokens(version: str, num_id_tokens: int, *, subject: str = "z", encoder_index: int = 1) -> list[str]:
    """The placeholder tokens whose embeddings are the ada embeddings.

    v1: ``z_0 .. z_{N-1}``. v2: ``z_{e}_0 .. z_{e}_{N-1}`` where ``e`` is the encoder's index in the checkpoint's
    encoder list (1 for the Arc2Face branch of the joint checkpoint; ConsistentID is 0).
    """
    _check_version(version)
    if version == ADAFACE_V1:
        return [f"{subject}_{i}" for i in range(num_id_tokens)]
    return [f"{subject}_{encoder_index}_{i}" for i in range(num_id_tokens)]


def _token_groups(tokens: Sequence[str] | Sequence[Sequence[str]]) -> list[list[str]]:
    """One group per encoder: a flat token list is one group, a list of lists is kept as given."""
    if isinstance(tokens, str):
        raise TypeError("tokens must be a sequence of token strings (or of per-encoder sequences), not one string")
    items = list(tokens)
    if all(isinstance(t, str) for t in items):
        return [items] if items else []
    if all(not isinstance(t, str) and all(isinstance(u, str) for u in t) for t in items):
        return [list(t) for t in items if len(t)]
    raise TypeError("tokens must be all strings, or all per-encoder sequences of strings")


def _clean_spaces(text: str) -> str:
    # CLIP's tokenizers collapse whitespace runs and strip the ends, so this never changes the token ids.
    return re.sub(r"\s+", " ", text).strip()


def compose_prompt(
    prompt: str,
    tokens: Sequence[str] | Sequence[Sequence[str]],
    version: str,
    *,
    subject: str = "z",
    repeat_prompt_for_each_encoder: bool = False,
) -> str:
    """Put the subject tokens into a user prompt with the rule of the release's wrapper (``update_prompt``).

    v2 (``adaface_wrapper.py``): ``a z``, ``an z``, ``the z`` (lower-case articles only) and then every other ``z``
    are deleted, each with one comma right after it (``"z,"``); ``\\b`` word boundaries, so ``z_1_0`` or
    ``zebra`` are kept. Then the tokens are appended: ``"<prompt> z_0_0 .. z_0_3 z_1_0 .. z_1_15"``. With
    ``repeat_prompt_for_each_encoder`` (the wrapper's own default; the app turns it on at composition level >= 1)
    the prompt is repeated per encoder: ``"<prompt> z_0_0 .. z_0_3, <prompt> z_1_0 .. z_1_15"``.

    v1 (AdaFace-Animate's wrapper): a prompt that already holds the joined tokens is left as is; otherwise every
    standalone ``z`` is replaced by the tokens, or, without one, the tokens are prepended.

    Whitespace runs are collapsed and the ends stripped afterwards; CLIP's tokenizer does the same, so the token ids
    equal those of the release's string exactly.

    Args:
        prompt (`str`): the user's text; ``z`` marks the subject.
        tokens (`Sequence[str]` or `Sequence[Sequence[str]]`): the subject tokens, or one sequence per encoder in
            the encoders' order (``[[z_0_0..z_0_3], [z_1_0..z_1_15]]`` for the joint v2 encoder).
        version (`str`): ``"v1"`` or ``"v2"``.
        subject (`str`, *optional*, defaults to ``"z"``): the placeholder.
        repeat_prompt_for_each_encoder (`bool`, *optional*, defaults to `False`): v2 only, see above.
    """
    _check_version(version)
    groups = _token_groups(tokens)
    joined = " ".join(" ".join(group) for group in groups)
    word = rf"\b{re.escape(subject)}\b"
    if version == ADAFACE_V1:
        if joined and joined in prompt:
            return _clean_spaces(prompt)
        if re.search(word, prompt) is None:
            return _clean_spaces(f"{joined} {prompt}")
        return _clean_spaces(re.sub(word, lambda _: joined, prompt))
    prompt = re.sub(rf"\b(a|an|the)\s+{re.escape(subject)}\b,?", "", prompt)
    prompt = re.sub(word + ",?", "", prompt)
    if repeat_prompt_for_each_encoder:
        return _clean_spaces(", ".join(f"{prompt} {' '.join(group)}" for group in groups))
    return _clean_spaces(f"{prompt} {joined}")


def _check_version(version: str) -> None:
    if version not in (ADAFACE_V1, ADAFACE_V2):
        raise ValueError(f"unknown AdaFace version {version!r}; expected {ADAFACE_V1!r} or {ADAFACE_V2!r}")


# ----------------------------------------------------------------------------------------------------------------------
# Face preprocessing (the release's FaceID2AdaPrompt.extract_init_id_embeds_from_images)
# ----------------------------------------------------------------------------------------------------------------------

OFFICIAL_FACE_SIZE = 512  # the release detects at det_size (512, 512) on a 512x512 image


def _rgb_array(image: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] not in (3, 4) or min(array.shape[:2]) < 1:
        raise ImageError(
            name, f"expected an (H, W, 3) uint8 RGB array (RGBA allowed), got {array.dtype} {array.shape}"
        )
    return array[..., :3]  # RGBA -> RGB drops alpha, as PIL's convert("RGB") in the release


def official_pad_offset(height: int, width: int) -> tuple[int, int]:
    """``(left, top)`` at which the release pastes an image into its black square (``pad_image_obj_to_square``):
    centred along the short side, rounding down."""
    if width > height:
        return 0, (width - height) // 2
    return (height - width) // 2, 0


def official_face_image(image: np.ndarray, *, size: int = OFFICIAL_FACE_SIZE, name: str = "image") -> np.ndarray:
    """The image the release runs face detection on: padded to a black square, resized to ``size`` NEAREST.

    The square's side is ``max(H, W)`` and the image is pasted at :func:`official_pad_offset`; PIL's NEAREST resize
    then takes source pixel ``floor((i + 0.5) * side / size)`` for output pixel ``i``. The release then converts to
    BGR for insightface, whose detector and recognizer swap back to RGB; idfusion's ONNX backends take this RGB
    array directly. Map detections back with :func:`official_to_original`.

    Args:
        image (`np.ndarray`): ``(H, W, 3)`` uint8 RGB (an alpha channel is dropped).
        size (`int`, *optional*, defaults to 512): output side.
        name (`str`, *optional*): names the image in errors.

    Returns:
        `np.ndarray`: ``(size, size, 3)`` uint8 RGB.

    Raises:
        ImageError: not an ``(H, W, 3)`` uint8 array.
    """
    from PIL import Image

    rgb = _rgb_array(image, name)
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    height, width = rgb.shape[:2]
    side = max(height, width)
    left, top = official_pad_offset(height, width)
    square = np.zeros((side, side, 3), dtype=np.uint8)
    square[top : top + height, left : left + width] = rgb
    return np.asarray(Image.fromarray(square).resize((size, size), Image.Resampling.NEAREST))


def official_to_original(
    points: np.ndarray, image_shape: Sequence[int], *, size: int = OFFICIAL_FACE_SIZE
) -> np.ndarray:
    """Map ``(..., 2)`` ``(x, y)`` coordinates (boxes as ``(x1, y1), (x2, y2)`` pairs, landmarks) found on
    :func:`official_face_image` back to the original ``image_shape`` ``(H, W, ...)``: ``x * side / size - left``.
    """
    height, width = int(image_shape[0]), int(image_shape[1])
    left, top = official_pad_offset(height, width)
    points = np.asarray(points, dtype=np.float64)
    if points.shape[-1] != 2:
        raise ValueError(f"points must have shape (..., 2), got {points.shape}")
    scale = max(height, width) / size
    return points * scale - np.array([left, top], dtype=np.float64)


def official_face_index(boxes: np.ndarray) -> int:
    """The face the release calls "the largest": the last one after a stable sort by ``(x2 - x1) * y2 - y1``.

    That key is the release's expression as written (operator precedence makes it ``((x2 - x1) * y2) - y1``, not
    the area); ties go to the later box. Boxes must be in the detector's order (insightface: by score) and in the
    coordinates of :func:`official_face_image`, as the release's are.

    Args:
        boxes (`np.ndarray`): ``(N, 4)`` ``x1, y1, x2, y2`` with ``N >= 1``.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if len(boxes) == 0:
        raise ValueError("official_face_index needs at least one box")
    keys = (boxes[:, 2] - boxes[:, 0]) * boxes[:, 3] - boxes[:, 1]
    return int(len(keys) - 1 - np.argmax(keys[::-1]))  # last maximum


class OfficialFaceEmbedder:
    """Face embeddings the way the release extracts them (``extract_init_id_embeds_from_images``), for either branch.

    An SCRFD detector runs at size 512 on :func:`official_face_image` (score 0.5, NMS 0.4, as insightface's
    ``FaceAnalysis.prepare(det_size=(512, 512))``; no second try on a padded image), the face is
    :func:`official_face_index`'s, and its ArcFace embedding (112 aligned crop) is L2-normalised. The Arc2Face
    branch uses ``antelopev2`` with Arc2Face's ``arcface.onnx`` (:meth:`antelopev2`), the ConsistentID branch
    ``buffalo_l`` (:class:`idfusion.methods.adaface_consistentid.BuffaloLFaces`).

    Args:
        detector_path, recognizer_path (`str` or `os.PathLike`): the ONNX files.
        providers (`Sequence[str]`, *optional*): onnxruntime providers.
    """

    def __init__(
        self,
        detector_path: str | os.PathLike[str],
        recognizer_path: str | os.PathLike[str],
        *,
        providers: Sequence[str] | None = None,
    ):
        from ..faces.onnx_backend import ArcFaceRecognizer, SCRFDDetector

        size = (OFFICIAL_FACE_SIZE, OFFICIAL_FACE_SIZE)
        self.detector = SCRFDDetector(
            detector_path, det_size=size, score_threshold=0.5, iou_threshold=0.4, providers=providers
        )
        self.recognizer = ArcFaceRecognizer(recognizer_path, providers=providers)

    @classmethod
    def antelopev2(
        cls, model_dir: str | os.PathLike[str], *, providers: Sequence[str] | None = None
    ) -> OfficialFaceEmbedder:
        """The Arc2Face branch's models: ``scrfd_10g_bnkps.onnx`` and ``arcface.onnx`` in ``model_dir``."""
        folder = Path(model_dir)
        files = [folder / "scrfd_10g_bnkps.onnx", folder / "arcface.onnx"]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelFilesError(f"{folder}: antelopev2 face models {missing} not found")
        return cls(files[0], files[1], providers=providers)

    def detect(self, image: np.ndarray, *, name: str = "image") -> tuple[np.ndarray, list[Detection]]:
        """:func:`official_face_image` of ``image`` and its detections (by score, highest first)."""
        face_image = official_face_image(image, name=name)
        return face_image, self.detector.detect(face_image)

    def embed(self, image: np.ndarray, *, name: str = "image", index: int | None = None) -> np.ndarray | None:
        """The unit ``(512,)`` float32 embedding of the release's chosen face (or of the ``index``-th face from the
        left), or ``None`` when none is found."""
        face_image, detections = self.detect(image, name=name)
        if not detections:
            return None
        if index is None:
            chosen = detections[official_face_index(np.stack([d.bbox for d in detections]))]
        else:
            ordered = sorted(detections, key=lambda d: float(d.bbox[0] + d.bbox[2]))
            if not -len(ordered) <= index < len(ordered):
                raise FaceIndexError(name, f"face index {index} requested, but the image has {len(ordered)} face(s)")
            chosen = ordered[index]
        embedding = self.recognizer.embed(face_image, chosen.landmarks[None])[0].astype(np.float32)
        return embedding / np.linalg.norm(embedding)


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class AdaFaceCheckpoint:
    """What generation needs from an AdaFace checkpoint.

    Attributes:
        path (`Path`): the file read.
        version (`str`): ``"v1"`` or ``"v2"``.
        subject_string (`str`): the subject placeholder (``"z"``).
        projector (`AdaFaceProjector`): the Arc2Face-branch projector (16 ID tokens).
        num_id_tokens (`int`): ``N_ID`` of the Arc2Face branch (16).
        encoder_index (`int`): the Arc2Face generator's index among the checkpoint's generators (1 in v2 joint
            checkpoints, else 0); names the v2 tokens.
        consistentid_projector (`AdaFaceProjector`, *optional*): the ConsistentID branch of a v2 joint checkpoint
            (4 ID tokens); :class:`idfusion.methods.adaface_consistentid.ConsistentIDEncoder` runs it.
        placeholder_strings (`list[str]`): the checkpoint's placeholder strings (``['z']``; v1 also ``'y'``).
        consistentid_index (`int`, *optional*): the ConsistentID generator's index (0 in the release); names its
            tokens ``z_0_0 .. z_0_3``.
    """

    path: Path
    version: str
    subject_string: str
    projector: AdaFaceProjector
    num_id_tokens: int
    encoder_index: int = 0
    consistentid_projector: AdaFaceProjector | None = None
    placeholder_strings: list[str] = field(default_factory=list)
    consistentid_index: int | None = None

    @property
    def has_consistentid(self) -> bool:
        return self.consistentid_projector is not None

    @property
    def consistentid_subject_tokens(self) -> list[str]:
        """The ConsistentID branch's tokens (``z_0_0 .. z_0_3``); empty without that branch."""
        if self.consistentid_projector is None or self.consistentid_index is None:
            return []
        return subject_tokens(
            self.version,
            self.consistentid_projector.num_id_tokens,
            subject=self.subject_string,
            encoder_index=self.consistentid_index,
        )

    def joint_subject_tokens(self, *, consistentid: bool = True) -> list[list[str]]:
        """Token groups in the release's encoder order (its ``adaface_encoder_types``, ``["consistentID",
        "arc2face"]``): ``[[z_0_0..z_0_3], [z_1_0..z_1_15]]``, or ``[[z_1_0..z_1_15]]`` for Arc2Face only (as the
        release's ``enabled_encoders=["arc2face"]``, which leaves the ConsistentID tokens out of the prompt)."""
        groups = [(self.encoder_index, self.subject_tokens)]
        if consistentid and self.consistentid_subject_tokens:
            groups.append((self.consistentid_index, self.consistentid_subject_tokens))
        return [tokens for _, tokens in sorted(groups, key=lambda item: item[0])]

    @property
    def subject_tokens(self) -> list[str]:
        """The Arc2Face branch's placeholder tokens (v1 ``z_0..z_15``; v2 joint ``z_1_0..z_1_15``)."""
        return subject_tokens(
            self.version, self.num_id_tokens, subject=self.subject_string, encoder_index=self.encoder_index
        )

    @property
    def template_num_commas(self) -> int:
        return template_num_commas(self.version, self.num_id_tokens)


@dataclass
class _Branch:
    name: str  # "arc2face" or "consistentID"
    index: int
    state_dict: dict[str, torch.Tensor]
    num_id_tokens: int
    num_heads: int | None
    layer_norm_eps: float


def _attrs(obj: Any) -> dict[str, Any]:
    return vars(obj) if isinstance(obj, PickledStub) or isinstance(obj, nn.Module) else {}


def _children(obj: Any) -> dict[str, Any]:
    if isinstance(obj, dict):
        return obj
    modules = _attrs(obj).get("_modules")
    return modules if isinstance(modules, dict) else {}


def _is_module_list(obj: Any) -> bool:
    return stub_qualified_name(obj).endswith(".ModuleList")


def _text_settings(generator: Any) -> tuple[int | None, float]:
    """Attention heads and LayerNorm epsilon from a pickled ``prompt2token_proj`` (its config or attention layers)."""
    wrapper = _children(generator).get("prompt2token_proj")
    config = _attrs(_attrs(wrapper).get("config"))
    heads = config.get("num_attention_heads")
    eps = config.get("layer_norm_eps", 1e-5)
    if not isinstance(heads, int):
        text_model = _children(wrapper).get("text_model")
        layers = _children(_children(_children(text_model).get("encoder")).get("layers"))
        attention = _attrs(_children(layers.get("0")).get("self_attn"))
        heads = attention.get("num_heads") if isinstance(attention.get("num_heads"), int) else None
    act = config.get("hidden_act", "quick_gelu")
    if act != "quick_gelu":
        raise ValueError(f"the projector uses activation {act!r}; only CLIP's quick_gelu is implemented")
    return heads, float(eps)


def _generator_num_id_tokens(generator: Any, default: int) -> int:
    attrs = _attrs(generator)
    for name in ("N_ID", "num_out_embs_per_layer", "num_id_vecs"):
        value = attrs.get(name)
        if isinstance(value, int) and value > 0:
            return value
    return default


# Top-level keys only the 2024 (v1) EmbeddingManager.save wrote; ``token2num_vectors`` is not one of them: the
# dev repo's save kept it into the v2 era (at the v2 release's training date, 2024-10-14, too).
_V1_ONLY_TOP_KEYS = ("string_to_token", "string_to_static_embedder", "emb_global_scale_scores", "do_zero_shot")


def _detect_version(top: Mapping[str, Any], generator: Any) -> tuple[str, str]:
    """``(version, reason)`` from what truly differs between the eras of the dev repo (askerlee/AdaFace-dev).

    The v2 behaviour (template ``"photo of a " + ", " * (N_ID + 2)``, appended ``z_{e}_{i}`` tokens) arrived with
    the generator attribute ``N_ID`` (commit e11ffd44, 2024-08-30); before it, generators had no ``N_ID`` and the
    template had 16 commas. Joint encoders (a ``ModuleList`` of generators) came later still (2024-09-23). Older
    signs of v1: ``num_out_layers`` without ``N_ID``, the single ``prompt2token_proj_attention_multiplier``, a
    subject ``pos_embs`` parameter (set to ``None`` from 2024-07-19), the v1-only top-level keys and ``ldm.``
    class paths. Module paths alone do not decide: the classes moved to ``adaface.`` on 2024-06-07, while the v1
    template stayed until 2024-08-30.
    """
    if _is_module_list(generator):
        return ADAFACE_V2, "its subject generators are a joint ModuleList (v2 only)"
    attrs = _attrs(generator)
    if isinstance(attrs.get("N_ID"), int):
        return ADAFACE_V2, "its subject generator has N_ID (v2, from 2024-08-30)"
    v1_signs = [name for name in ("num_out_layers", "prompt2token_proj_attention_multiplier") if name in attrs]
    if isinstance(_children_params(generator).get("pos_embs"), torch.Tensor):
        v1_signs.append("a subject pos_embs parameter")
    v1_signs += [f"top-level key {k!r}" for k in _V1_ONLY_TOP_KEYS if k in top]
    if stub_qualified_name(generator).startswith("ldm."):
        v1_signs.append("ldm.* classes")
    if v1_signs:
        return ADAFACE_V1, "its subject generator has no N_ID and " + ", ".join(v1_signs) + " (v1)"
    return ADAFACE_V2, "no sign of v1 was found; assuming v2"


def _children_params(obj: Any) -> dict[str, Any]:
    params = _attrs(obj).get("_parameters")
    return params if isinstance(params, dict) else {}


def _branches_from_pickle(path: Path, top: Any) -> tuple[str, str, list[str], list[_Branch]]:
    if not isinstance(top, dict) or "string_to_subj_basis_generator_dict" not in top:
        keys = sorted(map(str, top)) if isinstance(top, dict) else type(top).__name__
        raise ModelFilesError(
            f"{path}: not an AdaFace checkpoint (no 'string_to_subj_basis_generator_dict'; got {keys})"
        )
    subjects = top.get("subject_strings") or ["z"]
    subject = str(subjects[0])
    generators = _children(top["string_to_subj_basis_generator_dict"])
    if subject not in generators:
        raise ModelFilesError(f"{path}: no generator for subject {subject!r} (found {sorted(generators)})")
    generator = generators[subject]
    version, reason = _detect_version(top, generator)
    logger.debug("%s: AdaFace %s, since %s", path, version, reason)
    if reason.startswith("no sign"):
        logger.warning("%s: could not tell the AdaFace version from the file; assuming v2", path)
    if _is_module_list(generator):
        members = [generator_ for _, generator_ in sorted(_children(generator).items(), key=lambda kv: int(kv[0]))]
        # The joint order is ["consistentID", "arc2face"]; the N_ID attribute, when pickled, confirms it.
        defaults = [CONSISTENTID_NUM_ID_TOKENS] * (len(members) - 1) + [ARC2FACE_NUM_ID_TOKENS]
    else:
        members, defaults = [generator], [ARC2FACE_NUM_ID_TOKENS]
    branches = []
    for index, (member, default) in enumerate(zip(members, defaults, strict=True)):
        n_id = _generator_num_id_tokens(member, default)
        heads, eps = _text_settings(member)
        name = "arc2face" if n_id == ARC2FACE_NUM_ID_TOKENS else "consistentID"
        state = module_state_dict(member)
        _check_pickled_multipliers(path, member, state)
        branches.append(_Branch(name, index, state, n_id, heads, eps))
    placeholders = [str(s) for s in top.get("placeholder_strings") or [subject]]
    return version, subject, placeholders, branches


def _check_pickled_multipliers(path: Path, generator: Any, state: Mapping[str, torch.Tensor]) -> None:
    recorded = _attrs(generator).get("prompt2token_proj_attention_multipliers")
    if not isinstance(recorded, (list, tuple)):
        return
    try:
        inferred = projector_config_from_state_dict(state)["attention_multipliers"]
    except ValueError:
        return  # reported with the key names by from_state_dict
    if list(recorded) != inferred:
        logger.warning(
            "%s: the generator records attention multipliers %s but its k/v weights have %s; using the weights",
            path,
            list(recorded),
            inferred,
        )


_SAFETENSORS_FORMAT = "idfusion.adaface"


def _branches_from_safetensors(path: Path) -> tuple[str, str, list[str], list[_Branch]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        if metadata.get("format_name") != _SAFETENSORS_FORMAT:
            raise ModelFilesError(f"{path}: not an AdaFace .safetensors written by convert_adaface_checkpoint")
        info = json.loads(metadata["adaface"])
        tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    branches = []
    for entry in info["branches"]:
        prefix = entry["name"] + "."
        state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        branches.append(
            _Branch(
                entry["name"],
                entry["index"],
                state,
                entry["num_id_tokens"],
                entry["num_heads"],
                entry["layer_norm_eps"],
            )
        )
    return info["version"], info["subject_string"], list(info["placeholder_strings"]), branches


def _read_branches(path: Path) -> tuple[str, str, list[str], list[_Branch]]:
    if not path.is_file():
        raise ModelFilesError(
            f"{path}: AdaFace checkpoint not found. Put {V2_CHECKPOINT_NAME} (Hub repo adaface-neurips/adaface-models, "
            f"models/adaface/) or the v1 {V1_CHECKPOINT_NAME} there"
        )
    if path.suffix == ".safetensors":
        return _branches_from_safetensors(path)
    top = load_pickled_state(path, allowed_module_prefixes=PICKLE_MODULE_PREFIXES, allowed_globals=PICKLE_GLOBALS)
    return _branches_from_pickle(path, top)


def load_adaface_checkpoint(
    path: str | os.PathLike[str], *, reset_layer_weights: bool = False, dtype: torch.dtype | None = None
) -> AdaFaceCheckpoint:
    """Load an official AdaFace ``.pt`` (v1 or v2) or a ``.safetensors`` made by :func:`convert_adaface_checkpoint`.

    The ``.pt`` is read with :func:`idfusion.serialization.load_pickled_state`: the authors' classes are never
    imported and nothing in the file runs (the tokenizer the v2 generators pickle included, see
    :data:`PICKLE_GLOBALS`). The version is read from the subject generator's structure (``N_ID`` or a joint
    ``ModuleList``: v2; see :func:`_detect_version`), not from ``token2num_vectors``, which both eras saved. Only
    ``string_to_subj_basis_generator_dict[subject]`` is read: background generators ``'y'``, v1's static
    embedders and v2's optional UNet LoRAs are not used for generation.

    Args:
        path (`str` or `os.PathLike`): the checkpoint.
        reset_layer_weights (`bool`, *optional*, defaults to `False`): set ``hidden_state_layer_weights`` to their
            initial ``[1, 2, 4]``. The official v2 *single-encoder* loader does this (``patch_old_subj_basis_
            generator_ckpt``), so the trained mixing weights of Arc2Face-only checkpoints are ignored there, while its
            joint loader (the app default) keeps them. The trained weights are what the projector was optimised with,
            so they are kept by default; set this to reproduce the single-encoder code path exactly.
        dtype (`torch.dtype`, *optional*): cast the projectors (e.g. ``torch.float16``); default keeps the file's.

    Returns:
        `AdaFaceCheckpoint`

    Raises:
        ModelFilesError: the file is missing or is not an AdaFace checkpoint in a known layout.
        idfusion.serialization.UnsafeCheckpointError: the pickle refers to something outside the allow-list.
    """
    path = Path(path)
    version, subject, placeholders, branches = _read_branches(path)
    projectors: dict[str, tuple[_Branch, AdaFaceProjector]] = {}
    for branch in branches:
        try:
            projector = AdaFaceProjector.from_state_dict(
                branch.state_dict,
                num_id_tokens=branch.num_id_tokens,
                num_heads=branch.num_heads,
                layer_norm_eps=branch.layer_norm_eps,
                dtype=dtype,
            )
        except ValueError as error:
            raise ModelFilesError(f"{path}: {branch.name} generator: {error}") from error
        if reset_layer_weights:
            with torch.no_grad():
                projector.hidden_state_layer_weights.copy_(torch.tensor(INITIAL_LAYER_WEIGHTS).unsqueeze(1))
        projectors[branch.name] = (branch, projector)
    if "arc2face" not in projectors:
        raise ModelFilesError(
            f"{path}: no Arc2Face-branch generator (16 ID tokens) found; generation needs it "
            f"(found {[(b.name, b.num_id_tokens) for b in branches]})"
        )
    arc2face_branch, arc2face = projectors["arc2face"]
    consistentid_branch, consistentid = projectors.get("consistentID", (None, None))
    logger.info(
        "loaded AdaFace %s checkpoint %s: Arc2Face projector, %d layers, attention multipliers %s%s",
        version,
        path,
        arc2face.config["num_layers"],
        arc2face.attention_multipliers,
        ", and a ConsistentID projector" if consistentid is not None else "",
    )
    return AdaFaceCheckpoint(
        path=path,
        version=version,
        subject_string=subject,
        projector=arc2face,
        num_id_tokens=arc2face_branch.num_id_tokens,
        encoder_index=arc2face_branch.index,
        consistentid_projector=consistentid,
        placeholder_strings=placeholders,
        consistentid_index=consistentid_branch.index if consistentid_branch is not None else None,
    )


def convert_adaface_checkpoint(pt_path: str | os.PathLike[str], out_path: str | os.PathLike[str]) -> Path:
    """Rewrite an official AdaFace ``.pt`` as ``.safetensors``: no pickle, and it loads faster.

    Tensors are the generators' used weights under ``arc2face.`` / ``consistentID.`` prefixes (the trained
    ``hidden_state_layer_weights`` included); the header metadata (``format_name`` and a JSON ``adaface`` entry)
    keeps the version, subject string, placeholder strings and per-branch ``num_id_tokens``, heads and LayerNorm
    epsilon. :func:`load_adaface_checkpoint` reads the result with identical outputs.

    Args:
        pt_path (`str` or `os.PathLike`): the official checkpoint.
        out_path (`str` or `os.PathLike`): the ``.safetensors`` file to write.

    Returns:
        `Path`: ``out_path``.
    """
    from safetensors.torch import save_file

    out = Path(out_path)
    if out.suffix != ".safetensors":
        raise ValueError(f"{out}: the converted file must end in .safetensors")
    version, subject, placeholders, branches = _read_branches(Path(pt_path))
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    info: dict[str, Any] = {
        "version": version,
        "subject_string": subject,
        "placeholder_strings": placeholders,
        "branches": [],
    }
    for branch in branches:
        for key, value in branch.state_dict.items():
            if _is_ignored(key):
                continue
            value = value.contiguous()
            pointer = value.untyped_storage().data_ptr()
            if pointer in seen:  # safetensors refuses shared memory (v2's two branches share the CLIP tables)
                value = value.clone()
            seen.add(pointer)
            tensors[f"{branch.name}.{key}"] = value
        info["branches"].append(
            {
                "name": branch.name,
                "index": branch.index,
                "num_id_tokens": branch.num_id_tokens,
                "num_heads": branch.num_heads,
                "layer_norm_eps": branch.layer_norm_eps,
            }
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        tensors, str(out), metadata={"format": "pt", "format_name": _SAFETENSORS_FORMAT, "adaface": json.dumps(info)}
    )
    logger.info("converted %s to %s (%d tensors)", pt_path, out, len(tensors))
    return out
