"""FactPipeline: FaceChain-FACT portraits from face photo(s) and a prompt, on any SD1.5-family base model.

Identity enters through the FACT face adapter (:mod:`idfusion.methods.fact`): the photos' TransFace tokens are
resampled to 16 face tokens each and appended to the 77 text tokens; the adapters at the UNet's 16 cross-attention
sites read them, the text path and an optional OpenPose ControlNet do not. Styles (a prompt template and an
optional style LoRA, :mod:`idfusion.styles`), pose control and inpainting (used by the fixed-template flow,
:mod:`idfusion.flows.template`) are options of the one ``__call__``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers.loaders import StableDiffusionLoraLoaderMixin

from ..errors import ModelFilesError
from ..hub import resolve_model_folder
from ..images import ImageInput, load_image
from ..loras import activate_loras
from ..methods import fact
from ..prompt_encoders import encode_text
from .core import (
    FaceAnalysisNeeds,
    FaceInput,
    IdentityInputError,
    IdentityPipeline,
    IdentityPipelineOutput,
    check_one_identity,
)
from .sd15_sampling import InpaintInput, sample_sd15

__all__ = ["FactPipeline", "FaceTokens", "MODEL_ID", "POSE_CONTROLNET"]

logger = logging.getLogger(__name__)

#: The release lives on ModelScope (revision v1.0.0), not on the Hugging Face Hub.
MODEL_ID = "yucheng1996/FaceChain-FACT"
DEFAULT_BASE_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
#: The OpenPose ControlNet the release uses (it ships a copy in ModelScope ``damo/face_chain_control_model``).
POSE_CONTROLNET = "lllyasviel/control_v11p_sd15_openpose"
BASE_REQUIRED_FILES = (
    "model_index.json",
    "unet/config.json",
    "text_encoder/config.json",
    "tokenizer/vocab.json",
    "vae/config.json",
    "scheduler/scheduler_config.json",
)
CONTROLNET_FOLDERS = ("controlnet", "control_v11p_sd15_openpose")

EXAMPLE = """
    >>> import torch
    >>> from idfusion.pipelines import FactPipeline
    >>> pipe = FactPipeline.from_pretrained("FaceChain-FACT/", base_model="majicmixRealistic_v6/").to("cuda")
    >>> out = pipe(faces=["me.jpg"], style="business-suit", num_images_per_prompt=4, seed=42)
    >>> out.images[0].save("me_0.png")
