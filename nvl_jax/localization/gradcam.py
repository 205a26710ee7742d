"""GradCAM on the ViT3D extractor's penultimate layer, scored by the CLIP head against a concept target.

For a sample, ``hidden_states[-2] [1 + n_active, width]`` is the output of the second-to-last
transformer block (CLS first). The last block is pre-LayerNorm: its attention reads the tokens as
``A = norm1(hidden_states[-2])``, and that is the only way a patch token reaches the CLS token, the
heads and the score. GradCAM runs on A: the last block (its attention on A, the residual from the
unnormalized tokens, the MLP), the final LayerNorm and the CLIP head ``f_c`` give the predicted
CLIP embedding, and the score is its cosine with the concept target. Relevance of patch n:

- ``"gradcam"`` (the paper's): ``ReLU(sum_d alpha_d A[1 + n, d])``, ``alpha_d`` the mean over
  patches of ``d score / d A[1 + n, d]``;
- ``"token"``: each patch weighted by its own gradient, ``ReLU(sum_d d score / d A[1 + n, d] * A[1 + n, d])``.

Why A and not the raw residual stream: a LayerNorm is blind to the scale and the mean of its input,
so the gradient of anything downstream with respect to a raw token is orthogonal to that token, and
``sum_d grad[n, d] * token[n, d]`` is 0 for every patch; the mean gradient then ranks a patch by how
much it resembles the *other* patches' gradients (a planted concept patch comes last, AUROC 0.0 in
tests/test_localization.py). The CLS token is left out of the mean and of the map.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from nvl_jax.models import vit3d


METHODS = ("gradcam", "token")


def penultimate_tokens(model: vit3d.BrainEncoder, patches: jax.Array, coords: jax.Array) -> jax.Array:
    """``[batch, 1 + n_active, width]``: the second-to-last block's output for ``patches [batch, n_active, P**3]``."""
    if model.config.depth < 2:
        raise ValueError(f"GradCAM reads the penultimate layer: the extractor needs depth >= 2, got {model.config.depth}")
    return model.vit(patches, coords, output_hidden_states=True).hidden_states[-2]


def clip_head_from_penultimate(model: vit3d.BrainEncoder, tokens: jax.Array, normalized: jax.Array) -> jax.Array:
    """``[batch, clip_dim]``: the CLIP head's output continued from the penultimate ``tokens`` and their
    LayerNormed copy ``normalized = blocks[-1].norm1(tokens)`` (both ``[batch, 1 + n_active, width]``),
    as ``BrainEncoder`` computes it: the last block, the final LayerNorm, ``f_c`` on the CLS token."""
    block = model.vit.blocks[-1]
    x = tokens + block.attn(normalized)
    x = x + block.mlp(block.norm2(x))
    return model.heads.clip(model.vit.norm(x)[:, 0])


def cosine_score(clip_embedding: jax.Array, target: jax.Array) -> jax.Array:
    """``[batch]``: cosine of ``clip_embedding [batch, clip_dim]`` with ``target [clip_dim]``."""
    embedding = clip_embedding.astype(jnp.float32)
    target = target.astype(jnp.float32)
    return (embedding @ target) / (jnp.linalg.norm(embedding, axis=-1) * jnp.linalg.norm(target) + 1e-12)


def gradcam(tokens: jax.Array, gradient: jax.Array, method: str = "gradcam") -> jax.Array:
    """``[batch, n_active]``: relevance from ``tokens`` and ``d score / d tokens``, both
    ``[batch, 1 + n_active, width]`` (CLS first, left out); ``method`` one of ``METHODS``."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    weights = gradient[:, 1:]
    if method == "gradcam":
        weights = weights.mean(axis=1, keepdims=True)
    return jax.nn.relu(jnp.sum(weights * tokens[:, 1:], axis=-1))


def relevance_fn(model: vit3d.BrainEncoder, method: str = "gradcam"):
    """A jitted ``relevance(patches, coords, targets) -> (relevance, score)``.

    ``patches [batch, n_active, P**3]``, ``coords [n_active, 3]``, ``targets [n_targets, clip_dim]``;
    ``relevance [batch, n_targets, n_active]``, ``score [batch, n_targets]`` (the cosine of the CLIP
    head's output with each target). Samples are independent, so one gradient of the summed scores
    gives every sample's own.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    graphdef, state = nnx.split(model)

    def relevance(state, patches, coords, targets):
        model = nnx.merge(graphdef, state)
        tokens = jax.lax.stop_gradient(penultimate_tokens(model, patches, coords))
        normalized = model.vit.blocks[-1].norm1(tokens)

        def one_target(target):
            def total(a):
                scores = cosine_score(clip_head_from_penultimate(model, tokens, a), target)
                return scores.sum(), scores

            gradient, scores = jax.grad(total, has_aux=True)(normalized)
            return gradcam(normalized.astype(jnp.float32), gradient.astype(jnp.float32), method), scores

        maps, scores = jax.lax.map(one_target, targets)
        return jnp.moveaxis(maps, 0, 1), jnp.moveaxis(scores, 0, 1)

    jitted = jax.jit(relevance)
    return lambda patches, coords, targets: jitted(state, patches, coords, targets)
