"""Diffusion schedulers in JAX, equal to diffusers': PNDM (PLMS), DDIM, DPM-Solver++ multistep, DDPM's noising.

Each scheduler is built with ``from_config`` from diffusers' ``scheduler_config.json``;
``init_state(num_inference_steps, sample_shape)`` starts a run and
``step(state, model_output, step_index, sample)`` returns ``(prev_sample, state)``,
jittable with a traced ``step_index`` inside ``jax.lax.scan``.
"""

from nvl_jax.diffusion.schedulers.base import NoiseScheduleConfig, Scheduler, read_scheduler_config
from nvl_jax.diffusion.schedulers.ddim import DDIMConfig, DDIMScheduler, DDIMState
from nvl_jax.diffusion.schedulers.ddpm import DDPMScheduler
from nvl_jax.diffusion.schedulers.dpm_solver_multistep import (
    DPMSolverMultistepConfig, DPMSolverMultistepScheduler, DPMSolverMultistepState)
from nvl_jax.diffusion.schedulers.pndm import PNDMConfig, PNDMScheduler, PNDMState
from nvl_jax.diffusion.schedulers.auto import SCHEDULERS, scheduler_from_config
