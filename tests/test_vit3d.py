"""ViT3D + alignment heads: parity with the PyTorch twin (forward and gradients, with and without the
hand-written backward passes), dropout, forward mode, coordinates, dtypes, mesh, benchmark."""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from nvl_jax import sharding
from nvl_jax.bench import train_step, vit3d_torch
from nvl_jax.models import layers, vit3d

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = vit3d.ViT3DConfig.tiny()
TORCH_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight"}


def make_batch(config, batch, n_active, seed):
    """Random patches at ``n_active`` distinct random grid positions, and random targets."""
    rng = np.random.default_rng(seed)
    flat = rng.permutation(config.num_positions)[:n_active]
    coords = np.stack(np.unravel_index(flat, config.patch_grid), axis=-1).astype(np.int32)
    return {
        "patches": rng.standard_normal((batch, n_active, config.patch_dim)).astype(np.float32),
        "coords": coords,
        "clip_target": rng.standard_normal((batch, config.clip_dim)).astype(np.float32),
        "vae_target": rng.standard_normal((batch, *config.vae_latent_shape)).astype(np.float32),
    }


def loss_of(model, batch):
    output = model(jnp.asarray(batch["patches"]), jnp.asarray(batch["coords"]))
    return vit3d.dual_stream_loss(output, batch["clip_target"], batch["vae_target"])[0]


# Jitted, so that a cold compilation cache compiles each test's model once, not op by op.
@nnx.jit(static_argnames="output_hidden_states")
def forward(model, patches, coords, output_hidden_states=False):
    return model(patches, coords, output_hidden_states=output_hidden_states)


@nnx.jit
def value_and_grad(model, batch):
    return nnx.value_and_grad(loss_of)(model, batch)


@pytest.fixture(params=["on", "off"])
def custom_backward(request):
    """Each test using it runs with the hand-written backward passes and with plain autodiff."""
    previous = layers.set_custom_backward(request.param)
    yield request.param
    layers.set_custom_backward(previous)


def twin_pair(config, seed=1):
    """Our model (seeded) and the PyTorch twin holding the same weights, in evaluation mode."""
    ours = vit3d.BrainEncoder(config, rngs=nnx.Rngs(seed))
    return ours, vit3d_torch.load_from_nnx(vit3d_torch.BrainEncoder(config), ours).eval()


def assert_matches_twin(ours, theirs, batch):
    """Outputs, loss and every parameter's gradient of our model equal those of the twin."""
    output = forward(ours, batch["patches"], batch["coords"])
    t = {k: torch.from_numpy(v) for k, v in batch.items()}
    theirs.zero_grad()
    clip_embedding, vae_latent, cls = theirs(t["patches"], t["coords"].long())
    loss = vit3d_torch.dual_stream_loss(clip_embedding, vae_latent, t["clip_target"], t["vae_target"])
    loss.backward()
    for mine, ref in ((output.clip_embedding, clip_embedding), (output.vae_latent, vae_latent), (output.cls, cls)):
        assert mine.shape == tuple(ref.shape)
        np.testing.assert_allclose(np.asarray(mine), ref.detach().numpy(), atol=1e-4, rtol=0)

    our_loss, grads = value_and_grad(ours, batch)
    np.testing.assert_allclose(float(our_loss), loss.item(), atol=1e-5, rtol=0)
    torch_params = dict(theirs.named_parameters())
    for path, grad in nnx.to_flat_state(grads):
        name = ".".join(map(str, path[:-1] + (TORCH_NAMES.get(path[-1], path[-1]),)))
        g = np.asarray(grad[...])
        np.testing.assert_allclose(g.T if path[-1] == "kernel" else g, torch_params[name].grad.numpy(),
                                   atol=1e-4, rtol=1e-4, err_msg=name)


