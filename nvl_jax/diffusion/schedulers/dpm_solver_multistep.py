"""DPM-Solver++ multistep (Lu et al. 2022), diffusers' ``DPMSolverMultistepScheduler``, orders 1 and 2.

``solver_order=2`` is "DPM-Solver++ 2M": each step extrapolates the data
prediction ``x0`` from the current and the previous step in log-SNR
(``lambda = log(alpha / sigma)``). The first step, and the last (or last two,
``lower_order_final``) of a short run, fall back to first order as diffusers does.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from nvl_jax.diffusion.schedulers.base import (
    TIMESTEP_SPACINGS, NoiseScheduleConfig, Scheduler, _per_example, check_num_inference_steps)

# diffusers lowers the order near the end only for runs shorter than this.
LOWER_ORDER_FINAL_BELOW = 15


@dataclasses.dataclass(frozen=True)
class DPMSolverMultistepConfig(NoiseScheduleConfig):
    """diffusers' ``DPMSolverMultistepScheduler`` options that this port implements, with diffusers' defaults.

    Only ``algorithm_type="dpmsolver++"`` and sigmas at the model's own
    timesteps (no Karras / exponential / beta / Lu / flow sigmas) are ported.
    """

    solver_order: int = 2
    prediction_type: str = "epsilon"
    algorithm_type: str = "dpmsolver++"
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False
    final_sigmas_type: str = "zero"
    lambda_min_clipped: float = -float("inf")
    timestep_spacing: str = "linspace"
    steps_offset: int = 0


@flax.struct.dataclass
class DPMSolverMultistepState:
    """One sampling run's state; a pytree, carried through ``jax.lax.scan``.

    ``timesteps``: int32 ``[num_inference_steps]``. ``sigmas``: float32
    ``[num_inference_steps + 1]``, ``sqrt((1 - abar) / abar)`` at each timestep, then
    the final sigma. ``previous_x0``: ``[*sample_shape]``, the previous step's data
    prediction. ``lower_order_nums``: int32 scalar, the steps taken, capped at the order.
    """

    timesteps: jax.Array
    sigmas: jax.Array
    previous_x0: jax.Array
    lower_order_nums: jax.Array


@dataclasses.dataclass(frozen=True)
class DPMSolverMultistepScheduler(Scheduler):
    config: DPMSolverMultistepConfig
    CONFIG_CLASS: ClassVar[type] = DPMSolverMultistepConfig
    ALLOWED: ClassVar[dict[str, tuple]] = {
        "solver_order": (1, 2),
        "prediction_type": ("epsilon", "sample", "v_prediction"),
        "algorithm_type": ("dpmsolver++",),
        "solver_type": ("midpoint", "heun"),
        "final_sigmas_type": ("zero", "sigma_min"),
        "timestep_spacing": TIMESTEP_SPACINGS,
        "variance_type": (None,),
        "thresholding": (False,),
        "use_karras_sigmas": (False,),
        "use_exponential_sigmas": (False,),
        "use_beta_sigmas": (False,),
        "use_lu_lambdas": (False,),
        "use_flow_sigmas": (False,),
        "use_dynamic_shifting": (False,),
        "rescale_betas_zero_snr": (False,),
    }

    @functools.cached_property
    def train_sigmas(self) -> np.ndarray:
        """``sqrt((1 - abar_t) / abar_t)`` at every training timestep: ``[num_train_timesteps]`` float32."""
        alphas_cumprod = self.alphas_cumprod
        return np.sqrt((np.float32(1) - alphas_cumprod) / alphas_cumprod)

    def set_timesteps(self, num_inference_steps: int) -> jax.Array:
        """The model's timesteps, int32 ``[num_inference_steps]``, equal to diffusers' ``scheduler.timesteps``."""
        return jnp.asarray(self._timesteps(num_inference_steps), jnp.int32)

    def _timesteps(self, num_inference_steps: int) -> np.ndarray:
        c = self.config
        check_num_inference_steps(num_inference_steps, c.num_train_timesteps, "DPMSolverMultistepScheduler")
        # Clipping lambda from below shortens the schedule (for the cosine schedule, whose lambda plunges at the end).
        alpha = np.sqrt(self.alphas_cumprod)
        sigma = np.sqrt(np.float32(1) - self.alphas_cumprod)
        lambdas = np.log(alpha) - np.log(sigma)
        last_timestep = c.num_train_timesteps - int(np.searchsorted(lambdas[::-1], c.lambda_min_clipped))
        if c.timestep_spacing == "linspace":
            return np.linspace(0, last_timestep - 1, num_inference_steps + 1).round()[::-1][:-1].astype(np.int64)
        if c.timestep_spacing == "leading":
            ratio = last_timestep // (num_inference_steps + 1)
            timesteps = (np.arange(0, num_inference_steps + 1) * ratio).round()[::-1][:-1].astype(np.int64)
            return timesteps + c.steps_offset
        ratio = c.num_train_timesteps / num_inference_steps  # trailing
        return np.arange(last_timestep, 0, -ratio).round().astype(np.int64) - 1

    def init_state(self, num_inference_steps: int, sample_shape: tuple[int, ...],
                   dtype=jnp.float32) -> DPMSolverMultistepState:
        """A fresh run's state for samples ``[*sample_shape]``."""
        timesteps = self._timesteps(num_inference_steps)
        if self.config.final_sigmas_type == "sigma_min":
            final_sigma = self.train_sigmas[0]
        else:  # "zero": the last step lands on the data prediction itself
            final_sigma = np.float32(0)
        sigmas = np.concatenate([self.train_sigmas[timesteps], [final_sigma]]).astype(np.float32)
        return DPMSolverMultistepState(
            timesteps=jnp.asarray(timesteps, jnp.int32),
            sigmas=jnp.asarray(sigmas),
            previous_x0=jnp.zeros(sample_shape, dtype),
            lower_order_nums=jnp.zeros((), jnp.int32),
        )

    def step(self, state: DPMSolverMultistepState, model_output: jax.Array, step_index: jax.Array | int,
             sample: jax.Array) -> tuple[jax.Array, DPMSolverMultistepState]:
        """One multistep update from ``sample`` at ``state.timesteps[step_index]``; returns ``(prev_sample, state)``.

        ``model_output`` and ``sample``: ``[*sample_shape]``. ``step_index`` may be traced.
        """
        c = self.config
        num_steps = state.timesteps.shape[0]
        short_run = c.lower_order_final and num_steps < LOWER_ORDER_FINAL_BELOW
        is_last = step_index == num_steps - 1
        lower_order_final = is_last & (c.euler_at_final or short_run or c.final_sigmas_type == "zero")
        first_order = (c.solver_order == 1) | (state.lower_order_nums < 1) | lower_order_final

        x0 = self._data_prediction(model_output, sample, state.sigmas[step_index])
        compute_dtype = jnp.promote_types(sample.dtype, jnp.float32)
        sample32 = sample.astype(compute_dtype)
        prev_sample = jax.lax.cond(
            first_order,
            lambda: self._first_order_update(x0, sample32, state.sigmas, step_index),
            lambda: self._second_order_update(x0, state.previous_x0, sample32, state.sigmas, step_index),
        ).astype(sample.dtype)
        new_state = state.replace(previous_x0=x0.astype(state.previous_x0.dtype),
                                  lower_order_nums=jnp.minimum(state.lower_order_nums + 1, c.solver_order))
        return prev_sample, new_state

    def _data_prediction(self, model_output, sample, sigma):
        """DPM-Solver++ integrates the data prediction ``x0``, whatever the model predicts."""
        if self.config.prediction_type == "sample":
            return model_output
        alpha_t, sigma_t = _alpha_sigma(sigma)
        if self.config.prediction_type == "epsilon":
            return (sample - sigma_t * model_output) / alpha_t
        return alpha_t * sample - sigma_t * model_output  # v_prediction

    @staticmethod
    def _first_order_update(x0, sample, sigmas, i):
        alpha_t, sigma_t = _alpha_sigma(sigmas[i + 1])
        alpha_s, sigma_s = _alpha_sigma(sigmas[i])
        h = _log_snr(alpha_t, sigma_t) - _log_snr(alpha_s, sigma_s)
        return (sigma_t / sigma_s) * sample - (alpha_t * (jnp.exp(-h) - 1.0)) * x0

    def _second_order_update(self, m0, m1, sample, sigmas, i):
        alpha_t, sigma_t = _alpha_sigma(sigmas[i + 1])
        alpha_s0, sigma_s0 = _alpha_sigma(sigmas[i])
        alpha_s1, sigma_s1 = _alpha_sigma(sigmas[i - 1])
        lambda_t, lambda_s0, lambda_s1 = (_log_snr(alpha_t, sigma_t), _log_snr(alpha_s0, sigma_s0),
                                          _log_snr(alpha_s1, sigma_s1))
        h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
        r0 = h_0 / h
        d0, d1 = m0, (1.0 / r0) * (m0 - m1)
        if self.config.solver_type == "midpoint":
            return ((sigma_t / sigma_s0) * sample - (alpha_t * (jnp.exp(-h) - 1.0)) * d0
                    - 0.5 * (alpha_t * (jnp.exp(-h) - 1.0)) * d1)
        return ((sigma_t / sigma_s0) * sample - (alpha_t * (jnp.exp(-h) - 1.0)) * d0
                + (alpha_t * ((jnp.exp(-h) - 1.0) / h + 1.0)) * d1)  # heun

    def add_noise(self, original: jax.Array, noise: jax.Array, timesteps: jax.Array) -> jax.Array:
        """``alpha_t * original + sigma_t * noise`` with diffusers' sigma-based coefficients.

        ``timesteps``: int ``[batch]`` (or a scalar). diffusers looks the sigma up by the
        timestep's position in the run's schedule; for a timestep of the schedule that
        is the training sigma at that timestep, used here directly.
        """
        sigma = _per_example(jnp.asarray(self.train_sigmas, original.dtype)[jnp.asarray(timesteps)], original.ndim)
        alpha_t, sigma_t = _alpha_sigma(sigma)
        return alpha_t * original + sigma_t * noise


def _alpha_sigma(sigma):
    """The VP coefficients of a sigma ``sqrt((1 - abar) / abar)``: ``alpha = sqrt(abar)``, ``sigma = sqrt(1 - abar)``."""
    alpha_t = 1 / ((sigma**2 + 1) ** 0.5)
    return alpha_t, sigma * alpha_t


def _log_snr(alpha, sigma):
    return jnp.log(alpha) - jnp.log(sigma)
