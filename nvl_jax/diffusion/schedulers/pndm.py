"""PNDM's pseudo linear multistep (PLMS) sampler, diffusers' ``PNDMScheduler`` with ``skip_prk_steps=True``.

Stable Diffusion 2.x and Stable unCLIP ship this configuration. With the
Runge-Kutta warm-up skipped, diffusers runs ``num_inference_steps + 1`` model
evaluations: the second one repeats the first step from the same sample with
the average of the first two model outputs (a Heun step), after which the
update is Adams-Bashforth of growing order (2, 3, then 4) over the history of
model outputs.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from nvl_jax.diffusion.schedulers.base import (
    TIMESTEP_SPACINGS, NoiseScheduleConfig, Scheduler, check_num_inference_steps)

# The multistep history: the last four model outputs, as diffusers keeps.
HISTORY = 4


@dataclasses.dataclass(frozen=True)
class PNDMConfig(NoiseScheduleConfig):
    """diffusers' ``PNDMScheduler`` options, with diffusers' defaults."""

    skip_prk_steps: bool = False
    set_alpha_to_one: bool = False
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 0


@flax.struct.dataclass
class PNDMState:
    """One sampling run's state; a pytree, carried through ``jax.lax.scan``.

    ``timesteps``: int32 ``[num_inference_steps + 1]``, the model's timestep at each step.
    ``ets``: ``[4, *sample_shape]``, the last model outputs, newest last.
    ``cur_sample``: ``[*sample_shape]``, the sample the first step started from (the
    second step restarts from it).
    ``counter``: int32 scalar, the steps taken in this run.
    """

    timesteps: jax.Array
    ets: jax.Array
    cur_sample: jax.Array
    counter: jax.Array
    num_inference_steps: int = flax.struct.field(pytree_node=False)


@dataclasses.dataclass(frozen=True)
class PNDMScheduler(Scheduler):
    config: PNDMConfig
    CONFIG_CLASS: ClassVar[type] = PNDMConfig
    ALLOWED: ClassVar[dict[str, tuple]] = {
        "prediction_type": ("epsilon", "v_prediction"),
        "timestep_spacing": TIMESTEP_SPACINGS,
    }

    def __post_init__(self):
        # The Runge-Kutta warm-up is not ported: no Stable Diffusion config uses it. diffusers'
        # default is False, so a config must set the field, as Stable Diffusion's configs do.
        if not self.config.skip_prk_steps:
            raise ValueError("PNDMScheduler config: skip_prk_steps=False (diffusers' default) is not supported; "
                             "expected skip_prk_steps=True")

    @property
    def final_alpha_cumprod(self) -> np.float32:
        """``abar`` of the step after the last: 1, or ``abar_0`` (``set_alpha_to_one``)."""
        return np.float32(1.0) if self.config.set_alpha_to_one else self.alphas_cumprod[0]

    def _step_ratio(self, num_inference_steps: int) -> int:
        return self.config.num_train_timesteps // num_inference_steps

    def set_timesteps(self, num_inference_steps: int) -> jax.Array:
        """The model's timesteps, int32 ``[num_inference_steps + 1]``, equal to diffusers' ``scheduler.timesteps``."""
        c = self.config
        check_num_inference_steps(num_inference_steps, c.num_train_timesteps, "PNDMScheduler")
        if c.timestep_spacing == "linspace":
            ascending = np.linspace(0, c.num_train_timesteps - 1, num_inference_steps).round().astype(np.int64)
        elif c.timestep_spacing == "leading":
            ascending = (np.arange(0, num_inference_steps) * self._step_ratio(num_inference_steps)).round()
            ascending = ascending.astype(np.int64) + c.steps_offset
        else:  # trailing
            ratio = c.num_train_timesteps / num_inference_steps
            ascending = np.round(np.arange(c.num_train_timesteps, 0, -ratio))[::-1].astype(np.int64) - 1
        # The second-to-last ascending timestep is repeated: the Heun step's second evaluation.
        plms = np.concatenate([ascending[:-1], ascending[-2:-1], ascending[-1:]])[::-1]
        return jnp.asarray(plms, jnp.int32)

    def init_state(self, num_inference_steps: int, sample_shape: tuple[int, ...], dtype=jnp.float32) -> PNDMState:
        """A fresh run's state for samples ``[*sample_shape]`` (e.g. ``[batch, height, width, channels]``)."""
        return PNDMState(
            timesteps=self.set_timesteps(num_inference_steps),
            ets=jnp.zeros((HISTORY, *sample_shape), dtype),
            cur_sample=jnp.zeros(sample_shape, dtype),
            counter=jnp.zeros((), jnp.int32),
            num_inference_steps=num_inference_steps,
        )

    def step(self, state: PNDMState, model_output: jax.Array, step_index: jax.Array | int,
             sample: jax.Array) -> tuple[jax.Array, PNDMState]:
        """One PLMS step from ``sample`` at ``state.timesteps[step_index]``; returns ``(prev_sample, state)``.

        ``model_output`` and ``sample``: ``[*sample_shape]``. ``step_index`` may be traced.
        """
        ratio = self._step_ratio(state.num_inference_steps)
        timestep = state.timesteps[step_index]
        counter = state.counter
        second = counter == 1
        # The second evaluation is not appended to the history: it redoes the first step
        # (from timestep + ratio to timestep) with the average of the two outputs.
        ets = jnp.where(second, state.ets, jnp.concatenate([state.ets[1:], model_output[None]]))
        prev_timestep = jnp.where(second, timestep, timestep - ratio)
        timestep = jnp.where(second, timestep + ratio, timestep)
        sample = jnp.where(second, state.cur_sample, sample)
        cur_sample = jnp.where(counter == 0, sample, state.cur_sample)
        # Outputs in the history: 1 through the second step, then one more per step, at most 4.
        order = jnp.where(counter <= 1, 1, jnp.minimum(counter, HISTORY))
        e1, e2, e3, e4 = ets[-1], ets[-2], ets[-3], ets[-4]
        branch = jnp.where(second, 0, order)
        combined = jax.lax.switch(branch, [
            lambda: (model_output + e1) / 2,
            lambda: model_output,
            lambda: (3 * e1 - e2) / 2,
            lambda: (23 * e1 - 16 * e2 + 5 * e3) / 12,
            lambda: (1 / 24) * (55 * e1 - 59 * e2 + 37 * e3 - 9 * e4),
        ])
        prev_sample = self._prev_sample(sample, timestep, prev_timestep, combined)
        return prev_sample, state.replace(ets=ets, cur_sample=cur_sample, counter=counter + 1)

    def _prev_sample(self, sample, timestep, prev_timestep, model_output):
        """PNDM's formula (9): the sample at ``prev_timestep`` from the one at ``timestep``."""
        alphas_cumprod = jnp.asarray(self.alphas_cumprod)
        alpha_prod_t = alphas_cumprod[timestep]
        alpha_prod_t_prev = jnp.where(prev_timestep >= 0, alphas_cumprod[jnp.maximum(prev_timestep, 0)],
                                      self.final_alpha_cumprod)
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev
        if self.config.prediction_type == "v_prediction":
            model_output = (alpha_prod_t**0.5) * model_output + (beta_prod_t**0.5) * sample
        sample_coeff = (alpha_prod_t_prev / alpha_prod_t) ** 0.5
        model_output_denom_coeff = (alpha_prod_t * beta_prod_t_prev**0.5
                                    + (alpha_prod_t * beta_prod_t * alpha_prod_t_prev) ** 0.5)
        prev_sample = sample_coeff * sample - (alpha_prod_t_prev - alpha_prod_t) * model_output / model_output_denom_coeff
        return prev_sample.astype(sample.dtype)
