"""Speed and memory of a method against plain diffusers StableDiffusionPipeline, measured side by side in one run.

Both pipelines share the same UNet, VAE, scheduler config, steps, size and dtype; weights are random at full SD1.5
size (real weights are not needed to time the computation). Runs alternate (baseline, method, baseline, ...) so
drift in machine load hits both. Reported per pipeline: median seconds per denoising step, seconds per image (all
of ``__call__``: identity encoding, prompt encoding, sampling, VAE decode), and peak resident memory (and peak
VRAM on CUDA) during its runs.

Methods register a :class:`BenchCase` in :data:`BENCH_CASES`.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["BENCH_CASES", "BenchCase", "BenchResult", "run_bench", "format_table", "write_benchmarks_doc"]

logger = logging.getLogger(__name__)


@dataclass
class BenchResult:
    name: str
    seconds_per_step: float
    seconds_per_image: float
    peak_rss_gib: float
    peak_vram_gib: float | None = None
    step_times: list[float] = field(default_factory=list)


@dataclass
class BenchCase:
    """How to time one method: ``build(components, scheduler)`` returns ``call(steps, generator, on_step)``, which
    returns the images; ``baseline`` builds what it is measured against."""

    method: str
    build: Callable[[dict, str], Callable[[int, torch.Generator, Callable], Any]]
    goal: float | None = None  # the largest acceptable seconds-per-step ratio (method / baseline)
    baseline: Callable[[dict, str], Callable[[int, torch.Generator, Callable], Any]] | None = None
    baseline_name: str = "sd15 (diffusers)"
    size: str = "512x512"
    sampling: str | None = None  # what the case samples with, where it is not the --scheduler option
    batch: str = "1 image, CFG (UNet batch 2)"


class _PeakRSS:
    """Samples the process's resident memory in a thread (torch's CPU allocations are invisible to tracemalloc)."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()

    @staticmethod
    def current() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):  # not Linux: fall back to the lifetime peak
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def __enter__(self):
        self.peak = self.current()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.current())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.current())