"""


@dataclass
class FaceTokens:
    """One person's face conditioning, computed once per request.

    Attributes:
        tokens: ``(1, 16k, D)`` face tokens of ``k`` photos.
        unconditional: ``(1, 16k, D)`` the null face (``resampler(zeros)``), the negative branch's face part.
        references: the 112x112 head-masked aligned crops the tokens were computed from.
    """

    tokens: torch.Tensor
    unconditional: torch.Tensor
    references: list[np.ndarray] = field(default_factory=list)

    @property
    def num_photos(self) -> int:
        return self.tokens.shape[1] // fact.TOKENS_PER_FACE


def _subfolder(folder: Path, *names: str) -> Path | None:
    return next((folder / n for n in names if (folder / n).is_dir()), None)


class FactPipeline(IdentityPipeline, StableDiffusionLoraLoaderMixin):
    """FaceChain-FACT generation: an SD1.5-family base whose UNet reads the FACT face adapter.

    Components: ``vae``, ``text_encoder``, ``tokenizer``, ``unet``, ``scheduler`` (PNDM, the release's), and the
    optional ``face_encoder`` (TransFace ViT-S), ``face_adapter`` (:class:`~idfusion.methods.fact.FactFaceAdapter`:
    resampler + 16 sites) and OpenPose ``controlnet``. The adapter loads, scales and unloads as diffusers' IP-Adapter
    does (:meth:`load_face_adapter`, :meth:`set_face_adapter_scale`, :meth:`unload_face_adapter`); without it the
    pipeline is its base model.
    """

    method = "fact"
    face_analysis = FaceAnalysisNeeds(dense_landmarks=True)
    default_settings = {k: fact.DEFAULTS[k] for k in ("num_inference_steps", "guidance_scale")}
    template_defaults = {"prompt": fact.TEMPLATE_PROMPT}
    model_cpu_offload_seq = "text_encoder->unet->vae"
    _optional_components = ["face_encoder", "face_adapter", "controlnet"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(
        self, vae, text_encoder, tokenizer, unet, scheduler, face_encoder=None, face_adapter=None, controlnet=None
    ):
        super().__init__()
        self.register_modules(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
            face_encoder=face_encoder, face_adapter=None, controlnet=None,
        )  # fmt: skip
        self._adapter_handle = None
        self.pose_preprocessor = None
        if face_adapter is not None:
            self.set_face_adapter(face_adapter)
        if controlnet is not None:
            self.set_pose_controlnet(controlnet)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike = MODEL_ID,
        *,
        adapter: str | os.PathLike = "majicmix",
        base_model: str | os.PathLike | None = None,
        controlnet: str | os.PathLike | None = None,
        face_model_dir: str | os.PathLike | None = None,
        pose_model_dir: str | os.PathLike | None = None,
        torch_dtype: torch.dtype | None = None,
        local_files_only: bool | None = None,
        **kwargs,
    ) -> FactPipeline:
        """Load the FACT release on an SD1.5-family base model, or a folder saved by :meth:`save_pretrained`.

        Args:
            pretrained_model_name_or_path: a folder with the files of ModelScope ``yucheng1996/FaceChain-FACT``
                (rev ``v1.0.0``): ``ms1mv2_model_TransFace_S.pt`` and the adapter ``.ckpt`` files.
            adapter: ``"majicmix"`` (default), ``"film"`` (the adapters trained on each official base) or an
                adapter checkpoint file.
            base_model: any SD1.5-family diffusers model (Hub id or folder). Default: the model folder's
                ``majicmix/`` or ``film/`` (matching ``adapter``), else its ``stable-diffusion-v1-5/``, else
                ``stable-diffusion-v1-5/stable-diffusion-v1-5`` (the adapters were trained on the fine-tunes;
                expect lower fidelity on other bases).
            controlnet: an OpenPose ControlNet (Hub id or folder). Default: the model folder's ``controlnet/``
                when present; otherwise ``lllyasviel/control_v11p_sd15_openpose`` is loaded when a pose is given.
            face_model_dir: ONNX face models (SCRFD); default the model folder's ``antelopev2/``, else dlib.
            pose_model_dir: DWPose ONNX models for pose estimation from photos; default the folder's ``dwpose/``.
            torch_dtype: dtype of every component.
            local_files_only: never contact the Hub (also implied by ``HF_HUB_OFFLINE=1``).
        """
        from diffusers import ControlNetModel, StableDiffusionPipeline

        from ..pose import PosePreprocessor

        dtype = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
        local = Path(pretrained_model_name_or_path).expanduser()
        if (local / "model_index.json").is_file():  # saved by save_pretrained
            pipe = cls.from_saved_folder(local, torch_dtype=torch_dtype, **kwargs)
            pipe.model_info = {"model": str(pretrained_model_name_or_path)}
            pipe.face_model_dir = Path(face_model_dir) if face_model_dir else None
            pipe.pose_preprocessor = PosePreprocessor(pose_model_dir)
            return pipe

        adapter_file = None
        if str(adapter) in fact.ADAPTER_FILES:
            adapter_name, required = str(adapter), [fact.TRANSFACE_FILE, fact.ADAPTER_FILES[str(adapter)]]
        else:
            adapter_file = Path(adapter).expanduser()
            if not adapter_file.is_file():
                raise ModelFilesError(
                    f"adapter {adapter!s}: expected 'majicmix', 'film' or an adapter .ckpt file that exists"
                )
            adapter_name, required = str(adapter_file), [fact.TRANSFACE_FILE]
        try:
            folder = resolve_model_folder(
                pretrained_model_name_or_path, required=required, what="FaceChain-FACT",
                local_files_only=local_files_only,
            )  # fmt: skip
        except ModelFilesError as error:
            raise ModelFilesError(
                f"{error} FaceChain-FACT's weights are published on ModelScope ({MODEL_ID}, revision v1.0.0): "
                "download them into a folder and pass that folder."
            ) from error
        adapter_file = adapter_file or folder / fact.ADAPTER_FILES[adapter_name]

        if base_model is None:
            base_model = _subfolder(folder, adapter_name, "stable-diffusion-v1-5")
            if base_model is None:
                base_model = DEFAULT_BASE_MODEL
                logger.warning(
                    "no base model given: using %s; the FACT adapters were trained on %s, which gives better "
                    "likeness (pass it with base_model=)",
                    DEFAULT_BASE_MODEL, fact.BASE_MODELS.get(adapter_name, "an SD1.5 fine-tune"),
                )  # fmt: skip
        base_folder = resolve_model_folder(
            base_model, required=BASE_REQUIRED_FILES, what="SD1.5 base model for FaceChain-FACT",
            allow_patterns=["*.json", "*.txt", "unet/*", "text_encoder/*", "vae/*"],
            local_files_only=local_files_only,
        )  # fmt: skip
        base = StableDiffusionPipeline.from_pretrained(
            base_folder, safety_checker=None, requires_safety_checker=False, local_files_only=True, **dtype
        )
        if controlnet is None:
            controlnet = _subfolder(folder, *CONTROLNET_FOLDERS)
        control = None
        if controlnet is not None:
            control_folder = resolve_model_folder(
                controlnet, required=["config.json"], what="OpenPose ControlNet", allow_patterns=["*.json", "*.safetensors"],
                local_files_only=local_files_only,
            )  # fmt: skip
            control = ControlNetModel.from_pretrained(control_folder, **dtype)

        face_encoder = fact.load_transface(folder / fact.TRANSFACE_FILE)
        pipe = cls(base.vae, base.text_encoder, base.tokenizer, base.unet, base.scheduler, face_encoder=face_encoder,
                   controlnet=control)  # fmt: skip
        pipe.load_face_adapter(adapter_file)
        pipe.model_info = {
            "model": str(pretrained_model_name_or_path),
            "adapter": adapter_name,
            "base_model": str(base_model),
            "model_files": {adapter_file.name: adapter_file, fact.TRANSFACE_FILE: folder / fact.TRANSFACE_FILE},
        }
        if control is not None:
            pipe.model_info["controlnet"] = str(controlnet)
        faces = _subfolder(folder, "antelopev2")
        pipe.face_model_dir = Path(face_model_dir) if face_model_dir else faces
        pipe.pose_preprocessor = PosePreprocessor(pose_model_dir or _subfolder(folder, "dwpose"))
        return pipe

    # ---- the face adapter: load / set scale / unload ---------------------------------------------------------

    def set_face_adapter(self, adapter: fact.FactFaceAdapter) -> None:
        """Use ``adapter`` (a :class:`~idfusion.methods.fact.FactFaceAdapter` for this UNet) from now on."""
        self.unload_face_adapter()
        width = self.text_encoder.config.hidden_size
        if adapter.config.cross_attention_dim != width:
            raise ValueError(
                f"the FACT adapter makes {adapter.config.cross_attention_dim}-wide face tokens, but the base model's "
                f"text encoder is {width} wide; FACT needs an SD1.5 base"
            )
        adapter = adapter.to(device=self.unet.device, dtype=self.unet.dtype)
        self._adapter_handle = fact.attach_face_adapter(self.unet, adapter)
        self.register_modules(face_adapter=adapter)

    def load_face_adapter(self, path: str | os.PathLike) -> fact.FactFaceAdapter:
        """Load an official adapter checkpoint (``adapter_*_00290001.ckpt``) for this pipeline's UNet."""
        self.set_face_adapter(fact.load_fact_adapter(path, self.unet))
        return self.face_adapter

    def set_face_adapter_scale(self, scale: float) -> None:
        """The adapter scale ``s`` (0 = the base model; the release uses 0.5, 0.55 when inpainting)."""
        fact.set_face_adapter_scale(self.unet, scale)

    def unload_face_adapter(self) -> None:
        """Detach the adapter: the UNet is its base model again, bit for bit."""
        if self._adapter_handle is not None:
            self._adapter_handle.remove()
            self._adapter_handle = None
        self.register_modules(face_adapter=None)

    # ---- faces -----------------------------------------------------------------------------------------------

    def face_crops(self, faces: Sequence[FaceInput]) -> list[np.ndarray]:
        """The head-masked 112x112 aligned crop of the largest face of each photo (spec §2.1)."""
        from ..faces.masks import head_mask

        found = self.photo_faces(faces)
        return [fact.face_crop(image, face.landmarks, head_mask(face, image.shape[:2])) for image, face in found]

    @torch.no_grad()
    def encode_faces(self, faces: Sequence[FaceInput] | FaceInput) -> FaceTokens:
        """Face tokens for one person from 1 or more photos: the expensive part of a request, done once.

        Several photos are one identity: each photo gives its own 16 tokens and the adapters attend to all of
        them together (``16k`` tokens), as the release does; the null face covers the same ``16k`` positions.
        """
        if not isinstance(faces, (list, tuple)):
            faces = [faces]
        if not faces:
            raise IdentityInputError("faces is empty: give at least one face photo")
        if self.face_encoder is None or self.face_adapter is None:
            raise ModelFilesError(
                "this FactPipeline has no TransFace encoder or face adapter; load them with from_pretrained"
            )
        crops = self.face_crops(faces)
        resampler = self.face_adapter.resampler
        tokens = fact.encode_face_tokens(self.face_encoder, resampler, np.stack(crops))
        return FaceTokens(tokens, resampler.unconditional(len(crops)), crops)

    def encode_identity(self, faces: Sequence[FaceInput] | FaceInput) -> dict[str, Any]:
        """The call arguments that stand for ``faces`` (encoded once, reused by every call)."""
        return {"face_tokens": self.encode_faces(faces)}

    # ---- pose ------------------------------------------------------------------------------------------------

    def set_pose_controlnet(self, controlnet) -> None:
        """Use ``controlnet`` for poses; its attention sees the text tokens only."""
        fact.attach_text_only_processors(controlnet)
        self.register_modules(controlnet=controlnet)

    def load_pose_controlnet(self, source: str | os.PathLike = POSE_CONTROLNET, local_files_only: bool | None = None):
        """Add an OpenPose ControlNet (Hub id or folder)."""
        from diffusers import ControlNetModel

        folder = resolve_model_folder(
            source, required=["config.json"], what="OpenPose ControlNet",
            allow_patterns=["config.json", "diffusion_pytorch_model.safetensors"], local_files_only=local_files_only,
        )  # fmt: skip
        controlnet = ControlNetModel.from_pretrained(folder, torch_dtype=self.unet.dtype).to(self.unet.device)
        self.set_pose_controlnet(controlnet)
        self.model_info["controlnet"] = str(source)
        return controlnet

    def pose_condition(self, pose_image: ImageInput, height: int, width: int, mode: str = "auto") -> PIL.Image.Image:
        """A skeleton image for the OpenPose ControlNet: a ready skeleton as given, or estimated from a photo."""
        from ..pose import PosePreprocessor

        if self.pose_preprocessor is None:
            self.pose_preprocessor = PosePreprocessor()
        return self.pose_preprocessor(pose_image, (height, width), mode)

    # ---- call ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        faces: Sequence[FaceInput] | FaceInput | None = None,
        *,
        face_tokens: FaceTokens | None = None,
        prompt: str | None = None,
        negative_prompt: str | None = None,
        style: Any = None,
        style_weight: float | None = None,
        adapter_scale: float | None = None,
        pose_image: ImageInput | None = None,
        pose_mode: str = "auto",
        controlnet_conditioning_scale: float = 1.0,
        image: ImageInput | None = None,
        mask_image: ImageInput | None = None,
        strength: float = 0.6,
        num_images_per_prompt: int = 1,
        seed: int | Sequence[int] | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        scheduler: str | None = None,
        height: int | None = None,
        width: int | None = None,
        loras: Sequence[tuple[str, float]] = (),
        output_type: str = "pil",
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ) -> IdentityPipelineOutput:
        """Generate portraits of the person in ``faces``.

        Args:
            faces: photo(s) of one person (paths, bytes, PIL or arrays). Each photo's largest face is used.
            face_tokens: :meth:`encode_faces` output instead of ``faces`` (reuse it across calls).
            prompt: the text prompt; with a ``style`` it fills the style's subject slot (default "a person").
            negative_prompt: default the style's, else the release-style negative prompt.
            style: a :class:`~idfusion.styles.Style`, a style name from the catalogue, or a ``.toml`` file.
            style_weight: weight of the style's LoRA (default the style's own).
            adapter_scale: the face adapter scale ``s`` (0 = the base model; default 0.5, inpainting 0.55).
            pose_image: a pose skeleton image, or a photo to estimate the pose from (needs DWPose models); drives
                the OpenPose ControlNet at ``controlnet_conditioning_scale``.
            pose_mode: ``"auto"`` (tell skeletons from photos), ``"skeleton"`` or ``"photo"``.
            image, mask_image, strength: inpaint ``image`` where ``mask_image`` is white, with ``strength``.
            num_images_per_prompt: 1 to 6 portraits (one seed each); the faces are encoded once for all of them.
            seed, generator: an int (images get ``seed, seed + 1, ...``), one seed per image, or generators.
            num_inference_steps, guidance_scale: default 50, 7.0 (inpainting 5.0); ``pipe.scheduler`` is PNDM.
            height, width: output size (multiples of 8); default 512 (the image's size when inpainting).
            loras: extra ``(file, weight)`` LoRAs (diffusers or kohya format).
            output_type, callback_on_step_end, callback_on_step_end_tensor_inputs: as diffusers.

        Returns:
            :class:`IdentityPipelineOutput` with images, per-image metadata and the reference crops.
        """
        # 1. Check inputs and fill the release's defaults
        inpainting = image is not None
        if inpainting != (mask_image is not None):
            raise ValueError("inpainting needs both image and mask_image")
        if not 1 <= num_images_per_prompt <= fact.MAX_IMAGES:
            raise ValueError(f"num_images_per_prompt must be 1 to {fact.MAX_IMAGES}, got {num_images_per_prompt}")
        if inpainting:
            init = load_image(image, name="image").to_pil()
            mask = load_image(mask_image, name="mask_image").to_pil().convert("L")
            if mask.size != init.size:
                raise ValueError(f"mask_image is {mask.size[0]}x{mask.size[1]}, image {init.size[0]}x{init.size[1]}")
            if not 0.0 < strength <= 1.0:
                raise ValueError(f"strength must be in (0, 1], got {strength}")
            height, width = height or init.size[1] // 8 * 8, width or init.size[0] // 8 * 8
        defaults = fact.INPAINT_DEFAULTS if inpainting else fact.DEFAULTS
        settings = self.prepare_settings(
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, scheduler=scheduler,
            height=height, width=width, seed=seed, generator=generator, num_images_per_prompt=num_images_per_prompt,
            defaults={k: defaults[k] for k in ("num_inference_steps", "guidance_scale")}, output_type=output_type,
        )  # fmt: skip
        self.check_callback(callback_on_step_end, callback_on_step_end_tensor_inputs)
        scale = defaults["adapter_scale"] if adapter_scale is None else float(adapter_scale)
        if not np.isfinite(scale) or scale < 0:
            raise ValueError(f"adapter_scale must be a finite number >= 0, got {adapter_scale}")

        # 2. Style: prompt template and LoRA, a pre-step like any SD1.5 pipeline's
        loras = list(loras)
        text, negative, styled = prompt if prompt is not None else fact.DEFAULT_PROMPT, negative_prompt, {}
        if style is not None:
            from ..styles import apply_style

            applied = apply_style(style, prompt, negative_prompt, style_weight=style_weight)
            text, negative, styled = applied.prompt, applied.negative_prompt, applied.metadata
            loras = ([applied.lora] if applied.lora else []) + loras
        elif style_weight is not None:
            raise ValueError("style_weight needs a style")
        negative = fact.NEGATIVE_PROMPT if negative is None else negative

        # 3. Face tokens, once per request
        check_one_identity(faces, face_tokens, "face_tokens")
        identity = face_tokens if face_tokens is not None else self.encode_faces(faces)

        # 4. LoRAs first (their text-encoder parts apply to this call's prompts). Context = [77 text tokens | 16k
        #    face tokens]; the negative branch gets the null face (face-CFG)
        lora_meta = activate_loras(self, loras)
        if styled.get("style_weight") is not None:
            lora_meta = lora_meta[1:]  # the style brings its own LoRA back on replay: not recorded twice
        dtype = self.unet.dtype
        text_embeds = encode_text(self.text_encoder, self.tokenizer, [text, negative]).to(dtype)
        prompt_embeds = torch.cat([text_embeds[:1], identity.tokens.to(text_embeds.device, dtype)], dim=1)
        negative_embeds = torch.cat([text_embeds[1:], identity.unconditional.to(text_embeds.device, dtype)], dim=1)
        self.set_face_adapter_scale(scale)
        models = [self.unet] + ([self.controlnet] if self.controlnet is not None else [])
        fact.set_num_face_tokens(*models, num_photos=identity.num_photos)

        # 5. Pose and inpainting inputs
        condition = None
        if pose_image is not None:
            if self.controlnet is None:
                self.load_pose_controlnet()
                fact.set_num_face_tokens(self.controlnet, num_photos=identity.num_photos)
            condition = self.pose_condition(pose_image, settings.height, settings.width, pose_mode)
        inpaint = None
        if inpainting:
            size = (settings.width, settings.height)
            inpaint = InpaintInput(
                init.resize(size, PIL.Image.LANCZOS), mask.resize(size, PIL.Image.BILINEAR), strength
            )

        # 6. Sample, and record what it takes to make each image again
        images = sample_sd15(
            self, prompt_embeds, negative_embeds, settings, controlnet_image=condition,
            controlnet_conditioning_scale=controlnet_conditioning_scale, inpaint=inpaint, output_type=output_type,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=tuple(callback_on_step_end_tensor_inputs),
        )  # fmt: skip
        return self.result(
            images, settings, identity.references, **styled, prompt=prompt, composed_prompt=text,
            negative_prompt=negative, adapter_scale=scale, num_face_photos=identity.num_photos,
            loras=lora_meta or None, pose=pose_mode if pose_image is not None else None,
            controlnet_conditioning_scale=controlnet_conditioning_scale if pose_image is not None else None,
            strength=inpaint.strength if inpaint is not None else None,
        )  # fmt: skip
