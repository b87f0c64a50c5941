"""Speed and memory of a method against plain diffusers StableDiffusionPipeline, measured side by side in one run.

Both pipelines share the same UNet, VAE, scheduler config, steps, size and dtype; weights are random at full SD1.5
size (real weights are not needed to time the computation). Runs alternate (baseline, method, baseline, ...) so
drift in machine load hits both. Reported per pipeline: median seconds per denoising step, seconds per image (all
of ``__call__``: identity encoding, prompt encoding, sampling, VAE decode), and peak resident memory (and peak
VRAM on CUDA) during its runs.

A method's registry entry names its :class:`BenchCase` (``bench="idfusion.bench:ARC2FACE"``).
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

__all__ = [
    "ARC2FACE",
    "FACT",
    "FEEDFACE",
    "FLASHFACE",
    "BenchCase",
    "BenchResult",
    "run_bench",
    "format_table",
    "write_benchmarks_doc",
]

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
    from diffusers import PNDMScheduler

    from . import sd15
    from .clip_tokenizer import load_clip_tokenizer

    torch.manual_seed(0)
    if tiny:
        unet = sd15.build_unet(sd15.tiny_unet_config(cross_attention_dim=512, layers_per_block=2))
        vae = sd15.build_vae(sd15.tiny_vae_config())
        text = sd15.build_text_encoder(sd15.tiny_text_encoder_config(hidden_size=512))
    else:
        unet = sd15.build_unet(sd15.sd15_unet_config())
        vae = sd15.build_vae(sd15.sd15_vae_config())
        text = sd15.build_text_encoder(sd15.sd15_text_encoder_config())
    modules = {"unet": unet, "vae": vae, "text_encoder": text}
    for module in modules.values():
        module.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return {
        **modules,
        "tokenizer": load_clip_tokenizer(),
        "scheduler": PNDMScheduler.from_config(sd15.sd15_scheduler_config()),
        "_tiny": tiny,
    }


def _baseline(size: int | None = None):
    def build(components: dict, scheduler: str):
        from diffusers import StableDiffusionPipeline

        from .pipelines.scheduling import make_scheduler

        pipe = StableDiffusionPipeline(
            vae=components["vae"], text_encoder=components["text_encoder"], tokenizer=components["tokenizer"],
            unet=components["unet"], scheduler=make_scheduler(scheduler, components["scheduler"].config),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )  # fmt: skip
        pipe.set_progress_bar_config(disable=True)
        side = None if size is None or components["_tiny"] else size

        def call(steps, generator, on_step):
            return pipe("photo of a person", num_inference_steps=steps, guidance_scale=3.0, generator=generator,
                        height=side, width=side, output_type="np", callback_on_step_end=on_step).images  # fmt: skip

        return call

    return build


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


def flashface_full_size(components: dict):
    """A random FlashFace (official) pipeline at full size sharing the benchmark's VAE and text encoder."""
    if components.get("_flashface") is None:
        import copy

        from . import sd15
        from .convert.flashface import flashface_scheduler_config
        from .methods.flashface import OFFICIAL, build_flashface_models
        from .pipelines.pipeline_flashface import FlashFacePipeline

        unet = components["unet"]
        torch.manual_seed(1)
        # FlashFace's GroupNorms use eps 1e-6 (SD1.5: 1e-5)
        if components["_tiny"]:
            config = sd15.tiny_unet_config(layers_per_block=2, cross_attention_dim=512)
        else:
            config = sd15.sd15_unet_config()
        main, refnet, reference = build_flashface_models({**config, "norm_eps": 1e-6}, OFFICIAL)
        for module in (main, refnet, reference):
            module.to(device=unet.device, dtype=unet.dtype).eval().requires_grad_(False)
        from .schedulers import FlashFaceDDIMScheduler

        # the release's own DDIM and VAE attention layout (set on a copy: the SD1.5 baseline keeps diffusers' VAE)
        pipe = FlashFacePipeline(
            copy.deepcopy(components["vae"]), components["text_encoder"], components["tokenizer"], main, refnet,
            FlashFaceDDIMScheduler.from_config(flashface_scheduler_config(OFFICIAL)), reference,
        )  # fmt: skip
        pipe.set_progress_bar_config(disable=True)
        components["_flashface"] = pipe
    return components["_flashface"]


