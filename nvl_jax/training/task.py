"""What a task supplies to the generic trainer (big_vision's ``model_name``, as ``config.task``).

The trainer (``nvl_jax.training.loop``) owns everything tasks share: the mesh, the parameter and
optimizer layout, the jitted step, orbax checkpoints with the data iterator, resume, the NaN stop,
metrics and the final evaluation. A task owns what differs: which model, which parameters train,
which batches, which loss, which evaluation. ``docs/architecture.md`` shows how to add one.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from nvl_jax import sharding as sharding_lib
from nvl_jax.data import pipeline


class Task(abc.ABC):
    """One kind of run. Subclasses are named ``Task`` in ``nvl_jax/training/tasks/<config.task>.py``.

    Attributes set here: ``config``, ``mesh``, ``rules`` (logical axis -> mesh axes).
    """

    # Summary line printed after a checkpoint's evaluation, e.g. "stage 1".
    name = "task"

    def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
        self.config = config
        self.mesh = mesh
        self.rules = tuple(tuple(rule) for rule in config.sharding_rules)

    # ---- the model ---------------------------------------------------------------------------
    @abc.abstractmethod
    def build_model(self) -> nnx.Module:
        """A freshly initialised model (called under ``nnx.eval_shape`` and inside ``jax.jit``)."""

    def trainable(self) -> nnx.filterlib.Filter:
        """Which variables the optimizer updates; the rest are held fixed (and not checkpointed)."""
        return nnx.Param

    def initial_state(self, layout) -> tuple[nnx.State, nnx.State]:
        """``(trainable, frozen)`` at step 0, on their shardings. Default: ``build_model``'s random init.

        A task that starts from pretrained weights (an LLM, a stage-1 extractor) loads them here.
        Must be deterministic: a resumed run rebuilds the frozen part this way.
        """
        from nvl_jax.training import state as state_lib

        return state_lib.random_init(self.build_model, self.trainable(), layout)

    @classmethod
    def for_planning(cls, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, *,
                     upstream: ml_collections.ConfigDict | None = None) -> tuple[Task, dict[str, Any], Any]:
        """``(task, batch, constants)`` from ``config`` alone, to plan memory before the data, checkpoints
        or weights exist (``python -m nvl_jax.plan --from_config``): a task whose train step is this
        one's (it need not train or evaluate), the global batch and the constants as
        ``jax.ShapeDtypeStruct``s. ``upstream``: the config of the run this task builds on, where that
        run is not on disk. Tasks whose shapes come from their data do not override it."""
        raise ValueError(f"config.task = {config.task!r}: the {cls.name} task takes its shapes from its "
                         "data; plan it with its data (python -m nvl_jax.plan without --from_config)")

    # ---- the data ----------------------------------------------------------------------------
    @abc.abstractmethod
    def batch_ndims(self) -> dict[str, int]:
        """Rank of every entry of a training batch; each is split over the mesh's batch axes."""

    @abc.abstractmethod
    def train_iterator(self) -> Iterator[dict[str, np.ndarray]]:
        """Endless local batches of this process's share; a Grain iterator, saved in checkpoints."""

    def global_batch(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's batch assembled into global arrays over the mesh's batch axes."""
        return pipeline.global_batch(local, self.mesh, self.rules)

    def batch_shardings(self) -> dict[str, jax.sharding.NamedSharding]:
        return {k: sharding_lib.batch_sharding(self.mesh, ndim, self.rules) for k, ndim in self.batch_ndims().items()}

    @abc.abstractmethod
    def total_steps(self) -> int:
        """Training length, from the config (``total_steps``, or ``epochs`` over the training data)."""

    def constants(self) -> Any:
        """A pytree every step needs, placed replicated once (preprocessing tables, say); None if none."""
        return None

    # ---- the loss and the evaluation ---------------------------------------------------------
    @abc.abstractmethod
    def loss(self, model: nnx.Module, batch: dict[str, jax.Array], constants: Any,
             dropout_key: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """``(loss, metrics)`` of a global batch; traced inside the jitted step.

        ``metrics`` holds scalars, ``"loss"`` among them; ``dropout_key`` is fresh every step.
        """

    @abc.abstractmethod
    def evaluate(self, model: nnx.Module, workdir: Path) -> dict:
        """Evaluates the trained model, writes the task's result files into ``workdir``, returns them."""

    def describe(self, results: dict) -> str:
        """The headline figures of ``results`` in a line or two, printed after evaluation."""
        return str(results)