@pytest.mark.parametrize("batch_size, n_active", [(3, 7), (2, 12)])
def test_forward_loss_and_gradients_match_the_twin(custom_backward, batch_size, n_active):
    # The hand-written matmul, LayerNorm and attention backward passes, or autodiff, against torch autograd.
    assert_matches_twin(*twin_pair(CONFIG), make_batch(CONFIG, batch_size, n_active, seed=n_active))


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu_pytorch_tanh", "silu", "relu"])
def test_config_knobs_match_the_twin(hidden_act):
    """Each activation and a non-default epsilon; dropout configured, but off in evaluation on both sides."""
    config = dataclasses.replace(CONFIG, hidden_act=hidden_act, layer_norm_eps=1e-2, dropout=0.2,
                                 attention_dropout=0.2)
    assert_matches_twin(*twin_pair(config), make_batch(config, 2, 9, seed=9))


def test_attention_matches_jax_dot_product_attention(custom_backward):
    q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 4, 9, 8))

    def ours(q, k, v):
        return vit3d.attention(jnp.stack([q, k, v]))

    def reference(q, k, v):  # [batch, T, heads, head_dim] layout, default scale 1/sqrt(head_dim)
        t = lambda a: a.transpose(0, 2, 1, 3)  # noqa: E731
        return t(jax.nn.dot_product_attention(t(q) * 8**0.5, t(k), t(v)))

    cotangent = jax.random.normal(jax.random.key(1), (2, 4, 9, 8))

    @jax.jit
    def value_and_vjp(q, k, v):
        outs = [jax.vjp(f, q, k, v) for f in (ours, reference)]
        return [(out, vjp(cotangent)) for out, vjp in outs]

    (out, grads), (ref_out, ref_grads) = value_and_vjp(q, k, v)
    np.testing.assert_allclose(out, ref_out, atol=1e-6)
    for mine, ref in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(mine, ref, atol=1e-5)


def test_attention_dropout_gradients_match_autodiff(custom_backward):
    """With a dropout mask on the probabilities, value and gradients (q, k, v and the mask) equal
    autodiff of softmax -> mask -> weighted sum."""
    qkv = jax.random.normal(jax.random.key(2), (3, 2, 4, 9, 8))
    keep = jax.random.bernoulli(jax.random.key(3), 0.7, (2, 4, 9, 9)) / 0.7
    cotangent = jax.random.normal(jax.random.key(4), (2, 4, 9, 8))

    def reference(qkv, keep):
        q, k, v = qkv
        return jnp.einsum("bnts,bnsh->bnth", jax.nn.softmax(jnp.einsum("bnth,bnsh->bnts", q, k)) * keep, v)

    @jax.jit
    def value_and_vjp(qkv, keep):
        outs = [jax.vjp(f, qkv, keep) for f in (vit3d.attention, reference)]
        return [(out, vjp(cotangent)) for out, vjp in outs]

    (out, grads), (ref_out, ref_grads) = value_and_vjp(qkv, keep)
    np.testing.assert_allclose(out, ref_out, atol=1e-5)
    for mine, ref in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(mine, ref, atol=1e-5)


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_shapes_and_dtypes(compute_dtype):
    config = dataclasses.replace(CONFIG, compute_dtype=compute_dtype)
    model = vit3d.BrainEncoder(config)
    batch = make_batch(config, 2, 5, seed=0)
    output = forward(model, batch["patches"], batch["coords"], output_hidden_states=True)
    dtype = jnp.dtype(compute_dtype)
    assert output.clip_embedding.shape == (2, config.clip_dim) and output.clip_embedding.dtype == dtype
    assert output.vae_latent.shape == (2, *config.vae_latent_shape) and output.vae_latent.dtype == dtype
    assert output.cls.shape == (2, config.width) and output.cls.dtype == dtype
    assert len(output.hidden_states) == config.depth
    assert all(h.shape == (2, 6, config.width) and h.dtype == dtype for h in output.hidden_states)
    assert {p.dtype for _, p in nnx.to_flat_state(nnx.state(model, nnx.Param))} == {jnp.dtype(jnp.float32)}
    loss, metrics = vit3d.dual_stream_loss(output, batch["clip_target"], batch["vae_target"])
    assert loss.dtype == jnp.float32 and np.isfinite(float(loss)) and set(metrics) == {"loss", "mse_clip", "mse_vae"}


