"""FactPipeline: FaceChain-FACT portraits from face photo(s) and a prompt, on any SD1.5-family base model.

Identity enters through the FACT face adapter (:mod:`idfusion.methods.fact`): the photos' TransFace tokens are
resampled to 16 face tokens each and appended to the 77 text tokens; the adapters at the UNet's 16 cross-attention
sites read them, the text path and the ControlNets (OpenPose, Canny) do not. Styles (a prompt template and a style
LoRA, :mod:`idfusion.styles`), pose and Canny control and inpainting (used by the fixed-template flow,
:mod:`idfusion.flows.template`) are options of the one ``__call__``.

By default the pipeline does what the release does (spec ``facechain-fact.md`` §5): its prompts word for word, its
default style LoRA in text-to-image when the style brings none, each style on its own base model and adapter, the
photo downsized to 1000 px (2000 px for templates) and its highest-scoring face, TransFace and the resampler in
float32, [OpenPose, Canny] at [1.0, 0.2] for templates. Each of these has an option; the differences that remain
are listed in :class:`FactPipeline`'s docstring.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers.loaders import StableDiffusionLoraLoaderMixin

from ..errors import ModelFilesError
from ..hub import SD15_PIPELINE_FILES, SD15_REPO, resolve_model_folder
from ..images import ImageInput, load_image
from ..loras import activate_loras
from ..methods import fact
from ..prompt_encoders import encode_text
from ..registry import get_method
from .core import (
    FaceAnalysisNeeds,
    FaceInput,
    IdentityInputError,
    IdentityPipeline,
    IdentityPipelineOutput,
    check_one_identity,
    load_base_components,
)
from .sd15_sampling import InpaintInput, sample_sd15

__all__ = ["FactPipeline", "FaceTokens", "MODEL_ID", "POSE_CONTROLNET", "CANNY_CONTROLNET"]

logger = logging.getLogger(__name__)

#: The release lives on ModelScope (revision v1.0.0), not on the Hugging Face Hub; the registry's download data is
#: the one place that says so (``idfusion download`` reads it too).
_RELEASE = get_method("fact").downloads[0]
MODEL_ID = _RELEASE.repo_id
#: Where to get it, for messages.
SOURCE = _RELEASE.published
DEFAULT_BASE_MODEL = SD15_REPO
#: The OpenPose ControlNet the release uses (it ships a copy in ModelScope ``damo/face_chain_control_model``).
POSE_CONTROLNET = "lllyasviel/control_v11p_sd15_openpose"
BASE_REQUIRED_FILES = SD15_PIPELINE_FILES
CONTROLNET_FOLDERS = ("controlnet", "control_v11p_sd15_openpose")
#: A public Canny ControlNet for SD1.5; the release uses its own copy (ModelScope ``ly261666/cv_wanx_style_model``
#: rev v1.0.3, folder ``contronet-canny``), which loads from a folder of that name too.
CANNY_CONTROLNET = "lllyasviel/control_v11p_sd15_canny"
CANNY_CONTROLNET_FOLDERS = ("canny_controlnet", "contronet-canny", "control_v11p_sd15_canny")
#: What a saved pipeline remembers beyond its components (the adapter's name, the default style LoRA's file).
SAVED_INFO_FILE = "idfusion_fact.json"
PROMPT_WORDINGS = ("release", "idfusion")
DEFAULT_LORA_MODES = ("auto", "on", "off")
STYLE_BASE_MODES = ("tie", "any")
_UNSET = object()
#: What a saved folder's ``settings`` (in ``model_index.json``) may set: the defaults of a model trained by idfusion
#: (e.g. the synthetic world's FACT) where they differ from the release's.
SETTINGS = {
    "num_inference_steps": int,
    "guidance_scale": float,
    "adapter_scale": float,  # the face adapter scale s
    "negative_prompt": str,  # the negative text ("": the empty prompt)
    "default_lora": str,  # the release's default style LoRA: auto / on / off
    "base_model": str,  # a saved folder without some of BASE_COMPONENTS loads them from this SD1.5 folder
}
#: The components a saved folder may take from its ``base_model`` (frozen in FACT training, so equal to the base's).
BASE_COMPONENTS = ("vae", "text_encoder", "tokenizer", "unet")


def _check_settings(settings: dict) -> dict:
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise ValueError(f"unknown FACT settings {unknown}; known: {', '.join(SETTINGS)}")
    for key, value in settings.items():
        kind = SETTINGS[key]
        number = kind in (int, float) and not isinstance(value, bool)
        if kind is float and number and isinstance(value, int):
            value = float(value)
        if not isinstance(value, kind) or (kind in (int, float) and not (number and np.isfinite(value))):
            raise ValueError(f"FACT setting {key!r} must be a {kind.__name__}, got {value!r}")
    if settings.get("default_lora", "auto") not in DEFAULT_LORA_MODES:
        raise ValueError(f"FACT setting 'default_lora' must be one of {', '.join(DEFAULT_LORA_MODES)}")
    return dict(settings)


def _import_idfusion_components(config: dict) -> None:
    """Import the idfusion modules whose classes a saved folder names (diffusers loads only from imported modules),
    e.g. the world's face encoder; other libraries are left to diffusers."""
    import importlib

    for value in config.values():
        if isinstance(value, list) and len(value) == 2 and str(value[0]).startswith("idfusion."):
            importlib.import_module(value[0])


