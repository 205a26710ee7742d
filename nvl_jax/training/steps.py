"""The jitted stage-1 steps: betas in, on-device preprocessing, ViT3D, dual-stream loss.

A batch (see ``nvl_jax.data.pipeline``) holds ``betas [batch, max_voxels]``,
``subject [batch]``, ``clip_target [batch, clip_dim]`` and ``vae_target
[batch, h, w, c]``. The betas are scattered, resampled and cut into patches on
the accelerator inside the step, so the host never ships float32 volumes.
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from nvl_jax import sharding as sharding_lib
from nvl_jax.data import volumes
from nvl_jax.models import vit3d
from nvl_jax.training.state import StateLayout


@flax.struct.dataclass
class Preprocessing:
    """What turns a batch's betas into ViT3D tokens: the per-subject geometry and the kept patches.

    A pytree passed to the jitted steps as a replicated argument (it is ~15 MB
    for NSD: too big to bake into the program as a constant).
    """

    geometry: volumes.Geometry
    active: jax.Array  # int32 [n_active, 3] patch-grid coordinates
    patch_size: int = flax.struct.field(pytree_node=False)

    def patches(self, batch: dict) -> jax.Array:
        """``[batch, n_active, patch_size**3]``."""
        return volumes.betas_to_patches(batch["betas"], batch["subject"], self.geometry, self.active,
                                        self.patch_size)


def _batch_shardings(mesh, rules, batch_ndims: dict[str, int]):
    return {k: sharding_lib.batch_sharding(mesh, ndim, rules) for k, ndim in batch_ndims.items()}


def compute_loss(params, batch: dict, prep: Preprocessing, *, graphdef, alpha: float):
    """The dual-stream loss of a batch, ``(loss, {"loss", "mse_clip", "mse_vae"})``: what training differentiates."""
    output = nnx.merge(graphdef, params)(prep.patches(batch), prep.active)
    return vit3d.dual_stream_loss(output, batch["clip_target"], batch["vae_target"], alpha)


def make_train_step(layout: StateLayout, tx: optax.GradientTransformation, *, alpha: float, mesh, rules,
                    batch_ndims: dict[str, int]):
    """``step(params, opt_state, batch, prep) -> (params, opt_state, metrics)``, jitted with explicit shardings.

    params and opt_state are donated: the update happens in place on the devices.
    metrics: loss, mse_clip, mse_vae, grad_norm (replicated scalars).
    """

    def step(params, opt_state, batch, prep):
        (_, metrics), grads = jax.value_and_grad(compute_loss, has_aux=True)(
            params, batch, prep, graphdef=layout.graphdef, alpha=alpha)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {**metrics, "grad_norm": optax.global_norm(grads)}

    return jax.jit(
        step,
        in_shardings=(layout.param_shardings, layout.opt_shardings, _batch_shardings(mesh, rules, batch_ndims),
                      layout.replicated),
        out_shardings=(layout.param_shardings, layout.opt_shardings, layout.replicated),
        donate_argnums=(0, 1),
    )


def make_predict_step(layout: StateLayout, *, mesh, rules, batch_ndims: dict[str, int]):
    """``predict(params, batch, prep) -> dict`` of replicated arrays: the CLIP-head embedding
    ``[batch, clip_dim]``, the per-sample mean squared error of each head ``[batch]`` (the VAE
    prediction itself stays on the device), and the batch's subject, stimulus and valid entries."""

    def predict(params, batch, prep):
        model = nnx.merge(layout.graphdef, params)
        output = model(prep.patches(batch), prep.active)
        clip = output.clip_embedding.astype(jnp.float32)
        vae = output.vae_latent.astype(jnp.float32)
        return {
            **{k: batch[k] for k in ("subject", "stimulus", "valid")},
            "clip_embedding": clip,
            "mse_clip": jnp.mean(jnp.square(clip - batch["clip_target"]), axis=-1),
            "mse_vae": jnp.mean(jnp.square(vae - batch["vae_target"]).reshape(vae.shape[0], -1), axis=-1),
        }

    return jax.jit(predict, in_shardings=(layout.param_shardings, _batch_shardings(mesh, rules, batch_ndims),
                                          layout.replicated), out_shardings=layout.replicated)
