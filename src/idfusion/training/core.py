"""The one training loop every recipe runs in, on ``accelerate``.

The same code runs on CPU, one GPU, DDP over several processes, and FSDP/DeepSpeed as configured by ``accelerate
launch --config_file``: it is the accelerate examples' loop (``prepare``, ``accumulate``, ``backward``,
``clip_grad_norm_``, ``save_state``/``load_state``) plus what a long run needs:

- **data position**: a :class:`~idfusion.training.data.ResumableSampler` that starts at the samples already seen,
  and draws every random choice of a sample (augmentation, condition dropout, diffusion noise) from that sample's
  seed. So a resumed run ends exactly where an uninterrupted one would, and N processes with batch B match one
  process with batch N*B (or batch B with N accumulation steps);
- **atomic checkpoints** (:mod:`~idfusion.training.checkpoints`) every ``checkpoint.every_steps`` and at the last
  step, keeping the last ``checkpoint.keep_last``; a crash at any moment loses at most the steps since the last one;
- **logs**: ``logs/metrics.csv`` (one row per step), TensorBoard events through accelerate's tracker,
  ``logs/loss.png`` at each checkpoint and at the end, and validation grids in ``validation/step-N.png``;
- **output**: the recipe's ``save()`` writes the inference format into ``model/`` (staged, then renamed).

Output folder layout: ``config.yaml``, ``checkpoints/checkpoint-N/``, ``logs/``, ``validation/``, ``model/``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import IdfusionError
from ..images import atomic_write_bytes, save_image
from .checkpoints import CheckpointError, Checkpoints, read_state, replace_dir
from .config import RunConfig, config_to_dict, dump_config
from .data import ResumableSampler
from .logs import MetricsCSV, image_grid, plot_losses
from .recipe import Recipe, load_recipe

if TYPE_CHECKING:
    from diffusers.training_utils import EMAModel

__all__ = ["TrainResult", "TrainingError", "train"]

logger = logging.getLogger(__name__)  # info lines come from the main process only (guarded below)

EMA_FILE = "ema.safetensors"


class TrainingError(IdfusionError, RuntimeError):
    """Training cannot go on (a non-finite loss, a checkpoint that does not fit the run)."""


@dataclass(frozen=True)
class TrainResult:
    """What a finished run left behind."""

    output_dir: Path
    model_dir: Path  # the inference-format model
    step: int
    loss: float | None  # the last step's loss (None if the run had no step left)
    main_process: bool = True  # False on the other processes of a distributed run


def train(
    config: RunConfig, *, resume: str | Path | None = None, recipe_class: type[Recipe] | None = None
) -> TrainResult:
    """Train ``config.recipe`` and save its model in the inference format under ``config.output_dir / "model"``.

    Args:
        config (`RunConfig`): a validated config (see :func:`~idfusion.training.config.load_config`).
        resume (`str` or `Path`, *optional*): ``"latest"`` (the newest complete checkpoint, or a new run if there is
            none) or a checkpoint folder. Without it, an output folder that holds checkpoints is refused.
        recipe_class (`type[Recipe]`, *optional*): the recipe class; defaults to the one registered under
            ``config.recipe.name``.

    Returns:
        `TrainResult`
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    recipe_class = recipe_class or load_recipe(config.recipe_name)
    out, opts = config.output_dir, config.train
    accelerator = Accelerator(
        mixed_precision=opts.mixed_precision,
        gradient_accumulation_steps=opts.gradient_accumulation_steps,
        step_scheduler_with_optimizer=False,  # stepped once per optimiser step below, whatever the process count
        log_with="tensorboard" if config.log.tensorboard else None,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=opts.find_unused_parameters)],
    )
    main = accelerator.is_main_process
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > accelerator.num_processes:  # e.g. `accelerate launch --multi_gpu` on a machine without GPUs
        raise TrainingError(
            f"{launched} processes were launched but accelerate sees {accelerator.num_processes}; each would train "
            "alone into the same folder. For several CPU processes use `ACCELERATE_USE_CPU=1 torchrun "
            "--nproc_per_node N ...` (or accelerate launch --cpu with mpirun)"
        )

    # 1. Decide where to start before building anything.
    checkpoints = Checkpoints(out / "checkpoints", config.checkpoint.keep_last)
    start_from = checkpoints.resolve(resume) if resume is not None else None
    if resume is None and checkpoints.complete():
        raise CheckpointError(
            f"{out}: holds checkpoints of an earlier run; pass --resume latest to continue it, "
            "or choose another output folder"
        )
    if resume is not None and start_from is None and main:
        logger.info("no checkpoint in %s: starting a new run", checkpoints.root)
    global_batch = opts.batch_size * accelerator.num_processes * opts.gradient_accumulation_steps
    state = read_state(start_from) if start_from is not None else None
    if state is not None and state.get("global_batch_size", global_batch) != global_batch:
        raise TrainingError(
            f"{start_from}: saved with a global batch of {state['global_batch_size']} samples per step, this run "
            f"has {global_batch} (batch_size x processes x gradient_accumulation_steps); the data position would "
            "not carry over"
        )
    if main:
        checkpoints.remove_leftovers()
        atomic_write_bytes(out / "config.yaml", dump_config(config).encode())
        if start_from is not None:
            _warn_config_changes(config, start_from)
    accelerator.wait_for_everyone()

    # 2. Models, optimiser, data, schedule (seeded, so every process builds the same initial weights).
    set_seed(config.seed)
    recipe = recipe_class(config, accelerator)
    recipe.dataset = dataset = recipe.build_dataset()
    models = recipe.build()
    if not models:
        raise TrainingError(f"recipe {recipe.name!r}: build() returned no trainable model")
    if opts.gradient_checkpointing:
        _enable_gradient_checkpointing(models, warn=main)
    optimizer = torch.optim.AdamW(
        recipe.parameters(models),
        lr=opts.learning_rate,
        betas=(opts.adam_beta1, opts.adam_beta2),
        weight_decay=opts.adam_weight_decay,
        eps=opts.adam_epsilon,
    )
    sampler = ResumableSampler(
        len(dataset), opts.max_steps * global_batch, seed=config.seed, shuffle=config.data.shuffle
    )
    loader = DataLoader(
        dataset,
        batch_size=opts.batch_size,
        sampler=sampler,
        collate_fn=recipe.collator(),
        num_workers=config.data.num_workers,
        drop_last=True,
    )
    lr_scheduler = get_scheduler(
        opts.lr_scheduler, optimizer, num_warmup_steps=opts.lr_warmup_steps, num_training_steps=opts.max_steps
    )
    names = list(models)
    *prepared, optimizer, loader, lr_scheduler = accelerator.prepare(*models.values(), optimizer, loader, lr_scheduler)
    recipe.models = dict(zip(names, prepared, strict=True))
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    ema = _build_ema(trainable, opts.ema_decay) if opts.use_ema else None

    # 3. Resume: weights, optimiser, schedule and RNG through accelerate; EMA and data position here.
    step = 0
    if start_from is not None:
        accelerator.load_state(str(start_from))
        if ema is not None:
            _load_ema(ema, start_from)
        step = state["step"]
        if main:
            logger.info("resumed from %s (step %d)", start_from, step)
    sampler.start = step * global_batch

    if config.log.tensorboard:
        accelerator.init_trackers("tensorboard", config=_hparams(config))
    metrics = MetricsCSV(out / "logs" / "metrics.csv", resume_step=step if start_from else None) if main else None

    def save_checkpoint() -> None:
        staging = checkpoints.staging(step)
        if main:
            shutil.rmtree(staging, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(staging))  # every process writes its own RNG state
        accelerator.wait_for_everyone()
        if main:
            if ema is not None:
                _save_ema(ema, staging)
            (staging / "config.yaml").write_text(dump_config(config), encoding="utf-8")
            done = checkpoints.commit(
                staging,
                step,
                {
                    "samples_seen": step * global_batch,
                    "global_batch_size": global_batch,
                    "num_processes": accelerator.num_processes,
                    "recipe": recipe.name,
                },
            )
            logger.info("saved %s", done)
            if config.log.plot:
                plot_losses(metrics.path, out / "logs" / "loss.png")
        accelerator.wait_for_everyone()

    def validate() -> None:
        if main:
            with _ema_weights(ema, trainable), _eval_mode(recipe.models), torch.no_grad():
                images = recipe.validate()
            if images:
                grid = image_grid(images)
                path = save_image(out / "validation" / f"step-{step:06d}.png", grid)
                logger.info("validation images: %s", path)
                if config.log.tensorboard:
                    import numpy as np

                    tracker = accelerator.get_tracker("tensorboard", unwrap=True)
                    tracker.add_image("validation", np.asarray(grid), step, dataformats="HWC")
        accelerator.wait_for_everyone()

    # 4. The loop: one iteration per micro-batch, one optimiser step per `gradient_accumulation_steps` of them.
    every, validate_every = config.checkpoint.every_steps, config.log.validate_every_steps
    progress = tqdm(
        total=opts.max_steps,
        initial=step,
        desc=f"train {recipe.name}",
        unit="step",
        disable=not accelerator.is_local_main_process,
        dynamic_ncols=True,
    )
    sums: dict[str, torch.Tensor] = {}
    last_loss = None
    tick = time.perf_counter()
    for model in recipe.models.values():
        model.train()
    with logging_redirect_tqdm():
        for batch in loader:
            with accelerator.accumulate(*recipe.models.values()):
                terms = _terms(recipe.loss(batch), recipe.name)
                accelerator.backward(terms["loss"])
                grad_norm = None
                if accelerator.sync_gradients and opts.max_grad_norm is not None:
                    grad_norm = accelerator.clip_grad_norm_(trainable, opts.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            for key, value in terms.items():
                sums[key] = sums.get(key, 0.0) + value.detach().float()
            if not accelerator.sync_gradients:
                continue

            lr = lr_scheduler.get_last_lr()[0]
            lr_scheduler.step()
            if ema is not None:
                ema.step(trainable)
            step += 1

            # One all-reduce for every logged term: the step's mean over processes and micro-batches.
            keys = list(sums)
            means = accelerator.reduce(torch.stack([sums[k] for k in keys]), reduction="mean")
            values = dict(zip(keys, (means / opts.gradient_accumulation_steps).tolist(), strict=True))
            sums = {}
            if not math.isfinite(values["loss"]):
                raise TrainingError(
                    f"step {step}: the loss is {values['loss']}; lower train.learning_rate or check the data "
                    f"(the last checkpoint is in {checkpoints.root})"
                )
            last_loss = values["loss"]
            now = time.perf_counter()
            speed = global_batch / max(now - tick, 1e-9)
            tick = now
            row = {"step": step, "epoch": step * global_batch / len(dataset), "lr": lr, **values}
            if grad_norm is not None:
                row["grad_norm"] = float(grad_norm)
            row["samples_per_second"] = speed
            if metrics is not None:
                metrics.write(row)
            accelerator.log({k: v for k, v in row.items() if k != "step"}, step=step)
            progress.update(1)
            progress.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}", samples_s=f"{speed:.1f}", refresh=False)

            if step % every == 0 or step == opts.max_steps:
                save_checkpoint()
            if validate_every and step % validate_every == 0 and step != opts.max_steps:
                validate()
        progress.close()

        # 5. Final validation and the inference-format model (with the EMA weights, if any).
        accelerator.wait_for_everyone()
        if config.log.validate_at_end or (validate_every and step % validate_every == 0):
            validate()
        model_dir, staging = out / "model", out / ".model.tmp"
        if main:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        accelerator.wait_for_everyone()
        with _ema_weights(ema, trainable), _eval_mode(recipe.models):
            recipe.save(staging)
        accelerator.wait_for_everyone()
        if main:
            replace_dir(staging, model_dir)
            logger.info("saved the %s model to %s", recipe.name, model_dir)
            if config.log.plot:
                plot_losses(metrics.path, out / "logs" / "loss.png")
    accelerator.end_training()
    return TrainResult(output_dir=out, model_dir=model_dir, step=step, loss=last_loss, main_process=main)


