"""DDPM's forward (noising) process, diffusers' ``DDPMScheduler.add_noise``.

Stable unCLIP noises the CLIP image embedding with a DDPM scheduler
(``squaredcos_cap_v2``, 1000 steps) before conditioning on it; only that forward
process is ported. DDPM's ancestral sampling step is not.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from nvl_jax.diffusion.schedulers.base import NoiseScheduleConfig, Scheduler


@dataclasses.dataclass(frozen=True)
class DDPMScheduler(Scheduler):
    """``add_noise(original, noise, timesteps)`` and the noise table; the sampling options of
    diffusers' config (``variance_type``, ``clip_sample``, ...) are read by diffusers' step only."""

    config: NoiseScheduleConfig
    CONFIG_CLASS: ClassVar[type] = NoiseScheduleConfig
    ALLOWED: ClassVar[dict[str, tuple]] = {"rescale_betas_zero_snr": (False,)}
