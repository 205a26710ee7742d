"""Where denoising starts from the predicted latent ``z_v`` at strength ``beta``: the two readings.

The paper writes ``x_hat = D((1 - beta) z_v + beta * noise | z_c, a_r)`` and reports beta = 0.93;
diffusers' ``StableUnCLIPImg2ImgPipeline`` always starts from pure noise. Two readings:

- ``"linear_mix"`` (the default): the paper's formula taken literally. The start is
  ``(1 - beta) z_v + beta * noise`` and the whole schedule runs, from its first (noisiest) timestep.
- ``"img2img"``: diffusers' img2img pipelines with ``strength = beta``: skip the first
  ``t_start = steps - int(steps * beta)`` steps and noise ``z_v`` to the timestep the remaining run
  begins at with the scheduler's own ``add_noise``. ``t_start = 0`` (beta = 1) starts from pure
  noise, as diffusers' pipelines do at full strength, where ``add_noise`` would still keep
  ``sqrt(abar_T) z_v``.

At beta = 1 both start from the noise itself, which is the unCLIP pipeline's start.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nvl_jax.diffusion.schedulers import Scheduler

READINGS = ("linear_mix", "img2img")


def check(beta: float, reading: str, num_inference_steps: int) -> None:
    """Raises, naming the field, on a beta or reading this module cannot start from."""
    if reading not in READINGS:
        raise ValueError(f"beta_start={reading!r}: expected one of {list(READINGS)}")
    if not 0.0 < beta <= 1.0:
        raise ValueError(f"beta={beta}: expected 0 < beta <= 1 (1 = start from pure noise)")
    if reading == "img2img" and int(num_inference_steps * beta) < 1:
        raise ValueError(f"beta={beta} with {num_inference_steps} steps leaves no denoising step in the img2img "
                         f"reading (int(steps * beta) = 0); raise beta or the steps")


def start_index(beta: float, reading: str, num_inference_steps: int) -> int:
    """The first step of the run: 0 for ``linear_mix``, diffusers' ``t_start`` for ``img2img``."""
    check(beta, reading, num_inference_steps)
    if reading == "linear_mix":
        return 0
    return num_inference_steps - min(int(num_inference_steps * beta), num_inference_steps)


def start_latents(z_v: jax.Array, noise: jax.Array, beta: float, reading: str, scheduler: Scheduler,
                  timesteps: jax.Array, first_step: int) -> jax.Array:
    """The latents the run starts from, ``[batch, h, w, c]``.

    ``z_v`` and ``noise``: ``[batch, h, w, c]`` (scaled latents, standard normal noise);
    ``timesteps``: the scheduler state's timesteps; ``first_step``: :func:`start_index`.
    """
    if reading == "linear_mix":
        return (1.0 - beta) * z_v + beta * noise * scheduler.init_noise_sigma
    if first_step == 0:
        return noise * scheduler.init_noise_sigma
    t = jnp.full((z_v.shape[0],), timesteps[first_step], jnp.int32)
    return scheduler.add_noise(z_v, noise, t)
