"""The one jitted train step every task shares: merge, the task's loss, gradients, AdamW.

Only the trainable state is differentiated and updated; the frozen state is an input the step
reads. Both the trainable parameters and the optimizer state are donated, so the update happens
in place on the devices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
from flax import nnx

from nvl_jax.training.state import StateLayout
from nvl_jax.training.task import Task


def make_loss_fn(task: Task, layout: StateLayout):
    """``loss_fn(params, frozen, batch, constants, dropout_key) -> (loss, metrics)``: what training differentiates.

    It traces the task's loss under the task's mesh and logical-axis rules, so that a model's
    activation constraints (``sharding.constrain``) take effect; they change the layout, never
    the values. ``task.config.sharding_rules`` without activation names leaves them to XLA.
    """

    def loss_fn(params, frozen, batch, constants, dropout_key):
        with jax.sharding.use_abstract_mesh(task.mesh.abstract_mesh), nnx.logical_axis_rules(task.rules):
            return task.loss(layout.merge(params, frozen), batch, constants, dropout_key)

    return loss_fn


def make_train_step(task: Task, layout: StateLayout, tx: optax.GradientTransformation):
    """``step(params, opt_state, frozen, batch, constants, step) -> (params, opt_state, metrics)``.

    ``step`` (int32 scalar) seeds the dropout key, so a resumed run draws the same masks.
    metrics: the task's, plus grad_norm (replicated scalars).
    """
    loss_fn = make_loss_fn(task, layout)
    seed = task.config.seed

    def train_step(params, opt_state, frozen, batch, constants, step):
        dropout_key = jax.random.fold_in(jax.random.key(seed), step)
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, frozen, batch, constants,
                                                                        dropout_key)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {**metrics, "grad_norm": optax.global_norm(grads)}

    r = layout.replicated
    return jax.jit(
        train_step,
        in_shardings=(layout.param_shardings, layout.opt_shardings, layout.frozen_shardings,
                      task.batch_shardings(), r, r),
        out_shardings=(layout.param_shardings, layout.opt_shardings, r),
        donate_argnums=(0, 1),
    )


def step_counter(step: int) -> jax.Array:
    return jnp.asarray(step, jnp.int32)


def compile_on_all_processes(train_step, *args) -> None:
    """Compiles ``train_step`` for ``args`` and waits until every process of the job has too.

    The first run of a step sets up its cross-process collectives, and a CPU job's gloo gives up
    when one process arrives there 30 s after another: compile times differ that much on a busy
    host. The coordination service's barrier waits minutes. A no-op in a single-process run.
    """
    if jax.process_count() == 1:
        return
    train_step.lower(*args).compile()  # the jitted function reuses this executable
    ocp.multihost.sync_global_processes("nvl_jax.train_step_compiled", processes=set(range(jax.process_count())),
                                        timeout=1800)
