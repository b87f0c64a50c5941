"""Arc2Face (``foivospar/Arc2Face``) beside idfusion on one folder of release-layout weights.

The release is a diffusers ``StableDiffusionPipeline`` whose text encoder is its ``arc2face.CLIPTextModelWrapper``
and whose prompt embeddings come from its ``arc2face.project_face_embs``; the README sets DPM-Solver++ and samples
with ``prompt_embeds`` only (25 steps, guidance 3). The runner does exactly that, importing the two from the user's
checkout. Its ``arc2face/models.py`` imports ``transformers.modeling_attn_mask_utils``, which transformers 5
removed: the release runs only where transformers 4 is installed (``--official-python`` names that interpreter).

Folder layout (the README's local ``models/`` folder plus the SD1.5 base it names): ``arc2face/`` (the UNet),
``encoder/`` (``config.json`` + ``pytorch_model.bin``), ``stable-diffusion-v1-5/`` (``vae/``, ``tokenizer/``,
``scheduler/``, ``model_index.json``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from . import Release, ReleaseCodeError, release_shims

__all__ = ["RELEASE", "write_release_weights", "release_runner", "reference_runner", "ours_runner"]

RELEASE = Release(
    method="arc2face",
    repo="foivospar/Arc2Face",
    commit="8f3acd701d17fda7fde4c9f1d170fc88fecbe9ad",
    runs=(
        "arc2face/models.py CLIPTextModelWrapper, arc2face/utils.py project_face_embs, diffusers "
        "StableDiffusionPipeline(prompt_embeds=...) with DPMSolverMultistepScheduler, as README.md's inference"
    ),
    marker="arc2face/models.py",
    native_size=512,
    default_steps=25,
)
GUIDANCE = 3.0  # README


def identity(seed: int = 0) -> torch.Tensor:
    """The bench's identity: a fixed unit 512-d ArcFace embedding ``(1, 512)``."""
    embedding = torch.randn(1, 512, generator=torch.Generator().manual_seed(seed))
    return embedding / embedding.norm(dim=1, keepdim=True)


def write_release_weights(folder: Path, *, tiny: bool = False, seed: int = 0) -> Path:
    """Random weights in the release's layout into ``folder`` (full SD1.5 size, or tiny: the encoder keeps the
    512-d token width the ArcFace embedding is padded into, and CLIP's real vocabulary, which the release's
    ``project_face_embs`` tokenizes with)."""
    from diffusers import PNDMScheduler

    from .. import sd15
    from ..clip_tokenizer import save_clip_tokenizer

    torch.manual_seed(seed)
    if tiny:
        unet = sd15.build_unet(sd15.tiny_unet_config(cross_attention_dim=512))
        vae = sd15.build_vae(sd15.tiny_vae_config())
        encoder = sd15.build_text_encoder(sd15.sd15_text_encoder_config(
            hidden_size=512, intermediate_size=64, num_attention_heads=4, num_hidden_layers=1, projection_dim=512))  # fmt: skip
    else:
        unet = sd15.build_unet(sd15.sd15_unet_config())
        vae = sd15.build_vae(sd15.sd15_vae_config())
        encoder = sd15.build_text_encoder(sd15.sd15_text_encoder_config())
    folder.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(folder / "arc2face", safe_serialization=True)
    (folder / "encoder").mkdir(exist_ok=True)
    encoder.config.architectures = ["CLIPTextModelWrapper"]
    encoder.config.save_pretrained(folder / "encoder")
    torch.save(sd15.official_state_dict(encoder), folder / "encoder" / "pytorch_model.bin")  # as released
    base = folder / "stable-diffusion-v1-5"
    vae.save_pretrained(base / "vae", safe_serialization=True)
    save_clip_tokenizer(base / "tokenizer")
    PNDMScheduler.from_config(sd15.sd15_scheduler_config()).save_pretrained(base / "scheduler")
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.26.3",
             "feature_extractor": [None, None], "requires_safety_checker": False, "safety_checker": [None, None],
             "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"]}  # fmt: skip
    (base / "model_index.json").write_text(json.dumps(index, indent=1))
    return folder


Runner = Callable[[int, int, int, Callable[[], None] | None], np.ndarray]


def _step_callback(on_step):
    def callback(pipe, index, timestep, kwargs):
        if on_step is not None:
            on_step()
        return kwargs

    return callback


