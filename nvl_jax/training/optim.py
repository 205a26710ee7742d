"""AdamW with linear warmup and cosine decay (the paper names lr 5e-4 and nothing else)."""

from __future__ import annotations

import ml_collections
import optax


def learning_rate_schedule(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup over ``warmup_steps`` to ``lr``, then cosine decay to ``lr * final_lr_fraction``."""
    warmup = min(config.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.lr, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=config.lr * config.final_lr_fraction)


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
    """``config``: the ``optimizer`` block (lr, warmup_steps, final_lr_fraction, b1, b2, weight_decay, grad_clip)."""
    adamw = optax.adamw(learning_rate_schedule(config, total_steps), b1=config.b1, b2=config.b2,
                        weight_decay=config.weight_decay)
    if config.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(config.grad_clip), adamw)
    return adamw
