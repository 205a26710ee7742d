"""Stage 1: betas -> on-device preprocessing -> ViT3D -> CLIP and VAE heads, dual-stream loss.

A batch (``nvl_jax.data.pipeline``) holds ``betas [batch, max_voxels]``, ``subject [batch]``,
``stimulus [batch]``, ``clip_target [batch, clip_dim]`` and ``vae_target [batch, h, w, c]``.
The betas are scattered, resampled and cut into patches on the accelerator inside the step, so
the host never ships float32 volumes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from nvl_jax.data import pipeline, volumes
from nvl_jax.evaluation import stage1 as stage1_eval
from nvl_jax.models import vit3d
from nvl_jax.training import experiment
from nvl_jax.training import task as task_lib


@flax.struct.dataclass
class Preprocessing:
    """What turns a batch's betas into ViT3D tokens: the per-subject geometry and the kept patches.

    A pytree passed to the jitted steps as a replicated argument (it is ~15 MB for NSD: too big
    to bake into the program as a constant).
    """

    geometry: volumes.Geometry
    active: jax.Array  # int32 [n_active, 3] patch-grid coordinates
    patch_size: int = flax.struct.field(pytree_node=False)

    def patches(self, batch: dict) -> jax.Array:
        """``[batch, n_active, patch_size**3]``."""
        return volumes.betas_to_patches(batch["betas"], batch["subject"], self.geometry, self.active,
                                        self.patch_size)


def model_config(config: ml_collections.ConfigDict, common_grid, targets) -> vit3d.ViT3DConfig:
    """The ViT3D of ``config.model`` on ``common_grid``, its heads sized by the cached targets."""
    m, patch_size = config.model, config.data.patch_size
    # Run folders written before model.remat existed trained without it.
    remat = m.get("remat", "none")
    return vit3d.ViT3DConfig(
        patch_size=patch_size, patch_grid=volumes.patch_grid(common_grid, patch_size), width=m.width,
        depth=m.depth, num_heads=m.num_heads, mlp_ratio=m.mlp_ratio, head_hidden=m.head_hidden,
        hidden_act=m.hidden_act, layer_norm_eps=m.layer_norm_eps, dropout=m.dropout,
        attention_dropout=m.attention_dropout,
        clip_dim=targets.clip_image_embeds.shape[1], vae_latent_shape=tuple(targets.vae_latents.shape[1:]),
        compute_dtype=m.compute_dtype, remat=remat)


def total_steps(config: ml_collections.ConfigDict, dataset) -> int:
    """``config.total_steps``, or ``config.epochs`` passes over the training trials when it is -1."""
    if config.total_steps > 0:
        return config.total_steps
    records = len(pipeline.build_records(dataset, "train", "train"))
    return max(1, math.ceil(config.epochs * records / config.data.batch_size))


class Task(task_lib.Task):
    """The paper's stage 1. Attributes: ``dataset``, ``common_grid``, ``prep`` (replicated), ``model_config``."""

    name = "stage 1"

    def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
        super().__init__(config, mesh)
        self.dataset = experiment.prepare_dataset(config)
        self.common_grid = experiment.resolve_common_grid(config, self.dataset)
        patch_size = config.data.patch_size
        geometry = volumes.build_geometry([s.voxel_mask for s in self.dataset.subjects.values()], self.common_grid)
        active = experiment.active_patches(self.dataset, self.common_grid, patch_size)
        self.model_config = model_config(config, self.common_grid, self.dataset.targets())
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        self.prep = jax.device_put(Preprocessing(geometry, np.asarray(active, np.int32), patch_size), replicated)

    def build_model(self) -> vit3d.BrainEncoder:
        return vit3d.BrainEncoder(self.model_config, rngs=nnx.Rngs(self.config.seed))

    def batch_ndims(self) -> dict[str, int]:
        return {"betas": 2, "subject": 1, "stimulus": 1, "clip_target": 2,
                "vae_target": self.dataset.targets().vae_latents.ndim}

    def train_iterator(self):
        c = self.config
        return iter(pipeline.train_dataset(c.data.root, self.dataset, global_batch_size=c.data.batch_size,
                                           seed=c.seed, mixup=c.data.mixup, worker_count=c.data.worker_count))

    def total_steps(self) -> int:
        return total_steps(self.config, self.dataset)

    def constants(self) -> Preprocessing:
        return self.prep

    def loss(self, model, batch, constants, dropout_key):
        output = model(constants.patches(batch), constants.active, rngs=nnx.Rngs(dropout=dropout_key))
        return vit3d.dual_stream_loss(output, batch["clip_target"], batch["vae_target"], self.config.loss.alpha,
                                      self.config.loss.reduction)

    def predict_step(self, model: nnx.Module):
        """``predict(batch) -> dict`` of replicated arrays: the CLIP-head embedding ``[batch, clip_dim]``,
        the per-sample mean squared error of each head ``[batch]`` (the VAE prediction itself stays on the
        device), and the batch's subject, stimulus and valid entries. Dropout is off."""
        graphdef, state = nnx.split(model)

        def predict(state, batch, prep):
            output = nnx.merge(graphdef, state)(prep.patches(batch), prep.active)
            clip = output.clip_embedding.astype(jnp.float32)
            vae = output.vae_latent.astype(jnp.float32)
            return {
                **{k: batch[k] for k in ("subject", "stimulus", "valid")},
                "clip_embedding": clip,
                "mse_clip": jnp.mean(jnp.square(clip - batch["clip_target"]), axis=-1),
                "mse_vae": jnp.mean(jnp.square(vae - batch["vae_target"]).reshape(vae.shape[0], -1), axis=-1),
            }

        replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        jitted = jax.jit(predict, out_shardings=replicated)
        return lambda batch: jitted(state, batch, self.prep)

    def evaluate(self, model: nnx.Module, workdir: Path) -> dict:
        """Both test modes: ``workdir/eval.json`` and ``predictions_<mode>.npz``; returns eval.json's dict."""
        results = stage1_eval.evaluate(self, self.predict_step(model), workdir)
        if jax.process_index() == 0:
            (Path(workdir) / "eval.json").write_text(json.dumps(results, indent=2))
        return results

    def describe(self, results: dict) -> str:
        return "\n".join(
            f"{mode}: brain->image top-1 {m['brain_to_image_top1']:.3f}, image->brain top-1 "
            f"{m['image_to_brain_top1']:.3f} (chance {m['chance_top1']:.3f}, {m['n_test']} test stimuli), "
            f"two-way {m['two_way_identification']:.3f}, mse clip {m['mse_clip']:.4f} vae {m['mse_vae']:.4f}"
            for mode, m in results.items())
