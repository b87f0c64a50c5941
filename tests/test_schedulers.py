"""The release samplers as diffusers schedulers (idfusion.schedulers).

Each scheduler is checked against a straightforward numpy implementation of its release's rule written here from
the spec (flashface-feedface.md §1.12, §3.5) and from running the authors' code (the report of the "official
fidelity" task has the scratch commands): time grid, sigmas, the timesteps the model is fed, and the final latents of
an ordinary diffusers loop on toy deterministic models. diffusers' own DPMSolverSinglestepScheduler and
DDIMScheduler, configured as the pipelines configure them today, are shown *not* to match.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverSinglestepScheduler

from idfusion.schedulers import FeedFaceDPMSolverScheduler, FlashFaceDDIMScheduler

SD_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
# SD's alpha_bar, float64: betas linear in sqrt from 0.00085 to 0.012 over 1000 steps
ALPHAS_CUMPROD = np.cumprod(1.0 - np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2)


def run(scheduler, model, sample: torch.Tensor, steps: int) -> tuple[torch.Tensor, list[float]]:
    """The ordinary diffusers loop; returns the final sample and the timesteps the model saw."""
    scheduler.set_timesteps(steps)
    seen = []
    x = sample.clone() * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        seen.append(float(t))
        x = scheduler.step(model(scheduler.scale_model_input(x, t), float(t)), t, x).prev_sample
    return x, seen


def toy_eps(x, n: float):
    """A smooth nonlinear noise model (numpy or torch), so solver orders and sub-steps all matter."""
    sin = np.sin if isinstance(x, np.ndarray) else torch.sin
    return (0.3 + 0.5 * np.cos(3.0 * n / 1000.0)) * x + 0.1 * sin(x) + 0.05 * n / 1000.0


def noise(shape=(2, 4, 6, 6), seed=0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


# ---- FeedFace: DPM-Solver++ fast, order 3 ---------------------------------------------------------------------------


def feedface_marginals(n):
    """alpha, sigma, lambda at model time n in [1, 1000]: log alpha linear in n between the training steps, with
    model time n holding alphas_cumprod[n - 1] (the U-ViT's n = 1..1000 training convention)."""
    log_alpha = np.interp(n, np.arange(1, 1001), 0.5 * np.log(ALPHAS_CUMPROD))
    alpha = np.exp(log_alpha)
    sigma = np.sqrt(1.0 - alpha**2)
    return alpha, sigma, np.log(alpha / sigma)


def fast_orders_from_spec(steps: int) -> list[int]:
    k = steps // 3 + 1
    if steps % 3 == 0:
        return [3] * (k - 2) + [2, 1]
    if steps % 3 == 1:
        return [3] * (k - 1) + [1]
    return [3] * (k - 1) + [2]


def feedface_reference(eps, x: np.ndarray, steps: int) -> tuple[np.ndarray, list[float]]:
    """The release's DPM_Solver(predict_x0=True).sample(steps, eps=1/1000, T=1, order=3, 'time_uniform', 'fast'),
    written from the spec: singlestep DPM-Solver++ updates of the fast orders over linspace(1000, 1, steps + 1);
    intermediate points are the grid points; the third order's second sub-step uses phi(z) = (e^-z - 1)/z + 1."""
    grid = np.linspace(1000.0, 1.0, steps + 1)
    seen = []

    def data(y, n):
        seen.append(n)
        alpha, sigma, _ = feedface_marginals(n)
        return (y - sigma * eps(y, n)) / alpha

    def phi(z):
        return (np.exp(-z) - 1.0) / z + 1.0

    i = 0
    for order in fast_orders_from_spec(steps):
        _, sigma_s, lam_s = feedface_marginals(grid[i])
        alpha_t, sigma_t, lam_t = feedface_marginals(grid[i + order])
        h = lam_t - lam_s
        d0 = data(x, grid[i])
        if order == 1:
            x = sigma_t / sigma_s * x + alpha_t * (1 - np.exp(-h)) * d0
        else:
            alpha_1, sigma_1, lam_1 = feedface_marginals(grid[i + 1])
            r1 = (lam_1 - lam_s) / h
            d1 = data(sigma_1 / sigma_s * x + alpha_1 * (1 - np.exp(-r1 * h)) * d0, grid[i + 1])
            if order == 2:
                x = sigma_t / sigma_s * x + alpha_t * (1 - np.exp(-h)) * ((1 - 0.5 / r1) * d0 + 0.5 / r1 * d1)
            else:
                alpha_2, sigma_2, lam_2 = feedface_marginals(grid[i + 2])
                r2 = (lam_2 - lam_s) / h
                u2 = (
                    sigma_2 / sigma_s * x
                    + alpha_2 * (1 - np.exp(-r2 * h)) * d0
                    + r2 / r1 * alpha_2 * phi(r2 * h) * (d1 - d0)
                )
                d2 = data(u2, grid[i + 2])
                x = sigma_t / sigma_s * x + alpha_t * (1 - np.exp(-h)) * d0 + alpha_t / r2 * phi(h) * (d2 - d0)
        i += order
    return x, seen


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5, 6, 7, 20, 39, 40, 41])
def test_feedface_timesteps_are_the_release_model_times(steps):
    scheduler = FeedFaceDPMSolverScheduler()
    scheduler.set_timesteps(steps)
    # one model evaluation per step: grid points 1000 - k * 999 / N, k < N (the last point, n = 1, is the output)
    expected = 1000.0 - np.arange(steps) * 999.0 / steps
    assert scheduler.timesteps.dtype == torch.float32
    np.testing.assert_allclose(scheduler.timesteps.numpy(), expected, rtol=0, atol=1e-4)
    np.testing.assert_allclose(scheduler.model_time_grid, np.linspace(1000.0, 1.0, steps + 1), rtol=1e-12)
    assert scheduler.solver_orders == fast_orders_from_spec(steps)
    assert sum(scheduler.solver_orders) == len(scheduler.timesteps) == steps


