"""Train the world base model (a tiny SD1.5 architecture) with idfusion's training code, and ship it.

Usage::

    python -m idfusion.world.train_base --out src/idfusion/world/weights/base --work runs/world-base --seed 0

Steps, all in ``--work`` (each resumes when run again):

1. ``data/``: captioned 64x64 renders of training identities (:func:`~idfusion.world.dataset.write_dataset`, 10% of
   them 2-3 person scenes), with held-out attribute combinations redrawn so that evaluation captions stay unseen;
2. ``vae/``: the ``text-to-image`` recipe with ``trainable: [vae]`` builds all three models new and trains the
   autoencoder alone (:data:`PLANS` gives the sizes: a VAE with 4x downsampling, since the test kit's tiny 8x VAE
   cannot redraw a 64 px face);
3. ``unet/``: the same recipe from ``vae/model`` with ``trainable: [unet, text_encoder]`` on its latents, after
   giving that folder a zero-terminal-SNR, v-prediction schedule (:func:`_set_zero_snr_scheduler` says why);
4. ``unet/model`` is copied to ``--out`` and measured (:func:`~idfusion.world.base.evaluate_base`); commands, seed,
   wall times, metrics and each file's sha256 go into ``MANIFEST.json`` beside ``--out`` (key ``"base"``).

``--plan smoke`` trains the same way at toy sizes for a few steps (the tests' smoke run).
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["BasePlan", "PLANS", "CHECK", "train_base", "measure_base", "measure_vae", "main"]

logger = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"
# The tests reproduce this measurement of the shipped model ("check" in the manifest).
CHECK = {"count": 16, "seed": 1, "num_inference_steps": 12, "batch_size": 16}
_VALIDATION_PROMPTS = [
    "a photo of a person wearing a red hat, in a blue shirt, smiling, on a plain yellow background",
    "a photo of a person wearing sunglasses, in a green shirt, angry, on a white striped background",
    "a photo of two people, in black shirts, surprised, on a purple dotted background",
    "a photo of a person, in a white shirt, with a neutral expression, on a orange checkered background",
]


@dataclass(frozen=True)
class BasePlan:
    """Sizes and schedules of one base-model training (architecture overrides are of :mod:`idfusion.sd15`'s tiny
    configs)."""

    identities: int  # the first this many training identities
    images_per_identity: int
    scenes: int
    vae: dict[str, Any]
    unet: dict[str, Any]
    text_encoder: dict[str, Any]
    vae_steps: int
    vae_batch: int
    vae_lr: float
    unet_steps: int
    unet_batch: int
    unet_lr: float
    warmup: int
    ema_decay: float | None
    eval_count: int  # held-out captions in the reported metrics
    validation_steps: int = 20
    validate: bool = True  # validation images and loss plots at the end of each stage
    checkpoint_every: int = 1000


PLANS: dict[str, BasePlan] = {
    "full": BasePlan(
        identities=2000,
        images_per_identity=8,
        scenes=1800,
        # 4x downsampling (3 levels) to 16x16x4 latents: at 64 px a world face is ~28 px wide with 2-4 px eyes, and
        # SD1.5's 8x (an 8x8 latent, the face in ~3x3 cells) redrew faces with twice the error at 2.5x the cost per
        # step in a pilot (see the README). Pipelines read the factor from the VAE config.
        vae={
            "block_out_channels": [16, 32, 64],
            "down_block_types": ["DownEncoderBlock2D"] * 3,
            "up_block_types": ["UpDecoderBlock2D"] * 3,
        },
        unet={"block_out_channels": [32, 64, 64, 64]},
        text_encoder={},
        vae_steps=2500,
        vae_batch=16,
        vae_lr=6e-4,
        unet_steps=2500,
        unet_batch=32,
        unet_lr=6e-4,
        warmup=100,
        ema_decay=0.999,
        eval_count=1000,
    ),
    "smoke": BasePlan(
        identities=4,
        images_per_identity=2,
        scenes=0,
        vae={
            "block_out_channels": [8, 16, 16],
            "down_block_types": ["DownEncoderBlock2D"] * 3,
            "up_block_types": ["UpDecoderBlock2D"] * 3,
        },
        unet={"block_out_channels": [8, 16, 16, 16]},
        text_encoder={"num_hidden_layers": 1},
        vae_steps=2,
        vae_batch=2,
        vae_lr=1e-3,
        unet_steps=2,
        unet_batch=2,
        unet_lr=1e-3,
        warmup=0,
        ema_decay=None,
        eval_count=4,
        validation_steps=2,
        validate=False,
    ),
}


@dataclass
class _Stage:
    name: str
    seconds: float = 0.0
    steps: int = 0
    loss: float | None = None


def _stage_document(plan: BasePlan, stage: str, data: Path, out: Path, seed: int, pretrained: Path | None) -> dict:
    vae = stage == "vae"
    recipe: dict[str, Any] = {
        "name": "text-to-image",
        "trainable": ["vae"] if vae else ["unet", "text_encoder"],
        "validation_prompts": _VALIDATION_PROMPTS,
        "validation_inference_steps": plan.validation_steps,
    }
    if pretrained is None:
        recipe.update(size="tiny", vae=plan.vae, unet=plan.unet, text_encoder=plan.text_encoder)
    else:
        recipe["pretrained"] = str(pretrained)
    return {
        "output_dir": str(out),
        "recipe": recipe,
        "seed": seed,
        "data": {"train": [str(data)], "resolution": 64},
        "train": {
            "max_steps": plan.vae_steps if vae else plan.unet_steps,
            "batch_size": plan.vae_batch if vae else plan.unet_batch,
            "learning_rate": plan.vae_lr if vae else plan.unet_lr,
            "lr_scheduler": "cosine" if plan.warmup else "constant",
            "lr_warmup_steps": plan.warmup,
            "mixed_precision": "bf16",  # about 2-4x faster on a CPU with AVX-512 BF16 / AMX; weights stay float32
            "use_ema": plan.ema_decay is not None and not vae,
            "ema_decay": plan.ema_decay or 0.9999,
        },
        "checkpoint": {"every_steps": plan.checkpoint_every, "keep_last": 1},
        "log": {"tensorboard": False, "plot": plan.validate, "validate_at_end": plan.validate},
    }


def _recipe_class() -> type:
    from diffusers.models.attention_processor import AttnProcessor

    from ..training.recipes.text_to_image import TextToImageRecipe

    class WorldBaseRecipe(TextToImageRecipe):
        """The text-to-image recipe with the UNet on diffusers' classic attention while training: on a CPU, torch's
        fused attention backward takes ~10x its forward at these head sizes (a UNet step 1.5x slower). The saved
        folder is unaffected (attention processors are not part of it)."""

        def build(self):  # type: ignore[no-untyped-def]
            models = super().build()
            if self.accelerator.device.type == "cpu":
                self.unet.set_attn_processor(AttnProcessor())
            return models

    return WorldBaseRecipe


def _set_zero_snr_scheduler(folder: Path) -> None:
    """Give the pipeline in ``folder`` SD1.5's noise schedule rescaled to zero terminal SNR, v-prediction and DDIM
    "trailing" sampling (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", sec. 3).

    Why: with SD1.5's schedule the last noise level still holds 7% of the signal, so the low frequencies of the
    starting noise decide a world image's colours: in a first run (epsilon-prediction, same data and steps) two seeds
    with one prompt gave different background colours, and background accuracy on held-out captions was 0.21 (chance
    0.125). The recipe reads the prediction type and schedule from this folder for the UNet stage.
    """
    from diffusers import DDIMScheduler

    from ..sd15 import sd15_scheduler_config

    scheduler = DDIMScheduler.from_config(
        sd15_scheduler_config(),
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        timestep_spacing="trailing",
    )
    shutil.rmtree(folder / "scheduler")
    scheduler.save_pretrained(folder / "scheduler")
    index = json.loads((folder / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "DDIMScheduler"]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _run_stage(plan: BasePlan, stage: str, data: Path, work: Path, seed: int, pretrained: Path | None) -> _Stage:
    from ..training import load_config, train

    out = work / stage
    record = out / "stage.json"  # wall time and loss of the finished stage, for the manifest of a later rerun
    if (out / "model" / "model_index.json").is_file() and record.is_file():
        logger.info("%s: already trained (%s)", stage, out / "model")
        return _Stage(**json.loads(record.read_text()))
    config = load_config(document=_stage_document(plan, stage, data, out, seed, pretrained))
    start = time.time()
    trained = train(config, resume="latest", recipe_class=_recipe_class())
    result = _Stage(stage, round(time.time() - start, 1), trained.step, trained.loss)
    record.write_text(json.dumps(asdict(result)))
    return result


def _copy_model(model: Path, out: Path) -> None:
    from ..training.checkpoints import replace_dir

    staging = out.parent / f".{out.name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(model, staging)  # model/ holds only the inference files (checkpoints live beside it)
    for path in staging.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)  # atomic writers create private (0600) files; these ship
    replace_dir(staging, out)


def measure_base(folder: Path, count: int, *, seed: int = 0, progress: bool = True, **kwargs: Any) -> dict:
    """:func:`~idfusion.world.base.evaluate_base` on the model in ``folder``, values rounded for the manifest."""
    from .base import evaluate_base, load_base_pipeline

    return _round(evaluate_base(load_base_pipeline(folder), count, seed=seed, progress=progress, **kwargs))


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def measure_vae(folder: Path, count: int = 300) -> dict:
    """:func:`~idfusion.world.base.evaluate_vae` on the autoencoder in ``folder``."""
    from diffusers import AutoencoderKL

    from .base import evaluate_vae

    return evaluate_vae(AutoencoderKL.from_pretrained(folder, subfolder="vae").eval(), count)


def _round(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _round(v) for k, v in value.items()}
    if isinstance(value, float):
        return round(value, 5)
    return value


def _update_manifest(out: Path, entry: dict, command: str, seed: int) -> Path:
    from ..images import atomic_write_bytes
    from ..outputs import file_sha256
    from .train_faces import MANIFEST_DESCRIPTION

    path = out.parent / MANIFEST
    manifest = json.loads(path.read_text()) if path.is_file() else {"files": {}}
    prefix = f"{out.name}/"
    manifest["files"] = {k: v for k, v in manifest.get("files", {}).items() if not k.startswith(prefix)}
    for file in sorted(p for p in out.rglob("*") if p.is_file()):
        name = file.relative_to(out.parent).as_posix()
        manifest["files"][name] = {
            "sha256": file_sha256(file),
            "bytes": file.stat().st_size,
            "command": command,
            "seed": seed,
        }
    manifest["base"] = entry
    manifest["description"] = MANIFEST_DESCRIPTION
    atomic_write_bytes(path, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    return path


def train_base(
    out: Path,
    work: Path,
    *,
    seed: int = 0,
    plan: str = "full",
    progress: bool = True,
    command: str | None = None,
    measure: bool = True,
) -> dict:
    """Train (or resume) the base model in ``work``, copy it to ``out``, measure it and record it in the manifest.

    Returns:
        The manifest's ``"base"`` entry.
    """
    chosen = PLANS[plan]
    work.mkdir(parents=True, exist_ok=True)
    from .dataset import training_set

    data, data_seconds = training_set(
        work / "data",
        chosen.identities,
        chosen.images_per_identity,
        scenes=chosen.scenes,
        seed=seed,
        progress=progress,
    )
    vae = _run_stage(chosen, "vae", data, work, seed, None)
    _set_zero_snr_scheduler(work / "vae" / "model")
    unet = _run_stage(chosen, "unet", data, work, seed, work / "vae" / "model")
    _copy_model(work / "unet" / "model", out)
    entry: dict[str, Any] = {
        "description": (
            "The world base model: SD1.5's architecture at toy width (diffusers UNet2DConditionModel, AutoencoderKL "
            "with 4x downsampling and 4 latent channels, CLIPTextModel with the real CLIP tokenizer) as a "
            "StableDiffusionPipeline folder, trained on captioned 64x64 renders of training identities by the "
            "text-to-image recipe in two stages (VAE, then UNet + text encoder). 'metrics' are on held-out captions "
            "(attribute combinations never trained on), sampled with DPM-Solver++ 2M: attribute accuracy by the "
            "shipped checker (world detector), and the Frechet distance between judge features of generated faces "
            "and of renders of held-out identities with the same captions ('frechet_judge_renders': two render sets, "
            "the floor). 'check' is the small set the tests reproduce."
        ),
        "command": command,
        "seed": seed,
        "plan": plan,
        "plan_config": asdict(chosen),
        "threads": _threads(),
        "seconds": {"data": data_seconds, "vae": vae.seconds, "unet": unet.seconds},
        "final_loss": {"vae": vae.loss, "unet": unet.loss},
    }
    if measure:
        start = time.time()
        entry["metrics"] = measure_base(out, chosen.eval_count, seed=0, progress=progress)
        entry["metrics"]["vae"] = _round(measure_vae(out))
        entry["check"] = measure_base(out, **CHECK, progress=False)
        entry["check_config"] = CHECK
        entry["seconds"]["measure"] = round(time.time() - start, 1)
    _update_manifest(out, _round(entry), command or "", seed)
    return entry


def script_parser(prog: str, description: str, out_help: str) -> argparse.ArgumentParser:
    """The options every world training script takes (``--out``, ``--work``, ``--seed``, ``--threads``, ...)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--out", type=Path, required=True, help=out_help)
    parser.add_argument("--work", type=Path, required=True, help="folder for the data, runs and checkpoints")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on a shared 2-core machine two threads oversubscribe and run slower)",
    )
    parser.add_argument("--no-measure", action="store_true", help="skip the evaluation (not for shipped weights)")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def script_start(args: argparse.Namespace, prog: str, argv: list[str] | None) -> str:
    """Logging and torch threads for a world training script; returns its command line as the manifest records it."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import torch

    torch.set_num_threads(args.threads)
    words = argv if argv is not None else sys.argv[1:]
    return f"{prog} " + " ".join(shlex.quote(a) for a in words)


def main(argv: list[str] | None = None) -> int:
    prog = "python -m idfusion.world.train_base"
    parser = script_parser(prog, __doc__.split("\n")[0], "the pipeline folder to write (replaced)")
    parser.add_argument("--plan", choices=sorted(PLANS), default="full")
    args = parser.parse_args(argv)
    command = script_start(args, prog, argv)
    entry = train_base(
        args.out.resolve(),
        args.work.resolve(),
        seed=args.seed,
        plan=args.plan,
        progress=not args.no_progress,
        command=command,
        measure=not args.no_measure,
    )
    print(json.dumps(_round({k: entry.get(k) for k in ("seconds", "metrics")}), indent=1))  # noqa: T201 - summary
    return 0


if __name__ == "__main__":
    sys.exit(main())