def _terms(result: torch.Tensor | dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    terms = result if isinstance(result, dict) else {"loss": result}
    scalars = all(isinstance(v, torch.Tensor) and v.ndim == 0 for v in terms.values())
    if "loss" not in terms or not scalars:
        raise TrainingError(
            f"recipe {name!r}: loss() must return a scalar tensor, or a dict of scalar tensors with a 'loss'"
        )
    return terms


def _enable_gradient_checkpointing(models: dict[str, torch.nn.Module], *, warn: bool) -> None:
    for name, model in models.items():
        # transformers names it gradient_checkpointing_enable, diffusers (and recipe wrappers) the other way round
        enable = getattr(model, "gradient_checkpointing_enable", None) or getattr(
            model, "enable_gradient_checkpointing", None
        )
        try:
            if enable is None:
                raise ValueError("no gradient checkpointing method")
            enable()
        except ValueError:  # both libraries raise ValueError for models without support
            if warn:
                logger.warning("%s does not support gradient checkpointing; training it without", name)


def _build_ema(parameters: list[torch.nn.Parameter], decay: float) -> EMAModel:
    from diffusers.training_utils import EMAModel

    return EMAModel(parameters, decay=decay)


# EMA state is saved as safetensors by hand: accelerate's register_for_checkpointing would pickle it and load it with
# torch.load(weights_only=False).
def _save_ema(ema: EMAModel, folder: Path) -> None:
    from safetensors.torch import save_file

    state = ema.state_dict()
    tensors = {f"shadow.{i}": p.detach().contiguous().cpu() for i, p in enumerate(state.pop("shadow_params"))}
    save_file(tensors, folder / EMA_FILE, metadata={"ema": json.dumps(state)})


def _load_ema(ema: EMAModel, folder: Path) -> None:
    from safetensors import safe_open

    path = folder / EMA_FILE
    if not path.is_file():
        raise TrainingError(f"{folder}: train.use_ema is on but the checkpoint has no {EMA_FILE}")
    with safe_open(path, framework="pt") as handle:
        state = json.loads(handle.metadata()["ema"])
        shadows = [handle.get_tensor(f"shadow.{i}") for i in range(len(ema.shadow_params))]
    device = ema.shadow_params[0].device
    ema.load_state_dict({**state, "shadow_params": [s.to(device) for s in shadows]})


@contextlib.contextmanager
def _ema_weights(ema: EMAModel | None, parameters: list[torch.nn.Parameter]) -> Iterator[None]:
    if ema is None:
        yield
        return
    ema.store(parameters)
    ema.copy_to(parameters)
    try:
        yield
    finally:
        ema.restore(parameters)


@contextlib.contextmanager
def _eval_mode(models: dict[str, torch.nn.Module]) -> Iterator[None]:
    for model in models.values():
        model.eval()
    try:
        yield
    finally:
        for model in models.values():
            model.train()


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        flat: dict[str, Any] = {}
        for key, value in tree.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: tree}


def _hparams(config: RunConfig) -> dict[str, Any]:
    """The config flattened for TensorBoard's hparams (scalars only)."""
    flat = _flatten(config_to_dict(config))
    return {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v) for k, v in flat.items()}


def _warn_config_changes(config: RunConfig, checkpoint: Path) -> None:
    import yaml

    try:
        saved = yaml.safe_load((checkpoint / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return
    before, now = _flatten(saved or {}), _flatten(config_to_dict(config))
    changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k) and k != "output_dir")
    if changed:
        logger.warning("resuming with a config that differs from the checkpoint's in: %s", ", ".join(changed))