def _flashface(components: dict, scheduler: str):
    pipe = flashface_full_size(components)
    latents = torch.randn(4, 4, 28, 28, generator=torch.Generator().manual_seed(0))
    side = 64 if components["_tiny"] else None

    def call(steps, generator, on_step):
        return pipe(reference_latents=latents, prompt="a photo of a person", num_inference_steps=steps, height=side,
                    width=side, seed=int(generator.initial_seed()), callback_on_step_end=on_step,
                    output_type="np").images  # fmt: skip

    return call


def _fact(components: dict, scheduler: str):
    """FACT at full size: TransFace ViT-S, the 16-query resampler and adapters at the 16 sites (random, non-zero
    gates), on a copy of the benchmark's UNet (same weights), at the release's adapter scale 0.5."""
    import copy

    from .methods import fact
    from .pipelines.pipeline_fact import FaceTokens, FactPipeline

    unet = copy.deepcopy(components["unet"])  # the baseline's UNet keeps its own processors
    device, dtype = unet.device, unet.dtype
    torch.manual_seed(2)
    tiny = components["_tiny"]
    face_encoder = fact.TransFaceViT(**({"embed_dim": 64, "depth": 2} if tiny else {}))
    adapter = fact.FactFaceAdapter.for_unet(unet, resampler={"embedding_dim": face_encoder.embed_dim})
    with torch.no_grad():
        for site in adapter.sites:
            site.alpha_attn.fill_(0.5)
            site.alpha_dense.fill_(-0.5)
    for module in (face_encoder, adapter):
        module.to(device=device, dtype=dtype).eval().requires_grad_(False)
    pipe = FactPipeline(components["vae"], components["text_encoder"], components["tokenizer"], unet,
                        components["scheduler"], face_encoder=face_encoder, face_adapter=adapter)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    crop = np.random.default_rng(0).integers(0, 256, (1, 112, 112, 3), dtype=np.uint8)

    def call(steps, generator, on_step):
        tokens = fact.encode_face_tokens(pipe.face_encoder, adapter.resampler, crop)  # the per-request face work
        identity = FaceTokens(tokens, adapter.resampler.unconditional(1))
        return pipe(face_tokens=identity, prompt="photo of a person", num_inference_steps=steps, guidance_scale=3.0,
                    scheduler=scheduler, seed=int(generator.initial_seed()), callback_on_step_end=on_step,
                    output_type="np").images  # fmt: skip

    return call


def feedface_full_size(components: dict):
    """A random FeedFace pipeline at full size (UniDiffuser-v1 U-ViT, feed adapter with its CLIP-B/32 tower, caption
    decoder) sharing the benchmark's VAE and CLIP text encoder, which are UniDiffuser's too; built once per run."""
    if components.get("_feedface") is None:
        from diffusers import UniDiffuserModel, UniDiffuserTextDecoder

        from .convert import feedface as ckpt
        from .methods import feedface
        from .pipelines.pipeline_feedface import FeedFacePipeline
        from .pipelines.scheduling import make_scheduler

        unet, text_encoder = components["unet"], components["text_encoder"]
        device, dtype = unet.device, unet.dtype
        torch.manual_seed(3)
        if components["_tiny"]:
            config = {**ckpt.UVIT_V1_CONFIG, "num_layers": 29, "attention_head_dim": 16, "num_attention_heads": 8,
                      "text_dim": 16, "clip_img_dim": 32, "sample_size": 8}  # fmt: skip
            uvit = UniDiffuserModel(**config)
            adapter = feedface.FeedAdapter(uvit.inner_dim, vision_config={"hidden_size": 32, "intermediate_size": 64,
                                           "num_hidden_layers": 2, "num_attention_heads": 4})  # fmt: skip
            decoder_config = ckpt.text_decoder_config(n_layer=1, prefix_hidden_dim=uvit.config.text_dim)
        else:
            uvit, adapter = UniDiffuserModel(**ckpt.UVIT_V1_CONFIG), feedface.FeedAdapter()
            decoder_config = ckpt.TEXT_DECODER_CONFIG
        decoder = UniDiffuserTextDecoder(**{**decoder_config, "prefix_inner_dim": text_encoder.config.hidden_size})
        with torch.no_grad():  # trained adapters are not zero
            for block in adapter.blocks:
                block.zero_linear.weight.normal_(0, 1e-3)
        for module in (uvit, adapter, decoder):
            module.to(device=device, dtype=dtype).eval().requires_grad_(False)
        scheduler = make_scheduler(feedface.SCHEDULER, feedface.SCHEDULER_CONFIG)
        pipe = FeedFacePipeline(components["vae"], text_encoder, components["tokenizer"], decoder, uvit, scheduler,
                                adapter)  # fmt: skip
        pipe.set_progress_bar_config(disable=True)
        components["_feedface"] = pipe
    return components["_feedface"]


