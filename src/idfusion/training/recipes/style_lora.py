"""``style-lora``: train a style LoRA on the UNet of an SD1.5 folder, as FaceChain's "Style Model Training" tab does.

FaceChain (spec ``facechain-fact.md`` §8) trains a text-to-image LoRA with diffusers and peft on the UNet only:
``to_k, to_q, to_v, to_out.0`` at rank ``r`` (default 32) with ``lora_alpha = r``, learning rate 1e-4 constant,
batch 1, random flips, 512 px, captions ``"<trigger>, <tags>"``. It writes kohya-style keys (``lora_unet_...``) to
``lora_weights.safetensors`` and a style prompt of the tags found in more than half of the images. This recipe does
the same on idfusion's training core: the diffusion loss of the ``text-to-image`` recipe (this class reuses its loss
and collator) with the UNet behind ``unet.add_adapter(LoraConfig(...))``, as diffusers' ``train_text_to_image_lora``.

Input: ``recipe.images``, a folder of style images (searched recursively, hidden files left out) with optional
sidecar captions ``<stem>.txt``, plus any ``data.train`` records (plain image + caption records are enough). A caption
without the trigger gets it in front (``"<trigger>, <caption>"``); an image without a caption gets ``recipe.caption``
(default ``"{trigger}"``).

Output (``model/``), usable as it is::

    lora_weights.safetensors           the LoRA: kohya keys with alphas (lora_format: kohya, the default), or
    pytorch_lora_weights.safetensors   diffusers keys with the LoraConfig in the metadata (lora_format: diffusers)
    style.toml                         one [[style]]: name, prompt (with the trigger and the style words), lora, weight

``--style runs/my-style/model/style.toml`` (or the folder in ``$IDFUSION_STYLES`` and ``--style my-style``) applies
it with any method that takes styles; ``--lora runs/my-style/model`` applies the LoRA alone. Checkpoints hold the
LoRA weights only (accelerate save/load hooks), not the UNet.

Example config::

    recipe:
      name: style-lora
      pretrained: models/stable-diffusion-v1-5
      images: photos/my-style
      style_name: my-style
      trigger: mystyle
    data:
      resolution: 512                  # data.train: optional records of more style images
    train:
      max_steps: 2000                  # FaceChain: 200 epochs at batch 1 = 200 x the number of images
    output_dir: runs/my-style
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from ..checkpoints import CheckpointError
from ..config import ConfigError, ConfigFieldError, between, existing_folder, non_negative, positive, setting
from ..data import DataError, ImageCaptionDataset, ImageRecord, read_records
from ..prepare import IMAGE_SUFFIXES
from ..recipe import RecipeConfig
from .text_to_image import TextToImageRecipe, _load_scheduler

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "GENERIC_TAGS",
    "StyleLoraConfig",
    "StyleLoraRecipe",
    "kohya_state_dict",
    "style_records",
    "style_words",
    "write_style_lora",
]

logger = logging.getLogger(__name__)

KOHYA_FILE = "lora_weights.safetensors"  # FaceChain's name for the converted LoRA
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"  # diffusers' name (what load_lora_weights looks for)
STYLE_FILE = "style.toml"
#: Tags FaceChain leaves out of its auto style prompt (its prompt template has them already).
GENERIC_TAGS = frozenset(
    {"upper_body", "raw photo", "masterpiece", "solo", "medium shot", "high detail face", "photorealistic",
     "best quality", "1girl"}
)  # fmt: skip
DEFAULT_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")


# --------------------------------------------------------------------------------------------------------------------
# Captions and records
# --------------------------------------------------------------------------------------------------------------------


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        and p.is_file()
    )


def _fill(template: str, trigger: str, words: str) -> str:
    """``template`` with ``{trigger}`` and ``{style_words}`` filled in, dropping the commas of empty parts."""
    text = template.replace("{trigger}", trigger).replace("{style_words}", words)
    text = re.sub(r",(?:\s*,)+", ",", text)  # "a, , b" -> "a, b"
    return re.sub(r"^[\s,]+|[\s,]+$", "", text)


def _with_trigger(caption: str, trigger: str, template: str) -> str:
    """FaceChain's caption ``"<trigger>, <tags>"``; the template's text where there is no caption."""
    caption = " ".join(caption.split())
    if not caption:
        return _fill(template, trigger, "")
    if not trigger or trigger.strip() in (tag.strip() for tag in caption.split(",")):
        return caption
    return f"{trigger}, {caption}"


def _sidecar_caption(image: Path) -> str:
    sidecar = image.with_suffix(".txt")
    if not sidecar.is_file():
        return ""
    try:
        return sidecar.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{sidecar}: caption sidecar not readable as UTF-8 text ({error})") from None


def style_records(folder: str | Path, *, trigger: str = "", caption: str = "{trigger}") -> list[ImageRecord]:
    """The style images of ``folder`` (recursively, sorted) as plain image + caption records.

    Args:
        folder: the images (``.jpg .jpeg .png .webp .bmp .tif .tiff``) with optional ``<stem>.txt`` captions.
        trigger: the trigger word(s), put in front of every caption that lacks them.
        caption: the caption of an image without a sidecar; ``{trigger}`` is replaced by ``trigger``.

    Raises:
        DataError: no images, or an image or caption that cannot be read (the message names the file).
    """
    from PIL import Image, UnidentifiedImageError

    folder = Path(folder)
    files = _image_files(folder)
    if not files:
        raise DataError(f"{folder}: no style images (looked for {' '.join(IMAGE_SUFFIXES)} files)")
    records = []
    for path in files:
        try:
            with Image.open(path) as handle:  # the header only
                width, height = handle.size
        except (OSError, UnidentifiedImageError) as error:
            raise DataError(f"{path}: not a readable image ({error})") from None
        text = _with_trigger(_sidecar_caption(path), trigger, caption)
        records.append(ImageRecord(image=path.resolve(), width=width, height=height, caption=text, source=str(path)))
    return records


def style_words(captions: Sequence[str], *, exclude: Sequence[str] = (), share: float = 0.5) -> list[str]:
    """FaceChain's auto style prompt: the comma-separated tags found in more than ``share`` of the captions, most
    frequent first, leaving out :data:`GENERIC_TAGS` and ``exclude`` (the trigger words)."""
    left_out = GENERIC_TAGS | {t.strip() for t in exclude}
    counts: Counter[str] = Counter()
    first: dict[str, int] = {}
    for caption in captions:
        for tag in dict.fromkeys(t.strip() for t in caption.split(",")):
            if tag and tag not in left_out:
                counts[tag] += 1
                first.setdefault(tag, len(first))
    common = [tag for tag, count in counts.items() if count > share * len(captions)]
    return sorted(common, key=lambda tag: (-counts[tag], first[tag]))


# --------------------------------------------------------------------------------------------------------------------
# The LoRA file
# --------------------------------------------------------------------------------------------------------------------


def kohya_state_dict(peft_state: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """peft UNet LoRA weights (``down_blocks.0....to_q.lora_A.weight``) under kohya's keys
    (``lora_unet_down_blocks_0_..._to_q.lora_down.weight``, ``.lora_up.weight``, ``.alpha``), as FaceChain's
    ``convert_lora.py`` writes them. diffusers' ``convert_state_dict_to_kohya`` would write ``alpha = rank``
    whatever the training's ``lora_alpha``; here the alpha is the one trained with."""
    kohya: dict[str, torch.Tensor] = {}
    for key, tensor in peft_state.items():
        module, sep, tail = key.rpartition(".lora_")
        if not sep or tail not in ("A.weight", "B.weight"):
            raise ValueError(f"not a peft LoRA weight: {key}")
        name = "lora_unet_" + module.replace(".", "_")
        kohya[f"{name}.lora_{'down' if tail == 'A.weight' else 'up'}.weight"] = tensor.detach().contiguous()
        kohya[f"{name}.alpha"] = torch.tensor(float(alpha))
    return kohya


