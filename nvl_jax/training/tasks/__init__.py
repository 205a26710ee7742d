"""Tasks of the generic trainer, one module each, chosen by ``config.task``.

- ``stage1``: the ViT3D extractor with dual-stream CLIP / VAE alignment (the paper's stage 1).
- ``stage2``: the brain-language model on a stage-1 run: projector, LLM (frozen, full or LoRA).
"""

from __future__ import annotations

import importlib
import pkgutil

import jax
import ml_collections

from nvl_jax.training.task import Task


def available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__))


def get(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None) -> Task:
    """The task ``config.task`` names, built on ``mesh`` (default: the config's mesh over all devices)."""
    from nvl_jax.training import experiment

    name = config.get("task", "")
    if name not in available():
        raise ValueError(f"config.task = {name!r}: expected one of {available()} (nvl_jax/training/tasks/)")
    module = importlib.import_module(f"{__name__}.{name}")
    return module.Task(config, mesh if mesh is not None else experiment.make_mesh(config))
