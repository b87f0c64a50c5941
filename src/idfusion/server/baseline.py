"""The synthetic world's base model as a served entry: the prompt alone, no identity (the floor of the judge score).

The base model is a plain diffusers ``StableDiffusionPipeline`` (:func:`idfusion.world.base.load_base_pipeline`), not
a registry method, so it has its own check, load and run hooks with the signatures of
:func:`idfusion.jobs.check_job`, :func:`idfusion.jobs.load_configured` and :func:`idfusion.jobs.run_job`. Its images
carry the same kind of metadata as every other idfusion PNG. Face photos, when given, are only references (the
contact sheet, the judge score).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from .. import __version__
from ..jobs import (
    GenerationJob,
    JobCancelled,
    JobError,
    LoadSettings,
    PipelineCache,
    check_limits,
    given,
    resolve_device,
)
from ..registry import methods, options_by_flag
from .catalogue import BASELINE_SPEC

__all__ = ["DEFAULT_PROMPT", "check_baseline", "load_baseline", "run_baseline"]

logger = logging.getLogger(__name__)

DEFAULT_PROMPT = "a photo of a person"


def check_baseline(job: GenerationJob) -> None:
    """Refuse what the base model cannot do (as :func:`idfusion.jobs.check_job` does for methods)."""
    allowed = {o.dest for o in BASELINE_SPEC.all_options()}
    refused = sorted(
        option.flag
        for option, _ in options_by_flag(methods()).values()
        if option.dest not in allowed and given(job.options.get(option.dest))
    )
    if refused:
        raise JobError(f"{', '.join(refused)}: not options of the {BASELINE_SPEC.title} (it reads the prompt only)")
    if job.face_weights or job.template is not None or job.id_embeds is not None:
        raise JobError(f"the {BASELINE_SPEC.title} takes no identity: no face weights, templates or embeddings")
    check_limits(job)


def load_baseline(spec: Any, model: str | None, settings: LoadSettings, load_options: Mapping[str, Any] | None = None):
    """The world base pipeline (``model``: another base folder) on ``settings``' device and dtype."""
    from ..world.base import load_base_pipeline

    device, dtype = resolve_device(settings.device, settings.dtype)
    pipe = load_base_pipeline(model)
    if dtype is not None:
        pipe.to(device, dtype)
    else:
        pipe.to(device)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.eval().requires_grad_(False)
    return pipe


def run_baseline(
    job: GenerationJob,
    settings: LoadSettings | None = None,
    *,
    cache: PipelineCache | None = None,
    progress: Callable[[int, int], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
):
    """Generate ``job`` with the base model; returns an :class:`~idfusion.pipelines.core.IdentityPipelineOutput`."""
    settings = settings or LoadSettings()
    check_baseline(job)
    if cache is None:
        return _generate(load_baseline(BASELINE_SPEC, job.model, settings), job, progress, should_cancel)
    with cache.use(BASELINE_SPEC, job.model, settings, {}) as pipe:
        return _generate(pipe, job, progress, should_cancel)


def _generate(pipe: Any, job: GenerationJob, progress, should_cancel):
    import numpy as np
    import torch

    from ..images import load_image
    from ..outputs import file_sha256
    from ..pipelines.core import IdentityPipelineOutput, resolve_seeds
    from ..pipelines.scheduling import scheduler_from_name, scheduler_name
    from ..world.base import DEFAULT_GUIDANCE_SCALE, DEFAULT_STEPS, base_model_dir

    if should_cancel is not None and should_cancel():
        raise JobCancelled("the job was cancelled")
    options = job.options
    steps = int(options.get("steps") or DEFAULT_STEPS)
    guidance = float(options["guidance"]) if given(options.get("guidance")) else DEFAULT_GUIDANCE_SCALE
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    width, height = int(options.get("width") or native), int(options.get("height") or native)
    prompt = options.get("prompt") or DEFAULT_PROMPT
    negative = options.get("negative_prompt") or None
    seeds = resolve_seeds(job.seed, job.num_images or 1)

    def on_step_end(_pipe: Any, step: int, _timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        if should_cancel is not None and should_cancel():
            raise JobCancelled("the job was cancelled")
        if progress is not None:
            progress(min(step + 1, steps), steps)
        return tensors

    saved = pipe.scheduler
    pipe.scheduler = scheduler_from_name(options.get("scheduler"), saved)  # for this job only
    try:
        with torch.inference_mode():
            images = pipe(
                [prompt] * len(seeds),
                negative_prompt=[negative] * len(seeds) if negative else None,
                num_inference_steps=steps,
                guidance_scale=guidance,
                width=width,
                height=height,
                generator=[torch.Generator().manual_seed(int(s)) for s in seeds],
                callback_on_step_end=on_step_end,
                output_type="pil",
            ).images
        sampler = scheduler_name(pipe.scheduler)
    finally:
        pipe.scheduler = saved
    folder = base_model_dir(job.model)
    shared = {
        "idfusion_version": __version__,
        "method": BASELINE_SPEC.name,
        "model": str(folder.resolve()),
        "model_files": {"unet": file_sha256(folder / "unet" / "diffusion_pytorch_model.safetensors")},
        "prompt": prompt,
        "negative_prompt": negative,
        "steps": steps,
        "guidance_scale": guidance,
        "scheduler": sampler,
        "width": width,
        "height": height,
    }
    metadata = [{**{k: v for k, v in shared.items() if v is not None}, "seed": int(s)} for s in seeds]
    references = [np.asarray(load_image(face).array) for face in job.faces]
    return IdentityPipelineOutput(images=images, metadata=metadata, references=references)