EXAMPLE = """
    >>> import torch
    >>> from idfusion.pipelines import FactPipeline
    >>> pipe = FactPipeline.from_pretrained("FaceChain-FACT/", base_model="majicmixRealistic_v6/").to("cuda")
    >>> out = pipe(faces=["me.jpg"], style="cheongsam", num_images_per_prompt=4, seed=42)
    >>> out.images[0].save("me_0.png")
"""


@dataclass
class FaceTokens:
    """One person's face conditioning, computed once per request.

    Attributes:
        tokens: ``(1, 16k, D)`` float32 face tokens of ``k`` photos (cast to the UNet's dtype in the context).
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
    resampler + 16 sites), OpenPose ``controlnet`` and ``canny_controlnet``. The adapter loads, scales and unloads as
    diffusers' IP-Adapter does (:meth:`load_face_adapter`, :meth:`set_face_adapter_scale`,
    :meth:`unload_face_adapter`); without it the pipeline is its base model.

    What the release does and this pipeline mirrors by default, with the option that changes it:

    - prompts: the release's strings word for word, A1111 weights included (``prompt_wording="idfusion"``: plainer
      wording); styles fill their ``{subject}`` slot, FaceChain style ``.json`` files compose as the release does;
    - style LoRA: text-to-image always merges one, the release's default style LoRA (``zjz_mj_jiyi_small_addtxt_
      fromleo``, found in the model folder or the ModelScope cache) at weight 0.25 when the style has none; templates
      merge none (``default_lora="on"``/``"off"``);
    - a style made for one base model (``base_model = "film"``/``"majicmix"``) runs only with that adapter
      (``style_base="any"``);
    - the photo is downsized to 1000 px (2000 px for templates) before masking and alignment, and its
      highest-scoring face is used (``max_photo_side``);
    - TransFace and the resampler stay float32 under a float16/bfloat16 pipeline (autocast only around TransFace's
      linear layers, on CUDA);
    - templates inpaint with [OpenPose, Canny] at [1.0, 0.2] when both ControlNets are loaded
      (:meth:`template_controls`, ``controlnet_conditioning_scale``).

    A folder saved by idfusion's ``fact`` training recipe may carry ``settings`` (:data:`SETTINGS`: sampling steps,
    guidance, adapter scale, negative prompt, default LoRA) that replace the release's call defaults, and may take
    its frozen components (VAE, text encoder, tokenizer, UNet) from a ``base_model`` folder (the synthetic world's).

    What differs from the release (no option brings the release's behaviour back):

    - no FairFace gender/age prompt prefix (the subject is "a person" unless the prompt says who), and no ", children"
      negative for men;
    - no ABPN skin retouching of the photo and no face fusion of the results;
    - the head mask and face region come from landmarks, not from M2FP parsing (:mod:`idfusion.faces.masks`), and
      the face is chosen before masking (the release detects on its head-masked photo);
    - style LoRAs are applied through peft (unfused, restored exactly) instead of merged into the weights in place;
    - faces are encoded once per request, not once per image; seeds are fixed and recorded.
    """

    method = "fact"
    face_analysis = FaceAnalysisNeeds(dense_landmarks=True)
    default_settings = {k: fact.DEFAULTS[k] for k in ("num_inference_steps", "guidance_scale")}
    #: the template flow encodes the photo at the release's template size (2000 px); its prompts, LoRA and
    #: ControlNets are this pipeline's inpainting defaults
    template_defaults = {"identity_options": {"max_photo_side": fact.INPAINT_PHOTO_MAX_SIDE}}
    model_cpu_offload_seq = "text_encoder->unet->vae"
    _optional_components = ["face_encoder", "face_adapter", "controlnet", "canny_controlnet"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(
        self,
        vae,
        text_encoder,
        tokenizer,
        unet,
        scheduler,
        face_encoder=None,
        face_adapter=None,
        controlnet=None,
        canny_controlnet=None,
        settings: dict | None = None,
    ):
        super().__init__()
        self.register_modules(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
            face_encoder=face_encoder, face_adapter=None, controlnet=None, canny_controlnet=None,
        )  # fmt: skip
        self.register_to_config(settings=_check_settings(settings) if settings else None)
        self._adapter_handle = None
        self.pose_preprocessor = None
        #: the release's default style LoRA file: a path, ``None`` (absent) or not looked for yet
        self._default_style_lora: Any = _UNSET
        self._warned_default_lora = False
        if face_adapter is not None:
            self.set_face_adapter(face_adapter)
        if controlnet is not None:
            self.set_pose_controlnet(controlnet)
        if canny_controlnet is not None:
            self.set_canny_controlnet(canny_controlnet)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike = MODEL_ID,
        *,
        adapter: str | os.PathLike = "majicmix",
        base_model: str | os.PathLike | None = None,
        controlnet: str | os.PathLike | None = None,
        canny_controlnet: str | os.PathLike | None = None,
        default_style_lora: str | os.PathLike | bool | None = None,
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
            canny_controlnet: a Canny ControlNet (Hub id or folder), the template flow's second condition. Default:
                the model folder's ``canny_controlnet/`` or ``contronet-canny/`` (the release's folder name) when
                present; otherwise none (templates then use the pose alone).
            default_style_lora: the release's default style LoRA file
                (``zjz_mj_jiyi_small_addtxt_fromleo.safetensors``); default: looked for in the model folder (as is
                or in a folder of its repo name) and the ModelScope cache; ``False``: never use one.
            face_model_dir: ONNX face models (SCRFD); default the model folder's ``antelopev2/``, else dlib.
            pose_model_dir: DWPose ONNX models for pose estimation from photos; default the folder's ``dwpose/``.
            torch_dtype: dtype of every component except TransFace and the resampler, which stay float32.
            local_files_only: never contact the Hub (also implied by ``HF_HUB_OFFLINE=1``).
        """
        from diffusers import StableDiffusionPipeline

        from ..pose import PosePreprocessor

        dtype = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
        local = Path(pretrained_model_name_or_path).expanduser()
        if (local / "model_index.json").is_file():  # saved by save_pretrained
            import json

            config = json.loads((local / "model_index.json").read_text(encoding="utf-8"))
            _import_idfusion_components(config)
            shared = {
                k: v
                for k, v in load_base_components(local, config, BASE_COMPONENTS, torch_dtype).items()
                if k not in kwargs
            }
            pipe = cls.from_saved_folder(local, torch_dtype=torch_dtype, **shared, **kwargs)
            saved = local / SAVED_INFO_FILE
            info = json.loads(saved.read_text(encoding="utf-8")) if saved.is_file() else {}
            pipe.model_info = {"model": str(pretrained_model_name_or_path), **info.get("model_info", {})}
            if shared:
                base = (local / config["settings"]["base_model"]).resolve()
                pipe.model_info = {**pipe.model_info, "base_model": str(base)}
            pipe.face_model_dir = Path(face_model_dir) if face_model_dir else None
            pipe.pose_preprocessor = PosePreprocessor(pose_model_dir)
            if default_style_lora is None and saved.is_file():  # exactly what the saved pipeline used
                lora = info.get("default_style_lora")
                pipe._default_style_lora = local / lora if lora else None
            else:
                pipe._set_default_style_lora(default_style_lora, local)
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
        folder = resolve_model_folder(
            pretrained_model_name_or_path, required=required, what="FaceChain-FACT",
            local_files_only=local_files_only, source=SOURCE,
        )  # fmt: skip
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
        nets = {}
        for name, given, folders, what in (
            ("controlnet", controlnet, CONTROLNET_FOLDERS, "OpenPose ControlNet"),
            ("canny_controlnet", canny_controlnet, CANNY_CONTROLNET_FOLDERS, "Canny ControlNet"),
        ):
            source = given if given is not None else _subfolder(folder, *folders)
            if source is not None:
                nets[name] = (source, _load_controlnet(source, what, local_files_only, dtype))

        face_encoder = fact.load_transface(folder / fact.TRANSFACE_FILE)  # float32, whatever torch_dtype says
        pipe = cls(base.vae, base.text_encoder, base.tokenizer, base.unet, base.scheduler, face_encoder=face_encoder,
                   **{name: net for name, (_, net) in nets.items()})  # fmt: skip
        pipe.load_face_adapter(adapter_file)
        pipe.model_info = {
            "model": str(pretrained_model_name_or_path),
            "adapter": adapter_name,
            "base_model": str(base_model),
            "model_files": {adapter_file.name: adapter_file, fact.TRANSFACE_FILE: folder / fact.TRANSFACE_FILE},
        }
        for name, (source, _) in nets.items():
            pipe.model_info[name] = str(source)
        faces = _subfolder(folder, "antelopev2")
        pipe.face_model_dir = Path(face_model_dir) if face_model_dir else faces
        pipe.pose_preprocessor = PosePreprocessor(pose_model_dir or _subfolder(folder, "dwpose"))
        pipe._set_default_style_lora(default_style_lora, folder)
        return pipe

    def save_pretrained(self, save_directory: str | Path, **kwargs: Any) -> None:
        """diffusers' ``save_pretrained``, plus the adapter's name and the default style LoRA file (copied), so the
        saved folder makes the same images. LoRAs a call loaded are unloaded first (the base weights are saved;
        each call activates its own LoRAs again)."""
        import json
        import shutil

        from ..loras import loaded_adapters, unload_loras

        if loaded_adapters(self):
            unload_loras(self)
        super().save_pretrained(save_directory, **kwargs)
        lora = self.default_style_lora
        if lora is not None:
            shutil.copyfile(lora, Path(save_directory) / lora.name)
        keep = {k: v for k, v in self.model_info.items() if k in ("adapter", "base_model")}
        info = {"model_info": keep, "default_style_lora": lora.name if lora is not None else None}
        (Path(save_directory) / SAVED_INFO_FILE).write_text(json.dumps(info, indent=2), encoding="utf-8")

    @property
    def settings(self) -> dict:
        """The saved folder's :data:`SETTINGS` (defaults that replace the release's), ``{}`` for the release."""
        return dict(self.config.get("settings") or {})

    # ---- the release's default style LoRA ----------------------------------------------------------------------

    def _set_default_style_lora(self, given, folder: Path | None) -> None:
        from ..styles import facechain_default_lora_path

        if given is False:
            self._default_style_lora = None
        elif given is not None and given is not True:
            path = Path(given).expanduser()
            if not path.is_file():
                raise ModelFilesError(f"default_style_lora: file not found: {path}")
            self._default_style_lora = path
        else:
            self._default_style_lora = facechain_default_lora_path(folder)

    @property
    def default_style_lora(self) -> Path | None:
        """The release's default style LoRA file (:data:`~idfusion.methods.fact.DEFAULT_STYLE_LORA_FILE`), or
        ``None`` when it is not here (the model folder, the ModelScope cache) or switched off."""
        if self._default_style_lora is _UNSET:
            self._set_default_style_lora(None, None)
        return self._default_style_lora

    @default_style_lora.setter
    def default_style_lora(self, path: str | os.PathLike | None) -> None:
        self._set_default_style_lora(False if path is None else path, None)

    # ---- the face adapter: load / set scale / unload ---------------------------------------------------------

    def set_face_adapter(self, adapter: fact.FactFaceAdapter) -> None:
        """Use ``adapter`` (a :class:`~idfusion.methods.fact.FactFaceAdapter` for this UNet) from now on; its sites
        take the UNet's dtype, its resampler stays float32."""
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

    def face_crops(
        self, faces: Sequence[FaceInput], *, max_photo_side: int | None = fact.PHOTO_MAX_SIDE
    ) -> list[np.ndarray]:
        """The head-masked 112x112 aligned crop of each photo, as the release makes it (spec §2.1): the photo
        downsized to ``max_photo_side`` (:func:`~idfusion.methods.fact.limit_photo_size`), its highest-scoring
        face (:func:`~idfusion.methods.fact.best_scoring_face`), everything outside that face's head mask set to
        0, then the 5-point ArcFace alignment."""
        from ..faces.masks import head_mask
        from ..faces.types import Face, split_face_photo

        crops = []
        for item in faces:
            if isinstance(item, Face):
                raise IdentityInputError(f"{item.source}: {type(self).__name__} needs the photo itself, not a Face")
            image, index = split_face_photo(item)
            loaded = load_image(image)
            pixels = fact.limit_photo_size(loaded.array, max_photo_side)
            found = self.default_face_analyzer().analyze(pixels, select="all" if index is None else index,
                                                         name=loaded.name)  # fmt: skip
            face = fact.best_scoring_face(found) if index is None else found[0]
            crops.append(fact.face_crop(pixels, face.landmarks, head_mask(face, pixels.shape[:2])))
        return crops

    @torch.no_grad()
    def encode_faces(
        self, faces: Sequence[FaceInput] | FaceInput, *, max_photo_side: int | None = fact.PHOTO_MAX_SIDE
    ) -> FaceTokens:
        """Face tokens for one person from 1 or more photos: the expensive part of a request, done once.

        Several photos are one identity: each photo gives its own 16 tokens and the adapters attend to all of
        them together (``16k`` tokens), as the release does; the null face covers the same ``16k`` positions.
        ``max_photo_side``: the release downsizes photos to 1000 px (2000 px in its template flow); ``None`` keeps
        them as they are.
        """
        if not isinstance(faces, (list, tuple)):
            faces = [faces]
        if not faces:
            raise IdentityInputError("faces is empty: give at least one face photo")
        if self.face_encoder is None or self.face_adapter is None:
            raise ModelFilesError(
                "this FactPipeline has no TransFace encoder or face adapter; load them with from_pretrained"
            )
        crops = self.face_crops(faces, max_photo_side=max_photo_side)
        resampler = self.face_adapter.resampler
        tokens = fact.encode_face_tokens(self.face_encoder, resampler, np.stack(crops))
        return FaceTokens(tokens, resampler.unconditional(len(crops)), crops)

    def encode_identity(
        self, faces: Sequence[FaceInput] | FaceInput, *, max_photo_side: int | None = fact.PHOTO_MAX_SIDE
    ) -> dict[str, Any]:
        """The call arguments that stand for ``faces`` (encoded once, reused by every call)."""
        return {"face_tokens": self.encode_faces(faces, max_photo_side=max_photo_side)}

    # ---- ControlNets -----------------------------------------------------------------------------------------

    def set_pose_controlnet(self, controlnet) -> None:
        """Use ``controlnet`` for poses; its attention sees the text tokens only."""
        fact.attach_text_only_processors(controlnet)
        self.register_modules(controlnet=controlnet)

    def set_canny_controlnet(self, controlnet) -> None:
        """Use ``controlnet`` for Canny edge conditions; its attention sees the text tokens only."""
        fact.attach_text_only_processors(controlnet)
        self.register_modules(canny_controlnet=controlnet)

    def load_pose_controlnet(self, source: str | os.PathLike = POSE_CONTROLNET, local_files_only: bool | None = None):
        """Add an OpenPose ControlNet (Hub id or folder)."""
        controlnet = _load_controlnet(
            source, "OpenPose ControlNet", local_files_only, {"torch_dtype": self.unet.dtype}
        )
        self.set_pose_controlnet(controlnet.to(self.unet.device))
        self.model_info["controlnet"] = str(source)
        return controlnet

    def load_canny_controlnet(
        self, source: str | os.PathLike = CANNY_CONTROLNET, local_files_only: bool | None = None
    ):
        """Add a Canny ControlNet (Hub id or folder)."""
        controlnet = _load_controlnet(source, "Canny ControlNet", local_files_only, {"torch_dtype": self.unet.dtype})
        self.set_canny_controlnet(controlnet.to(self.unet.device))
        self.model_info["canny_controlnet"] = str(source)
        return controlnet

    def _controlnet(self, name: str):
        return {"pose": self.controlnet, "canny": self.canny_controlnet}[name]

    def template_controls(self) -> list[str]:
        """The fixed-template flow's default ControlNet conditions: the release's ``["pose", "canny"]`` (OpenPose of
        the face and hands, Canny of the crop with the face removed, at scales 1.0 and 0.2), those of the two
        ControlNets that are loaded."""
        return [name for name in fact.CONTROL_ORDER if self._controlnet(name) is not None]

    def pose_condition(self, pose_image: ImageInput, height: int, width: int, mode: str = "auto") -> PIL.Image.Image:
        """A skeleton image for the OpenPose ControlNet: a ready skeleton as given, or estimated from a photo."""
        from ..pose import PosePreprocessor

        if self.pose_preprocessor is None:
            self.pose_preprocessor = PosePreprocessor()
        return self.pose_preprocessor(pose_image, (height, width), mode)

    # ---- styles ----------------------------------------------------------------------------------------------

    def _check_style_base(self, style, style_base: str) -> None:
        """The release runs a style only on the base model (and adapter) it was made for."""
        hint = (style.base_model or "").strip().lower() if style is not None else ""
        adapter = self.model_info.get("adapter")
        if style_base == "any" or hint not in fact.ADAPTER_FILES or adapter not in fact.ADAPTER_FILES:
            return
        if hint != adapter:
            raise ValueError(
                f"style {style.name!r} is made for the {hint} base model, but this pipeline runs the {adapter} "
                f"adapter; the release runs each style on its own base model and adapter. Load "
                f"FactPipeline.from_pretrained(..., adapter={hint!r}) (CLI: --adapter {hint}), or pass "
                "style_base='any' (CLI: --style-base any) to use the style here anyway"
            )

    def _default_lora(self, mode: str, inpainting: bool, weight: float | None) -> tuple[str, float] | None:
        """The release's default style LoRA for a call whose style brings none, or ``None``."""
        if mode == "off" or (mode == "auto" and inpainting):
            return None
        path = self.default_style_lora
        if path is None:
            where = f"{fact.DEFAULT_STYLE_LORA_REPO} (ModelScope, rev {fact.DEFAULT_STYLE_LORA_REVISION})"
            message = (
                f"the release merges its default style LoRA {fact.DEFAULT_STYLE_LORA_FILE} from {where} into every "
                "text-to-image call whose style has none, but it is not in the model folder nor in the ModelScope "
                "cache"
            )
            if mode == "on":
                raise ModelFilesError(f"{message}; put it there or pass default_lora='off'")
            if not self._warned_default_lora:
                logger.warning("%s; images will differ from the release's (default_lora='off' silences this)", message)
                self._warned_default_lora = True
            return None
        weight = fact.DEFAULT_STYLE_WEIGHT if weight is None else weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0.0 <= weight <= 2.0:
            raise ValueError(f"style_weight must be a number in [0, 2], got {weight!r}")
        return str(path), float(weight)

    # ---- call ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        faces: Sequence[FaceInput] | FaceInput | None = None,
        *,
        face_tokens: FaceTokens | None = None,
        prompt: str | None = None,
        negative_prompt: str | None = None,
        prompt_wording: str = "release",
        style: Any = None,
        style_weight: float | None = None,
        style_base: str = "tie",
        default_lora: str | None = None,
        adapter_scale: float | None = None,
        pose_image: ImageInput | None = None,
        pose_mode: str = "auto",
        control_images: Mapping[str, ImageInput] | None = None,
        controlnet_conditioning_scale: float | Mapping[str, float] | None = None,
        image: ImageInput | None = None,
        mask_image: ImageInput | None = None,
        strength: float = 0.6,
        max_photo_side: int | None = None,
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
            faces: photo(s) of one person (paths, bytes, PIL or arrays). Each photo's highest-scoring face is used.
            face_tokens: :meth:`encode_faces` output instead of ``faces`` (reuse it across calls).
            prompt: the text prompt; with a ``style`` it fills the style's subject slot (default "a person").
                Default: the release's (``fact.PROMPTS``; inpainting: its template prompt).
            negative_prompt: default the style's, else the release's (inpainting: its template negative).
            prompt_wording: ``"release"`` (default: the release's prompts word for word) or ``"idfusion"`` (its
                rewording, without A1111 weights, which a plain CLIP encoder reads as text).
            style: a :class:`~idfusion.styles.Style`, a style name from the catalogue, a ``.toml`` file, or a
                FaceChain style ``.json`` file.
            style_weight: weight of the style's LoRA (default the style's own), or of the default style LoRA.
            style_base: ``"tie"`` (default, as the release: a style made for the film or majicmix base runs only
                with that adapter) or ``"any"``.
            default_lora: the release's default style LoRA where the style brings none: ``"auto"`` (text-to-image
                yes, as the release, with a warning when the file is absent; inpainting no), ``"on"`` (required),
                ``"off"``. Default: the folder's ``settings``, else ``"auto"``.
            adapter_scale: the face adapter scale ``s`` (0 = the base model; default 0.5, inpainting 0.55, or the
                folder's ``settings``).
            pose_image: a pose skeleton image, or a photo to estimate the pose from (needs DWPose models); drives
                the OpenPose ControlNet.
            pose_mode: ``"auto"`` (tell skeletons from photos), ``"skeleton"`` or ``"photo"``.
            control_images: ready ControlNet conditions by name: ``"pose"`` (an OpenPose skeleton) and ``"canny"``
                (an edge map); each needs its ControlNet. Several are stacked as the release stacks them.
            controlnet_conditioning_scale: one scale for every condition, or scales by name; default the release's
                (``fact.CONTROL_SCALES``: pose 1.0, canny 0.2).
            image, mask_image, strength: inpaint ``image`` where ``mask_image`` is white, with ``strength``.
            max_photo_side: downsize ``faces`` to this long side first; default the release's 1000 (inpainting
                2000).
            num_images_per_prompt: 1 to 6 portraits (one seed each); the faces are encoded once for all of them.
            seed, generator: an int (images get ``seed, seed + 1, ...``), one seed per image, or generators.
            num_inference_steps, guidance_scale: default 50, 7.0 (inpainting 5.0); ``pipe.scheduler`` is PNDM.
            height, width: output size (multiples of 8); default 512 (the image's size when inpainting).
            loras: extra ``(file, weight)`` LoRAs (diffusers or kohya format).
            output_type, callback_on_step_end, callback_on_step_end_tensor_inputs: as diffusers.

        Returns:
            :class:`IdentityPipelineOutput` with images, per-image metadata and the reference crops.
        """
        # 1. Check inputs and fill the release's defaults (a saved folder's settings over them)
        saved = self.settings
        default_lora = saved.get("default_lora", "auto") if default_lora is None else default_lora
        inpainting = image is not None
        if inpainting != (mask_image is not None):
            raise ValueError("inpainting needs both image and mask_image")
        for name, value, allowed in (
            ("prompt_wording", prompt_wording, PROMPT_WORDINGS),
            ("default_lora", default_lora, DEFAULT_LORA_MODES),
            ("style_base", style_base, STYLE_BASE_MODES),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
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
        defaults = {**(fact.INPAINT_DEFAULTS if inpainting else fact.DEFAULTS), **saved}
        settings = self.prepare_settings(
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, scheduler=scheduler,
            height=height, width=width, seed=seed, generator=generator, num_images_per_prompt=num_images_per_prompt,
            defaults={k: defaults[k] for k in ("num_inference_steps", "guidance_scale")}, output_type=output_type,
        )  # fmt: skip
        self.check_callback(callback_on_step_end, callback_on_step_end_tensor_inputs)
        scale = defaults["adapter_scale"] if adapter_scale is None else float(adapter_scale)
        if not np.isfinite(scale) or scale < 0:
            raise ValueError(f"adapter_scale must be a finite number >= 0, got {adapter_scale}")

        # 2. Style: prompt template and LoRA (the release's default style LoRA where the style has none)
        wording = fact.PROMPTS[prompt_wording]
        default_text = wording["template_prompt" if inpainting else "prompt"]
        default_negative = saved.get(
            "negative_prompt", wording["template_negative_prompt" if inpainting else "negative_prompt"]
        )
        loras = list(loras)
        text, negative, styled = prompt if prompt is not None else default_text, negative_prompt, {}
        style_lora = None
        if style is not None:
            from ..styles import apply_style

            applied = apply_style(style, prompt, negative_prompt, style_weight=style_weight)
            self._check_style_base(applied.style, style_base)
            text, negative, styled = applied.prompt, applied.negative_prompt, applied.metadata
            style_lora = applied.lora
        implicit = style_lora or self._default_lora(default_lora, inpainting, style_weight)
        if style_weight is not None and implicit is None:
            raise ValueError("style_weight needs a style with a LoRA, or the default style LoRA (default_lora)")
        default_used = implicit is not None and style_lora is None
        if default_used:
            styled = {**styled, "style_weight": implicit[1]}
        negative = default_negative if negative is None else negative

        # 3. Face tokens, once per request
        check_one_identity(faces, face_tokens, "face_tokens")
        if face_tokens is not None:
            identity = face_tokens
        else:
            side = max_photo_side or (fact.INPAINT_PHOTO_MAX_SIDE if inpainting else fact.PHOTO_MAX_SIDE)
            identity = self.encode_faces(faces, max_photo_side=side)

        # 4. LoRAs first (their text-encoder parts apply to this call's prompts). Context = [77 text tokens | 16k
        #    face tokens]; the negative branch gets the null face (face-CFG)
        lora_meta = activate_loras(self, ([implicit] if implicit else []) + loras)
        default_meta = lora_meta[0] if default_used else None
        if implicit is not None:
            lora_meta = lora_meta[1:]  # the style (or the default) brings its LoRA back on replay: not recorded twice
        dtype = self.unet.dtype
        text_embeds = encode_text(self.text_encoder, self.tokenizer, [text, negative]).to(dtype)
        prompt_embeds = torch.cat([text_embeds[:1], identity.tokens.to(text_embeds.device, dtype)], dim=1)
        negative_embeds = torch.cat([text_embeds[1:], identity.unconditional.to(text_embeds.device, dtype)], dim=1)
        self.set_face_adapter_scale(scale)

        # 5. ControlNet conditions (stacked in the release's order) and inpainting inputs
        if pose_image is not None and self.controlnet is None:
            self.load_pose_controlnet()
        controls = self._controls(pose_image, pose_mode, control_images, controlnet_conditioning_scale, settings)
        fact.set_num_face_tokens(self.unet, *(net for net, _, _ in controls), num_photos=identity.num_photos)
        inpaint = None
        if inpainting:
            size = (settings.width, settings.height)
            inpaint = InpaintInput(
                init.resize(size, PIL.Image.LANCZOS), mask.resize(size, PIL.Image.BILINEAR), strength
            )

        # 6. Sample, and record what it takes to make each image again
        steps = dict(
            output_type=output_type, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=tuple(callback_on_step_end_tensor_inputs),
        )  # fmt: skip
        images = sample_sd15(
            self, prompt_embeds, negative_embeds, settings, controls=controls, inpaint=inpaint, **steps
        )
        names = self._control_names(pose_image, control_images)
        return self.result(
            images, settings, identity.references, **styled, prompt=prompt, composed_prompt=text,
            negative_prompt=negative, prompt_wording=prompt_wording, style_base=style_base if style else None,
            default_lora=default_lora, default_lora_sha256=default_meta["sha256"] if default_meta else None,
            adapter_scale=scale, num_face_photos=identity.num_photos, loras=lora_meta or None,
            pose=pose_mode if pose_image is not None else ("skeleton" if "pose" in names else None),
            controls={name: s for name, (_, _, s) in zip(names, controls, strict=True)} or None,
            strength=inpaint.strength if inpaint is not None else None,
        )  # fmt: skip

    @staticmethod
    def _control_names(pose_image, control_images) -> list[str]:
        given = set(control_images or {}) | ({"pose"} if pose_image is not None else set())
        return [name for name in fact.CONTROL_ORDER if name in given]

    def _controls(self, pose_image, pose_mode, control_images, scales, settings) -> list[tuple[Any, Any, float]]:
        """``(ControlNet, condition image, scale)`` of each condition, in the release's order (pose, canny)."""
        control_images = dict(control_images or {})
        unknown = sorted(set(control_images) - set(fact.CONTROL_ORDER))
        if unknown:
            raise ValueError(f"unknown control_images {unknown}: FACT takes {list(fact.CONTROL_ORDER)}")
        if pose_image is not None and "pose" in control_images:
            raise ValueError("give the pose once: pose_image or control_images['pose']")
        if isinstance(scales, Mapping):
            extra = sorted(set(scales) - set(fact.CONTROL_ORDER))
            if extra:
                raise ValueError(f"controlnet_conditioning_scale names unknown controls {extra}")
        controls = []
        for name in self._control_names(pose_image, control_images):
            net = self._controlnet(name)
            if net is None:
                loader = {"pose": "load_pose_controlnet", "canny": "load_canny_controlnet"}[name]
                raise ModelFilesError(
                    f"a {name!r} condition was given, but this pipeline has no {name} ControlNet; add one with "
                    f"pipe.{loader}(...) or from_pretrained"
                )
            if name == "pose" and pose_image is not None:
                condition = self.pose_condition(pose_image, settings.height, settings.width, pose_mode)
            else:
                condition = load_image(control_images[name], name=f"control_images[{name!r}]").to_pil()
            if scales is None:
                value = fact.CONTROL_SCALES[name]
            elif isinstance(scales, Mapping):
                value = scales.get(name, fact.CONTROL_SCALES[name])
            else:
                value = scales
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value < 0:
                raise ValueError(f"controlnet_conditioning_scale for {name!r} must be a number >= 0, got {value!r}")
            controls.append((net, condition, float(value)))
        return controls


def _load_controlnet(source, what: str, local_files_only: bool | None, dtype: dict):
    from diffusers import ControlNetModel

    folder = resolve_model_folder(
        source, required=["config.json"], what=what, allow_patterns=["*.json", "*.safetensors"],
        local_files_only=local_files_only,
    )  # fmt: skip
    return ControlNetModel.from_pretrained(folder, **dtype)