def test_feedface_40_steps_is_40_evaluations_of_13_third_order_updates_and_one_first():
    scheduler = FeedFaceDPMSolverScheduler.from_config(SD_SCHEDULE)
    scheduler.set_timesteps(40)
    assert scheduler.solver_orders == [3] * 13 + [1]
    assert len(scheduler.timesteps) == 40
    # what the release's U-ViT saw (recorded from libs/feed_sample.py sample_fn, float32)
    np.testing.assert_allclose(scheduler.timesteps[:4].numpy(), [1000.0, 975.025, 950.05, 925.075], atol=1e-4)
    assert scheduler.timesteps[-1].item() == pytest.approx(25.975, abs=1e-4)


def test_feedface_schedule_is_piecewise_linear_log_alpha_with_the_plus_one_convention():
    scheduler = FeedFaceDPMSolverScheduler()
    n = np.array([1.0, 2.0, 500.0, 999.0, 1000.0])
    alpha, sigma, lam = scheduler.marginal(n)
    np.testing.assert_allclose(alpha**2, ALPHAS_CUMPROD[n.astype(int) - 1], rtol=1e-12)
    np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, rtol=1e-12)
    half = scheduler.marginal(np.array([975.025]))[0]
    # between model times 975 (alphas_cumprod[974]) and 976 (alphas_cumprod[975]), linear in log alpha
    expected = np.exp(0.975 * 0.5 * np.log(ALPHAS_CUMPROD[974]) + 0.025 * 0.5 * np.log(ALPHAS_CUMPROD[975]))
    np.testing.assert_allclose(half, expected, rtol=1e-12)
    np.testing.assert_allclose(lam, np.log(alpha / sigma), rtol=1e-12)


@pytest.mark.parametrize("steps", [1, 2, 3, 5, 10, 25, 40, 41])
def test_feedface_diffusers_loop_equals_the_release_algorithm(steps):
    x_init = noise()
    ours, seen = run(FeedFaceDPMSolverScheduler(), toy_eps, x_init, steps)
    reference, reference_seen = feedface_reference(toy_eps, x_init.numpy(), steps)
    assert len(seen) == len(reference_seen) == steps
    np.testing.assert_allclose(seen, reference_seen, rtol=0, atol=1e-4)
    assert rel_err(ours.numpy(), reference) < 1e-6


def test_feedface_float32_joint_latent():
    """FeedFace's state is the flat [z | clip_img] vector; float32 stays float32 and matches float64 to ~1e-6."""
    x_init = noise((2, 4 * 8 * 8 + 512), seed=3)
    ours, _ = run(FeedFaceDPMSolverScheduler(), toy_eps, x_init.float(), 40)
    reference, _ = feedface_reference(toy_eps, x_init.numpy(), 40)
    assert ours.dtype == torch.float32 and ours.shape == x_init.shape
    assert rel_err(ours.numpy(), reference) < 2e-6