def full_size_components(dtype: torch.dtype, device: str, *, tiny: bool = False) -> dict:
    """Random SD1.5 components at full size (or tiny, for a quick smoke run), the real CLIP tokenizer."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from .clip_tokenizer import load_clip_tokenizer
    from .testing import components as c

    torch.manual_seed(0)
    if tiny:
        unet, vae, text = c.tiny_unet(cross_attention_dim=512), c.tiny_vae(), c.tiny_text_encoder(hidden_size=512)
    else:
        unet = UNet2DConditionModel.from_config(c.sd15_unet_config())
        vae = AutoencoderKL.from_config(c.sd15_vae_config())
        text = CLIPTextModel(CLIPTextConfig(**c.sd15_text_encoder_config()))
    modules = {"unet": unet, "vae": vae, "text_encoder": text}
    for module in modules.values():
        module.to(device=device, dtype=dtype).eval()
    from diffusers import PNDMScheduler

    return {
        **modules,
        "tokenizer": load_clip_tokenizer(),
        "scheduler": PNDMScheduler.from_config(c.sd15_scheduler_config()),
    }


def _baseline(components: dict, scheduler: str):
    from diffusers import StableDiffusionPipeline

    from .pipelines.common import make_scheduler

    pipe = StableDiffusionPipeline(
        vae=components["vae"], text_encoder=components["text_encoder"], tokenizer=components["tokenizer"],
        unet=components["unet"], scheduler=make_scheduler(scheduler, components["scheduler"].config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)

    def call(steps, generator, on_step):
        return pipe("photo of a person", num_inference_steps=steps, guidance_scale=3.0, generator=generator,
                    output_type="np", callback_on_step_end=on_step).images  # fmt: skip

    return call


def _arc2face(components: dict, scheduler: str):
    from .pipelines.pipeline_arc2face import Arc2FacePipeline

    pipe = Arc2FacePipeline(
        components["vae"], components["text_encoder"], components["tokenizer"], components["unet"],
        components["scheduler"],
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    identity = torch.randn(512, generator=torch.Generator().manual_seed(0))

    def call(steps, generator, on_step):
        return pipe(id_embeds=identity, num_inference_steps=steps, guidance_scale=3.0, scheduler=scheduler,
                    seed=int(generator.initial_seed()), callback_on_step_end=on_step, output_type="np").images  # fmt: skip

    return call


class OfficialReadProcessor:
    """The official reference update written out as the released code computes it: every term for every sample of
    the batch, with the reference tokens repeated per sample (``(n, L, C) -> (B, n*L, C)``) before projection."""

    def __init__(self, bank, key, reference_attention):
        self.bank, self.key, self.reference_attention = bank, key, reference_attention

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        from .methods.flashface import _attention

        y = hidden_states
        batch = y.shape[0]
        if self.bank.writing:
            self.bank.tokens[self.key] = y
            return _attention(attn, y, y)
        tokens = self.bank.tokens.get(self.key)
        lam = self.bank.strength.to(y).view(batch, 1, 1) if tokens is not None else y.new_zeros(batch, 1, 1)
        ref = self.reference_attention
        out = _attention(attn, y, y) + (1 - lam) * _attention(ref, y, y)
        if tokens is not None:
            n, length, channels = tokens.shape
            repeated = tokens.reshape(1, n * length, channels).repeat(batch, 1, 1)  # (B, n*L, C), materialised
            out = out + lam * _attention(ref, y, torch.cat([y, repeated], dim=1))
        return out


def flashface_full_size(components: dict, dtype: torch.dtype, device: str, tiny: bool):
    """A random FlashFace (official) pipeline at full size sharing the benchmark's VAE and text encoder."""
    from diffusers import DDIMScheduler

    from .methods.flashface import OFFICIAL, build_flashface_models
    from .pipelines.pipeline_flashface import FlashFacePipeline
    from .testing import components as c

    torch.manual_seed(1)
    # FlashFace's GroupNorms use eps 1e-6 (SD1.5: 1e-5)
    config = c.tiny_unet_config(layers_per_block=2, cross_attention_dim=512) if tiny else c.sd15_unet_config()
    config = {**config, "norm_eps": 1e-6}
    unet, refnet = build_flashface_models(config, OFFICIAL)
    for module in (unet, refnet):
        module.to(device=device, dtype=dtype).eval()
    scheduler = DDIMScheduler.from_config(
        {**c.sd15_scheduler_config(), **OFFICIAL.scheduler_config, "clip_sample": False, "set_alpha_to_one": False}
    )
    pipe = FlashFacePipeline(
        components["vae"], components["text_encoder"], components["tokenizer"], unet, refnet, scheduler
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def use_official_processors(pipe) -> None:
    """Swap the main UNet's reference processors for :class:`OfficialReadProcessor` (same math, official work)."""
    from .methods.flashface import reference_blocks

    for path, block in reference_blocks(pipe.unet).items():
        block.attn1.set_processor(OfficialReadProcessor(pipe.bank, path, block.attn_ref))


@torch.no_grad()
def flashface_official_loop(pipe, reference_latents: torch.Tensor, steps: int, seed: int, on_step=None):
    """The official sampling control flow, step by step (``ContextGaussianDiffusion.denoise`` + ``RefStableUNet``):
    each step runs the ReferenceNet on the clean references at the current t with the negative prompt, then one main
    UNet call over all branches (``[pos, neg]`` at lambda_0 while t > T*, then ``[pos + ref, pos, neg]`` with
    lambda ``[lam, 0, 0]``), two-phase guidance with CFG-rescale 0.5, DDIM (trailing). Defaults as the demo.
    Used with :class:`OfficialReadProcessor` as the reference for the pipeline's output and speed."""
    from .methods import flashface as ff
    from .pipelines import pipeline_flashface as pf
    from .pipelines.common import make_scheduler

    positive, negative = pipe.encode_prompts(
        [f"a photo of a person, {pf.OFFICIAL_POSITIVE_POSTFIX}", f", {pf.OFFICIAL_NEGATIVE_POSTFIX}"]
    ).chunk(2)
    size = pipe._native_size() or pipe.unet.config.sample_size * 8
    scheduler = make_scheduler("ddim", pipe._base_scheduler_config)
    scheduler.set_timesteps(steps)
    generator = torch.Generator("cpu").manual_seed(seed)
    latents = torch.randn((1, 4, size // 8, size // 8), generator=generator).to(positive)
    latents = latents * scheduler.init_noise_sigma
    mask = ff.face_position_mask(None, size, size).to(latents)
    pipe.bank.weights = None
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


def _flashface_case(official: bool):
    def build(components: dict, scheduler: str):
        if components.get("_flashface") is None:
            unet = components["unet"]
            components["_flashface"] = flashface_full_size(
                components, unet.dtype, unet.device.type, components.get("_tiny", False)
            )
        pipe = components["_flashface"]
        latents = torch.randn(4, 4, 28, 28, generator=torch.Generator().manual_seed(0))

        def call(steps, generator, on_step):
            from .methods.flashface import attach_reference_processors

            seed = int(generator.initial_seed())
            if official:
                use_official_processors(pipe)
                return flashface_official_loop(pipe, latents, steps, seed, on_step)
            attach_reference_processors(pipe.unet, pipe.refnet, pipe.bank, pipe.variant)
            return pipe(reference_latents=latents, prompt="a photo of a person", num_inference_steps=steps,
                        seed=seed, callback_on_step_end=on_step, output_type="np").images  # fmt: skip

        return call

    return build


def _fact(components: dict, scheduler: str):
    """FACT at full size: TransFace ViT-S, the 16-query resampler and adapters at the 16 sites (random, non-zero
    gates), on a copy of the benchmark's UNet (same weights), at the release's adapter scale 0.5."""
    import copy

    from .methods import fact
    from .pipelines.pipeline_fact import FaceTokens, FactPipeline

    unet = copy.deepcopy(components["unet"])
    device, dtype, width = unet.device, unet.dtype, unet.config.cross_attention_dim
    torch.manual_seed(2)
    processors = fact.attach_face_adapter(unet, cross_attention_dim=width)
    for processor in processors.values():
        with torch.no_grad():
            processor.alpha_attn.fill_(0.5)
            processor.alpha_dense.fill_(-0.5)
    tiny = components.get("_tiny", False)
    face_encoder = fact.TransFaceViT(**({"embed_dim": 64, "depth": 2} if tiny else {})).eval()
    resampler = fact.FaceResampler(embedding_dim=face_encoder.embed_dim, output_dim=width).eval()
    pipe = FactPipeline(components["vae"], components["text_encoder"], components["tokenizer"], unet,
                        components["scheduler"])  # fmt: skip
    pipe.face_encoder, pipe.resampler = face_encoder.to(device, dtype), resampler.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    crop = np.random.default_rng(0).integers(0, 256, (1, 112, 112, 3), dtype=np.uint8)

    def call(steps, generator, on_step):
        tokens = fact.encode_face_tokens(pipe.face_encoder, pipe.resampler, crop)  # the per-request face work
        identity = FaceTokens(tokens, pipe.resampler.unconditional(1))
        return pipe(face_tokens=identity, prompt="photo of a person", num_inference_steps=steps, guidance_scale=3.0,
                    scheduler=scheduler, seed=int(generator.initial_seed()), callback_on_step_end=on_step,
                    output_type="np").images  # fmt: skip

    return call


def feedface_full_size(components: dict):
    """A random FeedFace pipeline at full size (UniDiffuser-v1 U-ViT, feed adapter with its CLIP-B/32 tower, caption
    decoder) sharing the benchmark's VAE and CLIP text encoder, which are UniDiffuser's too; built once per run."""
    if components.get("_feedface") is None:
        from diffusers import DPMSolverSinglestepScheduler, UniDiffuserModel, UniDiffuserTextDecoder

        from .methods import feedface
        from .methods import feedface_checkpoint as ckpt
        from .pipelines.pipeline_feedface import FeedFacePipeline

        unet, text_encoder = components["unet"], components["text_encoder"]
        device, dtype = unet.device, unet.dtype
        torch.manual_seed(3)
        if components.get("_tiny", False):
            from .testing.tiny_feedface_adapter import TINY_VISION_CONFIG
            from .testing.tiny_feedface_base import tiny_uvit_config

            uvit = UniDiffuserModel(**tiny_uvit_config(sample_size=64))
            adapter = feedface.FeedAdapter(uvit.inner_dim, vision_config=TINY_VISION_CONFIG)
            decoder_config = ckpt.text_decoder_config(n_layer=1, prefix_hidden_dim=uvit.config.text_dim)
        else:
            uvit, adapter = UniDiffuserModel(**ckpt.UVIT_V1_CONFIG), feedface.FeedAdapter()
            decoder_config = ckpt.TEXT_DECODER_CONFIG
        decoder = UniDiffuserTextDecoder(**{**decoder_config, "prefix_inner_dim": text_encoder.config.hidden_size})
        with torch.no_grad():  # trained adapters are not zero
            for block in adapter.blocks:
                block.zero_linear.weight.normal_(0, 1e-3)
        for module in (uvit, adapter, decoder):
            module.to(device=device, dtype=dtype).eval()
        scheduler = DPMSolverSinglestepScheduler.from_config(feedface.SCHEDULER_CONFIG)
        pipe = FeedFacePipeline(components["vae"], text_encoder, components["tokenizer"], decoder, uvit, scheduler)
        pipe.feed = adapter
        pipe._attach_feed()
        pipe.set_progress_bar_config(disable=True)
        components["_feedface"] = pipe
    return components["_feedface"]


def _feedface_case(adapter: bool):
    def build(components: dict, scheduler: str):
        from .methods import feedface

        pipe = feedface_full_size(components)
        crop = np.random.default_rng(0).integers(0, 256, (1, 224, 224, 3), dtype=np.uint8)

        def call(steps, generator, on_step):
            pixels = feedface.preprocess_faces(crop).to(pipe.unet.device, pipe.unet.dtype)
            tokens = pipe.feed.encode_faces(pixels) if adapter else torch.zeros(1, 50, pipe.feed.dim)
            return pipe(face_tokens=tokens, prompt="photo of a person", feed_scale=0.8 if adapter else 0.0,
                        num_inference_steps=steps, scheduler=scheduler, seed=int(generator.initial_seed()),
                        callback_on_step_end=on_step, output_type="np").images  # fmt: skip

        return call

    return build


BENCH_CASES: dict[str, BenchCase] = {
    "arc2face": BenchCase("arc2face", _arc2face, goal=1.02),
    "fact": BenchCase("fact", _fact, goal=1.25, batch="1 image, CFG (UNet batch 2), 77 + 16 tokens"),
    # FlashFace against the official control flow on the same weights: goal 1.3x faster, i.e. ratio <= 1/1.3
    "flashface": BenchCase(
        "flashface",
        _flashface_case(official=False),
        goal=round(1 / 1.3, 3),
        baseline=_flashface_case(official=True),
        baseline_name="flashface (official control flow)",
        size="768x768, 4 references",
        sampling="ddim (trailing)",
        batch="1 image, 2 guidance branches while t > 750, then 3",
    ),
    # FeedFace against the bare U-ViT (adapter multiplier 0 skips every feed block) on the same weights
    "feedface": BenchCase(
        "feedface",
        _feedface_case(adapter=True),
        goal=1.2,
        baseline=_feedface_case(adapter=False),
        baseline_name="unidiffuser-v1 U-ViT (bare)",
        size="512x512, 1 reference",
        batch="1 image, 2 U-ViT calls per step (conditional with the adapter, unconditional without)",
    ),
}


def _time_runs(call, steps: int, repeats: int, device: str) -> tuple[list[float], list[float], Any]:
    step_times, image_times, images = [], [], None
    for repeat in range(repeats):
        marks: list[float] = []

        def on_step(pipe, index, timestep, kwargs, marks=marks):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            marks.append(time.perf_counter())
            return kwargs

        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        images = call(steps, torch.Generator("cpu").manual_seed(repeat), on_step)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        image_times.append(time.perf_counter() - start)
        step_times += [b - a for a, b in zip(marks, marks[1:], strict=False)]
    return step_times, image_times, images


def run_bench(
    method: str,
    *,
    steps: int = 4,
    repeats: int = 2,
    dtype: str = "bfloat16",
    device: str = "cpu",
    scheduler: str = "dpm++",
    tiny: bool = False,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Time ``method`` against its baseline (plain diffusers SD1.5, or for FlashFace the official control flow on
    the same weights); returns a JSON-ready dict (see module docstring)."""
    if method not in BENCH_CASES:
        raise ValueError(f"no benchmark for {method!r}; available: {', '.join(BENCH_CASES)}")
    if steps < 2:
        raise ValueError("steps must be at least 2 (step times are measured between steps)")
    say = progress or logger.info
    torch_dtype = getattr(torch, dtype)
    say(f"building random {'tiny' if tiny else 'full-size'} SD1.5 components ({dtype}, {device})")
    components = full_size_components(torch_dtype, device, tiny=tiny)
    components["_tiny"] = tiny
    case = BENCH_CASES[method]
    calls = {
        case.baseline_name: (case.baseline or _baseline)(components, scheduler),
        method: case.build(components, scheduler),
    }
    for name, call in calls.items():  # warm-up: first-call allocations and kernel selection
        say(f"warm-up: {name}")
        _time_runs(call, 2, 1, device)[:2]

    samples: dict[str, dict[str, list]] = {name: {"steps": [], "images": [], "rss": [], "vram": []} for name in calls}
    outputs: dict[str, Any] = {}
    for repeat in range(repeats):
        for name, call in calls.items():
            say(f"run {repeat + 1}/{repeats}: {name}")
            gc.collect()
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            with _PeakRSS() as rss:
                step_times, image_times, outputs[name] = _time_runs(call, steps, 1, device)
            samples[name]["steps"] += step_times
            samples[name]["images"] += image_times
            samples[name]["rss"].append(rss.peak)
            if device.startswith("cuda"):
                samples[name]["vram"].append(torch.cuda.max_memory_allocated())

    results = []
    for name, s in samples.items():
        results.append(
            BenchResult(
                name=name,
                seconds_per_step=statistics.median(s["steps"]),
                seconds_per_image=statistics.median(s["images"]),
                peak_rss_gib=max(s["rss"]) / 2**30,
                peak_vram_gib=max(s["vram"]) / 2**30 if s["vram"] else None,
                step_times=s["steps"],
            )
        )
    baseline, measured = results
    return {
        "method": method,
        "settings": {
            "steps": steps,
            "repeats": repeats,
            "dtype": dtype,
            "device": device,
            "scheduler": case.sampling or scheduler,
            "size": "tiny" if tiny else f"full SD1.5 ({case.size}, random weights)",
            "batch": case.batch,
        },  # fmt: skip
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None,
        },
        "results": [asdict(r) for r in results],
        "ratio_per_step": measured.seconds_per_step / baseline.seconds_per_step,
        "ratio_per_image": measured.seconds_per_image / baseline.seconds_per_image,
        "goal_ratio_per_step": case.goal,
        # same seed, same weights: how far the two final images are apart (meaningful where the math is the same)
        "max_abs_output_difference": float(
            np.abs(np.asarray(outputs[baseline.name]) - np.asarray(outputs[measured.name])).max()
        ),
    }


def format_table(report: dict) -> str:
    lines = [
        "| pipeline | s/step | s/image | peak RAM GiB | peak VRAM GiB |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in report["results"]:
        vram = f"{r['peak_vram_gib']:.2f}" if r["peak_vram_gib"] is not None else "-"
        lines.append(
            f"| {r['name']} | {r['seconds_per_step']:.3f} | {r['seconds_per_image']:.2f} | {r['peak_rss_gib']:.2f} | {vram} |"
        )
    goal = report["goal_ratio_per_step"]
    lines.append("")
    lines.append(
        f"ratio (method / baseline): {report['ratio_per_step']:.3f} per step, {report['ratio_per_image']:.3f} per "
        f"image" + (f"; goal per step <= {goal}" if goal else "")
    )
    return "\n".join(lines)


def write_benchmarks_doc(path: str | os.PathLike, report: dict, command: str) -> Path:
    """Replace (or add) this method's section of docs/benchmarks.md with the report and the command that made it."""
    from .images import atomic_write_bytes

    path = Path(path)
    text = (
        path.read_text()
        if path.exists()
        else "# Benchmarks\n\nRegenerated by `idfusion bench`; one section per method.\n"
    )
    begin, end = f"<!-- bench:{report['method']} -->", f"<!-- /bench:{report['method']} -->"
    s = report["settings"]
    section = "\n".join(
        [
            begin,
            f"## {report['method']}",
            "",
            f"Command: `{command}`",
            "",
            f"Settings: {s['size']}, {s['steps']} steps x {s['repeats']} runs, {s['dtype']} on {s['device']}, "
            f"{s['scheduler']}, {s['batch']}. Machine: {report['machine']['cores']} cores, torch "
            f"{report['machine']['torch']}" + (f", {report['machine']['gpu']}" if report["machine"]["gpu"] else "") + ".",
            "",
            format_table(report),
            "",
            "<details><summary>JSON</summary>",
            "",
            "```json",
            json.dumps({k: v for k, v in report.items() if k != "results"} | {
                "results": [{k: v for k, v in r.items() if k != "step_times"} for r in report["results"]]
            }, indent=1),
            "```",
            "",
            "</details>",
            end,
        ]
    )  # fmt: skip
    if begin in text and end in text:
        text = text[: text.index(begin)] + section + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    atomic_write_bytes(path, text.encode())
    return path
