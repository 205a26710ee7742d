"""Picks the scheduler a diffusers ``scheduler_config.json`` names in ``_class_name``."""

from __future__ import annotations

import os

from nvl_jax.diffusion.schedulers.base import Scheduler, read_scheduler_config
from nvl_jax.diffusion.schedulers.ddim import DDIMScheduler
from nvl_jax.diffusion.schedulers.ddpm import DDPMScheduler
from nvl_jax.diffusion.schedulers.dpm_solver_multistep import DPMSolverMultistepScheduler
from nvl_jax.diffusion.schedulers.pndm import PNDMScheduler

SCHEDULERS: dict[str, type[Scheduler]] = {
    cls.__name__: cls for cls in (PNDMScheduler, DDIMScheduler, DPMSolverMultistepScheduler, DDPMScheduler)}


def scheduler_from_config(config: dict | str | os.PathLike, *, subfolder: str | None = None,
                          class_name: str | None = None) -> Scheduler:
    """The scheduler named by ``class_name``, else by the config's ``_class_name``, built from that config.

    Naming another class reads the same config into it, as diffusers'
    ``OtherScheduler.from_config(pipe.scheduler.config)`` does.
    """
    raw = read_scheduler_config(config, subfolder)
    name = class_name or raw.get("_class_name")
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler config: _class_name={name!r} is not one of {sorted(SCHEDULERS)}")
    return SCHEDULERS[name].from_config(raw)
