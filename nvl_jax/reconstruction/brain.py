"""A stage-1 run's predictions for reconstruction: the latent ``z_v`` and the CLIP embedding ``z_c`` of every record.

Records are those of ``nvl_jax.data.pipeline``: per subject and stimulus of a split, multi-trial
(the repeats averaged) or single-trial (the first presentation).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from nvl_jax.data import pipeline


@dataclasses.dataclass(frozen=True)
class Predictions:
    """One mode's records, in record order. ``subject`` int32 ``[N]`` (index into the dataset's subjects),
    ``stimulus`` int32 ``[N]``, ``clip_embedding`` float32 ``[N, clip_dim]``, ``vae_latent`` float32
    ``[N, h, w, c]`` (scaled latents)."""

    subject: np.ndarray
    stimulus: np.ndarray
    clip_embedding: np.ndarray
    vae_latent: np.ndarray

    def __len__(self) -> int:
        return len(self.stimulus)


def predict(task, model: nnx.Module, split: str, mode: str, limit: int | None = None) -> Predictions:
    """Both heads' outputs for the first ``limit`` (all if None) records of ``split`` in ``mode``.

    ``task``: a restored stage-1 task (``nvl_jax.training.loop.restore_model``); ``model``: its
    ``BrainEncoder``. Batches of ``task.config.eval.batch_size``, the last one padded.
    """
    config, dataset = task.config, task.dataset
    records = pipeline.build_records(dataset, split, mode)
    count = len(records) if limit is None else min(limit, len(records))
    if count == 0:
        raise ValueError(f"split {split!r} has no {mode} records")
    source = pipeline.RecordSource(config.data.root, records, max(s.n_voxels for s in dataset.subjects.values()))
    graphdef, state = nnx.split(model)
    replicated = jax.sharding.NamedSharding(task.mesh, jax.sharding.PartitionSpec())

    def heads(state, betas, subject, prep):
        output = nnx.merge(graphdef, state)(prep.patches({"betas": betas, "subject": subject}), prep.active)
        return output.clip_embedding.astype(jnp.float32), output.vae_latent.astype(jnp.float32)

    heads = jax.jit(heads, out_shardings=(replicated, replicated))
    batch_size = config.eval.batch_size
    local = batch_size // jax.process_count()
    clip_out, vae_out = [], []
    for start in tqdm(range(0, count, batch_size), desc=f"predict {mode}", unit="batch", leave=False):
        # This process's share of the batch; the last batch repeats the final record.
        rows = np.minimum(start + jax.process_index() * local + np.arange(local), count - 1)
        elements = [source[int(i)] for i in rows]
        batch = task.global_batch({k: np.stack([e[k] for e in elements]) for k in ("betas", "subject")})
        clip, latent = heads(state, batch["betas"], batch["subject"], task.prep)
        n = min(batch_size, count - start)
        clip_out.append(np.asarray(clip)[:n])
        vae_out.append(np.asarray(latent)[:n])
    return Predictions(subject=records.subject[:count], stimulus=records.stimulus[:count],
                       clip_embedding=np.concatenate(clip_out), vae_latent=np.concatenate(vae_out))