def test_bfloat16_compute_stays_close_to_float32():
    batch = make_batch(CONFIG, 2, 6, seed=3)
    outputs = [forward(vit3d.BrainEncoder(dataclasses.replace(CONFIG, compute_dtype=d)), batch["patches"],
                       batch["coords"]) for d in ("float32", "bfloat16")]
    # bfloat16 keeps 8 mantissa bits: a few percent of the outputs' scale (about 1) over 2 layers.
    np.testing.assert_allclose(np.asarray(outputs[1].clip_embedding, np.float32), outputs[0].clip_embedding,
                               atol=0.1)


def test_tokens_follow_their_coordinates():
    model = vit3d.ViT3D(CONFIG)
    batch = make_batch(CONFIG, 2, 8, seed=4)
    patches, coords = jnp.asarray(batch["patches"]), jnp.asarray(batch["coords"])
    perm = np.random.default_rng(0).permutation(8)
    base = forward(model, patches, coords)
    permuted = forward(model, patches[:, perm], coords[perm])
    # Same patches at the same places in another order: the CLS output does not change,
    # and every patch token moves with its patch.
    np.testing.assert_allclose(permuted.cls, base.cls, atol=1e-5)
    np.testing.assert_allclose(permuted.tokens[:, 1:], base.tokens[:, 1:][:, perm], atol=1e-5)
    # The same patches at other places do change it: the position table is really indexed.
    moved = forward(model, patches, coords[perm])
    assert np.abs(np.asarray(moved.cls - base.cls)).max() > 1e-3


def test_hidden_states_are_each_layers_output():
    model = vit3d.ViT3D(CONFIG)
    batch = make_batch(CONFIG, 2, 5, seed=5)
    output = forward(model, batch["patches"], batch["coords"], output_hidden_states=True)
    assert len(output.hidden_states) == CONFIG.depth
    np.testing.assert_allclose(model.norm(output.hidden_states[-1]), output.tokens, atol=1e-6)
    assert forward(model, batch["patches"], batch["coords"]).hidden_states is None


@nnx.jit
def train_forward(model, patches, coords, rngs):
    return model(patches, coords, rngs=rngs).clip_embedding


@pytest.mark.parametrize("rates", [dict(dropout=0.3), dict(attention_dropout=0.3),
                                   dict(dropout=0.3, attention_dropout=0.3)], ids=["hidden", "attention", "both"])
def test_dropout_runs_in_training_only(rates):
    config = dataclasses.replace(CONFIG, **rates)
    model = vit3d.BrainEncoder(config)
    batch = make_batch(config, 2, 5, seed=6)
    args = jnp.asarray(batch["patches"]), jnp.asarray(batch["coords"])
    # Evaluation (no rngs): deterministic, and the network without dropout (same seed, same weights).
    plain = forward(vit3d.BrainEncoder(CONFIG), *args).clip_embedding
    np.testing.assert_array_equal(forward(model, *args).clip_embedding, plain)
    np.testing.assert_array_equal(forward(model, *args).clip_embedding, plain)
    # Training: each call draws new masks from the stream; the same seed draws the same ones.
    rngs = nnx.Rngs(dropout=1)
    train_a, train_b = train_forward(model, *args, rngs), train_forward(model, *args, rngs)
    assert np.abs(np.asarray(train_a - train_b)).max() > 1e-3
    assert np.abs(np.asarray(train_a - plain)).max() > 1e-3
    np.testing.assert_array_equal(train_forward(model, *args, nnx.Rngs(dropout=1)), train_a)


