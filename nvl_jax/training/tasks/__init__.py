"""Tasks of the generic trainer, one module each, chosen by ``config.task``.

- ``stage1``: the ViT3D extractor with dual-stream CLIP / VAE alignment (the paper's stage 1).
- ``stage2``: the brain-language model on a stage-1 run: projector, LLM (frozen, full or LoRA).
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

import jax
import ml_collections

from nvl_jax.training.task import Task


def available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__))


def _task_class(config: ml_collections.ConfigDict) -> type[Task]:
    name = config.get("task", "")
    if name not in available():
        raise ValueError(f"config.task = {name!r}: expected one of {available()} (nvl_jax/training/tasks/)")
    return importlib.import_module(f"{__name__}.{name}").Task


def get(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None) -> Task:
    """The task ``config.task`` names, built on ``mesh`` (default: the config's mesh over all devices)."""
    from nvl_jax.training import experiment

    return _task_class(config)(config, mesh if mesh is not None else experiment.make_mesh(config))


def for_planning(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None, *,
                 upstream: ml_collections.ConfigDict | None = None) -> tuple[Task, dict[str, Any], Any]:
    """``(task, batch shapes, constants shapes)`` of ``config.task`` from the config alone
    (``Task.for_planning``), on ``mesh`` (default: the config's mesh over all devices)."""
    from nvl_jax.training import experiment

    mesh = mesh if mesh is not None else experiment.make_mesh(config)
    return _task_class(config).for_planning(config, mesh, upstream=upstream)
