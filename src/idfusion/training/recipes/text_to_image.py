"""``text-to-image``: train a Stable Diffusion 1.5-architecture model, from scratch or from a diffusers folder.

Training runs in stages, one run per stage, each ending in an ordinary SD1.5 folder that the next stage starts from:

1. ``trainable: [vae]`` — the autoencoder alone: pixel MSE of the reconstruction plus ``kl_weight`` times the KL of
   the posterior to N(0, I) (both means over elements). At the end ``vae.config.scaling_factor`` is set to one over
   the standard deviation of the training latents (``scale_latents``), as SD's 0.18215 was chosen;
2. ``trainable: [unet]`` (or ``[unet, text_encoder]``), with ``pretrained`` pointing at stage 1's ``model/`` folder:
   epsilon-prediction MSE under SD1.5's noise schedule (``DDPMScheduler``), captions dropped to ``""`` with
   probability ``caption_dropout`` so the model also learns the unconditional branch for classifier-free guidance.

Skipping stage 1 trains the UNet on the latents of whatever VAE the start folder (or a fresh random one) has.

Without ``pretrained``, models are built new at ``size`` (``tiny``: :mod:`idfusion.sd15`'s toy SD1.5
topology; ``sd15``: the release's architecture) with ``unet``/``vae``/``text_encoder`` config overrides, and the real
CLIP tokenizer (:func:`idfusion.clip_tokenizer.load_clip_tokenizer`). The output loads with
``StableDiffusionPipeline.from_pretrained(folder)``.

Example stage 2 config::

    recipe:
      name: text-to-image
      pretrained: runs/vae/model
      trainable: [unet]
    data:
      train: data/train.jsonl
      resolution: 64
    train:
      max_steps: 20000
      batch_size: 32
      learning_rate: 1.0e-4
    output_dir: runs/unet
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from ..config import ConfigFieldError, between, existing_folder, non_negative, positive, setting
from ..data import CONDITION_STREAM, NOISE_STREAM, sample_seed
from ..recipe import Recipe, RecipeConfig

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["TextToImageConfig", "TextToImageRecipe"]

logger = logging.getLogger(__name__)

COMPONENTS = ("vae", "unet", "text_encoder")
_DEFAULT_PROMPTS = ["a red circle on a white background", "a blue square on a black background"]


@dataclass
class TextToImageConfig(RecipeConfig):
    name: str = "text-to-image"
    pretrained: Path | None = setting(None, check=existing_folder)  # SD1.5 diffusers folder to start from
    size: Literal["tiny", "sd15"] = "tiny"  # architecture of new models (without `pretrained`)
    unet: dict[str, Any] = setting(factory=dict)  # config overrides for a new UNet2DConditionModel
    vae: dict[str, Any] = setting(factory=dict)  # ... for a new AutoencoderKL
    text_encoder: dict[str, Any] = setting(factory=dict)  # ... for a new CLIPTextModel (CLIPTextConfig keys)
    trainable: list[Literal["vae", "unet", "text_encoder"]] = setting(factory=lambda: ["unet"])
    caption_dropout: float = setting(0.1, check=between(0, 1))  # UNet stage: p(caption -> "")
    kl_weight: float = setting(1e-6, check=non_negative)  # VAE stage
    scale_latents: bool = True  # VAE stage: set scaling_factor = 1 / std(latents) at the end
    validation_prompts: list[str] = setting(factory=lambda: list(_DEFAULT_PROMPTS))
    validation_inference_steps: int = setting(20, check=positive)
    validation_guidance_scale: float = setting(5.0, check=non_negative)
    validation_seed: int = setting(0, check=non_negative)
    validation_images: int = setting(4, check=positive)  # VAE stage: training images shown with reconstructions

    def __post_init__(self) -> None:
        trainable = list(self.trainable)
        if not trainable:
            raise ConfigFieldError("trainable", f"expected some of {', '.join(COMPONENTS)}, got []")
        if len(set(trainable)) != len(trainable):
            raise ConfigFieldError("trainable", f"lists a component twice: {trainable}")
        if "vae" in trainable and len(trainable) > 1:
            raise ConfigFieldError(
                "trainable",
                f"train the VAE in a stage of its own ([vae]), then the rest from its output; got {trainable}",
            )
        if self.pretrained is not None:
            if not (self.pretrained / "model_index.json").is_file():
                raise ConfigFieldError(
                    "pretrained", f"not a diffusers pipeline folder (no model_index.json): {self.pretrained}"
                )
            for key in COMPONENTS:
                if getattr(self, key):
                    raise ConfigFieldError(
                        key, "config overrides apply to new models only (this run loads `pretrained`)"
                    )
            return
        try:
            unet, _, text_encoder = self.model_configs(resolution=None)
        except TypeError as error:  # merge_config's unknown-key message names the keys
            kind = str(error).split(" config keys")[0].removeprefix("unknown ")
            raise ConfigFieldError(kind if kind in COMPONENTS else "unet", str(error)) from None
        if unet["cross_attention_dim"] != text_encoder["hidden_size"]:
            raise ConfigFieldError(
                "unet",
                f"cross_attention_dim {unet['cross_attention_dim']} must equal the text encoder's hidden_size "
                f"{text_encoder['hidden_size']}",
            )

    def model_configs(self, resolution: int | None) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """The UNet, VAE and text-encoder configs of new models; sample sizes follow ``resolution`` unless overridden."""
        from ... import sd15

        if self.size == "tiny":
            un, va, te = sd15.tiny_unet_config, sd15.tiny_vae_config, sd15.tiny_text_encoder_config
        else:
            un, va, te = sd15.sd15_unet_config, sd15.sd15_vae_config, sd15.sd15_text_encoder_config
        vae = va(**self.vae)
        unet = un(**self.unet)
        if resolution is not None:
            factor = 2 ** (len(vae["block_out_channels"]) - 1)
            vae = va(**{"sample_size": resolution, **self.vae})
            unet = un(**{"sample_size": resolution // factor, **self.unet})
        return unet, vae, te(**self.text_encoder)


class VAEWithPosterior(torch.nn.Module):
    """``AutoencoderKL`` behind a ``forward`` that returns the reconstruction and the posterior's moments.

    Why: DDP synchronises gradients only for calls through ``forward``, and ``AutoencoderKL.forward`` hides the
    posterior that the KL term needs. ``eps`` (the reparameterisation noise) comes from the samples' seeds.
    """

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, pixels: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(pixels).latent_dist
        latents = posterior.mean + posterior.std * eps
        return self.vae.decode(latents).sample, posterior.mean, posterior.logvar

    def enable_gradient_checkpointing(self) -> None:
        self.vae.enable_gradient_checkpointing()


def _collate(items: list[dict[str, Any]], *, tokenizer: Any, caption_dropout: float) -> dict[str, Any]:
    captions = []
    for item in items:
        dropped = np.random.default_rng(sample_seed(item["seed"], CONDITION_STREAM)).random() < caption_dropout
        captions.append("" if dropped else item["caption"])
    input_ids = tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    return {
        "pixel_values": torch.stack([item["pixel_values"] for item in items]),
        "input_ids": input_ids,
        "seeds": [item["seed"] for item in items],
    }


def _load_scheduler(folder: Path) -> Any:
    import diffusers

    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
    return getattr(diffusers, config["_class_name"]).from_pretrained(folder, subfolder="scheduler")


class TextToImageRecipe(Recipe):
    name = "text-to-image"
    config_class = TextToImageConfig

    @classmethod
    def default_config(cls) -> dict[str, Any]:
        return {"train": {"learning_rate": 1e-4, "max_grad_norm": 1.0}}

    # -- build -----------------------------------------------------------------------------------------------------

    def build(self) -> dict[str, torch.nn.Module]:
        from diffusers import AutoencoderKL, DDPMScheduler, PNDMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        from ...sd15 import build_text_encoder, build_unet, build_vae, sd15_scheduler_config

        options, resolution = self.options, self.config.data.resolution
        if options.pretrained is not None:
            folder = options.pretrained
            self.unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
            self.vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
            self.text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
            self.tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
            self.noise_scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
            self.inference_scheduler = _load_scheduler(folder)
        else:
            from ...clip_tokenizer import load_clip_tokenizer

            unet_config, vae_config, text_config = options.model_configs(resolution)
            self.unet = build_unet(unet_config)
            self.vae = build_vae(vae_config)
            self.text_encoder = build_text_encoder(text_config)
            self.tokenizer = load_clip_tokenizer()
            self.noise_scheduler = DDPMScheduler.from_config(sd15_scheduler_config())
            self.inference_scheduler = PNDMScheduler.from_config(sd15_scheduler_config())  # as the SD1.5 release

        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.latent_shape = (self.vae.config.latent_channels, resolution // factor, resolution // factor)
        device = self.accelerator.device
        trainable = set(options.trainable)
        for name in COMPONENTS:
            model = getattr(self, name)
            model.requires_grad_(name in trainable)
            model.train(name in trainable)
        if "vae" in trainable:  # the UNet and text encoder wait on the CPU for the next stage
            return {"vae": VAEWithPosterior(self.vae)}
        # Frozen models stay float32 and run under autocast: the saved model is then exactly the loaded one.
        for name in COMPONENTS:
            if name not in trainable:
                getattr(self, name).to(device)
        return {name: getattr(self, name) for name in ("unet", "text_encoder") if name in trainable}

    def fresh_model(self, name: str) -> torch.nn.Module:
        if name == "vae":
            return VAEWithPosterior(type(self.vae).from_config(self.vae.config))
        return super().fresh_model(name)

    def collator(self) -> Any:
        return functools.partial(_collate, tokenizer=self.tokenizer, caption_dropout=self.options.caption_dropout)

    # -- loss ------------------------------------------------------------------------------------------------------

    def _normal(self, generators: list[torch.Generator], shape: tuple[int, ...]) -> torch.Tensor:
        """One standard-normal draw of ``shape`` per sample, each from its sample's generator."""
        return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(self.accelerator.device)

    def loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        generators = [torch.Generator().manual_seed(sample_seed(s, NOISE_STREAM)) for s in batch["seeds"]]
        pixels = batch["pixel_values"]
        if "vae" in self.models:
            recon, mean, logvar = self.models["vae"](pixels, self._normal(generators, self.latent_shape))
            rec = F.mse_loss(recon.float(), pixels.float())
            mean, logvar = mean.float(), logvar.float()
            kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
            return {"loss": rec + self.options.kl_weight * kl, "rec_loss": rec, "kl_loss": kl}

        eps = self._normal(generators, self.latent_shape)
        noise = self._normal(generators, self.latent_shape)
        num_timesteps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.stack([torch.randint(0, num_timesteps, (), generator=g) for g in generators])
        timesteps = timesteps.to(self.accelerator.device)
        with torch.no_grad(), self.accelerator.autocast():
            posterior = self.vae.encode(pixels).latent_dist
            latents = ((posterior.mean + posterior.std * eps) * self.vae.config.scaling_factor).float()
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if "text_encoder" in self.models:
            hidden = self.models["text_encoder"](batch["input_ids"])[0]
        else:
            with torch.no_grad(), self.accelerator.autocast():
                hidden = self.text_encoder(batch["input_ids"])[0]
        unet = self.models.get("unet", self.unet)
        with contextlib.nullcontext() if "unet" in self.models else self.accelerator.autocast():
            prediction = unet(noisy, timesteps, hidden).sample
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        return {"loss": F.mse_loss(prediction.float(), target.float())}

    # -- validate and save -----------------------------------------------------------------------------------------

    def _pipeline(self, unet: torch.nn.Module, vae: torch.nn.Module, text_encoder: torch.nn.Module) -> Any:
        from diffusers import StableDiffusionPipeline

        pipeline = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=self.tokenizer,
            unet=unet,
            scheduler=self.inference_scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    def validate(self) -> list[Image.Image]:
        from PIL import Image

        options = self.options
        if "vae" in self.models:  # each image: a training crop | its reconstruction
            vae = self.unwrap("vae").vae
            images = []
            for index in range(min(options.validation_images, len(self.dataset))):
                pixels = self.dataset[(index, index)]["pixel_values"][None].to(self.accelerator.device)
                with self.accelerator.autocast():
                    recon = vae.decode(vae.encode(pixels).latent_dist.mean).sample
                pair = torch.cat([pixels, recon.float()], dim=-1)[0].clamp(-1, 1)
                array = ((pair.permute(1, 2, 0).cpu().numpy() + 1) * 127.5).round().astype(np.uint8)
                images.append(Image.fromarray(array))
            return images

        unet = self.unwrap("unet") if "unet" in self.models else self.unet
        text_encoder = self.unwrap("text_encoder") if "text_encoder" in self.models else self.text_encoder
        pipeline = self._pipeline(unet, self.vae, text_encoder)
        size = self.config.data.resolution
        generator = torch.Generator().manual_seed(options.validation_seed)
        with self.accelerator.autocast():
            return pipeline(
                options.validation_prompts,
                height=size,
                width=size,
                num_inference_steps=options.validation_inference_steps,
                guidance_scale=options.validation_guidance_scale,
                generator=generator,
            ).images

    def save(self, output_dir: Path) -> None:
        from ...clip_tokenizer import save_clip_tokenizer
        from ...sd15 import save_pretrained_official

        exported = {name: self.export(name) for name in self.models}  # collective under FSDP/DeepSpeed
        if not self.accelerator.is_main_process:
            return
        vae = exported["vae"].vae if "vae" in exported else self.vae
        if "vae" in exported and self.options.scale_latents:
            scale = self._latent_scale(vae)
            vae.register_to_config(scaling_factor=scale)
            logger.info("VAE latents: scaling_factor set to %.5f (1 / their standard deviation)", scale)
        unet = exported.get("unet", self.unet)
        text_encoder = exported.get("text_encoder", self.text_encoder)
        self._pipeline(unet, vae, text_encoder).save_pretrained(output_dir, safe_serialization=True)
        # Rewrite the text encoder under the release's key names (transformers 5 would save flat CLIP names), and the
        # tokenizer in the release's files (transformers 5 writes only tokenizer.json).
        save_pretrained_official(text_encoder, output_dir / "text_encoder")
        tokenizer_dir = output_dir / "tokenizer"
        shutil.rmtree(tokenizer_dir)
        if self.options.pretrained is not None:
            shutil.copytree(self.options.pretrained / "tokenizer", tokenizer_dir)
        else:
            save_clip_tokenizer(tokenizer_dir, model_max_length=self.tokenizer.model_max_length)

    @torch.no_grad()
    def _latent_scale(self, vae: torch.nn.Module, max_images: int = 64, batch_size: int = 8) -> float:
        """1 / the standard deviation of the posterior latents of the first training images (center crops).

        Var(z) = Var(mean) + E[variance], so no sampling is needed.
        """
        count = min(max_images, len(self.dataset))
        means, variances = [], []
        for start in range(0, count, batch_size):
            items = [self.dataset[(i, i)]["pixel_values"] for i in range(start, min(start + batch_size, count))]
            with self.accelerator.autocast():
                posterior = vae.encode(torch.stack(items).to(self.accelerator.device)).latent_dist
            means.append(posterior.mean.float().flatten())
            variances.append(posterior.var.float().flatten())
        mean, variance = torch.cat(means), torch.cat(variances)
        std = math.sqrt(float(mean.var(unbiased=False) + variance.mean()))
        return 1.0 / std