def _diffusers_release(weights: Path, encoder_class, project, device: str, dtype: torch.dtype) -> Runner:
    """The README's pipeline, given the release's encoder class and projection (or the reference's)."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel

    encoder = encoder_class.from_pretrained(weights / "encoder", torch_dtype=dtype)
    unet = UNet2DConditionModel.from_pretrained(weights / "arc2face", torch_dtype=dtype)
    pipeline = StableDiffusionPipeline.from_pretrained(weights / "stable-diffusion-v1-5", text_encoder=encoder,
                                                       unet=unet, torch_dtype=dtype, safety_checker=None)  # fmt: skip
    pipeline.scheduler = DPMSolverMultistepScheduler.from_config(pipeline.scheduler.config)
    pipeline = pipeline.to(device)
    pipeline.set_progress_bar_config(disable=True)

    def run(steps: int, seed: int, size: int, on_step: Callable[[], None] | None = None) -> np.ndarray:
        with torch.no_grad():
            id_emb = project(pipeline, identity().to(device, dtype))
            latents = pipeline(prompt_embeds=id_emb, num_inference_steps=steps, guidance_scale=GUIDANCE,
                               height=size, width=size, generator=torch.Generator("cpu").manual_seed(seed),
                               output_type="latent", callback_on_step_end=_step_callback(on_step)).images  # fmt: skip
            pipeline.vae.decode(latents / pipeline.vae.config.scaling_factor)  # the README decodes to images
        return latents.float().cpu().numpy()

    return run


def release_runner(code: Path, weights: Path, *, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Runner:
    """The release's encoder wrapper and projection from ``code`` in the README's pipeline."""
    with release_shims(code, RELEASE, device):
        try:
            from arc2face.models import CLIPTextModelWrapper
            from arc2face.utils import project_face_embs
        except ImportError as error:
            import transformers

            raise ReleaseCodeError(
                f"the Arc2Face release at {code} does not import with transformers {transformers.__version__} "
                f"({error}); run its side with a Python that has transformers 4 (--official-python)"
            ) from error
    return _diffusers_release(weights, CLIPTextModelWrapper, project_face_embs, device, dtype)


def project_face_embeddings(pipeline, face_embs: torch.Tensor) -> torch.Tensor:
    """The release's ``project_face_embs``: "photo of a id person" with the ArcFace embedding, zero-padded to the
    token width, as the token embedding of "id", through the whole encoder (positions, causal mask, final norm);
    the last hidden state. The token row is swapped by a hook on the token table, whatever the transformers
    version's forward looks like."""
    tokenizer, encoder = pipeline.tokenizer, pipeline.text_encoder
    token = tokenizer.encode("id", add_special_tokens=False)[0]
    ids = tokenizer("photo of a id person", truncation=True, padding="max_length",
                    max_length=tokenizer.model_max_length, return_tensors="pt").input_ids.to(face_embs.device)  # fmt: skip
    ids = ids.repeat(face_embs.shape[0], 1)  # (N, 77)
    table = encoder.get_input_embeddings()
    padded = torch.cat(
        [face_embs, face_embs.new_zeros(face_embs.shape[0], table.embedding_dim - face_embs.shape[1])], 1
    )

    def swap(module, args, output):
        output = output.clone()
        output[ids == token] = padded.to(output.dtype)
        return output

    handle = table.register_forward_hook(swap)
    try:
        return encoder(input_ids=ids)[0]
    finally:
        handle.remove()


def reference_runner(weights: Path, *, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Runner:
    """Without the release's code: the README's pipeline with :func:`project_face_embeddings` on a plain
    ``CLIPTextModel`` (the wrapper adds only the ``input_embeds`` path)."""
    from transformers import CLIPTextModel

    return _diffusers_release(weights, CLIPTextModel, project_face_embeddings, device, dtype)


def ours_runner(weights: Path, *, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Runner:
    """idfusion's Arc2FacePipeline on the same folder, frozen for inference, DPM-Solver++ as the README."""
    from ..pipelines import Arc2FacePipeline
    from ..pipelines.core import freeze_for_inference

    pipe = Arc2FacePipeline.from_pretrained(weights, local_files_only=True, torch_dtype=dtype).to(device)
    freeze_for_inference(pipe)
    pipe.set_progress_bar_config(disable=True)

    def run(steps: int, seed: int, size: int, on_step: Callable[[], None] | None = None) -> np.ndarray:
        with torch.no_grad():
            latents = pipe(id_embeds=identity(), num_inference_steps=steps, guidance_scale=GUIDANCE, seed=seed,
                           scheduler="dpm++", height=size, width=size, output_type="latent",
                           callback_on_step_end=_step_callback(on_step)).images  # fmt: skip
        return np.asarray(torch.as_tensor(latents).float().cpu())

    return run
