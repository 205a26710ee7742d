"""Shared layers: Dense and LayerNorm against torch, with and without the hand-written backward passes,
forward-mode differentiation, and how the backward-pass mode is chosen."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from nvl_jax.models import layers


@pytest.fixture(params=["on", "off"])
def custom_backward(request):
    previous = layers.set_custom_backward(request.param)
    yield request.param
    layers.set_custom_backward(previous)


@pytest.fixture
def from_environment():
    """No explicit setting: the mode comes from the environment."""
    previous = layers.set_custom_backward(None)
    yield
    layers.set_custom_backward(previous)


def _dense_and_norm(seed=0):
    rngs = nnx.Rngs(seed)
    dense = layers.Dense(6, 5, axes=("embed", "mlp"), rngs=rngs)
    norm = layers.LayerNorm(5, eps=1e-3, rngs=rngs)
    # Non-trivial scale and bias, so their gradients and their effect on dx are seen.
    rng = np.random.default_rng(seed)
    norm.scale[...] = jnp.asarray(rng.standard_normal(5) + 1.0, jnp.float32)
    norm.bias[...] = jnp.asarray(rng.standard_normal(5), jnp.float32)
    return dense, norm


def _loss(dense, norm, x, cotangent):
    return jnp.sum(norm(dense(x)) * cotangent)


def test_dense_and_layer_norm_value_and_gradients_match_torch(custom_backward):
    dense, norm = _dense_and_norm()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 6)).astype(np.float32)
    cotangent = rng.standard_normal((2, 3, 5)).astype(np.float32)
    loss, (g_dense, g_norm, g_x) = jax.jit(jax.value_and_grad(
        lambda d, n, x: _loss(nnx.merge(*d), nnx.merge(*n), x, cotangent), argnums=(0, 1, 2)))(
        nnx.split(dense), nnx.split(norm), x)

    tx = torch.from_numpy(x).requires_grad_()
    weight = torch.from_numpy(np.array(dense.kernel[...]).T.copy()).requires_grad_()
    bias, scale, shift = (torch.from_numpy(np.array(p[...])).requires_grad_()
                          for p in (dense.bias, norm.scale, norm.bias))
    y = torch.nn.functional.layer_norm(torch.nn.functional.linear(tx, weight, bias), (5,), scale, shift, eps=1e-3)
    theirs = (y * torch.from_numpy(cotangent)).sum()
    theirs.backward()

    np.testing.assert_allclose(float(loss), theirs.item(), rtol=1e-5)
    pairs = [(g_x, tx), (g_dense[1]["kernel"][...].T, weight), (g_dense[1]["bias"][...], bias),
             (g_norm[1]["scale"][...], scale), (g_norm[1]["bias"][...], shift)]
    for ours, param in pairs:
        np.testing.assert_allclose(np.asarray(ours), param.grad.numpy(), atol=1e-5, rtol=1e-5)


def test_jvp_works_with_the_hand_written_passes_off():
    dense, norm = _dense_and_norm(3)
    rng = np.random.default_rng(1)
    x, tangent, cotangent = (rng.standard_normal(s).astype(np.float32) for s in ((4, 6), (4, 6), (4, 5)))

    def f(x):
        return _loss(dense, norm, x, cotangent)

    previous = layers.set_custom_backward("off")
    try:
        _, directional = jax.jit(lambda x, t: jax.jvp(f, (x,), (t,)))(x, tangent)
        gradient = jax.jit(jax.grad(f))(x)
    finally:
        layers.set_custom_backward(previous)
    np.testing.assert_allclose(float(directional), float(jnp.vdot(gradient, tangent)), rtol=1e-5)

    previous = layers.set_custom_backward("on")
    try:  # a custom_vjp has no forward-mode rule
        with pytest.raises(TypeError, match="custom_vjp"):
            jax.jit(lambda x, t: jax.jvp(f, (x,), (t,)))(x, tangent)
    finally:
        layers.set_custom_backward(previous)


def test_a_dense_layer_opted_out_takes_autodiff_in_every_mode():
    dense = layers.Dense(6, 5, axes=("embed", "mlp"), custom_backward=False, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(2)
    x, tangent = (rng.standard_normal((4, 6)).astype(np.float32) for _ in range(2))
    previous = layers.set_custom_backward("on")
    try:  # forward mode works: no custom_vjp was traced
        _, directional = jax.jit(lambda x, t: jax.jvp(lambda x: dense(x).sum(), (x,), (t,)))(x, tangent)
    finally:
        layers.set_custom_backward(previous)
    np.testing.assert_allclose(float(directional), float((tangent @ dense.kernel[...]).sum()), rtol=1e-5)


def test_auto_takes_the_hand_written_passes_on_cpu_only(from_environment, monkeypatch):
    monkeypatch.delenv(layers.CUSTOM_BACKWARD_ENV, raising=False)
    assert layers.custom_backward_mode() == "auto"
    assert layers.use_custom_backward() == (jax.default_backend() == "cpu")
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert not layers.use_custom_backward()


def test_environment_variable_and_explicit_setting(from_environment, monkeypatch):
    monkeypatch.setenv(layers.CUSTOM_BACKWARD_ENV, "off")
    assert not layers.use_custom_backward()
    monkeypatch.setenv(layers.CUSTOM_BACKWARD_ENV, "on")
    assert layers.use_custom_backward()
    # An explicit setting wins over the environment until it is reset to None.
    assert layers.set_custom_backward("off") is None
    assert layers.custom_backward_mode() == "off" and not layers.use_custom_backward()
    assert layers.set_custom_backward(None) == "off"
    assert layers.use_custom_backward()
    monkeypatch.setenv(layers.CUSTOM_BACKWARD_ENV, "yes")
    with pytest.raises(ValueError, match="NVL_JAX_CUSTOM_BACKWARD='yes'; expected one of"):
        layers.use_custom_backward()
    with pytest.raises(ValueError, match="custom_backward='fast'"):
        layers.set_custom_backward("fast")


def test_changing_the_mode_retraces_jitted_functions():
    dense, _ = _dense_and_norm()
    x = jnp.ones((2, 6))
    traced = []

    @nnx.jit
    def grad_of(dense, x):
        traced.append(layers.use_custom_backward())
        return jax.grad(lambda x: dense(x).sum())(x)

    previous = layers.set_custom_backward("on")
    try:
        grad_on = grad_of(dense, x)
        grad_of(dense, x)
        layers.set_custom_backward("off")
        grad_off = grad_of(dense, x)
    finally:
        layers.set_custom_backward(previous)
    assert traced == [True, False]
    np.testing.assert_allclose(grad_on, grad_off, rtol=1e-6)
