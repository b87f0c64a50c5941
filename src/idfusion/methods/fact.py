"""FaceChain-FACT (Yu et al., arXiv 2410.12312): identity through a serial, gated self-attention face adapter.

Pieces, named as in the official checkpoints (spec ``facechain-fact.md`` §2, §4):

- :class:`TransFaceViT`: the frozen TransFace ViT-S face encoder (``ms1mv2_model_TransFace_S.pt``). FACT uses its
  "local" output, the 144x512 patch tokens after the final LayerNorm.
- :class:`FaceResampler`: the Perceiver resampler (``local_fac_prj.*`` in the adapter checkpoint), 144x512 tokens
  to 16 face tokens of the UNet's context width. ``k`` photos give one sequence of ``16 * k`` tokens.
- :class:`FactFaceAdapter`: the resampler and, for each of the 16 cross-attention (``attn2``) sites of an SD1.5
  UNet, a :class:`FactAdapterSite`: a gated self-attention over ``[visual | face]`` tokens and a gated GEGLU
  feed-forward that run *before* the host's own text cross-attention, on the block's residual stream. A pipeline
  component (``ModelMixin``), so it saves and loads with the pipeline.
- :class:`FaceAdapterAttnProcessor`: the site's attention processor. The block passes ``attn2`` its ``norm2(x)``;
  the adapter works on ``x`` itself, which a forward pre-hook on ``norm2`` hands over (:class:`ResidualStash`). The
  site's ``ln`` (the release's relocated ``norm2``) normalises the adapted stream. The UNet's modules are unchanged.
- :class:`TextOnlyControlNetProcessor`: ControlNets get the same context and drop the trailing face tokens.

Precision follows the release: TransFace and the resampler keep float32 weights under a float16/bfloat16 pipeline
(only TransFace's linear layers run under float16 autocast, on CUDA); the adapter sites take the UNet's dtype.
The release's prompts (:data:`PROMPTS`), photo sizes and ControlNet scales are here as constants.

:func:`load_fact_adapter` loads an official adapter ``.ckpt`` (both base models share the format) and
:func:`load_transface` the TransFace weights, strictly; :func:`fact_adapter_key_map` is the key map between the
checkpoint and :class:`FactFaceAdapter`, written once.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ..serialization import check_state_dict, format_keys, load_tensor_file

__all__ = [
    "ADAPTER_FILES",
    "CONTROL_SCALES",
    "PROMPTS",
    "limit_photo_size",
    "best_scoring_face",
    "TRANSFACE_FILE",
    "UNUSED_PREFIXES",
    "TransFaceViT",
    "FaceResampler",
    "FactAdapterSite",
    "FactFaceAdapter",
    "FaceAdapterAttnProcessor",
    "ResidualStash",
    "TextOnlyControlNetProcessor",
    "adapter_sites",
    "attach_face_adapter",
    "FaceAdapterHandle",
    "attach_text_only_processors",
    "set_face_adapter_scale",
    "set_num_face_tokens",
    "fact_adapter_key_map",
    "load_fact_adapter",
    "load_transface",
    "preprocess_transface",
    "face_crop",
    "encode_face_tokens",
]

logger = logging.getLogger(__name__)

#: The adapter checkpoints of ModelScope ``yucheng1996/FaceChain-FACT`` (rev ``v1.0.0``), per base model.
ADAPTER_FILES = {
    "majicmix": "adapter_maj_mask_large_new_reg001_faceshuffle_00290001.ckpt",
    "film": "adapter_film_mask_large_new_reg001_faceshuffle_00290001.ckpt",
}
#: The TransFace ViT-S weights in the same repo.
TRANSFACE_FILE = "ms1mv2_model_TransFace_S.pt"

#: The base model each adapter was trained on (spec §3), and the folder name idfusion looks for in a FACT folder.
BASE_MODELS = {
    "majicmix": "MAILAND/majicmixRealistic_v6 (ModelScope, subfolder realistic)",
    "film": "ly261666/cv_portrait_model (ModelScope, rev v2.0, subfolder film/film)",
}

#: Sampling defaults of the release: text-to-image (spec §5.1) and the template's inpainting stage (§5.2).
DEFAULTS = {"num_inference_steps": 50, "guidance_scale": 7.0, "scheduler": "pndm", "adapter_scale": 0.5}
INPAINT_DEFAULTS = {"num_inference_steps": 50, "guidance_scale": 5.0, "scheduler": "pndm", "adapter_scale": 0.55}
#: The official app caps a request at 6 portraits.
MAX_IMAGES = 6

#: The release downsizes the user photo to this long side before masking and alignment: 1000 px for text-to-image
#: (``inference_fact.py`` L397-401), 2000 px in the template flow (``inference_inpaint_fact.py`` L790-794).
PHOTO_MAX_SIDE = 1000
INPAINT_PHOTO_MAX_SIDE = 2000

#: The ControlNet conditioning scale of each condition in the release's template stage B (OpenPose of the face and
#: hands, Canny of the template with the face removed; ``inference_inpaint_fact.py`` L375-398), and of the pose in
#: text-to-image (1.0 with a pose image).
CONTROL_SCALES = {"pose": 1.0, "canny": 0.2}
#: The order the release stacks its ControlNets in (``MultiControlNetModel([openpose, canny])``).
CONTROL_ORDER = ("pose", "canny")

#: The release's prompts, exactly as it passes them to CLIP. Its A1111-style weights ("(word:2)") are not parsed by
#: diffusers' plain ``_encode_prompt``, so the release reads them as text, and so does idfusion.
#: ``facechain/constants.py`` ``neg_prompt``: the text-to-image negative prompt.
RELEASE_NEGATIVE_PROMPT = (
    "(nsfw:2), paintings, sketches, (worst quality:2), (low quality:2), lowers, normal quality, ((monochrome)), "
    "((grayscale)), logo, word, character, bad hand, tattoo, (username, watermark, signature, time signature, "
    "timestamp, artist name, copyright name, copyright),low res, ((monochrome)), ((grayscale)), skin spots, acnes, "
    "skin blemishes, age spot, glans, extra fingers, fewer fingers, strange fingers, bad hand, mole, ((extra legs)), "
    "((extra hands))"
)
#: ``app.py`` ``launch_pipeline_inpaint`` (and ``run_inference_inpaint.py``): the template flow's prompts.
RELEASE_TEMPLATE_PROMPT = (
    "raw photo, masterpiece, simple background, solo, medium shot, high detail face, photorealistic, best quality, "
    "wearing T-shirt"
)
RELEASE_TEMPLATE_NEGATIVE_PROMPT = (
    "nsfw, paintings, sketches, (worst quality:2), (low quality:2) lowers, normal quality, ((monochrome)), "
    "((grayscale)), logo, word, character"
)
#: The release always has a style; without one, idfusion fills the release's style template
#: (``pos_prompt_with_style``, :data:`idfusion.styles.FACECHAIN_PROMPT_WITH_STYLE`) with the subject alone.
RELEASE_DEFAULT_PROMPT = (
    "a person, upper_body, raw photo, masterpiece, solo, medium shot, high detail face, photorealistic, best quality"
)

#: idfusion's rewording (``prompt_wording="idfusion"``): no A1111 weights, no duplicates, plainer words.
DEFAULT_PROMPT = "a person, upper body, raw photo, high detail face, photorealistic, best quality"
TEMPLATE_PROMPT = "raw photo, simple background, upper body, high detail face, photorealistic, best quality"
NEGATIVE_PROMPT = (
    "nsfw, paintings, sketches, worst quality, low quality, lowres, normal quality, monochrome, grayscale, logo, "
    "text, watermark, username, skin spots, acne, blemishes, bad hands, extra fingers, fewer fingers, extra limbs"
)

#: The default prompts of each wording: ``(text-to-image prompt, negative)`` and ``(template prompt, negative)``.
PROMPTS = {
    "release": {
        "prompt": RELEASE_DEFAULT_PROMPT,
        "negative_prompt": RELEASE_NEGATIVE_PROMPT,
        "template_prompt": RELEASE_TEMPLATE_PROMPT,
        "template_negative_prompt": RELEASE_TEMPLATE_NEGATIVE_PROMPT,
    },
    "idfusion": {
        "prompt": DEFAULT_PROMPT,
        "negative_prompt": NEGATIVE_PROMPT,
        "template_prompt": TEMPLATE_PROMPT,
        "template_negative_prompt": NEGATIVE_PROMPT,
    },
}

#: The style LoRA the release merges into text-to-image when the style brings none (``inference_fact.py``
#: L456-460): ModelScope ``Cherrytest/zjz_mj_jiyi_small_addtxt_fromleo`` rev ``v1.0.0``, at the style weight (the
#: release's scripts and app default to 0.25). The template flow merges no LoRA.
DEFAULT_STYLE_LORA_REPO = "Cherrytest/zjz_mj_jiyi_small_addtxt_fromleo"
DEFAULT_STYLE_LORA_REVISION = "v1.0.0"
DEFAULT_STYLE_LORA_FILE = "zjz_mj_jiyi_small_addtxt_fromleo.safetensors"
DEFAULT_STYLE_WEIGHT = 0.25

RESAMPLER_PREFIX = "local_fac_prj."
_PROCESSOR_INFIX = ".attn2.processor."
TOKENS_PER_FACE = 16
#: Checkpoint prefixes the release loads with ``strict=False`` and never uses, and why; they are skipped with a
#: logged note (any other unknown key is refused).
UNUSED_PREFIXES = {
    "global_fac_prj.": "the trainer's projector of TransFace's global embedding, unused by FACT's inference",
}


# ----------------------------------------------------------------------------------------------------------------
# Precision: the release keeps TransFace and the resampler in float32 under its float16 pipeline


class _Float32Weights:
    """Mixin for an ``nn.Module`` whose floating-point weights stay ``float32`` whatever ``.to()``, ``.half()`` or a
    pipeline's ``torch_dtype`` asks; device moves still apply. The release builds TransFace and the resampler in
    float32 and never casts them (only its adapter processors become float16, ``face_adapter_v1.py`` L320)."""

    def _apply(self, fn, recurse=True):
        def keep_float32(tensor):
            moved = fn(tensor)
            if tensor.is_floating_point() and moved.is_floating_point() and moved.dtype != torch.float32:
                # a dtype cast: take only its device, from the original values (a round trip would lose bits)
                return tensor.to(device=moved.device, dtype=torch.float32)
            return moved

        return super()._apply(keep_float32, recurse)


#: The dtype TransFace's linear layers run in under autocast on CUDA, as the release's ``torch.cuda.amp.autocast``.
TRANSFACE_AUTOCAST_DTYPE = torch.float16


def _matmul_autocast(x: torch.Tensor, dtype: torch.dtype | None, enabled: bool = True):
    """The release's ``torch.cuda.amp.autocast(True)`` around TransFace's linear layers: on CUDA only (on other
    devices the release's context does nothing either)."""
    return torch.autocast("cuda", dtype=dtype or torch.float16, enabled=enabled and dtype is not None and x.is_cuda)


# ----------------------------------------------------------------------------------------------------------------
# TransFace ViT-S


class _TransFaceMlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.ReLU6()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _TransFaceAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, autocast: torch.dtype | None = None) -> torch.Tensor:
        batch, length, dim = x.shape
        with _matmul_autocast(x, autocast):
            # (B, L, 3C) -> (3, B, heads, L, C/heads)
            qkv = self.qkv(x).reshape(batch, length, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        with _matmul_autocast(x, autocast, enabled=False):  # softmax attention in fp32, as released
            q, k, v = qkv[0].float(), qkv[1].float(), qkv[2].float()
            out = F.scaled_dot_product_attention(q, k, v)
            out = out.transpose(1, 2).reshape(batch, length, dim)  # (B, L, C)
        with _matmul_autocast(x, autocast):
            return self.proj(out)


class _TransFaceBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _TransFaceAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = _TransFaceMlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, autocast: torch.dtype | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), autocast)
        with _matmul_autocast(x, autocast):
            return x + self.mlp(self.norm2(x))  # the residual stream stays float32 (type promotion)


