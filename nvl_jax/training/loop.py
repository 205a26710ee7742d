"""The generic training loop: restore or initialise, step, log, checkpoint, evaluate.

Any task (``nvl_jax.training.tasks``) runs through it: the loop knows nothing of ViT3Ds or LLMs.
"""

from __future__ import annotations

import math
from pathlib import Path

import jax
import ml_collections
from tqdm.auto import tqdm

from nvl_jax.models import layers
from nvl_jax.training import optim, run_config, state as state_lib, steps, tasks
from nvl_jax.training.checkpointing import Checkpointer
from nvl_jax.training.metrics_writer import MetricsWriter
from nvl_jax.training.task import Task


def _finite(value: float) -> bool:
    return math.isfinite(float(value))


def plan(task: Task) -> tuple[state_lib.StateLayout, "optim.optax.GradientTransformation", int]:
    """``(layout, tx, total_steps)`` of ``task``: nothing is allocated."""
    steps_total = task.total_steps()
    tx = optim.make_optimizer(task.config.optimizer, steps_total)
    return state_lib.plan(task.build_model, task.trainable(), tx, task.mesh, task.rules), tx, steps_total


def train(config: ml_collections.ConfigDict, workdir: str | Path, task: Task | None = None) -> dict:
    """Trains ``config.task`` (resuming from ``workdir``'s newest checkpoint if any), then evaluates.

    Returns the task's evaluation dict. ``workdir/config.json`` records the resolved config; a
    resume with a config that changes shapes, data or the task is refused (``run_config``).
    """
    workdir = Path(workdir)
    layers.set_custom_backward(config.custom_backward)
    checkpointer = Checkpointer(workdir, keep=config.keep_checkpoints)
    step = checkpointer.latest_step() or 0
    if step:
        run_config.check_resume(workdir, config)
    run_config.save(workdir, config)
    task = task or tasks.get(config)
    layout, tx, steps_total = plan(task)
    schedule = optim.learning_rate_schedule(config.optimizer, steps_total)
    data = task.train_iterator()
    params, frozen = task.initial_state(layout)
    if step:
        del params  # freed before the checkpoint's copy is read
        params, opt_state, _ = checkpointer.restore(step, layout, data)
        print(f"resumed from {checkpointer.directory / str(step)}")
    else:
        opt_state = state_lib.init_optimizer(tx, params, layout)
    train_step = steps.make_train_step(task, layout, tx)
    constants = task.constants()
    writer = MetricsWriter(workdir, resume_step=step)
    meta = {"task": config.task, "total_steps": steps_total}
    previous = None  # the last step's metrics, read one step late so the device always has work queued
    with tqdm(total=steps_total, initial=step, desc=task.name, unit="step", disable=jax.process_index() != 0) as bar:
        while step < steps_total:
            batch = task.global_batch(next(data))
            if previous is None:
                steps.compile_on_all_processes(train_step, params, opt_state, frozen, batch, constants,
                                               steps.step_counter(step))
            params, opt_state, metrics = train_step(params, opt_state, frozen, batch, constants,
                                                    steps.step_counter(step))
            step += 1
            if previous is not None and not _finite(previous[1]["loss"]):
                raise FloatingPointError(_nan_message(previous[0], previous[1]["loss"], checkpointer))
            previous = (step, metrics)
            if step % config.log_every_steps == 0 or step == steps_total:
                logged = {k: float(v) for k, v in jax.device_get(metrics).items()}
                if not _finite(logged["loss"]):
                    raise FloatingPointError(_nan_message(step, logged["loss"], checkpointer))
                writer.write(step, {**logged, "learning_rate": float(schedule(step))})
                bar.set_postfix(loss=f"{logged['loss']:.4f}")
            if step % config.checkpoint_every_steps == 0 or step == steps_total:
                if not _finite(jax.device_get(metrics["loss"])):
                    raise FloatingPointError(_nan_message(step, float(metrics["loss"]), checkpointer))
                checkpointer.save(step, params, opt_state, data, {**meta, "step": step})
            bar.update(1)
    writer.close()
    results = task.evaluate(layout.merge(params, frozen), workdir)
    print(task.describe(results))
    checkpointer.close()
    return results


def restore_model(workdir: str | Path, step: int | None = None, mesh: jax.sharding.Mesh | None = None):
    """``(task, model, step)`` of a finished or running run, from its folder alone.

    The config comes from ``workdir/config.json``; the trainable state from the newest (or
    ``step``'s) checkpoint; the frozen state from the task's deterministic start.
    """
    workdir = Path(workdir)
    config = run_config.load(workdir)
    layers.set_custom_backward(config.custom_backward)
    checkpointer = Checkpointer(workdir)
    step = step or checkpointer.latest_step()
    if step is None:
        raise FileNotFoundError(f"{checkpointer.directory}: no checkpoint; train first with "
                                f"python -m nvl_jax.train --config=... --workdir={workdir}")
    task = tasks.get(config, mesh)
    layout, _, _ = plan(task)
    _, frozen = task.initial_state(layout)
    params, _ = checkpointer.restore_params(step, layout)
    checkpointer.close()
    return task, layout.merge(params, frozen), step


def evaluate_run(workdir: str | Path, step: int | None = None) -> dict:
    """The task's evaluation of ``workdir``'s checkpoint (``python -m nvl_jax.evaluate``): writes its result
    files into the run folder, prints the headline figures and returns them."""
    task, model, step = restore_model(workdir, step)
    results = task.evaluate(model, Path(workdir))
    print(f"step {step}:\n{task.describe(results)}")
    return results


def _nan_message(step: int, loss: float, checkpointer: Checkpointer) -> str:
    return (f"step {step}: loss is {loss}; training stopped. The last good checkpoint "
            f"(step {checkpointer.latest_step()}) in {checkpointer.directory} is kept; lower the learning rate "
            "or check the data, then rerun the same command to resume from it.")