def test_feedface_ends_at_n_equals_one_not_at_sigma_zero():
    """Closed form: for the ideal denoiser of a point mass x* (x0(x) = x*), every DPM-Solver order is exact and the
    release ends at n = 1: alpha_1 x* + sigma_1 (x_T - alpha_T x*) / sigma_T, still noisy (sigma_1 ~ 0.029)."""
    target = noise(seed=7) * 0.5

    def point_mass_eps(x, n):
        alpha, sigma, _ = feedface_marginals(n)
        return (x - alpha * target) / sigma

    x_init = noise(seed=8)
    ours, _ = run(FeedFaceDPMSolverScheduler(), point_mass_eps, x_init, 40)
    alpha_0, sigma_0, _ = feedface_marginals(1.0)
    alpha_T, sigma_T, _ = feedface_marginals(1000.0)
    exact = alpha_0 * target + sigma_0 * (x_init - alpha_T * target) / sigma_T
    assert rel_err(ours.numpy(), exact.numpy()) < 1e-7  # the model is fed float32 times
    assert (ours - target).abs().max() > 1e-3  # not the clean sample a sigma-0 solver returns


def test_diffusers_dpm_solver_singlestep_does_not_reproduce_feedface():
    """idfusion's "dpm++-3s" (DPMSolverSinglestep order 3, dpmsolver++) feeds integer t = n - 1, steps to sigma 0
    and takes a midpoint sub-step: its result is a few percent away from the release's."""
    x_init = noise(seed=1)
    reference, reference_seen = feedface_reference(toy_eps, x_init.numpy(), 40)
    for extra in ({}, {"solver_type": "heun"}):
        diffusers_scheduler = DPMSolverSinglestepScheduler(
            **SD_SCHEDULE, solver_order=3, algorithm_type="dpmsolver++", lower_order_final=True, **extra
        )
        theirs, seen = run(diffusers_scheduler, toy_eps, x_init, 40)
        assert len(seen) == 40
        assert seen[0] == 999 and seen[0] != reference_seen[0]
        assert rel_err(theirs.numpy(), reference) > 1e-2


# ---- FlashFace: DDIM over fractional trailing times ---------------------------------------------------------------


def flashface_sigma(tau):
    """VP sigma at fractional time tau: linear in log of the VE sigma sigma / sqrt(1 - sigma^2)."""
    log_ve = 0.5 * np.log((1.0 - ALPHAS_CUMPROD) / ALPHAS_CUMPROD)
    ve = np.exp(np.interp(tau, np.arange(1000), log_ve))
    return ve / np.sqrt(1.0 + ve**2)


def flashface_reference(eps, x: np.ndarray, steps: int) -> tuple[np.ndarray, list[int]]:
    """The release's GaussianDiffusion.sample(solver='ddim', discretization='trailing'), eta 0, from the spec:
    times 999 - 1000 k / N, the model fed round(time), x0 from the integer time's alpha_bar, DDIM between the
    fractional-time sigmas, the last step to sigma 0 (so the output is x0). For step counts without exact halves."""
    taus = 999.0 - np.arange(steps) * 1000.0 / steps
    sigmas = [flashface_sigma(t) for t in taus] + [0.0]
    seen = []
    for k, tau in enumerate(taus):
        n = int(np.rint(tau))
        seen.append(n)
        x0 = (x - np.sqrt(1 - ALPHAS_CUMPROD[n]) * eps(x, n)) / np.sqrt(ALPHAS_CUMPROD[n])
        s, s_next = sigmas[k], sigmas[k + 1]
        x = np.sqrt(1 - s_next**2) * x0 + s_next * (x - np.sqrt(1 - s**2) * x0) / s
    return x, seen


@pytest.mark.parametrize("steps", [1, 10, 25, 30, 35, 50])
def test_flashface_grid_and_model_timesteps(steps):
    scheduler = FlashFaceDDIMScheduler()
    scheduler.set_timesteps(steps)
    taus = 999.0 - np.arange(steps) * 1000.0 / steps
    np.testing.assert_allclose(scheduler.fractional_timesteps.numpy(), taus, rtol=0, atol=1e-4)
    assert scheduler.timesteps.dtype == torch.int64
    assert scheduler.timesteps.tolist() == np.rint(taus).astype(int).tolist()
    assert scheduler.sigmas[-1].item() == 0.0 and len(scheduler.sigmas) == steps + 1
    np.testing.assert_allclose(scheduler.sigmas[:-1].numpy(), [flashface_sigma(t) for t in taus], rtol=2e-6)