def _feedface_case(adapter: bool):
    def build(components: dict, scheduler: str):
        from .methods import feedface

        pipe = feedface_full_size(components)
        crop = np.random.default_rng(0).integers(0, 256, (1, 224, 224, 3), dtype=np.uint8)
        side = 64 if components["_tiny"] else None

        def call(steps, generator, on_step):
            tokens = (
                feedface.encode_face_crops(pipe.feed, list(crop)) if adapter else torch.zeros(1, 50, pipe.feed.dim)
            )
            return pipe(face_tokens=tokens, prompt="photo of a person", feed_scale=0.8 if adapter else 0.0,
                        num_inference_steps=steps, height=side, width=side, seed=int(generator.initial_seed()),
                        callback_on_step_end=on_step, output_type="np").images  # fmt: skip

        return call

    return build


ARC2FACE = BenchCase("arc2face", _arc2face, goal=1.02)
FACT = BenchCase("fact", _fact, goal=1.25, batch="1 image, CFG (UNet batch 2), 77 + 16 tokens")
# FlashFace against plain SD1.5 at its resolution: the method's overhead (the comparison with the official control
# flow on the same weights is benchmarks/bench_flashface_official.py)
FLASHFACE = BenchCase(
    "flashface",
    _flashface,
    baseline=_baseline(768),
    baseline_name="sd15 (diffusers, 768)",
    size="768x768, 4 references",
    sampling="ddim (trailing)",
    batch="1 image, 2 guidance branches while t > 750, then 3",
)
# FeedFace against the bare U-ViT (adapter multiplier 0 skips every feed block) on the same weights
FEEDFACE = BenchCase(
    "feedface",
    _feedface_case(adapter=True),
    goal=1.2,
    baseline=_feedface_case(adapter=False),
    baseline_name="unidiffuser-v1 U-ViT (bare)",
    size="512x512, 1 reference",
    batch="1 image, 2 U-ViT calls per step (conditional with the adapter, unconditional without)",
)


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
    from .registry import get_method, methods, resolve

    if get_method(method).bench is None:
        raise ValueError(f"no benchmark for {method!r}; available: {', '.join(s.name for s in methods() if s.bench)}")
    if steps < 2:
        raise ValueError("steps must be at least 2 (step times are measured between steps)")
    say = progress or logger.info
    torch_dtype = getattr(torch, dtype)
    say(f"building random {'tiny' if tiny else 'full-size'} SD1.5 components ({dtype}, {device})")
    components = full_size_components(torch_dtype, device, tiny=tiny)
    case = resolve(get_method(method).bench)
    calls = {
        case.baseline_name: (case.baseline or _baseline())(components, scheduler),
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
    return replace_section(path, text, begin, end, section)


def replace_section(path: Path, text: str, begin: str, end: str, section: str) -> Path:
    """Write ``text`` to ``path`` atomically with the part from ``begin`` to ``end`` replaced by ``section`` (which
    carries both markers), or ``section`` appended where the markers are absent."""
    from .images import atomic_write_bytes

    if begin in text and end in text:
        text = text[: text.index(begin)] + section + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    atomic_write_bytes(path, text.encode())
    return path
