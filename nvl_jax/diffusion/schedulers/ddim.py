"""DDIM (Song et al. 2021), diffusers' ``DDIMScheduler``: deterministic at ``eta=0``, with injected noise above."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from nvl_jax.diffusion.schedulers.base import (
    TIMESTEP_SPACINGS, NoiseScheduleConfig, Scheduler, check_num_inference_steps)


@dataclasses.dataclass(frozen=True)
class DDIMConfig(NoiseScheduleConfig):
    """diffusers' ``DDIMScheduler`` options, with diffusers' defaults (``thresholding`` and
    ``rescale_betas_zero_snr`` are refused unless false)."""

    clip_sample: bool = True
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True
    steps_offset: int = 0
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"


@flax.struct.dataclass
class DDIMState:
    """One sampling run's state. ``timesteps``: int32 ``[num_inference_steps]``."""

    timesteps: jax.Array
    num_inference_steps: int = flax.struct.field(pytree_node=False)


@dataclasses.dataclass(frozen=True)
class DDIMScheduler(Scheduler):
    config: DDIMConfig
    CONFIG_CLASS: ClassVar[type] = DDIMConfig
    ALLOWED: ClassVar[dict[str, tuple]] = {
        "prediction_type": ("epsilon", "sample", "v_prediction"),
        "timestep_spacing": TIMESTEP_SPACINGS,
        "thresholding": (False,),
        "rescale_betas_zero_snr": (False,),
    }

    @property
    def final_alpha_cumprod(self) -> np.float32:
        return np.float32(1.0) if self.config.set_alpha_to_one else self.alphas_cumprod[0]

    def set_timesteps(self, num_inference_steps: int) -> jax.Array:
        """The model's timesteps, int32 ``[num_inference_steps]``, equal to diffusers' ``scheduler.timesteps``."""
        c = self.config
        check_num_inference_steps(num_inference_steps, c.num_train_timesteps, "DDIMScheduler")
        if c.timestep_spacing == "linspace":
            timesteps = np.linspace(0, c.num_train_timesteps - 1, num_inference_steps).round()[::-1].astype(np.int64)
        elif c.timestep_spacing == "leading":
            ratio = c.num_train_timesteps // num_inference_steps
            timesteps = (np.arange(0, num_inference_steps) * ratio).round()[::-1].astype(np.int64) + c.steps_offset
        else:  # trailing
            ratio = c.num_train_timesteps / num_inference_steps
            timesteps = np.round(np.arange(c.num_train_timesteps, 0, -ratio)).astype(np.int64) - 1
        return jnp.asarray(timesteps, jnp.int32)

    def init_state(self, num_inference_steps: int, sample_shape: tuple[int, ...] = (), dtype=jnp.float32) -> DDIMState:
        """A fresh run's state. DDIM keeps no history, so ``sample_shape`` and ``dtype`` are not needed;
        they are accepted so every scheduler starts a run the same way."""
        return DDIMState(timesteps=self.set_timesteps(num_inference_steps), num_inference_steps=num_inference_steps)

    def step(self, state: DDIMState, model_output: jax.Array, step_index: jax.Array | int, sample: jax.Array,
             *, eta: float = 0.0, noise: jax.Array | None = None) -> tuple[jax.Array, DDIMState]:
        """One DDIM step (formulas 12 and 16 of the paper); returns ``(prev_sample, state)``.

        ``model_output``, ``sample`` and ``noise``: ``[*sample_shape]``. With ``eta > 0``
        the step adds ``sigma_t(eta) * noise``; the noise is passed in (diffusers'
        ``variance_noise``), so a run is reproducible from its PRNG key.
        """
        if eta > 0 and noise is None:
            raise ValueError("DDIMScheduler.step: eta > 0 needs noise of the sample's shape")
        c = self.config
        alphas_cumprod = jnp.asarray(self.alphas_cumprod)
        timestep = state.timesteps[step_index]
        prev_timestep = timestep - c.num_train_timesteps // state.num_inference_steps
        alpha_prod_t = alphas_cumprod[timestep]
        alpha_prod_t_prev = jnp.where(prev_timestep >= 0, alphas_cumprod[jnp.maximum(prev_timestep, 0)],
                                      self.final_alpha_cumprod)
        beta_prod_t = 1 - alpha_prod_t

        if c.prediction_type == "epsilon":
            pred_original_sample = (sample - beta_prod_t**0.5 * model_output) / alpha_prod_t**0.5
            pred_epsilon = model_output
        elif c.prediction_type == "sample":
            pred_original_sample = model_output
            pred_epsilon = (sample - alpha_prod_t**0.5 * pred_original_sample) / beta_prod_t**0.5
        else:  # v_prediction
            pred_original_sample = alpha_prod_t**0.5 * sample - beta_prod_t**0.5 * model_output
            pred_epsilon = alpha_prod_t**0.5 * model_output + beta_prod_t**0.5 * sample
        if c.clip_sample:
            pred_original_sample = jnp.clip(pred_original_sample, -c.clip_sample_range, c.clip_sample_range)

        beta_prod_t_prev = 1 - alpha_prod_t_prev
        variance = (beta_prod_t_prev / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
        std_dev_t = eta * variance**0.5
        pred_sample_direction = (1 - alpha_prod_t_prev - std_dev_t**2) ** 0.5 * pred_epsilon
        prev_sample = alpha_prod_t_prev**0.5 * pred_original_sample + pred_sample_direction
        if eta > 0:
            prev_sample = prev_sample + std_dev_t * noise
        return prev_sample.astype(sample.dtype), state
