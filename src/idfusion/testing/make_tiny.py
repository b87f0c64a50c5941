"""Write tiny random checkpoints in the exact layouts of official releases, for tests and demos with no downloads.

Each *method* names its writer in the method registry (:mod:`idfusion.registry`), beside the kits in :data:`KITS`;
:func:`make_tiny` runs it into a fresh folder. The files have the
folder layout, file names, config fields and tensor key names of the real release, with tiny shapes and seeded random
weights, so loading code written for the real files runs unchanged on them.

Each kit is a few MB (about 1 to 15). Where an official layout forces wide or many layers into a ``torch.save`` file
(FlashFace's checkpoint and VAE, FeedFace's autoencoder, AdaFace's 512-wide generators and Arc2Face encoder), the
large tensors are views of a few shared random pools (:mod:`idfusion.testing.shared_storage`), stored once.

Methods and the layouts they write (paths relative to the output folder):

``sd15``
    A ``StableDiffusionPipeline`` folder like the ``stable-diffusion-v1-5/stable-diffusion-v1-5`` diffusers release;
    it loads with ``StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)`` and generates 64x64
    images (the tiny UNet's ``sample_size`` is 8)::

        model_index.json
        feature_extractor/preprocessor_config.json
        safety_checker/config.json
        safety_checker/model.safetensors
        scheduler/scheduler_config.json
        text_encoder/config.json
        text_encoder/model.safetensors
        tokenizer/merges.txt                      (CLIP's BPE, reduced vocabulary: see tiny_clip_tokenizer.py)
        tokenizer/special_tokens_map.json
        tokenizer/tokenizer_config.json
        tokenizer/vocab.json
        unet/config.json
        unet/diffusion_pytorch_model.safetensors
        vae/config.json
        vae/diffusion_pytorch_model.safetensors

    Weight files use the release's key names, also under transformers 5 (which would write flat CLIP names):
    ``text_model.…`` in the text encoder, ``vision_model.vision_model.…`` in the safety checker.

``antelopev2``
    The ONNX face models Arc2Face uses, written by ``idfusion.testing.onnx_faces.write_tiny_antelopev2`` (see that
    module)::

        scrfd_10g_bnkps.onnx                      (SCRFD-style face detector, as in InsightFace's antelopev2)
        arcface.onnx                              (ArcFace-style recognizer, as in Arc2Face's release)

    The detector's weights are random, so it is marked as a stand-in (``idfusion.faces.stand_in``) and the face
    path detects with real detectors in its place (the world detector for renders, dlib's HOG for photos).

``arc2face``
    The Arc2Face release as the README's local ``models/`` folder, plus a tiny SD1.5 base where the pipeline
    looks for one (see ``idfusion.testing.tiny_arc2face``)::

        arc2face/config.json
        arc2face/diffusion_pytorch_model.safetensors
        encoder/config.json
        encoder/pytorch_model.bin                 (a torch.save state dict, as released)
        controlnet/config.json
        controlnet/diffusion_pytorch_model.safetensors
        antelopev2/scrfd_10g_bnkps.onnx
        antelopev2/arcface.onnx
        stable-diffusion-v1-5/...                 (the ``sd15`` layout)

``adaface``
    An AdaFace v2 checkpoint in the official pickled format (``torch.save`` of whole modules under the authors'
    class paths; see ``idfusion.testing.tiny_adaface``)::

        models/adaface/VGGface2_HQ_masks2024-10-14T16-09-24_zero3-ada-3500.pt
        models/arc2face/encoder/config.json
        models/arc2face/encoder/pytorch_model.bin
        models/insightface/models/antelopev2/scrfd_10g_bnkps.onnx
        models/insightface/models/antelopev2/arcface.onnx
        models/stable-diffusion-v1-5/...          (the ``sd15`` layout, 512 wide)

``flashface``
    The official FlashFace release as the repo's ``cache/`` folder (``shilongz/FlashFace-SD1.5``), in FlashFace's
    own key naming, plus face models where the pipeline looks (see ``idfusion.testing.tiny_flashface``)::

        flashface.ckpt                            (torch.save'd OrderedDict: all 2,142 official key names)
        openai-clip-vit-large-14.pth              (CLIP visual.* + textual.* + log_scale)
        sd-v1-vae.pth                             (VAE, the 240 official key names)
        bpe_simple_vocab_16e6.txt.gz              (CLIP's BPE file with the kit's reduced vocabulary)
        antelopev2/scrfd_10g_bnkps.onnx
        antelopev2/arcface.onnx

``open-flashface``
    The open re-implementation's diffusers folder (``IntellectGen/FlashFace``; see
    ``idfusion.testing.tiny_flashface``)::

        model_index.json                          (StableDiffusionReferencePipeline, diffusers 0.22.1)
        unet/config.json
        unet/diffusion_pytorch_model.safetensors
        refnet/config.json
        refnet/diffusion_pytorch_model.safetensors
        vae/...  text_encoder/...  tokenizer/...  scheduler/scheduler_config.json (DDIMScheduler)
        antelopev2/scrfd_10g_bnkps.onnx
        antelopev2/arcface.onnx

``fact``
    The FaceChain-FACT release (ModelScope ``yucheng1996/FaceChain-FACT``) plus a tiny SD1.5 base and face models
    (see ``idfusion.testing.tiny_fact``)::

        ms1mv2_model_TransFace_S.pt
        adapter_maj_mask_large_new_reg001_faceshuffle_00290001.ckpt
        adapter_film_mask_large_new_reg001_faceshuffle_00290001.ckpt
        stable-diffusion-v1-5/...                 (the ``sd15`` layout; UNet with 2 layers per level, 16 sites)
        antelopev2/scrfd_10g_bnkps.onnx
        antelopev2/arcface.onnx
        controlnet/...                            (OpenPose ControlNet)
        dwpose/yolox_l.onnx, dwpose/dw-ll_ucoco_384.onnx

``feedface``
    The FeedFace release (Hub ``Xiang-cd/FeedFace``) on a tiny UniDiffuser-v1 (see
    ``idfusion.testing.tiny_feedface_base`` and ``tiny_feedface_adapter``)::

        models/uvit_v1.pth  models/autoencoder_kl.pth  models/caption_decoder.pth  models/gpt2/...
        models/feed-4800000.pt
        models/clip-vit-large-patch14/...         (the text encoder the release takes from the Hub)
        antelopev2/scrfd_10g_bnkps.onnx
        antelopev2/arcface.onnx

``feedface-sd15``
    The FeedFace adapter for SD1.5 (no official release; idfusion's format) on a tiny SD1.5 base::

        feedface_sd15.safetensors                 (face encoder + 16 feed blocks, zero_linear non-zero)
        stable-diffusion-v1-5/...                 (the ``sd15`` layout)
        antelopev2/scrfd_10g_bnkps.onnx
        antelopev2/arcface.onnx

Adding a method: write a function ``writer(out_dir: Path, seed: int) -> list[Path]`` that fills the (existing, empty)
folder and returns the files it wrote, and name it in the method's registry entry (``tiny="module:function"``). Import heavy or optional modules inside
the writer, so that this module stays cheap to import.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from idfusion.errors import IdfusionError

__all__ = ["KITS", "OutputExistsError", "Writer", "make_tiny", "tiny_writers"]

logger = logging.getLogger(__name__)

Writer = Callable[[Path, int], list[Path]]


class OutputExistsError(IdfusionError, FileExistsError):
    """The output folder of :func:`make_tiny` is not empty (or is a file): a user error, not a bug."""


@contextmanager
def _quiet_progress_bars() -> Iterator[None]:
    # transformers' save_pretrained shows a "Writing model shards" bar per model; restore the caller's setting after.
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _sd15_model_index() -> dict[str, object]:
    import diffusers

    # Written by hand rather than by pipeline.save_config: the release's model_index.json lists exactly these entries
    # (a fresh save would add the optional ``image_encoder`` slot, which the release does not have).
    return {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": ["transformers", "CLIPImageProcessor"],
        "requires_safety_checker": True,
        "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def write_sd15(
    out_dir: Path, seed: int, *, text_width: int | None = None, unet: dict[str, object] | None = None
) -> list[Path]:
    """Write a tiny SD1.5 ``StableDiffusionPipeline`` folder (layout in this module's docstring).

    Args:
        out_dir (`Path`): an existing, empty folder.
        seed (`int`): seeds every model; each model gets its own derived seed so they are not correlated.
        text_width (`int`, *optional*): text encoder width and UNet cross-attention width (default 32). AdaFace's
            tiny kit needs 512: its token embeddings come from the 512-wide tiny Arc2Face encoder. A 512-wide
            encoder gets 1 layer with a narrow MLP (each 512-wide attention layer is 4 MB).
        unet (`dict`, *optional*): overrides of the UNet config (``components.tiny_unet_config``), for methods
            whose adapters need other widths.

    Returns:
        `list[Path]`: the files written.
    """
    from idfusion.testing import components
    from idfusion.testing.tiny_clip_tokenizer import save_tiny_clip_tokenizer

    with _quiet_progress_bars():
        wide = {"cross_attention_dim": text_width} if text_width else {}
        text = {}
        if text_width:
            text = {"hidden_size": text_width, "intermediate_size": 32, "num_attention_heads": 4}
            text |= {"num_hidden_layers": 1, "projection_dim": text_width}
        unet_model = components.tiny_unet(seed=seed, **wide, **(unet or {}))
        unet_model.save_pretrained(out_dir / "unet", safe_serialization=True)
        components.tiny_vae(seed=seed + 1).save_pretrained(out_dir / "vae", safe_serialization=True)
        # transformers 5 would write flat CLIP key names; the release has the nested (transformers 4) ones.
        text_encoder = components.tiny_text_encoder(seed=seed + 2, **text)
        components.save_pretrained_official(text_encoder, out_dir / "text_encoder")
        components.save_pretrained_official(components.tiny_safety_checker(seed=seed + 3), out_dir / "safety_checker")
        components.tiny_feature_extractor().save_pretrained(out_dir / "feature_extractor")
        components.tiny_scheduler().save_pretrained(out_dir / "scheduler")
    save_tiny_clip_tokenizer(out_dir / "tokenizer")
    (out_dir / "model_index.json").write_text(json.dumps(_sd15_model_index(), indent=2) + "\n", encoding="utf-8")
    return sorted(p for p in out_dir.rglob("*") if p.is_file())


def write_antelopev2(out_dir: Path, seed: int) -> list[Path]:
    """Write tiny random ``antelopev2`` ONNX face models (see ``idfusion.testing.onnx_faces``)."""
    from idfusion.testing.onnx_faces import write_tiny_antelopev2

    return write_tiny_antelopev2(out_dir, seed=seed)


def write_adaface(out_dir: Path, seed: int) -> list[Path]:
    """Write a tiny AdaFace v2 release: the model repo's ``models/`` layout, with a 512-wide SD1.5 base in
    ``models/stable-diffusion-v1-5/`` where the pipeline looks first (see ``idfusion.testing.tiny_adaface``)."""
    import torch

    from idfusion.testing.components import official_state_dict
    from idfusion.testing.shared_storage import pooled_tensors
    from idfusion.testing.tiny_adaface import ROW_STRIDE, write_tiny_adaface_checkpoint
    from idfusion.testing.tiny_arc2face import TINY_ID_WIDTH, tiny_arc2face_encoder

    write_tiny_adaface_checkpoint(out_dir, seed)
    encoder_dir = out_dir / "models" / "arc2face" / "encoder"
    encoder_dir.mkdir(parents=True)
    encoder = tiny_arc2face_encoder(seed + 10)
    encoder.config.save_pretrained(encoder_dir)
    # 512 wide, frozen in AdaFace: its big tensors share pools (a torch.save file; see testing.shared_storage)
    state = pooled_tensors(official_state_dict(encoder), seed + 10, row_stride=ROW_STRIDE)
    torch.save(state, encoder_dir / "pytorch_model.bin")
    faces = out_dir / "models" / "insightface" / "models" / "antelopev2"
    faces.mkdir(parents=True)
    write_antelopev2(faces, seed)
    base = out_dir / "models" / "stable-diffusion-v1-5"
    base.mkdir()
    write_sd15(base, seed + 20, text_width=TINY_ID_WIDTH)
    return sorted(p for p in out_dir.rglob("*") if p.is_file())


def write_feedface(out_dir: Path, seed: int) -> list[Path]:
    """Write a tiny FeedFace release on a tiny UniDiffuser-v1 (layout above)."""
    from idfusion.methods.feedface import FEED_FILE
    from idfusion.testing.tiny_feedface_adapter import write_feed_checkpoint
    from idfusion.testing.tiny_feedface_base import TINY_UVIT_WIDTH, write_unidiffuser_base

    files = write_unidiffuser_base(out_dir / "models", seed)
    files.append(write_feed_checkpoint(out_dir / "models" / FEED_FILE, seed + 10, dim=TINY_UVIT_WIDTH))
    (out_dir / "antelopev2").mkdir()
    return sorted(files + write_antelopev2(out_dir / "antelopev2", seed))


def write_feedface_sd15(out_dir: Path, seed: int) -> list[Path]:
    """Write a tiny SD1.5 FeedFace adapter on a tiny SD1.5 base (layout above)."""
    import torch
    from diffusers import UNet2DConditionModel

    from idfusion.methods.feedface import SD15FeedAdapter, save_sd15_feed_adapter
    from idfusion.pipelines.pipeline_feedface_sd15 import ADAPTER_FILE
    from idfusion.testing.tiny_feedface_adapter import TINY_VISION_CONFIG

    base = out_dir / "stable-diffusion-v1-5"
    base.mkdir()
    # widths 8 heads of the feed blocks divide (the kit's default starts at 4)
    files = write_sd15(base, seed + 20, unet={"block_out_channels": [8, 16, 32, 32], "norm_num_groups": 8})
    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    torch.manual_seed(seed)
    adapter = SD15FeedAdapter.for_unet(unet, face_dim=32, vision_config=TINY_VISION_CONFIG)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # a "trained" adapter: zero_linear (zero-initialised) and the rest perturbed
        for param in adapter.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=generator))
    files.append(save_sd15_feed_adapter(adapter, out_dir / ADAPTER_FILE))
    (out_dir / "antelopev2").mkdir()
    return sorted(files + write_antelopev2(out_dir / "antelopev2", seed))


#: Writers of the face-model and base-model kits; each method's writer is named by its registry entry.
KITS: dict[str, Writer] = {"sd15": write_sd15, "antelopev2": write_antelopev2}


def tiny_writers() -> dict[str, str | Writer]:
    """Every ``make-tiny`` target: the kits, then each registered method (``"module:function"`` of its writer)."""
    from idfusion.registry import methods

    return {**KITS, **{spec.name: spec.tiny for spec in methods()}}


def _writer(method: str) -> Writer:
    from idfusion.registry import resolve

    writers = tiny_writers()
    if method not in writers:
        raise ValueError(f"unknown tiny checkpoint method {method!r}; choose one of: {', '.join(writers)}")
    writer = writers[method]
    return resolve(writer) if isinstance(writer, str) else writer


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def make_tiny(method: str, out_dir: str | os.PathLike[str], *, seed: int = 0, overwrite: bool = False) -> list[Path]:
    """Write a tiny random checkpoint of ``method`` into ``out_dir``, in the layout of the official release.

    The files are written to a temporary sibling folder that is renamed to ``out_dir`` when complete, so a failed run
    never leaves a half-written checkpoint behind.

    Args:
        method (`str`): a kit (``"sd15"``, ``"antelopev2"``) or a registered method (``"arc2face"``, ...).
        out_dir (`str` or `os.PathLike`): the folder to create. It must not exist or be empty, unless ``overwrite``.
        seed (`int`, *optional*, defaults to 0): the same seed writes the same weights.
        overwrite (`bool`, *optional*, defaults to `False`): write into a non-empty ``out_dir``. Each top-level
            entry of the checkpoint (a file, or a component folder such as ``unet/``) replaces the entry of that name,
            so no stale file is left inside it; other entries of ``out_dir`` are left alone.

    Returns:
        `list[Path]`: the files written, sorted, as paths under ``out_dir``.

    Raises:
        ValueError: unknown ``method``.
        OutputExistsError: ``out_dir`` is a file, or a non-empty folder and ``overwrite`` is false (an
            ``IdfusionError`` and a ``FileExistsError``).
    """
    write = _writer(method)
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out}: exists and is not a folder; give the path of a new or empty folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(
            f"{out}: folder is not empty; choose another folder, or overwrite it (overwrite=True, CLI --overwrite)"
        )

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        written = write(tmp, seed)
        relative = sorted({(p if p.is_absolute() else tmp / p).relative_to(tmp) for p in written})
        tmp.chmod(0o755)  # mkdtemp makes it private; this is an ordinary output folder
        if out.is_dir() and any(out.iterdir()):
            for entry in sorted(tmp.iterdir()):
                _remove(out / entry.name)
                entry.rename(out / entry.name)
        else:
            if out.is_dir():
                out.rmdir()
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("wrote tiny %s checkpoint (%d files) to %s", method, len(relative), out)
    return [out / p for p in relative]