def test_training_gradients_agree_across_backward_passes():
    """Dropout on: the hand-written passes and autodiff see the same masks and give the same gradients."""
    config = dataclasses.replace(CONFIG, dropout=0.2, attention_dropout=0.2)
    model = vit3d.BrainEncoder(config)
    batch = make_batch(config, 2, 7, seed=10)

    @nnx.jit
    def train_value_and_grad(model, batch, rngs):
        # rngs enters as an argument: a stream is advanced inside the differentiated function.
        def loss(model, rngs):
            output = model(jnp.asarray(batch["patches"]), jnp.asarray(batch["coords"]), rngs=rngs)
            return vit3d.dual_stream_loss(output, batch["clip_target"], batch["vae_target"])[0]
        return nnx.value_and_grad(loss)(model, rngs)

    results = {}
    for mode in ("on", "off"):
        previous = layers.set_custom_backward(mode)
        try:
            results[mode] = train_value_and_grad(model, batch, nnx.Rngs(dropout=3))
        finally:
            layers.set_custom_backward(previous)
    (loss_on, grads_on), (loss_off, grads_off) = results["on"], results["off"]
    np.testing.assert_allclose(loss_on, loss_off, rtol=1e-6)
    for (path, g_on), (_, g_off) in zip(nnx.to_flat_state(grads_on), nnx.to_flat_state(grads_off), strict=True):
        np.testing.assert_allclose(g_on[...], g_off[...], atol=1e-5, rtol=1e-5, err_msg=".".join(map(str, path)))


def test_forward_mode_differentiation_without_the_hand_written_passes():
    """jax.jvp of the loss along a random parameter direction equals the gradient's dot product with it."""
    model = vit3d.BrainEncoder(CONFIG)
    batch = make_batch(CONFIG, 2, 6, seed=11)
    graphdef, params = nnx.split(model)
    rng = np.random.default_rng(5)
    tangent = jax.tree.map(lambda p: rng.standard_normal(p.shape).astype(np.float32), params)

    def loss(params):
        return loss_of(nnx.merge(graphdef, params), batch)

    previous = layers.set_custom_backward("off")
    try:
        _, directional = jax.jit(lambda p, t: jax.jvp(loss, (p,), (t,)))(params, tangent)
        grads = jax.jit(jax.grad(loss))(params)
    finally:
        layers.set_custom_backward(previous)
    expected = sum(np.vdot(g, t) for g, t in zip(jax.tree.leaves(grads), jax.tree.leaves(tangent), strict=True))
    np.testing.assert_allclose(float(directional), expected, rtol=1e-4)


def test_dual_stream_loss_is_mse_clip_plus_alpha_mse_vae():
    batch = make_batch(CONFIG, 2, 5, seed=7)
    output = forward(vit3d.BrainEncoder(CONFIG), batch["patches"], batch["coords"])
    loss, metrics = vit3d.dual_stream_loss(output, batch["clip_target"], batch["vae_target"], alpha=0.25)
    mse_clip = np.mean((np.asarray(output.clip_embedding) - batch["clip_target"]) ** 2)
    mse_vae = np.mean((np.asarray(output.vae_latent) - batch["vae_target"]) ** 2)
    np.testing.assert_allclose([metrics["mse_clip"], metrics["mse_vae"]], [mse_clip, mse_vae], rtol=1e-5)
    np.testing.assert_allclose(loss, mse_clip + 0.25 * mse_vae, rtol=1e-5)