class _PatchEmbed(nn.Module):
    def __init__(self, img_size: int, patch_size: int, embed_dim: int):
        super().__init__()
        self.img_size = img_size
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"TransFace expects {self.img_size}x{self.img_size} crops, got {tuple(x.shape[-2:])}")
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, C, h, w) -> (B, h*w, C)


class TransFaceViT(_Float32Weights, ModelMixin, ConfigMixin):
    """TransFace ViT (Dan et al., ICCV 2023) in the key naming of its ``backbones/vit.py``.

    Defaults are ViT-S as FACT uses it: 112x112 input, 9x9 patches (144 tokens, no CLS token), width 512, 12 blocks
    of 8-head attention (qkv without bias) and a ReLU6 MLP (ratio 4), LayerNorms, a learned position embedding, then
    the SE patch re-weighting ``senet`` and the embedding head ``feature``. ``mask_token`` is a training-only
    parameter, kept so the released weights load strictly. Patch masking and drop-path are training-only and absent.

    Precision, as the release: the weights are always ``float32`` (a float16/bfloat16 pipeline does not cast them);
    on CUDA the linear layers run under autocast (:attr:`autocast_dtype`, float16; ``None``: all float32) while the
    attention softmax, the residual stream and the final LayerNorm stay float32. Elsewhere all is float32.

    Args:
        img_size (`int`, defaults to 112): input side.
        patch_size (`int`, defaults to 9): patch side.
        embed_dim (`int`, defaults to 512): token width.
        depth (`int`, defaults to 12): number of blocks.
        num_heads (`int`, defaults to 8): attention heads.
        mlp_ratio (`float`, defaults to 4.0): MLP hidden width / token width.
        num_features (`int`, defaults to 512): width of the global embedding (``num_classes`` upstream).
    """

    # diffusers' from_pretrained(torch_dtype=...) loads these in float32 (every top-level part: all of it)
    _keep_in_fp32_modules = ["patch_embed", "pos_embed", "blocks", "norm", "feature", "mask_token", "senet"]

    @register_to_config
    def __init__(
        self,
        img_size: int = 112,
        patch_size: int = 9,
        embed_dim: int = 512,
        depth: int = 12,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        num_features: int = 512,
    ):
        super().__init__()
        self.patch_embed = _PatchEmbed(img_size, patch_size, embed_dim)
        self.num_patches = num_patches = self.patch_embed.num_patches
        self.embed_dim = embed_dim
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, embed_dim))
        self.blocks = nn.ModuleList([_TransFaceBlock(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim)
        self.feature = nn.Sequential(
            nn.Linear(embed_dim * num_patches, embed_dim, bias=False),
            nn.BatchNorm1d(embed_dim, eps=2e-5),
            nn.Linear(embed_dim, num_features, bias=False),
            nn.BatchNorm1d(num_features, eps=2e-5),
        )
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        #: autocast dtype of the linear layers on CUDA (the release's float16); ``None`` runs them in float32
        self.autocast_dtype: torch.dtype | None = TRANSFACE_AUTOCAST_DTYPE
        self.senet = nn.Sequential(
            nn.Linear(embed_dim * num_patches, num_patches, bias=False),
            nn.ReLU(),
            nn.Linear(num_patches, num_patches, bias=False),
            nn.Sigmoid(),
        )

    def to(self, *args, **kwargs):
        # plain nn.Module.to: diffusers' ModelMixin.to warns on every dtype cast of a model with
        # _keep_in_fp32_modules, but here the float32 parts stay float32 by construction (_Float32Weights)
        return nn.Module.to(self, *args, **kwargs)

    def forward(
        self, pixel_values: torch.Tensor, return_global: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Encode aligned face crops.

        Args:
            pixel_values (`torch.Tensor` of shape `(B, 3, 112, 112)`): RGB in [-1, 1] (see
                :func:`preprocess_transface`).
            return_global (`bool`, defaults to `False`): also return the global embedding.

        Returns:
            `torch.Tensor` of shape `(B, 144, 512)`: the tokens after the final LayerNorm (FACT's "local" output),
            or a tuple ``(tokens, embedding)`` with ``embedding`` of shape `(B, 512)` when ``return_global``.
        """
        x = self.patch_embed(pixel_values.float()) + self.pos_embed
        for block in self.blocks:
            x = block(x, self.autocast_dtype)
        tokens = self.norm(x.float())
        if not return_global:
            return tokens
        batch = tokens.shape[0]
        flat = tokens.reshape(batch, self.num_patches * self.embed_dim)  # (B, 144*512)
        weights = self.senet(flat).reshape(batch, self.num_patches, 1)  # (B, 144, 1): SE patch weights
        embedding = self.feature((weights * tokens).reshape(batch, -1))  # (B, 144*512) -> (B, 512)
        return tokens, embedding

    @classmethod
    def config_from_state_dict(cls, state_dict: Mapping[str, torch.Tensor], num_heads: int = 8) -> dict:
        """The constructor arguments for a state dict in the official naming (heads are not in the shapes)."""
        try:
            patch = state_dict["patch_embed.proj.weight"]  # (C, 3, p, p)
            num_patches, embed_dim = state_dict["pos_embed"].shape[1:]
            hidden = state_dict["blocks.0.mlp.fc1.weight"].shape[0]
            num_features = state_dict["feature.2.weight"].shape[0]
        except KeyError as err:
            raise ValueError(f"not a TransFace state dict: missing key {err.args[0]!r}") from None
        depth = 1 + max(int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k)))
        side, patch_size = math.isqrt(num_patches), patch.shape[-1]
        # the conv drops what does not fill a patch: 112 // 9 = 12, so 112x112 crops give 144 tokens
        img_size = 112 if 112 // patch_size == side else side * patch_size
        return {
            "img_size": img_size,
            "patch_size": patch_size,
            "embed_dim": embed_dim,
            "depth": depth,
            "num_heads": num_heads,
            "mlp_ratio": hidden / embed_dim,
            "num_features": num_features,
        }


def preprocess_transface(images) -> torch.Tensor:
    """RGB 112x112 ArcFace-aligned crops → TransFace input, ``(x / 255 - 0.5) / 0.5``.

    Args:
        images: a uint8 array/tensor of shape `(112, 112, 3)` or `(B, 112, 112, 3)` (RGB, HWC).

    Returns:
        `torch.Tensor` of shape `(B, 3, 112, 112)`, float32 in [-1, 1].
    """
    x = torch.as_tensor(images)
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected RGB crops of shape (B, H, W, 3), got {tuple(x.shape)}")
    x = x.permute(0, 3, 1, 2).float()  # (B, H, W, 3) -> (B, 3, H, W)
    return (x / 255.0 - 0.5) / 0.5


def limit_photo_size(image, max_side: int | None):
    """The release's photo downsizing: when the long side exceeds ``max_side``, resize by ``max_side / long side``
    to ``(int(w * scale), int(h * scale))`` with PIL's default filter (bicubic), as ``inference_fact.py`` L397-401.

    Args:
        image: ``(H, W, 3)`` uint8 RGB array.
        max_side: the longest side allowed (:data:`PHOTO_MAX_SIDE`, :data:`INPAINT_PHOTO_MAX_SIDE`); ``None`` keeps
            the photo as it is.

    Returns:
        ``(H', W', 3)`` uint8 RGB array (the input itself when it is small enough).
    """
    import numpy as np
    import PIL.Image

    pixels = np.asarray(image)
    height, width = pixels.shape[:2]
    if max_side is None or max(height, width) <= max_side:
        return pixels
    if max_side < 1:
        raise ValueError(f"max_side must be at least 1, got {max_side}")
    scale = max_side / max(width, height)
    size = (int(width * scale), int(height * scale))
    return np.asarray(PIL.Image.fromarray(pixels).resize(size, PIL.Image.BICUBIC))


def best_scoring_face(faces):
    """The face the release encodes: the highest detection score (``detect`` in ``face_adapter_v1.py``:
    ``argmax(scores)``, the first on a tie), not the largest."""
    if not faces:
        raise ValueError("no faces to choose from")
    scores = [float(face.det_score) for face in faces]
    return faces[scores.index(max(scores))]


def face_crop(image, landmarks, head_mask=None):
    """FACT's face input: the photo with everything outside the head set to 0, warped to the 112x112 ArcFace
    template by its 5 landmarks (spec §2.1; the release masks with a human-parsing model, idfusion with a mask
    from landmarks, see :func:`idfusion.faces.masks.head_mask`).

    Args:
        image: ``(H, W, 3)`` uint8 RGB photo.
        landmarks: ``(5, 2)`` ArcFace-order points in ``image``.
        head_mask: ``(H, W)`` float mask in [0, 1], or ``None`` to keep the background.

    Returns:
        ``(112, 112, 3)`` uint8 RGB crop.
    """
    import numpy as np

    from idfusion.faces import align_face

    pixels = np.asarray(image)
    if head_mask is not None:
        pixels = (pixels.astype(np.float32) * np.asarray(head_mask, np.float32)[..., None]).round().astype(np.uint8)
    return align_face(pixels, landmarks, size=112)


@torch.no_grad()
def encode_face_tokens(face_encoder: TransFaceViT, resampler: FaceResampler, crops) -> torch.Tensor:
    """``k`` aligned crops of one person → the context's face part, ``(1, 16k, D)``.

    Each photo is encoded on its own (TransFace's 144 tokens → 16 resampler tokens) and the ``k`` sets are
    concatenated: the adapters attend to all ``16k`` tokens at once, the release's way of using several photos.
    """
    pixels = preprocess_transface(crops).to(face_encoder.pos_embed.device, face_encoder.pos_embed.dtype)
    tokens = face_encoder(pixels)  # (k, 144, 512)
    return resampler.identity_tokens(tokens.to(resampler.latents.dtype))  # (1, 16k, D)


# ----------------------------------------------------------------------------------------------------------------
# Resampler


class _PerceiverAttention(nn.Module):
    def __init__(self, dim: int, dim_head: int, heads: int):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        inner = dim_head * heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x, latents = self.norm1(x), self.norm2(latents)
        batch, length, _ = latents.shape
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)
        # (B, L, heads*d) -> (B, heads, L, d); q·k scaled by d^-1/2 (upstream: d^-1/4 on each), softmax in fp32
        q, k, v = (t.reshape(batch, -1, self.heads, self.dim_head).transpose(1, 2).float() for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v).to(latents.dtype)
        return self.to_out(out.transpose(1, 2).reshape(batch, length, -1))  # (B, L, heads*d) -> (B, L, dim)


class FaceResampler(_Float32Weights, nn.Module):
    """The Perceiver resampler FACT names ``local_fac_prj`` (IP-Adapter-Plus style).

    ``[B, 144, 512]`` TransFace tokens → ``proj_in`` → ``depth`` x (PerceiverAttention + FeedForward, residual) over
    16 learned latents → ``proj_out`` → ``norm_out`` → ``[B, 16, 768]``.

    Always ``float32`` and run without autocast, as the release (a float16/bfloat16 pipeline does not cast it; its
    face tokens are cast to the UNet's dtype where they enter the context).

    Args:
        dim (`int`, defaults to 1024): latent width.
        depth (`int`, defaults to 4): layers.
        dim_head (`int`, defaults to 64): attention head width.
        heads (`int`, defaults to 12): attention heads (inner width ``heads * dim_head``).
        num_queries (`int`, defaults to 16): face tokens per photo.
        embedding_dim (`int`, defaults to 512): input token width (TransFace's).
        output_dim (`int`, defaults to 768): output width (the UNet's cross-attention width).
        ff_mult (`int`, defaults to 4): feed-forward expansion.
        num_input_tokens (`int`, defaults to 144): input tokens per photo; sets the shape of :meth:`unconditional`.
    """

    def __init__(
        self,
        dim: int = 1024,
        depth: int = 4,
        dim_head: int = 64,
        heads: int = 12,
        num_queries: int = 16,
        embedding_dim: int = 512,
        output_dim: int = 768,
        ff_mult: int = 4,
        num_input_tokens: int = 144,
    ):
        super().__init__()
        self.embedding_dim, self.num_input_tokens, self.num_queries = embedding_dim, num_input_tokens, num_queries
        self.latents = nn.Parameter(torch.randn(1, num_queries, dim) / dim**0.5)
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    _PerceiverAttention(dim, dim_head, heads),
                    nn.Sequential(
                        nn.LayerNorm(dim),
                        nn.Linear(dim, dim * ff_mult, bias=False),
                        nn.GELU(),
                        nn.Linear(dim * ff_mult, dim, bias=False),
                    ),
                ]
            )
            for _ in range(depth)
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, 144, embedding_dim)`` face tokens → ``(B, num_queries, output_dim)``."""
        latents = self.latents.expand(tokens.shape[0], -1, -1)
        x = self.proj_in(tokens.to(self.latents.dtype))
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))

    def identity_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """``k`` photos' TransFace tokens ``(k, 144, C)`` → one context sequence ``(1, 16k, output_dim)``."""
        out = self(tokens)
        return out.reshape(1, -1, out.shape[-1])  # (k, 16, D) -> (1, 16k, D)

    def unconditional(self, num_photos: int = 1) -> torch.Tensor:
        """The null face, ``resampler(zeros)``, for ``num_photos`` photos: ``(1, 16 * num_photos, output_dim)``."""
        zeros = self.latents.new_zeros(num_photos, self.num_input_tokens, self.embedding_dim)
        return self.identity_tokens(zeros)

    @classmethod
    def config_from_state_dict(cls, state_dict: Mapping[str, torch.Tensor], heads: int = 12) -> dict:
        """Constructor arguments for a resampler state dict (without prefix); ``heads`` is not in the shapes."""
        try:
            _, num_queries, dim = state_dict["latents"].shape
            embedding_dim = state_dict["proj_in.weight"].shape[1]
            output_dim = state_dict["proj_out.weight"].shape[0]
            inner = state_dict["layers.0.0.to_q.weight"].shape[0]
            ff_hidden = state_dict["layers.0.1.1.weight"].shape[0]
        except KeyError as err:
            raise ValueError(f"not a FACT resampler state dict: missing key {err.args[0]!r}") from None
        depth = 1 + max(int(m.group(1)) for k in state_dict if (m := re.match(r"layers\.(\d+)\.", k)))
        if inner % heads:
            raise ValueError(f"resampler inner width {inner} is not a multiple of {heads} heads")
        return {
            "dim": dim,
            "depth": depth,
            "dim_head": inner // heads,
            "heads": heads,
            "num_queries": num_queries,
            "embedding_dim": embedding_dim,
            "output_dim": output_dim,
            "ff_mult": ff_hidden // dim,
        }


# ----------------------------------------------------------------------------------------------------------------
# Face adapter processors


class _AdapterSelfAttention(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])

    def forward(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        batch, length, dim = x.shape
        # (B, L, C) -> (B, heads, L, C/heads)
        q, k, v = (
            p(x).view(batch, length, heads, dim // heads).transpose(1, 2) for p in (self.to_q, self.to_k, self.to_v)
        )
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out[1](self.to_out[0](out.transpose(1, 2).reshape(batch, length, dim)))


class _GEGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, hidden * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class _AdapterFeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList([_GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for module in self.net:
            x = module(x)
        return x


def _host_cross_attention(attn, hidden_states, context, attention_mask=None) -> torch.Tensor:
    """The host ``Attention``'s own attention, op for op as diffusers' ``AttnProcessor2_0`` (so outputs are bitwise
    equal to the unpatched block)."""
    batch, length, _ = context.shape
    if attention_mask is not None:
        attention_mask = attn.prepare_attention_mask(attention_mask, length, batch)
        attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
    if attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)
    query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
    head_dim = key.shape[-1] // attn.heads
    # (B, L, heads*d) -> (B, heads, L, d)
    query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)
    out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)  # (B, L, heads*d)
    return attn.to_out[1](attn.to_out[0](out))


def _check_host(attn) -> None:
    if attn.rescale_output_factor != 1.0 or attn.residual_connection:
        raise ValueError("FACT adapters need attention with rescale_output_factor 1 and no residual connection")


class FactAdapterSite(nn.Module):
    """The FACT adapter's weights at one cross-attention site (checkpoint ``<site>.attn2.processor.*``).

    Args:
        hidden_size: the site's width ``C``.
        cross_attention_dim: the face tokens' width.
    """

    def __init__(self, hidden_size: int, cross_attention_dim: int = 768):
        super().__init__()
        self.linear = nn.Linear(cross_attention_dim, hidden_size)
        self.attn = _AdapterSelfAttention(hidden_size)
        self.ff = _AdapterFeedForward(hidden_size)
        self.norm1 = nn.LayerNorm(hidden_size)
        self.norm2 = nn.LayerNorm(hidden_size)
        self.alpha_attn = nn.Parameter(torch.tensor(0.0))
        self.alpha_dense = nn.Parameter(torch.tensor(0.0))
        self.ln = nn.LayerNorm(hidden_size)  # the block's norm2, relocated by the release


def adapter_sites(unet: nn.Module) -> dict[str, nn.Module]:
    """The UNet's transformer blocks with cross-attention, by path (16 in SD1.5), in module order."""
    return {
        name: module
        for name, module in unet.named_modules()
        if type(module).__name__ == "BasicTransformerBlock" and getattr(module, "attn2", None) is not None
    }


class FactFaceAdapter(ModelMixin, ConfigMixin):
    """FACT's trained parts: the resampler and one :class:`FactAdapterSite` per cross-attention site.

    Args:
        site_paths: the UNet's transformer-block paths, in module order (``down_blocks.0.attentions.0.…``).
        hidden_sizes: each site's width.
        cross_attention_dim: the face tokens' width (the UNet's context width).
        resampler_config: :class:`FaceResampler` arguments.
    """

    # the resampler stays float32 (see FaceResampler); the sites take the UNet's dtype
    _keep_in_fp32_modules = ["resampler"]

    @register_to_config
    def __init__(
        self,
        site_paths: list[str],
        hidden_sizes: list[int],
        cross_attention_dim: int = 768,
        resampler_config: dict | None = None,
    ):
        super().__init__()
        if len(site_paths) != len(hidden_sizes):
            raise ValueError(f"{len(site_paths)} site paths but {len(hidden_sizes)} widths")
        self.resampler = FaceResampler(**{"output_dim": cross_attention_dim, **(resampler_config or {})})
        self.sites = nn.ModuleList(FactAdapterSite(width, cross_attention_dim) for width in hidden_sizes)

    @classmethod
    def for_unet(cls, unet: nn.Module, resampler: dict | None = None) -> FactFaceAdapter:
        """An adapter shaped for ``unet`` (zero gates: it changes nothing until trained or loaded), with each site's
        ``ln`` initialised from its block's ``norm2``."""
        sites = adapter_sites(unet)
        width = unet.config.cross_attention_dim
        with torch.device(unet.device):
            adapter = cls(list(sites), [b.attn2.to_q.in_features for b in sites.values()], width, resampler)
        for site, block in zip(adapter.sites, sites.values(), strict=True):
            if isinstance(block.norm2, nn.LayerNorm) and not block.norm2.weight.is_meta:
                site.ln.load_state_dict(block.norm2.state_dict())
        return adapter.to(dtype=unet.dtype)

    def to(self, *args, **kwargs):
        # plain nn.Module.to: diffusers' ModelMixin.to warns on every dtype cast of a model with
        # _keep_in_fp32_modules, but here the float32 parts stay float32 by construction (_Float32Weights)
        return nn.Module.to(self, *args, **kwargs)

    def forward(self, *args, **kwargs):  # pragma: no cover - read by the processors, not called
        raise RuntimeError("FactFaceAdapter is read by FACT's attention processors; encode faces with .resampler")


class ResidualStash:
    """A forward pre-hook on a block's ``norm2`` that keeps its input, the residual stream ``x`` (the documented way
    FACT's processor sees ``x`` while the block hands ``attn2`` only ``norm2(x)``)."""

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None

    def __call__(self, module: nn.Module, args: tuple) -> None:
        self.value = args[0]


class FaceAdapterAttnProcessor:
    """The FACT adapter at one cross-attention (``attn2``) site: gated self-attention, gated FF, then text attention.

    With ``x`` the block's residual stream, ``s`` = :attr:`scale` and the context split into ``text`` and the
    trailing :attr:`num_face_tokens` face tokens ``face``::

        f = linear(face)
        x' = x + s * tanh(alpha_attn)  * attn(norm1([x | f]))[:, :N]     (heads of the host attention)
        x' = x' + s * tanh(alpha_dense) * ff(norm2(x'))                   (GEGLU, 4x)
        y = host_cross_attention(ln(x'), text)
        return y + x' - x                                                 (the block adds x back)

    With ``s = 0`` it returns the host's ``cross_attention(ln(x), text)`` exactly.
    """

    def __init__(self, site: FactAdapterSite, stash: ResidualStash, scale: float = 1.0):
        self.site, self.stash = site, stash
        self.num_face_tokens = TOKENS_PER_FACE
        self.scale = scale

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if encoder_hidden_states is None:
            raise ValueError("the FACT adapter sits on cross-attention and needs encoder_hidden_states")
        n_face = self.num_face_tokens
        if n_face <= 0 or n_face >= encoder_hidden_states.shape[1]:
            raise ValueError(
                f"context of {encoder_hidden_states.shape[1]} tokens cannot end in {n_face} face tokens; "
                "set num_face_tokens to 16 x the number of photos"
            )
        text, face = encoder_hidden_states[:, :-n_face], encoder_hidden_states[:, -n_face:]
        if attention_mask is not None:
            attention_mask = attention_mask[..., : text.shape[1]]
        site = self.site
        x_in, self.stash.value = self.stash.value, None  # consumed: a later call must not read a stale stream
        if x_in is None or x_in.shape != hidden_states.shape:
            raise RuntimeError("FACT adapter: the block's residual stream was not captured (norm2 hook missing)")
        if self.scale == 0:  # the base block (with the release's ln), bit for bit
            return _host_cross_attention(attn, site.ln(x_in), text, attention_mask)
        length = x_in.shape[1]
        f = site.linear(face.to(x_in.dtype))  # (B, 16k, C_ctx) -> (B, 16k, C)
        joint = site.norm1(torch.cat([x_in, f], dim=1))  # (B, N + 16k, C)
        x = x_in + self.scale * torch.tanh(site.alpha_attn) * site.attn(joint, attn.heads)[:, :length]
        x = x + self.scale * torch.tanh(site.alpha_dense) * site.ff(site.norm2(x))
        y = _host_cross_attention(attn, site.ln(x), text, attention_mask)
        return y + x - x_in


class TextOnlyControlNetProcessor:
    """A ControlNet processor that drops the trailing face tokens of the context, then attends as usual."""

    def __init__(self, num_face_tokens: int = TOKENS_PER_FACE):
        self.num_face_tokens = num_face_tokens

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        _check_host(attn)
        if encoder_hidden_states is None:
            context = hidden_states
        else:
            context = encoder_hidden_states[:, : encoder_hidden_states.shape[1] - self.num_face_tokens]
            if attention_mask is not None:
                attention_mask = attention_mask[..., : context.shape[1]]
        return _host_cross_attention(attn, hidden_states, context, attention_mask)


class FaceAdapterHandle:
    """What :func:`attach_face_adapter` returns: the processors by site, and :meth:`remove` to detach."""

    def __init__(self, unet: nn.Module, processors: dict[str, FaceAdapterAttnProcessor], previous, hooks):
        self.unet, self.processors, self._previous, self._hooks = unet, processors, previous, hooks

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        for path, block in adapter_sites(self.unet).items():
            block.attn2.set_processor(self._previous[path])
        self._hooks.clear()


def attach_face_adapter(unet: nn.Module, adapter: FactFaceAdapter, *, scale: float = 1.0) -> FaceAdapterHandle:
    """Put a :class:`FaceAdapterAttnProcessor` reading ``adapter`` on every ``attn2`` of ``unet``, and the
    :class:`ResidualStash` hook on each block's ``norm2``.

    Raises:
        ValueError: the adapter does not fit the UNet's sites, or one is attached already.
    """
    sites = adapter_sites(unet)
    if list(sites) != list(adapter.config.site_paths):
        raise ValueError(f"the FACT adapter's sites do not match this UNet's ({len(sites)} sites)")
    processors, previous, hooks = {}, {}, []
    for (path, block), site in zip(sites.items(), adapter.sites, strict=True):
        attn = block.attn2
        if isinstance(attn.processor, FaceAdapterAttnProcessor):
            raise ValueError(f"{path}: a FACT adapter is already attached")
        _check_host(attn)
        if not isinstance(block.norm2, nn.LayerNorm) or attn.to_q.in_features != site.ln.normalized_shape[0]:
            raise ValueError(f"{path}: expected a LayerNorm norm2 of width {site.ln.normalized_shape[0]}")
        stash = ResidualStash()
        hooks.append(block.norm2.register_forward_pre_hook(stash))
        previous[path] = attn.processor
        processors[path] = FaceAdapterAttnProcessor(site, stash, scale)
        attn.set_processor(processors[path])
    logger.debug("attached FACT adapters at %d sites", len(processors))
    return FaceAdapterHandle(unet, processors, previous, hooks)


def _processors(model: nn.Module, kind: type | tuple[type, ...]) -> list:
    return [m.processor for m in model.modules() if isinstance(getattr(m, "processor", None), kind)]


def set_face_adapter_scale(unet: nn.Module, scale: float) -> None:
    """Set the adapter scale ``s`` at every site (0 = base model; FACT defaults 0.5, inpainting 0.55)."""
    for processor in _processors(unet, FaceAdapterAttnProcessor):
        processor.scale = float(scale)


def set_num_face_tokens(*models: nn.Module, num_photos: int = 1) -> None:
    """Tell the adapters of a UNet and the text-only processors of ControlNets how many photos' tokens trail."""
    for model in models:
        for processor in _processors(model, (FaceAdapterAttnProcessor, TextOnlyControlNetProcessor)):
            processor.num_face_tokens = TOKENS_PER_FACE * num_photos


def attach_text_only_processors(controlnet: nn.Module, num_face_tokens: int = TOKENS_PER_FACE) -> None:
    """Give every attention of ``controlnet`` a :class:`TextOnlyControlNetProcessor` (one shared instance)."""
    processor = TextOnlyControlNetProcessor(num_face_tokens)
    for module in controlnet.modules():
        if hasattr(module, "set_processor") and hasattr(module, "processor"):
            module.set_processor(processor)


# ----------------------------------------------------------------------------------------------------------------
# Loading


def _load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    expected = module.state_dict()
    check_state_dict(expected, state, what)
    module.load_state_dict(state, strict=True, assign=any(v.is_meta for v in expected.values()))


def fact_adapter_key_map(adapter: FactFaceAdapter) -> dict[str, str]:
    """The official checkpoint key of each :class:`FactFaceAdapter` key (the inverse is this dict inverted):
    ``resampler.*`` <- ``local_fac_prj.*``, ``sites.{i}.*`` <- ``<site path>.attn2.processor.*``."""
    paths = adapter.config.site_paths
    keys = {}
    for key in adapter.state_dict():
        if key.startswith("resampler."):
            keys[key] = RESAMPLER_PREFIX + key.removeprefix("resampler.")
        else:
            index, _, rest = key.removeprefix("sites.").partition(".")
            keys[key] = f"{paths[int(index)]}{_PROCESSOR_INFIX}{rest}"
    return keys


def load_fact_adapter(
    path_or_state_dict: str | os.PathLike[str] | Mapping[str, torch.Tensor], unet: nn.Module, *, heads: int = 12
) -> FactFaceAdapter:
    """Load an official FACT adapter checkpoint for ``unet``: the resampler and the 16 sites, strictly.

    The checkpoint (``adapter_{maj,film}_mask_large_new_reg001_faceshuffle_00290001.ckpt``, a ``torch.save`` dict)
    holds ``local_fac_prj.*`` (the resampler) and ``<site>.attn2.processor.*`` (the adapters). Every key must be
    used and every parameter filled, except: ``….processor.ln.*`` (the relocated block ``norm2``) is optional and
    keeps the base UNet's ``norm2`` values when absent, and keys under :data:`UNUSED_PREFIXES` (left over from the
    release's trainer, which its own loader ignores with ``strict=False``) are skipped with a logged note.

    Args:
        path_or_state_dict: the ``.ckpt`` (or a ``.safetensors``) file, or its loaded dict.
        unet (`UNet2DConditionModel`): the base UNet the adapter is for (not changed).
        heads (`int`, defaults to 12): resampler heads (not recoverable from the shapes).

    Returns:
        `FactFaceAdapter`: in eval mode, on the UNet's device, in the file's dtype.

    Raises:
        ValueError: unexpected, missing or mis-shaped keys (named in the message).
    """
    if isinstance(path_or_state_dict, Mapping):
        state = dict(path_or_state_dict)
    else:
        state = load_tensor_file(path_or_state_dict, what="FACT adapter checkpoint")
    for prefix, reason in UNUSED_PREFIXES.items():
        unused = [k for k in state if k.startswith(prefix)]
        if unused:
            logger.info("FACT adapter checkpoint: skipping %d %s* keys (%s)", len(unused), prefix, reason)
            state = {k: v for k, v in state.items() if not k.startswith(prefix)}
    resampler_state = {k[len(RESAMPLER_PREFIX) :]: v for k, v in state.items() if k.startswith(RESAMPLER_PREFIX)}
    if not resampler_state:
        raise ValueError(f"not a FACT adapter checkpoint: no {RESAMPLER_PREFIX}* keys")
    stray = [k for k in state if not k.startswith(RESAMPLER_PREFIX) and _PROCESSOR_INFIX not in k]
    if stray:
        raise ValueError(f"FACT adapter checkpoint: unexpected keys: {format_keys(stray)}")
    config = FaceResampler.config_from_state_dict(resampler_state, heads=heads)
    adapter = FactFaceAdapter.for_unet(unet, resampler={k: v for k, v in config.items() if k != "output_dim"})
    names = fact_adapter_key_map(adapter)
    expected = {names[k]: v for k, v in adapter.state_dict().items()}
    optional = {names[k] for k in names if ".ln." in k and k.startswith("sites.")}
    check_state_dict(expected, state, "FACT adapter (local_fac_prj.*, *.attn2.processor.*)", optional)
    inverse = {official: key for key, official in names.items()}
    own = {inverse[k]: v for k, v in state.items()}
    missing_ln = optional - set(state)
    meta = any(v.is_meta for v in adapter.state_dict().values())
    adapter.load_state_dict(own, strict=not missing_ln, assign=meta)
    dtype = resampler_state["latents"].dtype
    logger.info("loaded FACT adapter: resampler + %d sites", len(adapter.sites))
    return adapter.to(dtype=dtype).eval()


def load_transface(path: str | os.PathLike[str], *, num_heads: int = 8) -> TransFaceViT:
    """Load TransFace weights (``ms1mv2_model_TransFace_S.pt``) strictly into a :class:`TransFaceViT` (eval mode).

    Raises:
        ValueError: unexpected, missing or mis-shaped keys (named in the message).
    """
    state = load_tensor_file(path, what="TransFace state dict")
    model = TransFaceViT(**TransFaceViT.config_from_state_dict(state, num_heads=num_heads))
    _load_strict(model, state, f"TransFace ({Path(path).name})")
    return model.eval()
