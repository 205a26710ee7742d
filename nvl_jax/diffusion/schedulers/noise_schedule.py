"""The training noise schedule shared by every scheduler: ``betas`` and ``alphas_cumprod``.

Computed once on the host with numpy, bit for bit as diffusers computes them
with torch on CPU:

- ``linear`` / ``scaled_linear``: ``torch.linspace(..., dtype=float32)``, whose
  kernel computes ``start + step * i`` (first half) and ``end - step * (n - 1 - i)``
  (second half) with a single rounding (a fused multiply-add) and a float32 step;
  ``scaled_linear`` then squares in float32.
- ``squaredcos_cap_v2`` (the GLIDE cosine schedule): Python float64, cast to float32.
- ``alphas_cumprod``: ``torch.cumprod`` on CPU accumulates float32 input in
  float64 and rounds each partial product to float32.
"""

from __future__ import annotations

import math

import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def torch_linspace_float32(start: float, end: float, num: int) -> np.ndarray:
    """``torch.linspace(start, end, num, dtype=torch.float32)``, bit for bit: ``[num]`` float32."""
    start32, end32 = np.float32(start), np.float32(end)
    if num == 1:
        return np.array([start32], np.float32)
    step = np.float32((end32 - start32) / np.float32(num - 1))
    index = np.arange(num)
    # float64 holds the product float32 * (integer < 2**24) exactly, so one cast rounds once, as an FMA does.
    from_start = (np.float64(start32) + np.float64(step) * index).astype(np.float32)
    from_end = (np.float64(end32) - np.float64(step) * (num - 1 - index)).astype(np.float32)
    return np.where(index < num // 2, from_start, from_end)


def squaredcos_cap_v2(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """GLIDE's cosine schedule (diffusers' ``betas_for_alpha_bar``, cosine): ``[num_train_timesteps]`` float32."""

    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / num_train_timesteps) / alpha_bar(i / num_train_timesteps), max_beta)
             for i in range(num_train_timesteps)]
    return np.array(betas, np.float32)


def make_betas(num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str,
               trained_betas: tuple[float, ...] | None = None) -> np.ndarray:
    """The per-step noise variances ``[num_train_timesteps]`` float32; ``trained_betas`` overrides the schedule."""
    if trained_betas is not None:
        return np.array(trained_betas, np.float32)
    if beta_schedule == "linear":
        return torch_linspace_float32(beta_start, beta_end, num_train_timesteps)
    if beta_schedule == "scaled_linear":
        return np.square(torch_linspace_float32(beta_start**0.5, beta_end**0.5, num_train_timesteps))
    if beta_schedule == "squaredcos_cap_v2":
        return squaredcos_cap_v2(num_train_timesteps)
    raise ValueError(f"beta_schedule {beta_schedule!r} is not one of {BETA_SCHEDULES}")


def alphas_cumprod(betas: np.ndarray) -> np.ndarray:
    """``prod_{s <= t} (1 - beta_s)``: ``[num_train_timesteps]`` float32."""
    alphas = np.float32(1.0) - betas.astype(np.float32)
    return np.cumprod(alphas.astype(np.float64)).astype(np.float32)
