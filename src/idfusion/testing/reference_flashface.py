"""The official FlashFace sampling control flow, step by step, as a reference for tests and benchmarks.

:func:`flashface_official_loop` runs what ``ContextGaussianDiffusion.denoise`` + ``RefStableUNet`` do: every step
the ReferenceNet on the clean references at the current t with the negative prompt, then one main UNet call over all
branches, two-phase guidance with CFG-rescale 0.5. :class:`OfficialReadProcessor` is the reference update as the
released code computes it (every term for every sample). The pipeline's fast paths are held to these.
"""

from __future__ import annotations

import torch

from ..official.flashface import ReleaseReadProcessor

__all__ = ["OfficialReadProcessor", "use_official_processors", "flashface_official_loop"]


# the release's reference update, as the bench's reference loop runs it
OfficialReadProcessor = ReleaseReadProcessor


def use_official_processors(pipe) -> None:
    """Swap the main UNet's reference processors for :class:`OfficialReadProcessor` (same math, official work);
    ``pipe.restore_reference_processors()`` undoes it."""
    from ..methods.flashface import reference_blocks

    attentions = pipe.reference_attention.attentions
    for (path, block), ref in zip(reference_blocks(pipe.unet).items(), attentions, strict=True):
        block.attn1.set_processor(OfficialReadProcessor(pipe.bank, path, ref))


@torch.no_grad()
def flashface_official_loop(
    pipe, reference_latents: torch.Tensor, steps: int, seed: int, on_step=None, size: int | None = None
):
    """The official sampling control flow, step by step (``ContextGaussianDiffusion.denoise`` + ``RefStableUNet``):
    each step runs the ReferenceNet on the clean references at the current t with the negative prompt, then one main
    UNet call over all branches (``[pos, neg]`` at lambda_0 while t > T*, then ``[pos + ref, pos, neg]`` with
    lambda ``[lam, 0, 0]``), two-phase guidance with CFG-rescale 0.5, sampled with ``pipe.scheduler``. Defaults as
    the demo. Used with :class:`OfficialReadProcessor` as the reference for the pipeline's output and speed."""
    from ..methods import flashface as ff
    from ..pipelines import pipeline_flashface as pf

    positive, negative = pipe.encode_prompts(
        [f"a photo of a person, {pf.OFFICIAL_POSITIVE_POSTFIX}", pf.OFFICIAL_NEGATIVE_POSTFIX]  # the release's
    ).chunk(2)
    size = size or pipe.native_size()
    scheduler = pipe.scheduler
    scheduler.set_timesteps(steps)
    generator = torch.Generator("cpu").manual_seed(seed)
    latents = torch.randn((1, 4, size // 8, size // 8), generator=generator).to(positive)
    latents = latents * scheduler.init_noise_sigma
    mask = ff.face_position_mask(list(ff.OFFICIAL_FACE_BOX), size, size).to(latents)  # the demo's default box
    pipe.bank.log_weights, pipe.bank.num_groups, pipe.bank.num_images = None, 1, 1
    for i, t in enumerate(scheduler.timesteps):
        pipe.write_references(reference_latents.to(positive), t, negative.expand(reference_latents.shape[0], -1, -1))
        if int(t) > pf.OFFICIAL_GUIDANCE_START:
            contexts, lams = torch.cat([positive, negative]), [pf.OFFICIAL_STRENGTH_BEFORE_GUIDANCE] * 2
        else:
            contexts, lams = torch.cat([positive, positive, negative]), [ff.OFFICIAL.reference_strength, 0.0, 0.0]
        branches = len(lams)
        model_input = torch.cat([latents.repeat(branches, 1, 1, 1), mask.expand(branches, -1, -1, -1)], dim=1)
        pipe.bank.strength = torch.tensor(lams)
        noise = pipe.unet(model_input, t, encoder_hidden_states=contexts).sample  # every branch, full UNet
        guided = ff.flashface_guidance(
            noise.view(branches, 1, *noise.shape[1:]), text_scale=ff.OFFICIAL.guidance_scale,
            reference_scale=pf.OFFICIAL_REFERENCE_GUIDANCE if branches == 3 else None, rescale=pf.OFFICIAL_RESCALE,
        )  # fmt: skip
        latents = scheduler.step(guided, t, latents).prev_sample
        if on_step is not None:
            on_step(pipe, i, t, {})
    pipe.bank.clear()
    image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return ((image.float() / 2 + 0.5).clamp(0, 1)).permute(0, 2, 3, 1).cpu().numpy()