def test_mesh_value_and_grad_matches_single_device():
    mesh = sharding.make_mesh((2, 2, 2))
    config = dataclasses.replace(CONFIG, width=64, num_heads=4, head_hidden=64)
    model = vit3d.BrainEncoder(config, rngs=nnx.Rngs(2))
    batch = make_batch(config, 4, 9, seed=8)
    graphdef, state = nnx.split(model)

    def value_and_grad(state, batch):
        return jax.value_and_grad(lambda s: loss_of(nnx.merge(graphdef, s), batch))(state)

    loss, grads = jax.jit(value_and_grad)(state, batch)
    placed = nnx.from_flat_state([
        (path, var.replace(value=jax.device_put(var[...], sharding.variable_sharding(var, mesh))))
        for path, var in nnx.to_flat_state(state)])
    fc1 = placed["vit"]["blocks"][0]["mlp"]["fc1"]["kernel"]
    assert fc1[...].sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    sharded_batch = {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim)) for k, v in batch.items()
                     if k != "coords"}
    sharded_batch["coords"] = batch["coords"]
    mesh_loss, mesh_grads = jax.jit(value_and_grad)(placed, sharded_batch)
    np.testing.assert_allclose(mesh_loss, loss, rtol=1e-5)
    # Sharded sums add in another order: agreement to 1e-5 of each gradient's own scale.
    for (path, g), (_, mg) in zip(nnx.to_flat_state(grads), nnx.to_flat_state(mesh_grads), strict=True):
        scale = float(np.abs(g[...]).max())
        np.testing.assert_allclose(mg[...], g[...], rtol=0, atol=1e-5 * scale, err_msg=".".join(map(str, path)))


def test_config_presets_and_round_trip():
    assert vit3d.ViT3DConfig.paper().patch_grid == (6, 8, 6)
    assert vit3d.ViT3DConfig.paper(12).patch_grid == (7, 9, 7)
    assert vit3d.ViT3DConfig.paper(10).patch_grid == (9, 11, 9)
    paper = vit3d.ViT3DConfig.paper()
    assert (paper.depth, paper.width, paper.num_heads, paper.num_positions) == (16, 768, 12, 288)
    assert vit3d.ViT3DConfig.from_dict(json.loads(json.dumps(CONFIG.to_dict()))) == CONFIG
    with pytest.raises(ValueError, match="heads"):
        vit3d.ViT3DConfig(width=100, num_heads=12)
    with pytest.raises(ValueError, match="compute_dtype"):
        vit3d.ViT3DConfig(compute_dtype="float16")


def test_train_step_benchmark_reports_the_same_computation_on_both_sides():
    report = train_step.measure(layers=1, width=32, heads=4, n_active=10, patch_size=4, batch=2, repeats=1)
    # Same weights, same batch: the first steps' losses agree, so the times compare one computation.
    np.testing.assert_allclose(report["first_step_loss_jax"], report["first_step_loss_torch"], rtol=1e-5)
    assert report["speedup_vs_torch"] == pytest.approx(report["step_seconds_torch"] / report["step_seconds_jax"])
    assert report["matmul_peak_fraction"] == pytest.approx(report["flops_per_s"] / report["matmul_flops_per_s"])
    assert report["step_flops"] == train_step.train_step_flops(
        dataclasses.replace(vit3d.ViT3DConfig.paper(4), width=32, depth=1, num_heads=4), 2, 10)
    assert report["matmul_flops_per_s"] > 0 and report["samples_per_s_jax"] > 0
    assert report["page_faults_per_step_jax"] >= 0 and report["system_seconds_per_step_torch"] >= 0
    assert report["keeps_freed_memory_jax"] and not report["keeps_freed_memory_torch"]


def test_train_step_cli_runs_jax_under_the_training_allocator_setting():
    flags = ["--layers", "1", "--width", "32", "--heads", "4", "--n_active", "10", "--patch_size", "4",
             "--batch", "2", "--repeats", "1", "--no_torch"]
    # One host device, as a user running the script has: the 8 virtual test devices are not inherited.
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    result = subprocess.run([sys.executable, "-m", "nvl_jax.bench.train_step", *flags], capture_output=True,
                            text=True, cwd=ROOT, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["keeps_freed_memory_jax"] is True  # as python -m nvl_jax.train runs
    assert "speedup_vs_torch" not in report and report["step_seconds_jax"] > 0