def write_style_lora(
    unet: torch.nn.Module, path: Path, *, lora_format: Literal["kohya", "diffusers"], metadata: dict[str, str]
) -> Path:
    """Write the LoRA of a peft-adapted diffusers UNet (its ``"default"`` adapter) to ``path`` (safetensors)."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    config = unet.peft_config["default"]
    state = {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(unet).items()}
    if lora_format == "kohya":
        info = {"ss_network_module": "networks.lora", "ss_network_dim": str(config.r),
                "ss_network_alpha": str(config.lora_alpha)}  # fmt: skip
        save_file(kohya_state_dict(state, config.lora_alpha), path, metadata={**info, **metadata})
        return path
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    # The LoraConfig goes into the file's metadata, so a lora_alpha other than the rank loads right.
    StableDiffusionPipeline.save_lora_weights(
        path.parent,
        unet_lora_layers=convert_state_dict_to_diffusers(state),
        weight_name=path.name,
        safe_serialization=True,
        unet_lora_adapter_metadata=config.to_dict(),
    )
    return path


def _toml_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # JSON's escapes are TOML basic-string escapes


# --------------------------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class StyleLoraConfig(RecipeConfig):
    name: str = "style-lora"
    pretrained: Path | None = setting(None, check=existing_folder)  # the SD1.5 diffusers folder (required)
    images: Path | None = setting(None, check=existing_folder)  # folder of style images (+ <stem>.txt captions)
    trigger: str = ""  # trigger word(s), put in front of each caption (FaceChain: "<trigger>, <tags>")
    caption: str = "{trigger}"  # caption of an image without one
    # the style: its name, the prompt template ({subject} stays for the user's prompt; {trigger} and
    # {style_words}, the tags of more than half of the captions, are filled in at the end), LoRA weight
    style_name: str = "my-style"
    title: str | None = None
    prompt: str = "{subject}, {trigger}, {style_words}"
    negative_prompt: str | None = None
    weight: float = setting(0.8, check=between(0, 2))  # FaceChain applies user-trained styles at 0.8
    base_model: str | None = None  # hint written to the style: the base model it was trained for
    # the LoRA (FaceChain: to_k/q/v/out.0, r 32, alpha = r)
    rank: int = setting(32, check=positive)
    lora_alpha: float | None = setting(None, check=positive)  # null: the rank (scale 1)
    target_modules: list[str] = setting(factory=lambda: list(DEFAULT_TARGETS))
    init_lora_weights: Literal["gaussian", "default"] = "gaussian"  # peft's; diffusers' script uses gaussian
    lora_format: Literal["kohya", "diffusers"] = "kohya"
    caption_dropout: float = setting(0.0, check=between(0, 1))  # p(caption -> ""); FaceChain: none
    validation_prompts: list[str] | None = None  # null: the style's prompt with the default subject
    validation_inference_steps: int = setting(20, check=positive)
    validation_guidance_scale: float = setting(5.0, check=non_negative)
    validation_seed: int = setting(0, check=non_negative)

    def __post_init__(self) -> None:
        from ...styles import Style, StyleError

        if self.pretrained is None:
            raise ConfigFieldError("pretrained", "missing: give the SD1.5 diffusers folder to train the LoRA on")
        if not (self.pretrained / "model_index.json").is_file() or not (self.pretrained / "unet").is_dir():
            raise ConfigFieldError(
                "pretrained", f"not a diffusers SD1.5 folder (no model_index.json and unet/): {self.pretrained}"
            )
        if self.images is not None and not _image_files(self.images):
            raise ConfigFieldError("images", f"no images ({' '.join(IMAGE_SUFFIXES)}) in {self.images}")
        if "{" in self.trigger or "}" in self.trigger:
            raise ConfigFieldError("trigger", f"may not contain braces, got {self.trigger!r}")
        if not self.target_modules:
            raise ConfigFieldError("target_modules", "expected module names such as to_q, got []")
        rest = self.caption.replace("{trigger}", "")
        if "{" in rest or "}" in rest:
            raise ConfigFieldError("caption", f"may contain no braces other than {{trigger}}: {self.caption!r}")
        if not _fill(self.caption, self.trigger, "") and self.caption_dropout < 1:
            logger.warning("recipe.caption is empty: images without a caption train the unconditional branch")
        # The style must be valid now, not after training: build it with stand-ins for what training adds.
        checks = [("style_name", "name"), ("prompt", "prompt"), ("negative_prompt", "negative_prompt")]
        try:
            Style(name=self.style_name, prompt=_fill(self.prompt, self.trigger, "words"), title=self.title,
                  negative_prompt=self.negative_prompt, lora=KOHYA_FILE, weight=self.weight,
                  base_model=self.base_model)  # fmt: skip
        except StyleError as error:
            message = str(error)
            field = next((ours for ours, key in checks if f"'{key}'" in message), "prompt")
            raise ConfigFieldError(field, message.split(": ", 1)[-1]) from None

    @property
    def alpha(self) -> float:
        return float(self.rank if self.lora_alpha is None else self.lora_alpha)


# --------------------------------------------------------------------------------------------------------------------
# Recipe
# --------------------------------------------------------------------------------------------------------------------


class StyleLoraRecipe(TextToImageRecipe):
    """A UNet LoRA for a style; the loss and collator are the ``text-to-image`` recipe's (UNet stage)."""

    name = "style-lora"
    config_class = StyleLoraConfig

    @classmethod
    def default_config(cls) -> dict[str, Any]:
        # FaceChain's trainer: lr 1e-4 constant, no warm-up, batch 1, random flips; diffusers' clipping at 1.0
        return {
            "train": {"learning_rate": 1e-4, "lr_scheduler": "constant", "lr_warmup_steps": 0, "batch_size": 1,
                      "max_grad_norm": 1.0},
            "data": {"random_flip": True},
        }  # fmt: skip

    @classmethod
    def needs_data_train(cls, options: StyleLoraConfig) -> bool:
        return options.images is None

    def build_dataset(self) -> ImageCaptionDataset:
        options, data = self.options, self.config.data
        records = []
        if options.images is not None:
            records += style_records(options.images, trigger=options.trigger, caption=options.caption)
        for record in read_records(data.train, check_files=data.check_files):
            text = _with_trigger(record.caption, options.trigger, options.caption)
            records.append(record if text == record.caption else _replace_caption(record, text))
        self.captions = [record.caption for record in records]
        logger.info("style-lora: %d images, e.g. caption %r", len(records), self.captions[0])
        return ImageCaptionDataset(
            records, data.resolution, center_crop=data.center_crop, random_flip=data.random_flip
        )

    def build(self) -> dict[str, torch.nn.Module]:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        folder = self.options.pretrained
        self.unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
        self.vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
        self.text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
        self.tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
        self.noise_scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
        self.inference_scheduler = _load_scheduler(folder)
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        size = self.config.data.resolution
        self.latent_shape = (self.vae.config.latent_channels, size // factor, size // factor)
        # Frozen models stay float32 and run under autocast; only the LoRA weights train.
        for model in (self.unet, self.vae, self.text_encoder):
            model.requires_grad_(False)
        self.vae.eval()
        self.text_encoder.eval()
        self._add_adapter(self.unet)
        device = self.accelerator.device
        self.unet.to(device)
        self.vae.to(device)
        self.text_encoder.to(device)
        self.accelerator.register_save_state_pre_hook(self._save_lora_only)
        self.accelerator.register_load_state_pre_hook(self._load_lora_only)
        return {"unet": self.unet}

    def _add_adapter(self, unet: torch.nn.Module) -> None:
        from peft import LoraConfig

        options = self.options
        config = LoraConfig(
            r=options.rank,
            lora_alpha=options.alpha,
            init_lora_weights=True if options.init_lora_weights == "default" else "gaussian",
            target_modules=list(options.target_modules),
        )
        try:
            unet.add_adapter(config)
        except ValueError as error:  # peft: "Target modules {...} not found in the base model"
            raise ConfigError(f"recipe.target_modules: {error}") from None

    def fresh_model(self, name: str) -> torch.nn.Module:
        unet = super().fresh_model(name)
        self._add_adapter(unet)
        return unet

    # -- checkpoints: the LoRA weights, not the frozen UNet ----------------------------------------------------------

    def _unet_index(self, models: list[torch.nn.Module]) -> int | None:
        # accelerate's list holds the DDP wrapper on GPUs but the bare model under CPU DDP: compare bare models
        unet = self.unwrap("unet")
        return next((i for i, model in enumerate(models) if self.accelerator.unwrap_model(model) is unet), None)

    def _save_lora_only(self, models: list[torch.nn.Module], weights: list[dict[str, Any]], output_dir: str) -> None:
        index = self._unet_index(models)
        if index is None or index >= len(weights):  # FSDP/DeepSpeed save their own way
            return
        unet = self.unwrap("unet")
        weights[index] = {n: p.detach().contiguous() for n, p in unet.named_parameters() if p.requires_grad}

    def _load_lora_only(self, models: list[torch.nn.Module], input_dir: str) -> None:
        from accelerate.utils import SAFE_WEIGHTS_NAME, DistributedType
        from safetensors.torch import load_file

        index = self._unet_index(models)
        if index is None or self.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            return
        name = SAFE_WEIGHTS_NAME if index == 0 else SAFE_WEIGHTS_NAME.replace(".", f"_{index}.")
        path = Path(input_dir) / name
        models.pop(index)  # accelerate would load a full UNet state strictly
        unet = self.unwrap("unet")
        state = load_file(path, device=str(self.accelerator.device))
        wanted = {n for n, p in unet.named_parameters() if p.requires_grad}
        hint = "check recipe.rank and recipe.target_modules against the checkpoint's config.yaml"
        if set(state) != wanted:
            missing, extra = sorted(wanted - set(state)), sorted(set(state) - wanted)
            raise CheckpointError(
                f"{path}: not this run's LoRA (missing {missing[:3]}, unexpected {extra[:3]}); {hint}"
            )
        try:
            unet.load_state_dict(state, strict=False)
        except RuntimeError as error:  # shapes: another rank
            raise CheckpointError(
                f"{path}: not this run's LoRA ({str(error).splitlines()[-1].strip()}); {hint}"
            ) from None

    # -- validate and save -------------------------------------------------------------------------------------------

    def style_prompt(self) -> str:
        """The style's prompt template: the config's, with the trigger and the auto style words filled in."""
        options = self.options
        words = style_words(self.captions, exclude=[t for t in options.trigger.split(",") if t.strip()])
        return _fill(options.prompt, options.trigger, ", ".join(words))

    def validate(self) -> list[Image.Image]:
        """Each validation prompt without, then with the LoRA (same seed)."""
        from ...styles import DEFAULT_SUBJECT

        options = self.options
        prompts = options.validation_prompts or [self.style_prompt().replace("{subject}", DEFAULT_SUBJECT)]
        unet = self.unwrap("unet")
        pipeline = self._pipeline(unet, self.vae, self.text_encoder)
        size = self.config.data.resolution
        images = []
        for enabled in (False, True):
            if enabled:
                unet.enable_adapters()
            else:
                unet.disable_adapters()
            with self.accelerator.autocast():
                images += pipeline(
                    prompts,
                    height=size,
                    width=size,
                    num_inference_steps=options.validation_inference_steps,
                    guidance_scale=options.validation_guidance_scale,
                    generator=torch.Generator().manual_seed(options.validation_seed),
                ).images
        return images

    def save(self, output_dir: Path) -> None:
        from ...styles import load_style_file

        unet = self.export("unet")  # collective under FSDP/DeepSpeed
        if not self.accelerator.is_main_process:
            return
        options = self.options
        file = KOHYA_FILE if options.lora_format == "kohya" else DIFFUSERS_FILE
        metadata = {"idfusion_recipe": self.name, "idfusion_trigger": options.trigger,
                    "idfusion_style": options.style_name}  # fmt: skip
        write_style_lora(unet, output_dir / file, lora_format=options.lora_format, metadata=metadata)
        prompt = self.style_prompt()
        description = (
            f"style LoRA trained by idfusion's style-lora recipe on {len(self.captions)} images from "
            f"{options.pretrained.name}: rank {options.rank}, alpha {options.alpha:g}, {self.config.train.max_steps} "
            f"steps; trigger {options.trigger!r}"
        )
        lines = ["[[style]]", f"name = {_toml_string(options.style_name)}"]
        if options.title:
            lines.append(f"title = {_toml_string(options.title)}")
        lines.append(f"prompt = {_toml_string(prompt)}")
        if options.negative_prompt is not None:
            lines.append(f"negative_prompt = {_toml_string(options.negative_prompt)}")
        lines += [f"lora = {_toml_string(file)}", f"weight = {options.weight!r}"]
        if options.base_model:
            lines.append(f"base_model = {_toml_string(options.base_model)}")
        lines.append(f"description = {_toml_string(description)}")
        style_file = output_dir / STYLE_FILE
        style_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
        load_style_file(style_file)  # the file must read back (a StyleError here is a bug)
        logger.info("style %r: %s (prompt %r)", options.style_name, style_file, prompt)


def _replace_caption(record: ImageRecord, caption: str) -> ImageRecord:
    import dataclasses

    return dataclasses.replace(record, caption=caption)
