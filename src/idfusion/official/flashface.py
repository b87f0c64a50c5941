"""FlashFace (official, ``ali-vilab/FlashFace``) beside idfusion on one folder of release-layout weights.

The release runner builds the release's own networks (``sd_v1_ref_unet``, ``sd_v1_vae``, the CLIP text tower),
loads the folder's ``flashface.ckpt``, ``sd-v1-vae.pth`` and ``openai-clip-vit-large-14.pth`` into them
(``strict=True`` for the UNet, as the demo does) and samples with the release's ``ContextGaussianDiffusion``, set up
as ``flashface/all_finetune/demo_gradio.py:generate`` sets it up (share cache, two-phase guidance, rescale 0.5,
trailing DDIM). The glue that lives in the demo file itself (``encode_text``, the face box mask, ``ref_z0``) is
written out here, because the demo module cannot be imported without gradio and a GPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from . import Release, release_shims

__all__ = ["RELEASE", "write_release_weights", "release_runner", "reference_runner", "ours_runner"]

RELEASE = Release(
    method="flashface",
    repo="ali-vilab/FlashFace",
    commit="fff0f078b72d6a0cfe32d24626235dce1b72561c",
    runs=(
        "flashface/all_finetune/models/reference_unet.py sd_v1_ref_unet (RefStableUNet, replace_input_conv), "
        "flashface/all_finetune/ops/context_diffusion.py ContextGaussianDiffusion.sample(solver='ddim', "
        "discretization='trailing'), ldm/models/vae.py sd_v1_vae, ldm/models/clip.py clip_vit_l_14().textual, "
        "ldm/ops noise_schedule; driven as flashface/all_finetune/demo_gradio.py generate()"
    ),
    marker="flashface/all_finetune/models/reference_unet.py",
    native_size=768,
    default_steps=35,
    import_roots=("", "flashface/all_finetune"),
)
# the release's ldm/models/{clip,retinaface}.py and all_finetune/utils.py import torchvision at module level; the
# sampling path uses none of it
_ABSENT = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional", "torchvision.models",
           "torchvision.models._utils")  # fmt: skip
PROMPT = "a photo of a person"


def _configs(tiny: bool) -> tuple[dict, dict, dict]:
    from .. import sd15
    from ..convert.flashface import FLASHFACE_NORM_EPS

    if tiny:  # widths divisible by FlashFace's 32 GroupNorm groups, 2 layers per level (every official key)
        unet = sd15.sd15_unet_config(block_out_channels=[32, 64, 96, 96], cross_attention_dim=64, sample_size=8,
                                     attention_head_dim=8)  # fmt: skip
        text = sd15.sd15_text_encoder_config(hidden_size=64, intermediate_size=256, num_attention_heads=1,
                                             num_hidden_layers=2, projection_dim=64)  # fmt: skip
        vae = sd15.sd15_vae_config(block_out_channels=[32, 64, 96, 96], norm_num_groups=32)
    else:
        unet, text, vae = sd15.sd15_unet_config(), sd15.sd15_text_encoder_config(), sd15.sd15_vae_config()
    return {**unet, "norm_eps": FLASHFACE_NORM_EPS}, text, vae


def write_release_weights(folder: Path, *, tiny: bool = False, seed: int = 0) -> Path:
    """Random weights in the release's file layout (``cache/``: the four files the release loads) into ``folder``;
    full SD1.5 size, or tiny for a smoke run."""
    from ..clip_tokenizer import clip_bpe_path
    from ..convert import flashface as ckpt
    from ..methods.flashface import OFFICIAL, build_flashface_models
    from ..sd15 import build_text_encoder, build_vae

    unet_config, text_config, vae_config = _configs(tiny)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    main, refnet, reference = build_flashface_models(unet_config, OFFICIAL)
    with torch.no_grad():  # trained weights: the mask channel and the reference attention are not their init
        main.conv_in.weight[:, 4:].normal_(0, 0.02)
        for parameter in reference.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    torch.save(ckpt.flashface_unets_state_dict(main, refnet, reference), folder / ckpt.CHECKPOINT_FILE)
    del main, refnet, reference
    text = build_text_encoder(text_config)
    projection = (
        torch.randn(text_config["hidden_size"], text_config["projection_dim"]) / text_config["hidden_size"] ** 0.5
    )
    torch.save(ckpt.text_encoder_to_flashface(text, projection), folder / ckpt.CLIP_FILE)
    torch.save(ckpt.vae_to_flashface(build_vae(vae_config)), folder / ckpt.VAE_FILE)
    (folder / ckpt.BPE_FILE).write_bytes(clip_bpe_path().read_bytes())
    return folder


def reference_crops(count: int = 4, size: int = 224) -> np.ndarray:
    """The bench's reference faces: fixed random square crops at the release's reference size."""
    return np.random.default_rng(0).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


def _autocast(device: str, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)


Runner = Callable[[int, int, int, Callable[[], None] | None], np.ndarray]


def release_runner(code: Path, weights: Path, *, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Runner:
    """Build the release's networks from its code at ``code`` on the weights in ``weights``; returns
    ``run(steps, seed, size, on_step) -> final latents (1, 4, size/8, size/8)``. The weights stay in float32 and
    sampling runs under autocast in ``dtype``, as the release does (``cfg.flash_dtype``)."""
    from ..convert import flashface as ckpt
    from ..convert.flashface import _tokenizer_from_bpe

    with release_shims(code, RELEASE, device, _ABSENT):
        import ldm  # the release's package
        from models import sd_v1_ref_unet  # flashface/all_finetune/models
        from ops.context_diffusion import ContextGaussianDiffusion

        clip_state = torch.load(weights / ckpt.CLIP_FILE, map_location="cpu", weights_only=True)
        vae_state = torch.load(weights / ckpt.VAE_FILE, map_location="cpu", weights_only=True)
        unet_state = torch.load(weights / ckpt.CHECKPOINT_FILE, map_location="cpu", weights_only=True)
        text_dim = clip_state["textual.token_embedding.weight"].shape[1]
        full = text_dim == 768
        text_kwargs = {} if full else {"text_dim": text_dim, "text_heads": 1, "text_layers": 2, "embed_dim": text_dim,
                                       "vision_dim": 32, "vision_heads": 1, "vision_layers": 1}  # fmt: skip
        clip = ldm.models.clip_vit_l_14(pretrained=False, **text_kwargs).textual
        clip.load_state_dict({k[len("textual.") :]: v for k, v in clip_state.items() if k.startswith("textual.")})
        clip = clip.eval().requires_grad_(False).to(device)
        vae_kwargs = {} if full else {"dim": 32, "dim_mult": [1, 2, 3, 3]}
        autoencoder = ldm.models.sd_v1_vae(pretrained=False, **vae_kwargs)
        autoencoder.load_state_dict(vae_state)
        autoencoder = autoencoder.eval().requires_grad_(False).to(device)
        unet_kwargs = {} if full else {"dim": 32, "dim_mult": [1, 2, 3, 3], "context_dim": text_dim}
        unet = sd_v1_ref_unet(pretrained=False, version="sd-v1-5_nonema", enable_encoder=False, **unet_kwargs)
        if full:
            unet.replace_input_conv()
        else:  # replace_input_conv hard-codes SD1.5's 320 channels; the same swap at the tiny width
            unet.ori_encoder[0] = torch.nn.Conv2d(5, 32, 3, padding=1)
        unet.load_state_dict(unet_state, strict=True)
        del unet_state, vae_state, clip_state
        unet = unet.eval().requires_grad_(False).to(device)
        sigmas = ldm.ops.noise_schedule(schedule="scaled_linear", n=1000, beta_min=0.00085, beta_max=0.0120)
        diffusion = ContextGaussianDiffusion(sigmas=sigmas, prediction_type="eps")
    tokenizer = _tokenizer_from_bpe(weights / ckpt.BPE_FILE)  # the same ids as the release's (test_clip_tokenizer)

    def encode_text(prompt: str) -> torch.Tensor:  # demo_gradio.encode_text
        ids = tokenizer(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        x = clip.token_embedding(ids.input_ids.to(device)) + clip.pos_embedding
        for block in clip.transformer:
            x = block(x)
        return clip.norm(x)

    faces = torch.from_numpy(reference_crops()).permute(0, 3, 1, 2).float().div(127.5).sub(1).to(device)
    from ..pipelines import pipeline_flashface as pf

    def run(steps: int, seed: int, size: int, on_step: Callable[[], None] | None = None) -> np.ndarray:
        with release_shims(code, RELEASE, device, _ABSENT), torch.no_grad():
            positive = encode_text(f"{PROMPT}, {pf.OFFICIAL_POSITIVE_POSTFIX}")
            negative = encode_text(pf.OFFICIAL_NEGATIVE_POSTFIX)
            box = [int(0.3 * size), int(0.1 * size), int(0.6 * size), int(0.4 * size)]
            side = max(box[2] - box[0], box[3] - box[1])
            mask = torch.zeros(size, size)
            mask[box[1] : box[1] + side, box[0] : box[0] + side] = 1
            ref_z0 = 0.18215 * autoencoder.sample(faces, deterministic=True)
            unet.share_cache.update(
                num_pairs=4, ref=ref_z0, similarity=torch.tensor(1.2, device=device),
                ori_similarity=torch.tensor(1.2, device=device),
                lamda_feat_before_ref_guidence=torch.tensor(0.85, device=device), ref_context=negative.repeat(4, 1, 1),
                masks=mask[::8, ::8][None].to(device), classifier=3.2, step_to_launch_face_guidence=750,
            )  # fmt: skip
            diffusion.classifier = 3.2
            noise = torch.randn((1, 4, size // 8, size // 8), generator=torch.Generator("cpu").manual_seed(seed))
            forward = unet.forward
            if on_step is not None:  # one RefStableUNet call per step (all guidance branches in one batch)

                def marked(*args, **kwargs):
                    out = forward(*args, **kwargs)
                    on_step()
                    return out

                unet.forward = marked
            try:
                with _autocast(device, dtype):
                    z0 = diffusion.sample(solver="ddim", noise=noise.to(device), model=unet,
                                          model_kwargs=[{"context": positive}, {"context": negative}], steps=steps,
                                          guide_scale=7.5, guide_rescale=0.5, discretization="trailing")  # fmt: skip
                    autoencoder.decode(z0 / 0.18215)  # the demo decodes; the image is not compared
            finally:
                unet.forward = forward
                unet.share_cache.pop("ori_similarity", None)
            return z0.float().cpu().numpy()

    return run


def ours_runner(weights: Path, *, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Runner:
    """idfusion's FlashFacePipeline on the same folder, frozen for inference, references as the same crops."""
    from ..pipelines import FlashFacePipeline
    from ..pipelines.core import freeze_for_inference

    pipe = FlashFacePipeline.from_pretrained(weights, local_files_only=True, torch_dtype=dtype).to(device)
    freeze_for_inference(pipe)
    pipe.set_progress_bar_config(disable=True)
    crops = list(reference_crops())

    def run(steps: int, seed: int, size: int, on_step: Callable[[], None] | None = None) -> np.ndarray:
        def callback(pipe, index, timestep, kwargs):
            if on_step is not None:
                on_step()
            return kwargs

        with torch.no_grad():
            latents = pipe(reference_images=crops, prompt=PROMPT, seed=seed, num_inference_steps=steps, height=size,
                           width=size, output_type="latent", callback_on_step_end=callback).images  # fmt: skip
        return np.asarray(torch.as_tensor(latents).float().cpu())

    return run