def test_flashface_model_timesteps_at_exact_halves_and_float32_arange_as_the_release():
    """Recorded from the release (CPU float32): at N = 16 the halves 936.5, 811.5, ... round by float32 noise
    (61.5 -> 61, not half-to-even's 62); at N = 61 float32 arange gives 62 points, the last clipped to 0."""
    scheduler = FlashFaceDDIMScheduler()
    scheduler.set_timesteps(16)
    assert scheduler.timesteps.tolist() == [
        999,
        936,
        874,
        812,
        749,
        686,
        624,
        562,
        499,
        436,
        374,
        312,
        249,
        186,
        124,
        61,
    ]
    scheduler.set_timesteps(61)
    assert len(scheduler.timesteps) == 62 and scheduler.timesteps[-1].item() == 0
    assert scheduler.timesteps[-3:].tolist() == [32, 15, 0]
    assert scheduler.sigmas[-2].item() == pytest.approx(np.sqrt(1 - ALPHAS_CUMPROD[0]), rel=1e-6)


@pytest.mark.parametrize("steps", [1, 10, 25, 35, 50])
def test_flashface_diffusers_loop_equals_the_release_algorithm(steps):
    x_init = noise(seed=steps)
    ours, seen = run(FlashFaceDDIMScheduler(), toy_eps, x_init, steps)
    reference, reference_seen = flashface_reference(toy_eps, x_init.numpy(), steps)
    assert seen == reference_seen
    # The scheduler keeps the release's float32 sigmas (bit-identical to the release's on CPU); near sigma = 1,
    # alpha = sqrt(1 - sigma^2) magnifies their last-bit rounding ~170x, so float64 agrees to a few 1e-6.
    assert rel_err(ours.numpy(), reference) < 1e-5
    assert rel_err(run(FlashFaceDDIMScheduler(), toy_eps, x_init.float(), steps)[0].numpy(), reference) < 1e-5


def test_flashface_last_step_returns_x0():
    scheduler = FlashFaceDDIMScheduler()
    scheduler.set_timesteps(35)
    x = noise()
    for t in scheduler.timesteps:
        out = scheduler.step(toy_eps(x, float(t)), t, x)
        x = out.prev_sample
    torch.testing.assert_close(x, out.pred_original_sample, rtol=0, atol=0)


def test_diffusers_ddim_does_not_reproduce_flashface():
    """diffusers' DDIM with the pipeline's trailing spacing sees the same integer timesteps at 35 steps, but steps
    to alphas_cumprod[t - 1000 // N] and ends at alphas_cumprod[0]: the final latents move."""
    x_init = noise(seed=2)
    for steps, at_least in ((25, 1e-2), (35, 1e-3), (50, 1e-2)):
        reference, reference_seen = flashface_reference(toy_eps, x_init.numpy(), steps)
        diffusers_scheduler = DDIMScheduler(
            **SD_SCHEDULE, timestep_spacing="trailing", steps_offset=0, clip_sample=False, set_alpha_to_one=False
        )
        theirs, seen = run(diffusers_scheduler, toy_eps, x_init, steps)
        assert [int(t) for t in seen] == reference_seen
        assert rel_err(theirs.numpy(), reference) > at_least


# ---- both: diffusers conventions ------------------------------------------------------------------------------------


SCHEDULERS = [
    (FeedFaceDPMSolverScheduler, {"solver_order": 2, "final_time": 0.002}),
    (FlashFaceDDIMScheduler, {"timestep_spacing": "leading"}),
]


def public(config) -> dict:
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


@pytest.mark.parametrize(("cls", "overrides"), SCHEDULERS)
def test_save_load_and_from_config(cls, overrides, tmp_path):
    scheduler = cls(**overrides)
    scheduler.save_pretrained(tmp_path)
    loaded = cls.from_pretrained(tmp_path)
    assert type(loaded) is cls and public(loaded.config) == public(scheduler.config)
    copy = cls.from_config(scheduler.config)
    for s in (scheduler, loaded, copy):
        s.set_timesteps(12)
    torch.testing.assert_close(loaded.timesteps, scheduler.timesteps, rtol=0, atol=0)
    torch.testing.assert_close(copy.timesteps, scheduler.timesteps, rtol=0, atol=0)
    x = noise()
    torch.testing.assert_close(run(loaded, toy_eps, x, 12)[0], run(scheduler, toy_eps, x, 12)[0], rtol=0, atol=0)
    assert scheduler.order == 1 and scheduler.init_noise_sigma == 1.0
    assert scheduler.scale_model_input(x, scheduler.timesteps[0]) is x


