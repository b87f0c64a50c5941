"""SD1.5-family sampling over a pipeline's components: diffusers' own loops, with the method's conditioning.

Methods that condition SD1.5 through prompt embeddings (Arc2Face, AdaFace, FACT's text + face context, FeedFace on
SD1.5) hand :func:`sample_sd15` their ``(B, L, D)`` embeddings. It runs diffusers' ``StableDiffusionPipeline`` (or
its inpainting and ControlNet variants) over the same modules, so schedulers, offload hooks, VAE tiling, LoRAs and
callbacks behave exactly as in diffusers. An SDXL family would get a sibling module with the same signature.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import PIL.Image
import torch

from ..errors import ModelFilesError
from ..images import ImageInput

if TYPE_CHECKING:
    from .core import IdentityPipeline, SamplingSettings

__all__ = ["InpaintInput", "sample_sd15"]


@dataclass
class InpaintInput:
    """What an inpainting call repaints: ``image`` (RGB) where ``mask_image`` (L, white = repaint) says, with
    ``strength`` of noise (1.0: from pure noise inside the mask)."""

    image: PIL.Image.Image
    mask_image: PIL.Image.Image
    strength: float = 0.6


def sample_sd15(
    pipe: IdentityPipeline,
    prompt_embeds: torch.Tensor,
    negative_prompt_embeds: torch.Tensor,
    settings: SamplingSettings,
    *,
    controlnet_image: ImageInput | PIL.Image.Image | None = None,
    controlnet_conditioning_scale: float = 1.0,
    controls: Sequence[tuple[Any, PIL.Image.Image, float]] | None = None,
    inpaint: InpaintInput | None = None,
    output_type: str = "pil",
    callback_on_step_end=None,
    callback_on_step_end_tensor_inputs: tuple[str, ...] = ("latents",),
) -> Any:
    """Sample one image per generator of ``settings`` from ``(1, L, D)`` conditioning, with ``pipe``'s components.

    Text-to-image, or with ``inpaint`` diffusers' inpainting pipelines (a 4-channel UNet repaints the masked region
    from the noised image, as diffusers does for non-inpainting checkpoints), optionally with ``pipe.controlnet``
    (``controlnet_image``) or several ControlNets (``controls``: ``(net, condition, scale)`` each, stacked as
    diffusers' ``MultiControlNetModel``, residuals summed). The callback receives ``pipe`` (not the diffusers runner), as diffusers' contract says.
    """
    import diffusers

    batch = settings.batch_size
    shared = dict(
        vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
        scheduler=settings.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    callback = None
    if callback_on_step_end is not None:

        def callback(runner, step, timestep, tensors):
            return callback_on_step_end(pipe, step, timestep, tensors)

    kwargs = dict(
        prompt_embeds=prompt_embeds.expand(batch, -1, -1),  # (1, L, D) -> (B, L, D)
        negative_prompt_embeds=negative_prompt_embeds.expand(batch, -1, -1),
        num_inference_steps=settings.steps,
        guidance_scale=settings.guidance_scale,
        height=settings.height,
        width=settings.width,
        generator=settings.generators,
        output_type=output_type,
        callback_on_step_end=callback,
        callback_on_step_end_tensor_inputs=list(callback_on_step_end_tensor_inputs),
    )
    if inpaint is not None:
        kwargs.update(image=inpaint.image, mask_image=inpaint.mask_image, strength=inpaint.strength)
    if controlnet_image is not None:
        controlnet = getattr(pipe, "controlnet", None)
        if controlnet is None:
            raise ModelFilesError(
                "a ControlNet image was given, but this model has no ControlNet (expected a controlnet/ folder "
                "with config.json and diffusion_pytorch_model.safetensors in the model folder)"
            )
        if isinstance(controlnet_image, PIL.Image.Image):
            condition = controlnet_image
        else:
            from ..images import load_image

            condition = load_image(controlnet_image, name="controlnet_image").to_pil()
        controls = [(controlnet, condition, controlnet_conditioning_scale), *(controls or [])]
    if not controls:
        name = "StableDiffusionInpaintPipeline" if inpaint else "StableDiffusionPipeline"
        runner = getattr(diffusers, name)(**shared)
    else:
        from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

        nets = [net for net, _, _ in controls]
        conditions = [image.resize((settings.width, settings.height), PIL.Image.BICUBIC) for _, image, _ in controls]
        scales = [float(scale) for _, _, scale in controls]
        several = len(nets) > 1
        controlnet = MultiControlNetModel(nets) if several else nets[0]
        condition = conditions if several else conditions[0]
        if inpaint is not None:
            runner = diffusers.StableDiffusionControlNetInpaintPipeline(**shared, controlnet=controlnet)
            kwargs.update(control_image=condition)
        else:
            runner = diffusers.StableDiffusionControlNetPipeline(**shared, controlnet=controlnet)
            kwargs.update(image=condition)
        kwargs.update(controlnet_conditioning_scale=scales if several else scales[0])
    runner.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
    # The runner shares modules (and any offload hooks) with the pipeline; only the wrapper object is new.
    images = runner(**kwargs).images
    pipe.maybe_free_model_hooks()
    return images
