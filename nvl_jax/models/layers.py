"""Building blocks shared by the model zoo, each parameter with logical axis names.

Parameter names follow Flax (``kernel``, ``bias``, ``scale``, ``embedding``);
the per-model key tables in ``hf_loader`` map PyTorch names onto them. Arrays
are channels-last: a dense kernel is ``[in, out]``, a conv kernel ``[kh, kw, in, out]``.

``set_custom_backward`` (or ``$NVL_JAX_CUSTOM_BACKWARD``) chooses between the
hand-written backward passes of ``Dense`` and ``LayerNorm`` and plain autodiff.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import functools
import os

import jax
import jax.numpy as jnp
from flax import nnx

Axes = tuple[str | None, ...]

# The hand-written backward passes (Dense's matmul, LayerNorm, ViT3D's attention) were
# measured faster than autodiff on XLA CPU only; on other platforms they are unmeasured,
# and plain autodiff also allows forward mode (jax.jvp), which a custom_vjp rules out.
# "auto" takes them on CPU only.
CUSTOM_BACKWARD_ENV = "NVL_JAX_CUSTOM_BACKWARD"
CUSTOM_BACKWARD_MODES = ("auto", "on", "off")
_custom_backward_mode: str | None = None  # None: read CUSTOM_BACKWARD_ENV, default "auto"


def _check_mode(mode: str, source: str) -> str:
    if mode not in CUSTOM_BACKWARD_MODES:
        raise ValueError(f"{source}={mode!r}; expected one of {CUSTOM_BACKWARD_MODES}")
    return mode


def custom_backward_mode() -> str:
    """The mode in force: the last ``set_custom_backward``, else ``$NVL_JAX_CUSTOM_BACKWARD``, else "auto"."""
    if _custom_backward_mode is not None:
        return _custom_backward_mode
    return _check_mode(os.environ.get(CUSTOM_BACKWARD_ENV, "auto"), CUSTOM_BACKWARD_ENV)


def use_custom_backward() -> bool:
    """Whether modules traced now take the hand-written backward passes: "on", or "auto" on a CPU backend."""
    mode = custom_backward_mode()
    return mode == "on" or (mode == "auto" and jax.default_backend() == "cpu")


def set_custom_backward(mode: str | None) -> str | None:
    """Chooses the backward passes: "auto" (hand-written on CPU, autodiff elsewhere), "on", "off";
    None goes back to ``$NVL_JAX_CUSTOM_BACKWARD``. Returns the previous setting, for restoring it.

    The choice is read when a function is traced. If it changes what modules use, JAX's
    in-memory compilation caches are cleared, so that no jitted function keeps the
    passes it was traced with.
    """
    global _custom_backward_mode
    mode = None if mode is None else _check_mode(mode, "custom_backward")
    previous, before = _custom_backward_mode, use_custom_backward()
    _custom_backward_mode = mode
    if use_custom_backward() != before:
        jax.clear_caches()
    return previous


def param(rngs: nnx.Rngs, init, shape: Sequence[int], dtype, axes: Axes) -> nnx.Param:
    """A parameter annotated with logical axis names ``axes``, one per dimension.

    Eager sharding is off: the annotation is metadata only, so a model builds
    anywhere (no mesh needed); the loader or a jitted init with out_shardings
    places the values.
    """
    return nnx.Param(init(rngs.params(), tuple(shape), dtype), out_sharding=axes, eager_sharding=False)


# Rematerialization ("remat"): what a block keeps from its forward pass for the backward pass.
# "none" keeps everything (fastest, most memory); "full" keeps only the block's input and recomputes
# the rest; the others are jax.checkpoint_policies names, e.g. "dots_with_no_batch_dims_saveable"
# keeps the weight matmuls' outputs and recomputes attention and elementwise work.
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable", "checkpoint_dots",
                  "checkpoint_dots_with_no_batch_dims", "everything_saveable", "nothing_saveable")


def check_remat(policy: str) -> None:
    if policy not in REMAT_POLICIES:
        raise ValueError(f"remat {policy!r} is not one of {REMAT_POLICIES} (remat={policy!r} was given)")


def remat(fn: Callable, policy: str) -> Callable:
    """``fn`` (which may take NNX modules) under the remat ``policy``, one of ``REMAT_POLICIES``."""
    check_remat(policy)
    if policy == "none":
        return fn
    if policy == "full":
        return nnx.remat(fn)  # jax.checkpoint's default: nothing saved but the inputs
    return nnx.remat(fn, policy=getattr(jax.checkpoint_policies, policy))


# JAX's own transpose rule computes a kernel's gradient as dot(g, x) followed by a
# transpose, so XLA CPU materializes g transposed; it then fuses the whole chain of
# residual-stream gradient additions into each such transposed copy and recomputes
# it once per layer (quadratic in depth: half a train step at 8 layers). With x
# as the left operand the only transposed operand is x, a stored activation.
@jax.custom_vjp
def _matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return x @ kernel


def _matmul_fwd(x, kernel):
    return x @ kernel, (x, kernel)


def _matmul_bwd(residuals, g):
    x, kernel = residuals
    dx = jax.lax.dot_general(g, kernel, (((g.ndim - 1,), (1,)), ((), ())))
    dkernel = jax.lax.dot_general(x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1]),
                                  (((0,), (0,)), ((), ())))
    return dx, dkernel


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


class Dense(nnx.Module):
    """``y = x @ kernel + bias``; kernel ``[in_features, out_features]``. With ``use_custom_backward()``
    the kernel's gradient is one ``x^T g`` matmul over ``[batch * tokens, in]`` (``_matmul``), unless
    the model opts out (``custom_backward=False``: autodiff whatever the mode)."""

    def __init__(self, in_features: int, out_features: int, *, axes: Axes, use_bias: bool = True,
                 custom_backward: bool = True, dtype=jnp.float32, rngs: nnx.Rngs):
        self.kernel = param(rngs, nnx.initializers.lecun_normal(), (in_features, out_features), dtype, axes)
        self.bias = param(rngs, nnx.initializers.zeros, (out_features,), dtype, (axes[-1],)) if use_bias else None
        self.custom_backward = custom_backward

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...].astype(x.dtype)
        y = _matmul(x, kernel) if self.custom_backward and use_custom_backward() else x @ kernel
        if self.bias is not None:
            y = y + self.bias[...].astype(x.dtype)
        return y


class Embed(nnx.Module):
    """Lookup table ``[num_embeddings, features]``."""

    def __init__(self, num_embeddings: int, features: int, *, axes: Axes = ("vocab", "embed"),
                 dtype=jnp.float32, rngs: nnx.Rngs):
        self.embedding = param(rngs, nnx.initializers.normal(0.02), (num_embeddings, features), dtype, axes)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0)


# LayerNorm with the textbook backward pass, dx = rstd * (dxhat - mean(dxhat) -
# xhat * mean(dxhat * xhat)), recomputing xhat: on XLA CPU this takes about half
# the time of autodiff through the forward pass.
@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    return _layer_norm_fwd(x, scale, bias, eps)[0]


def _normalize(x, eps):
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    rstd = jax.lax.rsqrt(jnp.square(x32 - mean).mean(-1, keepdims=True) + eps)
    return (x32 - mean) * rstd, mean, rstd


def _layer_norm_fwd(x, scale, bias, eps):
    xhat, mean, rstd = _normalize(x, eps)
    return (xhat * scale + bias).astype(x.dtype), (x, mean, rstd, scale)


def _layer_norm_bwd(eps, residuals, g):
    x, mean, rstd, scale = residuals
    xhat = (x.astype(jnp.float32) - mean) * rstd
    g32 = g.astype(jnp.float32)
    dxhat = g32 * scale
    dx = rstd * (dxhat - dxhat.mean(-1, keepdims=True) - xhat * (dxhat * xhat).mean(-1, keepdims=True))
    rows = tuple(range(g.ndim - 1))
    return dx.astype(x.dtype), (g32 * xhat).sum(rows), g32.sum(rows)


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis; statistics in float32 whatever the compute dtype. With
    ``use_custom_backward()`` the hand-written backward pass of ``_layer_norm``, else autodiff."""

    def __init__(self, features: int, *, eps: float = 1e-5, dtype=jnp.float32, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = param(rngs, nnx.initializers.ones, (features,), dtype, ("norm",))
        self.bias = param(rngs, nnx.initializers.zeros, (features,), dtype, ("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        scale, bias = self.scale[...].astype(jnp.float32), self.bias[...].astype(jnp.float32)
        if use_custom_backward():
            return _layer_norm(x, scale, bias, self.eps)
        return _layer_norm_fwd(x, scale, bias, self.eps)[0]


class RMSNorm(nnx.Module):
    """Llama's RMSNorm: ``x / rms(x) * scale``, computed in float32 as the reference does."""

    def __init__(self, features: int, *, eps: float = 1e-6, dtype=jnp.float32, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = param(rngs, nnx.initializers.ones, (features,), dtype, ("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + self.eps)
        return self.scale[...] * y.astype(x.dtype)


class GroupNorm(nnx.Module):
    """GroupNorm over channels-last ``[B, ..., C]``; groups are contiguous channel blocks, as in PyTorch."""

    def __init__(self, features: int, num_groups: int, *, eps: float = 1e-6, dtype=jnp.float32,
                 rngs: nnx.Rngs):
        if features % num_groups:
            raise ValueError(f"GroupNorm: {features} channels do not split into {num_groups} groups")
        self.num_groups, self.eps = num_groups, eps
        self.scale = param(rngs, nnx.initializers.ones, (features,), dtype, ("norm",))
        self.bias = param(rngs, nnx.initializers.zeros, (features,), dtype, ("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        shape = x.shape
        x32 = x.astype(jnp.float32).reshape(shape[0], -1, self.num_groups, shape[-1] // self.num_groups)
        mean = x32.mean((1, 3), keepdims=True)
        var = jnp.square(x32 - mean).mean((1, 3), keepdims=True)
        y = ((x32 - mean) * jax.lax.rsqrt(var + self.eps)).reshape(shape)
        return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


class Conv2d(nnx.Module):
    """2-D convolution on ``[B, H, W, C]``; kernel ``[kh, kw, in, out]``; symmetric zero padding."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1,
                 padding: int = 0, use_bias: bool = True, dtype=jnp.float32, rngs: nnx.Rngs):
        self.stride, self.padding = stride, padding
        self.kernel = param(rngs, nnx.initializers.lecun_normal(),
                             (kernel_size, kernel_size, in_channels, out_channels), dtype,
                             (None, None, "conv_in", "conv_out"))
        self.bias = param(rngs, nnx.initializers.zeros, (out_channels,), dtype, ("conv_out",)) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        pad = ((self.padding, self.padding),) * 2
        y = jax.lax.conv_general_dilated(
            x, self.kernel[...].astype(x.dtype), (self.stride,) * 2, pad,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        if self.bias is not None:
            y = y + self.bias[...].astype(x.dtype)
        return y


ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "relu": jax.nn.relu,
}


def activation(name: str):
    """The activation function that Hugging Face configs call ``name``."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]