def reference_runner(weights: Path, *, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Runner:
    """The release's control flow without its code (``flashface_release_loop``) on idfusion's modules loaded from
    the same folder: every step the ReferenceNet, then one main UNet call over every guidance branch, with the
    reference update computed per sample as the release does."""
    from ..pipelines import FlashFacePipeline
    from ..pipelines.core import freeze_for_inference

    pipe = FlashFacePipeline.from_pretrained(weights, local_files_only=True, torch_dtype=dtype).to(device)
    freeze_for_inference(pipe)
    crops = reference_crops()

    def run(steps: int, seed: int, size: int, on_step: Callable[[], None] | None = None) -> np.ndarray:
        with torch.no_grad():
            return flashface_release_loop(pipe, crops, steps, seed, size, on_step)

    return run


class ReleaseReadProcessor:
    """The release's reference update (``forward_with_ref``) as it computes it: every term for every sample of the
    batch, the reference tokens repeated per sample (``(n, L, C) -> (B, n*L, C)``) before projection."""

    def __init__(self, bank, key, reference_attention):
        self.bank, self.key, self.reference_attention = bank, key, reference_attention

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        from ..methods.flashface import _attention

        y = hidden_states
        batch = y.shape[0]
        if self.bank.writing:
            self.bank.tokens[self.key] = y
            return _attention(attn, y, y)
        tokens = self.bank.tokens.get(self.key)  # None: nothing referenced
        lam = self.bank.strength.to(y).view(batch, 1, 1) if tokens is not None else y.new_zeros(batch, 1, 1)
        ref = self.reference_attention
        out = _attention(attn, y, y) + (1 - lam) * _attention(ref, y, y)
        if tokens is not None:
            n, length, channels = tokens.shape
            repeated = tokens.reshape(1, n * length, channels).repeat(batch, 1, 1)  # (B, n*L, C), materialised
            out = out + lam * _attention(ref, y, torch.cat([y, repeated], dim=1))
        return out


def flashface_release_loop(pipe, crops: np.ndarray, steps: int, seed: int, size: int, on_step=None) -> np.ndarray:
    """The release's sampling (``ContextGaussianDiffusion.denoise`` + ``RefStableUNet.forward``) on idfusion's
    modules: references encoded with the VAE mean, each step the ReferenceNet at the current t with the negative
    prompt, one main UNet call over ``[pos, neg]`` at lambda 0.85 while t > 750, then ``[pos, pos, neg]`` with
    lambda ``[1.2, 0, 0]`` and reference guidance 3.2, CFG 7.5 rescaled 0.5; trailing DDIM to sigma 0. Returns the
    final latents."""
    from ..methods import flashface as ff
    from ..pipelines import pipeline_flashface as pf

    processors = dict(pipe.unet.attn_processors)
    for (path, block), ref in zip(ff.reference_blocks(pipe.unet).items(), pipe.reference_attention.attentions,
                                  strict=True):  # fmt: skip
        block.attn1.set_processor(ReleaseReadProcessor(pipe.bank, path, ref))
    try:
        positive, negative = pipe.encode_prompts([f"{PROMPT}, {pf.OFFICIAL_POSITIVE_POSTFIX}",
                                                  pf.OFFICIAL_NEGATIVE_POSTFIX]).chunk(2)  # fmt: skip
        faces = torch.from_numpy(crops).permute(0, 3, 1, 2).to(positive).div(127.5).sub(1)
        references = pipe.vae.encode(faces).latent_dist.mean * pipe.vae.config.scaling_factor
        scheduler = pipe.scheduler
        scheduler.set_timesteps(steps)
        latents = torch.randn((1, 4, size // 8, size // 8), generator=torch.Generator("cpu").manual_seed(seed))
        latents = latents.to(positive) * scheduler.init_noise_sigma
        mask = ff.face_position_mask(list(ff.OFFICIAL_FACE_BOX), size, size).to(latents)
        pipe.bank.log_weights, pipe.bank.num_groups, pipe.bank.num_images = None, 1, 1
        for t in scheduler.timesteps:
            pipe.write_references(references, t, negative.expand(references.shape[0], -1, -1))
            if int(t) > pf.OFFICIAL_GUIDANCE_START:
                contexts, lams = torch.cat([positive, negative]), [pf.OFFICIAL_STRENGTH_BEFORE_GUIDANCE] * 2
            else:
                contexts, lams = torch.cat([positive, positive, negative]), [ff.OFFICIAL.reference_strength, 0, 0]
            branches = len(lams)
            model_input = torch.cat([latents.repeat(branches, 1, 1, 1), mask.expand(branches, -1, -1, -1)], dim=1)
            pipe.bank.strength = torch.tensor(lams, dtype=torch.float32)
            noise = pipe.unet(model_input, t, encoder_hidden_states=contexts).sample
            guided = ff.flashface_guidance(
                noise.view(branches, 1, *noise.shape[1:]), text_scale=ff.OFFICIAL.guidance_scale,
                reference_scale=pf.OFFICIAL_REFERENCE_GUIDANCE if branches == 3 else None, rescale=pf.OFFICIAL_RESCALE,
            )  # fmt: skip
            latents = scheduler.step(guided, t, latents).prev_sample
            if on_step is not None:
                on_step()
        pipe.bank.clear()
        pipe.vae.decode(latents / pipe.vae.config.scaling_factor)  # the release decodes too
        return latents.float().cpu().numpy()
    finally:
        pipe.unet.set_attn_processor(processors)
