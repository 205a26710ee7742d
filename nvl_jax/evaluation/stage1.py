"""Stage-1 evaluation on the test split, multi-trial and single-trial.

Per subject: brain -> image and image -> brain top-1 retrieval over all its
test stimuli (and MindEye2's 300-way protocol when there are at least 300),
two-way identification, both heads' MSE; the top-level figures of each mode
are the means over subjects.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from tqdm.auto import tqdm

from nvl_jax.data import pipeline
from nvl_jax.evaluation.retrieval import retrieval_metrics


def predict_split(task, predict_step, mode: str) -> dict[str, np.ndarray]:
    """Runs ``predict_step(batch)`` over every test record of ``mode``; returns the valid rows, host numpy.

    ``task``: a stage-1 task (``nvl_jax.training.tasks.stage1.Task``): its config, dataset and mesh.
    """
    config, dataset = task.config, task.dataset
    rows: dict[str, list[np.ndarray]] = {}
    batches = pipeline.test_batches(config.data.root, dataset, mode, config.eval.batch_size)
    for local in tqdm(batches, desc=f"eval {mode}", unit="batch", leave=False):
        out = predict_step(task.global_batch(local))
        for k, v in out.items():
            rows.setdefault(k, []).append(np.asarray(v))
    out = {k: np.concatenate(v) for k, v in rows.items()}
    return {k: v[out["valid"]] for k, v in out.items()}


def mode_metrics(task, predictions: dict[str, np.ndarray]) -> dict:
    """Retrieval and MSE per subject and their means over subjects."""
    targets = task.dataset.targets()
    per_subject = {}
    for index, name in enumerate(task.dataset.subjects):
        rows = np.flatnonzero(predictions["subject"] == index)
        rows = rows[np.argsort(predictions["stimulus"][rows])]
        stimuli = predictions["stimulus"][rows]
        metrics = retrieval_metrics(predictions["clip_embedding"][rows], targets.clip_image_embeds[stimuli],
                                    way=task.config.eval.retrieval_way,
                                    draws=task.config.eval.retrieval_draws, seed=task.config.seed)
        metrics.update(mse_clip=float(predictions["mse_clip"][rows].mean()),
                       mse_vae=float(predictions["mse_vae"][rows].mean()))
        per_subject[name] = metrics
    keys = per_subject[next(iter(per_subject))].keys()
    summary = {k: float(np.mean([m[k] for m in per_subject.values()])) for k in keys}
    summary["n_test"] = int(summary["n_test"])
    return {**summary, "per_subject": per_subject}


def evaluate(task, predict_step, workdir: Path | None = None) -> dict:
    """``{"multi_trial": {...}, "single_trial": {...}}``, each with at least brain_to_image_top1,
    image_to_brain_top1, chance_top1, n_test, two_way_identification, mse_clip, mse_vae.

    With ``workdir``, each mode's predictions are kept in ``predictions_<mode>.npz``
    (clip_embedding, subject, stimulus, mse_clip, mse_vae per test record) for plots and analysis.
    """
    results = {}
    for mode in pipeline.TEST_MODES:
        predictions = predict_split(task, predict_step, mode)
        if workdir is not None and jax.process_index() == 0:
            np.savez(Path(workdir) / f"predictions_{mode}.npz", **{k: v for k, v in predictions.items() if k != "valid"})
        results[mode] = mode_metrics(task, predictions)
    return results
