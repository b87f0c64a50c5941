"""FeedFace's sampler: DPM-Solver++ "fast" order 3 over uniform continuous time (``Xiang-cd/FeedFace``
``libs/dpm_solver_pp.py``, called by ``libs/feed_sample.py`` as ``DPM_Solver(predict_x0=True).sample(steps,
eps=1/N, T=1)`` with ``order=3, skip_type='time_uniform', method='fast'``).

The release's rule, in model-time units ``n = 1000 t`` (its U-ViT was trained on ``n`` in 1..1000 with
``alpha_bar(n) = alphas_cumprod[n - 1]``, and is fed ``n`` itself, a float):

- ``log alpha(n)`` is piecewise linear in ``n`` through the knots ``(n, 0.5 log alphas_cumprod[n - 1])``,
  ``n = 1..1000``; ``sigma = sqrt(1 - alpha^2)``, ``lambda = log alpha - log sigma``.
- The grid is ``n_k = linspace(1000, 1, N + 1)`` (``t`` from ``T = 1`` to ``eps = 1/1000``); the last point is the
  output: no step to sigma 0 and no final denoise.
- ``N`` is the number of model evaluations. The grid is covered by singlestep updates of orders
  ``[3] * (K - 2) + [2, 1]``, ``[3] * (K - 1) + [1]`` or ``[3] * (K - 1) + [2]`` for ``N % 3 == 0, 1, 2``, with
  ``K = N // 3 + 1`` (order 2: ``[2] * (N // 2)`` plus ``[1]`` when ``N`` is odd). An update of order ``p`` goes from
  ``n_i`` to ``n_{i+p}`` and evaluates the model at ``n_i, ..., n_{i+p-1}``, its intermediate points (``r1, r2`` are
  the grid's logSNR ratios), so the model sees ``n_0, ..., n_{N-1}``, one per :meth:`step`.

This is neither of diffusers' ``DPMSolverSinglestepScheduler`` variants: that one feeds ``n - 1`` on an integer grid,
steps to sigma 0, and its third-order intermediate is a midpoint (not a ``phi_2``) sub-step.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

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

__all__ = ["FeedFaceDPMSolverScheduler", "fast_orders"]

logger = logging.getLogger(__name__)


def fast_orders(num_evaluations: int, solver_order: int = 3) -> list[int]:
    """Orders of the singlestep updates of DPM-Solver-fast for ``num_evaluations`` model evaluations
    (DPM-Solver, arXiv 2206.00927, §3.4; the orders add up to ``num_evaluations``)."""
    if num_evaluations < 1:
        raise ValueError(f"num_inference_steps must be at least 1, got {num_evaluations}")
    if solver_order == 3:
        k = num_evaluations // 3 + 1
        return {0: [3] * (k - 2) + [2, 1], 1: [3] * (k - 1) + [1], 2: [3] * (k - 1) + [2]}[num_evaluations % 3]
    if solver_order == 2:
        return [2] * (num_evaluations // 2) + [1] * (num_evaluations % 2)
    raise ValueError(f"solver_order must be 2 or 3, got {solver_order}")


@dataclass(frozen=True)
class _Evaluation:
    """One model evaluation: at grid point ``start + position`` of an update of ``order`` from ``start``."""

    start: int
    order: int
    position: int


class FeedFaceDPMSolverScheduler(StepIndexMixin, SchedulerMixin, ConfigMixin):
    """DPM-Solver++ "fast" (singlestep, order 3) exactly as the FeedFace release samples.

    :attr:`timesteps` are the (fractional) model times ``n`` the U-ViT must be given, one per model evaluation;
    ``num_inference_steps`` is the release's ``sample_steps`` (its NFE, 40 in ``inference.py``). The final
    ``prev_sample`` is the release's output: the sample at ``n = 1`` (``t = eps``), not a denoised x0.
    ``init_noise_sigma`` is 1 and :meth:`scale_model_input` is the identity. Works on any sample shape (FeedFace's
    flat ``[z | clip_img]`` joint state included): every coefficient is a scalar per step.

    Args:
        num_train_timesteps: training steps (1000); the continuous time is ``t = n / num_train_timesteps``.
        beta_start, beta_end, beta_schedule, trained_betas: the training betas (SD's scaled linear
            0.00085..0.012), computed in float64 as in the release.
        solver_order: 3 (the release's) or 2.
        prediction_type: what the model predicts: ``"epsilon"`` (the U-ViT), ``"v_prediction"`` or ``"sample"``.
        final_time: the continuous end time ``eps`` (default ``1 / num_train_timesteps``, the release's).
    """

    _compatibles: list = []
    order = 1  # one step() per model evaluation

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        trained_betas: np.ndarray | list[float] | None = None,
        solver_order: int = 3,
        prediction_type: str = "epsilon",
        final_time: float | None = None,
    ):
        check_prediction_type(prediction_type)
        fast_orders(3, solver_order)  # validates the order
        betas = training_betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
        # knots of the piecewise-linear log alpha: model time n = 1..N holds 0.5 log alphas_cumprod[n - 1]
        self._knot_times = np.arange(1, num_train_timesteps + 1, dtype=np.float64)
        self._knot_log_alphas = 0.5 * np.cumsum(np.log1p(-betas))
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self.timesteps = torch.from_numpy(self._knot_times[::-1].astype(np.float32).copy())
        self._grid = np.zeros(0)
        self._plan: list[_Evaluation] = []
        self._x_start: torch.Tensor | None = None
        self._data: list[torch.Tensor] = []
        self._step_index = None
        self._begin_index = None

    # ---- the noise schedule in model time ----------------------------------------------------------------------

    def _log_alpha(self, n: np.ndarray | float) -> np.ndarray:
        return np.interp(n, self._knot_times, self._knot_log_alphas)

    def marginal(self, n: np.ndarray | float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(alpha, sigma, lambda)`` at model time(s) ``n`` in ``[1, num_train_timesteps]``."""
        log_alpha = self._log_alpha(n)
        log_sigma = 0.5 * np.log(-np.expm1(2.0 * log_alpha))
        return np.exp(log_alpha), np.exp(log_sigma), log_alpha - log_sigma

    def _scalars(self, k: int) -> tuple[float, float, float]:
        """``(alpha, sigma, lambda)`` at grid point ``k``, as Python floats."""
        return tuple(float(v) for v in self.marginal(self._grid[k]))

    @property
    def model_time_grid(self) -> np.ndarray:
        """The ``N + 1`` grid points in model time, from ``num_train_timesteps`` down to the final time."""
        return self._grid.copy()

    @property
    def update_starts(self) -> list[int]:
        """Step indices at which an update starts (where a run may begin, see :meth:`set_begin_index`)."""
        return [k for k, e in enumerate(self._plan) if e.position == 0]

    @property
    def solver_orders(self) -> list[int]:
        """The orders of the singlestep updates, in sampling order."""
        return [e.order for e in self._plan if e.position == 0]

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Plan ``num_inference_steps`` model evaluations (the release's ``steps``/NFE)."""
        total = self.config.num_train_timesteps
        final_time = 1.0 / total if self.config.final_time is None else float(self.config.final_time)
        if not 1.0 / total <= final_time < 1.0:
            raise ValueError(f"final_time must lie in [1/{total}, 1), got {final_time}")
        orders = fast_orders(int(num_inference_steps), self.config.solver_order)
        # skip_type='time_uniform': uniform in continuous time t from T = 1 to eps
        self._grid = total * np.linspace(1.0, final_time, num_inference_steps + 1)
        plan, start = [], 0
        for order in orders:
            plan += [_Evaluation(start, order, j) for j in range(order)]
            start += order
        self._plan = plan
        self.num_inference_steps = int(num_inference_steps)
        times = [self._grid[e.start + e.position] for e in plan]
        self.timesteps = torch.tensor(times, dtype=torch.float32, device=device)
        self._x_start, self._data = None, []
        self._step_index, self._begin_index = None, None
        logger.debug("%d model evaluations in updates of orders %s", num_inference_steps, orders)

    def scale_model_input(self, sample: torch.Tensor, timestep: float | torch.Tensor | None = None) -> torch.Tensor:
        """The identity: the model takes ``x_t`` as it is."""
        return sample

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        return_dict: bool = True,
    ) -> ReleaseSchedulerOutput | tuple[torch.Tensor]:
        """Take the model output at ``timestep`` and return the next model input (after the last evaluation of an
        update, the sample at the update's end point).

        Returns:
            :class:`ReleaseSchedulerOutput` (``prev_sample``, ``pred_original_sample``), or ``(prev_sample,)``.
        """
        index = self._check_ready(timestep)
        evaluation = self._plan[index]
        if evaluation.position == 0:
            self._x_start, self._data = sample, []
        elif self._x_start is None:
            raise ValueError(
                f"timestep {float(timestep):g} is inside an order-{evaluation.order} update; a sampling run can only "
                f"start where an update starts (step indices {self.update_starts})"
            )
        alpha, sigma, _ = self._scalars(evaluation.start + evaluation.position)
        x0 = to_data_prediction(model_output, sample, alpha, sigma, self.config.prediction_type)
        self._data.append(x0)
        prev_sample = self._update(evaluation)
        if evaluation.position == evaluation.order - 1:
            self._x_start, self._data = None, []
        self._step_index = index + 1
        if not return_dict:
            return (prev_sample,)
        return ReleaseSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)

    def _update(self, evaluation: _Evaluation) -> torch.Tensor:
        """Singlestep updates in data prediction: DPM-Solver++ (Lu et al., arXiv 2211.01095, §4: first order = DDIM;
        Algorithm 1, DPM-Solver++(2S)) and, for order 3, DPM-Solver-3 (arXiv 2206.00927, §3.3) written for x0 as
        the release writes it. ``phi(z) = (e^{-z} - 1) / z + 1`` weighs the first divided difference."""
        i, order, j = evaluation.start, evaluation.order, evaluation.position
        x, d = self._x_start, self._data
        _, sigma_s, lambda_s = self._scalars(i)
        # the next point: the next intermediate grid point, or (after the last evaluation) the update's end
        target = i + j + 1
        alpha_u, sigma_u, lambda_u = self._scalars(target)
        h_u = lambda_u - lambda_s
        first = (sigma_u / sigma_s) * x - alpha_u * math.expm1(-h_u) * d[0]  # DPM-Solver++(1) = DDIM
        if len(d) == 1:
            return first
        h = self._scalars(i + order)[2] - lambda_s
        r1 = (self._scalars(i + 1)[2] - lambda_s) / h  # logSNR ratios of the grid's intermediate points
        if order == 2:  # DPM-Solver++(2S): the end point from x0 at s and s1
            return first - (0.5 / r1) * alpha_u * math.expm1(-h) * (d[1] - d[0])
        r2 = (self._scalars(i + 2)[2] - lambda_s) / h
        if len(d) == 2:  # the second intermediate point, s2 (a phi-type, not a midpoint, correction)
            return first + (r2 / r1) * alpha_u * (math.expm1(-r2 * h) / (r2 * h) + 1.0) * (d[1] - d[0])
        return first + (1.0 / r2) * alpha_u * (math.expm1(-h) / h + 1.0) * (d[2] - d[0])

    def __len__(self) -> int:
        return self.config.num_train_timesteps