@pytest.mark.parametrize(
    ("cls", "diffusers_cls", "extra"),
    [
        (FeedFaceDPMSolverScheduler, DPMSolverSinglestepScheduler, {"solver_order": 3, "lower_order_final": True}),
        (FlashFaceDDIMScheduler, DDIMScheduler, {"timestep_spacing": "trailing", "steps_offset": 0}),
    ],
)
def test_from_a_pipeline_scheduler_config(cls, diffusers_cls, extra):
    """A pipeline's existing scheduler config (SD's schedule) builds the release scheduler; unknown keys are ignored."""
    scheduler = cls.from_config(diffusers_cls(**SD_SCHEDULE, **extra).config)
    assert public(scheduler.config).items() >= SD_SCHEDULE.items()
    reference = cls()
    scheduler.set_timesteps(20)
    reference.set_timesteps(20)
    torch.testing.assert_close(scheduler.timesteps, reference.timesteps, rtol=0, atol=0)


@pytest.mark.parametrize("cls", [FeedFaceDPMSolverScheduler, FlashFaceDDIMScheduler])
def test_prediction_types_agree(cls):
    """An x0- or v-predicting model equivalent to the noise model gives the same trajectory."""
    epsilon = cls()
    epsilon.set_timesteps(10)
    alpha_sigma = (
        (lambda n: feedface_marginals(n)[:2])
        if cls is FeedFaceDPMSolverScheduler
        else (lambda n: (np.sqrt(ALPHAS_CUMPROD[int(n)]), np.sqrt(1 - ALPHAS_CUMPROD[int(n)])))
    )

    def as_sample(x, n):
        alpha, sigma = alpha_sigma(n)
        return (x - sigma * toy_eps(x, n)) / alpha

    def as_v(x, n):
        alpha, sigma = alpha_sigma(n)
        return alpha * toy_eps(x, n) - sigma * as_sample(x, n)

    x = noise(seed=5)
    reference = run(epsilon, toy_eps, x, 10)[0]
    for prediction_type, model in (("sample", as_sample), ("v_prediction", as_v)):
        torch.testing.assert_close(run(cls(prediction_type=prediction_type), model, x, 10)[0], reference)


@pytest.mark.parametrize("cls", [FeedFaceDPMSolverScheduler, FlashFaceDDIMScheduler])
def test_step_index_and_misuse(cls):
    scheduler = cls()
    x = noise()
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.step(x, 999, x)
    scheduler.set_timesteps(4)
    assert scheduler.step_index is None
    for t in scheduler.timesteps:
        x = scheduler.step(toy_eps(x, float(t)), t, x, return_dict=False)[0]
    assert scheduler.step_index == 4
    with pytest.raises(ValueError, match="times for 4 timesteps"):
        scheduler.step(x, scheduler.timesteps[-1], x)
    scheduler.set_timesteps(4)  # resets; a pipeline may start later with set_begin_index (img2img)
    scheduler.set_begin_index(3)  # FeedFace at 4 steps: updates of order 3 and 1, the second starts at index 3
    scheduler.step(x, scheduler.timesteps[3], x)
    assert scheduler.step_index == 4
    scheduler.set_timesteps(4)
    scheduler.step(x, scheduler.timesteps[3], x)  # located by timestep, as diffusers does
    assert scheduler.step_index == 4
    with pytest.raises(ValueError):
        cls(prediction_type="flow")
    with pytest.raises(ValueError):
        cls(beta_schedule="cosine")


def test_feedface_cannot_start_inside_an_update():
    scheduler = FeedFaceDPMSolverScheduler()
    scheduler.set_timesteps(4)
    assert scheduler.update_starts == [0, 3]
    x = noise()
    with pytest.raises(ValueError, match="inside an order-3 update"):
        scheduler.step(x, scheduler.timesteps[1], x)


def test_bad_settings():
    with pytest.raises(ValueError, match="solver_order"):
        FeedFaceDPMSolverScheduler(solver_order=1)
    with pytest.raises(ValueError, match="final_time"):
        FeedFaceDPMSolverScheduler(final_time=0.0).set_timesteps(10)
    with pytest.raises(ValueError, match="timestep_spacing"):
        FlashFaceDDIMScheduler(timestep_spacing="karras")
    with pytest.raises(ValueError, match="num_inference_steps"):
        FlashFaceDDIMScheduler().set_timesteps(0)
    with pytest.raises(ValueError, match="num_inference_steps"):
        FeedFaceDPMSolverScheduler().set_timesteps(0)


def test_importing_the_package_loads_nothing():
    code = "import sys, idfusion.schedulers; assert 'diffusers' not in sys.modules and 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
