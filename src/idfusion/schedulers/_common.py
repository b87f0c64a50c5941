"""What the release schedulers share: the training betas and diffusers' step-index bookkeeping."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers.schedulers.scheduling_utils import SchedulerOutput

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


@dataclass
class ReleaseSchedulerOutput(SchedulerOutput):
    """``prev_sample`` is the input of the next model evaluation (the final sample after the last one);
    ``pred_original_sample`` is the data prediction x0 of this evaluation."""

    pred_original_sample: torch.Tensor | None = None


def training_betas(
    num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str, trained_betas=None
) -> np.ndarray:
    """Betas in float64, as both releases compute them (diffusers' own are float32); torch's ``linspace``, whose
    rounding both releases share, so the schedules agree to the bit."""
    if trained_betas is not None:
        betas = np.asarray(trained_betas, dtype=np.float64)
        if betas.shape != (num_train_timesteps,):
            raise ValueError(f"trained_betas has shape {betas.shape}, expected ({num_train_timesteps},)")
    elif beta_schedule == "scaled_linear":  # SD's schedule: linear in sqrt(beta)
        ramp = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64)
        betas = (ramp**2).numpy()
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64).numpy()
    else:
        raise ValueError(f"beta_schedule must be 'scaled_linear' or 'linear', got {beta_schedule!r}")
    if not ((betas > 0) & (betas < 1)).all():
        raise ValueError("betas must lie in (0, 1)")
    return betas


def check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}")


def to_data_prediction(
    model_output: torch.Tensor, sample: torch.Tensor, alpha: float, sigma: float, prediction_type: str
) -> torch.Tensor:
    """x0 from the model output at a point with x_t = alpha x0 + sigma eps (alpha^2 + sigma^2 = 1)."""
    if prediction_type == "epsilon":
        return (sample - sigma * model_output) / alpha
    if prediction_type == "v_prediction":
        return alpha * sample - sigma * model_output
    return model_output


class StepIndexMixin:
    """diffusers' convention: the step index starts at ``begin_index`` (or where the first timestep lies in
    :attr:`timesteps`) and advances by one per ``step()``."""

    timesteps: torch.Tensor
    _step_index: int | None = None
    _begin_index: int | None = None

    @property
    def step_index(self) -> int | None:
        """Index into :attr:`timesteps` of the next ``step()``; ``None`` before the first."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """First step index, when a pipeline set one with :meth:`set_begin_index`."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start at ``timesteps[begin_index]`` (called by pipelines before the loop, e.g. for img2img)."""
        self._begin_index = begin_index

    def index_for_timestep(self, timestep: float | torch.Tensor) -> int:
        """Position of ``timestep`` in :attr:`timesteps` (the first match)."""
        value = float(timestep)
        matches = np.flatnonzero(np.isclose(self.timesteps.double().cpu().numpy(), value, rtol=0.0, atol=1e-4))
        if len(matches) == 0:
            raise ValueError(f"timestep {value} is not one of this scheduler's timesteps")
        return int(matches[0])

    def _init_step_index(self, timestep: float | torch.Tensor) -> None:
        self._step_index = self.index_for_timestep(timestep) if self._begin_index is None else self._begin_index

    def _check_ready(self, timestep: float | torch.Tensor) -> int:
        if getattr(self, "num_inference_steps", None) is None:
            raise ValueError("call set_timesteps before step")
        if self._step_index is None:
            self._init_step_index(timestep)
        if self._step_index >= len(self.timesteps):
            raise ValueError(f"step called {self._step_index + 1} times for {len(self.timesteps)} timesteps")
        return self._step_index
