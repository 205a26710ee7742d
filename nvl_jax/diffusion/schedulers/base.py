"""What every scheduler shares: reading diffusers' ``scheduler_config.json``, the noise table, ``add_noise``.

A scheduler is a frozen dataclass around its config: hashable (it can be a
static argument of ``jax.jit``), with its tables computed once on the host. The
per-run values (timesteps, multistep history) live in a separate state pytree,
so a whole denoising loop is one ``jax.lax.scan``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from nvl_jax.diffusion.schedulers import noise_schedule
from nvl_jax.models import hf_loader

CONFIG_NAME = "scheduler_config.json"
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")


def read_scheduler_config(config: dict | str | os.PathLike, subfolder: str | None = None) -> dict:
    """A diffusers scheduler config: a dict, a ``scheduler_config.json`` path, or a folder (or hub name) holding one.

    ``subfolder`` picks a pipeline's scheduler folder, e.g. ``"scheduler"`` or
    ``"image_noising_scheduler"``.
    """
    if isinstance(config, dict):
        return dict(config)
    path = Path(config)
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
    return hf_loader.read_config(hf_loader.resolve(config, subfolder), CONFIG_NAME)


def parse_config(config_cls: type, raw: dict, allowed: dict[str, tuple], scheduler: str):
    """Builds ``config_cls`` from a diffusers config dict.

    A field absent from ``raw`` takes diffusers' default (the dataclass default).
    ``allowed`` lists, for this scheduler's diffusers options, the values this
    port implements; any other value is refused with the field's name. Keys of
    other schedulers' configs are ignored, as diffusers' ``from_config`` does, so
    one pipeline's config can build any of the schedulers. A live diffusers
    ``scheduler.config`` lists the fields it took defaults for in
    ``_use_default_values``; like diffusers, those take this scheduler's defaults.
    """
    defaulted = set(raw.get("_use_default_values", ()))
    raw = {k: v for k, v in raw.items() if k not in defaulted}
    for field, values in allowed.items():
        if field in raw and raw[field] not in values:
            raise ValueError(f"{scheduler} config: {field}={raw[field]!r} is not supported; "
                             f"expected one of {list(values)}")
    kwargs = {}
    for field in dataclasses.fields(config_cls):
        if field.name in raw:
            value = raw[field.name]
            kwargs[field.name] = tuple(value) if isinstance(value, list) else value
    return config_cls(**kwargs)


@dataclasses.dataclass(frozen=True)
class NoiseScheduleConfig:
    """The training noise schedule's fields, common to every diffusers scheduler, with diffusers' defaults."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None


COMMON_ALLOWED = {"beta_schedule": noise_schedule.BETA_SCHEDULES}


@dataclasses.dataclass(frozen=True)
class Scheduler:
    """Base of the schedulers: the training noise table and the DDPM forward process."""

    config: NoiseScheduleConfig
    CONFIG_CLASS: ClassVar[type] = NoiseScheduleConfig
    # diffusers' options this port implements, with the values it implements; set per scheduler.
    ALLOWED: ClassVar[dict[str, tuple]] = {}
    # Every scheduler here starts from unit-variance noise and feeds the model the sample as is.
    init_noise_sigma: ClassVar[float] = 1.0

    @classmethod
    def from_config(cls, config: dict | str | os.PathLike, *, subfolder: str | None = None):
        """Builds the scheduler from diffusers' ``scheduler_config.json`` (see :func:`read_scheduler_config`)."""
        raw = read_scheduler_config(config, subfolder)
        return cls(parse_config(cls.CONFIG_CLASS, raw, {**COMMON_ALLOWED, **cls.ALLOWED}, cls.__name__))

    @functools.cached_property
    def betas(self) -> np.ndarray:
        """``[num_train_timesteps]`` float32."""
        c = self.config
        return noise_schedule.make_betas(c.num_train_timesteps, c.beta_start, c.beta_end, c.beta_schedule,
                                         c.trained_betas)

    @functools.cached_property
    def alphas_cumprod(self) -> np.ndarray:
        """``[num_train_timesteps]`` float32."""
        return noise_schedule.alphas_cumprod(self.betas)

    def scale_model_input(self, sample: jax.Array, step_index: jax.Array | int | None = None) -> jax.Array:
        """The model input at a step: the sample itself for these schedulers."""
        return sample

    def add_noise(self, original: jax.Array, noise: jax.Array, timesteps: jax.Array) -> jax.Array:
        """``sqrt(abar_t) * original + sqrt(1 - abar_t) * noise``, diffusers' DDPM forward process.

        ``original`` and ``noise``: ``[batch, ...]``; ``timesteps``: int ``[batch]``
        (or a scalar), training timesteps in ``[0, num_train_timesteps)``.
        """
        alpha_prod = jnp.asarray(self.alphas_cumprod, original.dtype)[jnp.asarray(timesteps)]
        sqrt_alpha_prod = _per_example(alpha_prod**0.5, original.ndim)
        sqrt_one_minus_alpha_prod = _per_example((1 - alpha_prod) ** 0.5, original.ndim)
        return sqrt_alpha_prod * original + sqrt_one_minus_alpha_prod * noise


def _per_example(coefficient: jax.Array, ndim: int) -> jax.Array:
    """A per-example coefficient ``[batch]`` (or scalar) shaped to broadcast over ``[batch, ...]``."""
    coefficient = coefficient.reshape(-1)
    return coefficient.reshape(coefficient.shape + (1,) * (ndim - 1))


def check_num_inference_steps(num_inference_steps: int, num_train_timesteps: int, scheduler: str) -> None:
    if not 1 <= num_inference_steps <= num_train_timesteps:
        raise ValueError(f"{scheduler}: num_inference_steps={num_inference_steps} must be in "
                         f"[1, num_train_timesteps={num_train_timesteps}]")
