"""The stage-1 training loop: restore or initialise, step, log, checkpoint, evaluate."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import ml_collections
from flax import nnx
from tqdm.auto import tqdm

from nvl_jax.data import pipeline
from nvl_jax.evaluation import stage1 as stage1_eval
from nvl_jax.models import vit3d
from nvl_jax.training import experiment as experiment_lib
from nvl_jax.training import optim, state as state_lib, steps
from nvl_jax.training.checkpointing import Checkpointer
from nvl_jax.training.metrics_writer import MetricsWriter


def total_steps(config: ml_collections.ConfigDict, dataset) -> int:
    """``config.total_steps``, or ``config.epochs`` passes over the training trials when it is -1."""
    if config.total_steps > 0:
        return config.total_steps
    records = len(pipeline.build_records(dataset, "train", "train"))
    return max(1, math.ceil(config.epochs * records / config.data.batch_size))


def model_builder(experiment: experiment_lib.Experiment):
    return lambda: vit3d.BrainEncoder(experiment.model_config, rngs=nnx.Rngs(experiment.config.seed))


def _finite(value: float) -> bool:
    return math.isfinite(float(value))


def train(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """Trains (resuming from ``workdir``'s newest checkpoint if any), then evaluates; returns eval.json's dict."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    experiment = experiment_lib.build(config)
    steps_total = total_steps(config, experiment.dataset)
    tx = optim.make_optimizer(config.optimizer, steps_total)
    schedule = optim.learning_rate_schedule(config.optimizer, steps_total)
    build_model = model_builder(experiment)
    layout = state_lib.plan(build_model, tx, experiment.mesh, experiment.rules)
    data = iter(pipeline.train_dataset(config.data.root, experiment.dataset, global_batch_size=config.data.batch_size,
                                       seed=config.seed, mixup=config.data.mixup,
                                       worker_count=config.data.worker_count))
    checkpointer = Checkpointer(workdir, keep=config.keep_checkpoints)
    step = checkpointer.latest_step() or 0
    if step:
        params, opt_state, _ = checkpointer.restore(step, layout, data)
        print(f"resumed from {checkpointer.directory / str(step)}")
    else:
        params, opt_state = state_lib.initialize(build_model, tx, layout)
    train_step = steps.make_train_step(layout, tx, alpha=config.loss.alpha, mesh=experiment.mesh,
                                       rules=experiment.rules, batch_ndims=experiment.batch_ndims)
    writer = MetricsWriter(workdir, resume_step=step)
    meta = {"config": config.to_dict(), "total_steps": steps_total}
    previous = None  # the last step's metrics, read one step late so the device always has work queued
    with tqdm(total=steps_total, initial=step, desc="stage 1", unit="step", disable=jax.process_index() != 0) as bar:
        while step < steps_total:
            batch = pipeline.global_batch(next(data), experiment.mesh, experiment.rules)
            params, opt_state, metrics = train_step(params, opt_state, batch, experiment.prep)
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
    results = evaluate(experiment, layout, params, workdir)
    checkpointer.close()
    return results


def evaluate(experiment: experiment_lib.Experiment, layout: state_lib.StateLayout, params, workdir: Path) -> dict:
    """Both test modes on ``params``: predictions in ``workdir``, eval.json written and printed; returns it."""
    predict_step = steps.make_predict_step(layout, mesh=experiment.mesh, rules=experiment.rules,
                                           batch_ndims={**experiment.batch_ndims, "valid": 1})
    results = stage1_eval.evaluate(experiment, params, predict_step, workdir)
    write_eval(workdir, results)
    return results


def _nan_message(step: int, loss: float, checkpointer: Checkpointer) -> str:
    return (f"step {step}: loss is {loss}; training stopped. The last good checkpoint "
            f"(step {checkpointer.latest_step()}) in {checkpointer.directory} is kept; lower the learning rate "
            "or check the data, then rerun the same command to resume from it.")


def write_eval(workdir: Path, results: dict) -> None:
    """Writes ``workdir/eval.json`` and prints the headline figures."""
    if jax.process_index() == 0:
        (workdir / "eval.json").write_text(json.dumps(results, indent=2))
    for mode, m in results.items():
        print(f"{mode}: brain->image top-1 {m['brain_to_image_top1']:.3f}, image->brain top-1 "
              f"{m['image_to_brain_top1']:.3f} (chance {m['chance_top1']:.3f}, {m['n_test']} test stimuli), "
              f"two-way {m['two_way_identification']:.3f}, mse clip {m['mse_clip']:.4f} vae {m['mse_vae']:.4f}")
