"""Official FlashFace's sampler: DDIM (eta = 0) between sigmas at fractional times, ending at sigma 0
(``ali-vilab/FlashFace`` ``ldm/ops/diffusion.py`` ``GaussianDiffusion.sample`` and ``ldm/ops/solvers.py``
``sample_ddim``, as ``flashface/all_finetune/demo_gradio.py`` calls them with ``config.py``'s
``discretization='trailing'``).

The release's rule, with ``T = num_train_timesteps`` and VP sigmas ``sigma_n = sqrt(1 - alphas_cumprod[n])``:

1. Times ``tau_i``: trailing ``arange(T - 1, -1, -T / N)`` (``999, 999 - 1000/N, ...``), leading
   ``arange(0, T, T / N)`` reversed, or ``linspace(T - 1, 0, N)``; float32, clipped to ``[0, T - 1]``. Float32
   ``arange`` sometimes yields ``N + 1`` points (e.g. ``N = 61``: a last one at ``-1``, clipped to 0); kept.
2. ``s_i = sigma(tau_i)``, interpolated linearly in ``log`` of the VE sigma ``sigma / sqrt(1 - sigma^2)`` between
   ``floor(tau_i)`` and ``ceil(tau_i)``; then ``s_N = 0``.
3. The model sees the integer ``n_i = round(tau_i)`` (the release maps ``s_i`` back to a time by the inverse
   interpolation and rounds half to even; both maps run in float32 here too, so exact halves such as ``936.5`` at
   ``N = 16`` round the way the release's do), and ``x0`` uses ``sigma_{n_i}`` at that integer time.
4. DDIM (Song et al., arXiv 2010.02502, eq. (12) with eta = 0) from ``s_i`` to ``s_{i+1}``:
   ``x <- a_{i+1} x0 + s_{i+1} (x - a_i x0) / s_i`` with ``a = sqrt(1 - s^2)``; the last step returns x0.

diffusers' ``DDIMScheduler`` instead steps between ``alphas_cumprod`` at integer times and ends at
``alphas_cumprod[0]`` (or 1 with ``set_alpha_to_one``), which moves the final latents by a few percent.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from ._common import (
    ReleaseSchedulerOutput,
    StepIndexMixin,
    check_prediction_type,
    to_data_prediction,
    training_betas,
)

__all__ = ["FlashFaceDDIMScheduler", "TIMESTEP_SPACINGS"]

logger = logging.getLogger(__name__)

TIMESTEP_SPACINGS = ("trailing", "leading", "linspace")


class FlashFaceDDIMScheduler(StepIndexMixin, SchedulerMixin, ConfigMixin):
    """DDIM exactly as official FlashFace samples (eta = 0).

    :attr:`timesteps` are the integer timesteps the UNet (and ReferenceNet, and the guidance phase switch
    ``t > T*``) must be given, one per model evaluation; :attr:`sigmas` the ``N + 1`` VP sigmas the update moves
    between (fractional times, last 0). The final ``prev_sample`` is the clean latent x0: no extra denoise.
    ``init_noise_sigma`` is 1 and :meth:`scale_model_input` is the identity.

    Args:
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas: the training schedule (SD's scaled
            linear 0.00085..0.012 over 1000 steps), in float64 as in the release.
        timestep_spacing: the release's ``discretization``: ``"trailing"`` (official), ``"leading"`` or
            ``"linspace"``.
        prediction_type: ``"epsilon"`` (official), ``"v_prediction"`` or ``"sample"``.
    """

    _compatibles: list = []
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        trained_betas: np.ndarray | list[float] | None = None,
        timestep_spacing: str = "trailing",
        prediction_type: str = "epsilon",
    ):
        check_prediction_type(prediction_type)
        if timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(
                f"timestep_spacing must be one of {', '.join(TIMESTEP_SPACINGS)}, got {timestep_spacing!r}"
            )
        betas = torch.from_numpy(
            training_betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
        )
        # float64 torch ops, as the release computes them: every value equals its to the bit (numpy differs in the
        # last bit for some)
        sigmas = (1.0 - torch.cumprod(1.0 - betas, dim=0)).sqrt()
        self.train_sigmas = sigmas.numpy()  # VP sigma at each integer time
        self.train_alphas = (1.0 - sigmas**2).sqrt().numpy()
        # log VE sigma, the interpolation variable: float64, then float32 (where the release interpolates)
        self._log_ve = (sigmas**2 / (1.0 - sigmas**2)).sqrt().log().float()
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1)
        self.fractional_timesteps = self.timesteps.float()
        self.sigmas = torch.zeros(0)
        self._step_index = None
        self._begin_index = None

    def _times(self, num_inference_steps: int) -> torch.Tensor:
        total, spacing = self.config.num_train_timesteps, self.config.timestep_spacing
        stride = total / num_inference_steps
        if spacing == "trailing":
            times = torch.arange(total - 1, -1, -stride, dtype=torch.float32)
        elif spacing == "leading":
            times = torch.arange(0, total, stride, dtype=torch.float32).flip(0)
        else:
            times = torch.linspace(total - 1, 0, num_inference_steps, dtype=torch.float32)
        return times.clamp(0, total - 1)

    def _sigma_at(self, times: torch.Tensor) -> torch.Tensor:
        """VP sigma at fractional times: linear in log VE sigma between the neighbouring integer times."""
        low, high, w = times.floor().long(), times.ceil().long(), times - times.floor()
        log_ve = (1 - w) * self._log_ve[low] + w * self._log_ve[high]
        ve = log_ve.exp()
        return (ve**2 / (1 + ve**2)).sqrt()

    def _time_of(self, sigmas: torch.Tensor) -> torch.Tensor:
        """The inverse map, sigma -> fractional time (float32), before rounding."""
        log_ve = (sigmas**2 / (1 - sigmas**2)).sqrt().log()
        # the interval [k, k + 1] whose lower knot is the last one at or below (log VE sigma increases with time)
        k = ((log_ve[:, None] - self._log_ve[None, :]) >= 0).sum(1).sub(1).clamp(0, len(self._log_ve) - 2)
        w = ((self._log_ve[k] - log_ve) / (self._log_ve[k] - self._log_ve[k + 1])).clamp(0, 1)
        return (1 - w) * k + w * (k + 1)

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Plan ``num_inference_steps`` DDIM steps (usually that many model evaluations; see the module notes)."""
        total = self.config.num_train_timesteps
        if not 1 <= int(num_inference_steps) <= total:
            raise ValueError(f"num_inference_steps must lie in [1, {total}], got {num_inference_steps}")
        times = self._times(int(num_inference_steps))
        if len(times) != num_inference_steps:
            logger.info(
                "the release's %s grid for %d steps has %d points (float32 arange); sampling takes %d steps",
                self.config.timestep_spacing, num_inference_steps, len(times), len(times),
            )  # fmt: skip
        sigmas = self._sigma_at(times)
        self.num_inference_steps = int(num_inference_steps)
        self.fractional_timesteps = times.to(device)
        self.sigmas = torch.cat([sigmas, sigmas.new_zeros(1)]).to(device)
        self.timesteps = self._time_of(sigmas).round().long().to(device)
        self._step_index, self._begin_index = None, None

    def scale_model_input(self, sample: torch.Tensor, timestep: int | torch.Tensor | None = None) -> torch.Tensor:
        """The identity: the model takes ``x_t`` as it is."""
        return sample

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        return_dict: bool = True,
    ) -> ReleaseSchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """One DDIM step from ``sigmas[i]`` to ``sigmas[i + 1]``; x0 from the model output at the integer time.

        Returns:
            :class:`ReleaseSchedulerOutput` (``prev_sample``, ``pred_original_sample``), or the tuple of both.
        """
        index = self._check_ready(timestep)
        n = int(self.timesteps[index])
        alpha_n, sigma_n = float(self.train_alphas[n]), float(self.train_sigmas[n])
        x0 = to_data_prediction(model_output, sample, alpha_n, sigma_n, self.config.prediction_type)
        # the sigmas stay float32 tensors, as in the release (its sampling arithmetic is float32)
        s, s_next = self.sigmas[index].to(sample.device), self.sigmas[index + 1].to(sample.device)
        # DDIM, eta = 0: keep the noise direction that x and x0 imply, move to the next sigma
        direction = (sample - (1 - s**2).sqrt() * x0) / s
        prev_sample = (1 - s_next**2).sqrt() * x0 + s_next * direction
        self._step_index = index + 1
        if not return_dict:
            return (prev_sample, x0)
        return ReleaseSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)

    def __len__(self) -> int:
        return self.config.num_train_timesteps
