"""The LLM's activation sharding constraints (by logical names, only under a mesh) and its remat policies."""

import json
import os
from pathlib import Path
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from nvl_jax import sharding
from nvl_jax.models.llama import LlamaConfig, LlamaForCausalLM

# Heads, kv heads, MLP width and vocab all divide by a tensor axis of 4.
CONFIG = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=8,
                     num_kv_heads=4, head_dim=8, bos_token_id=None, eos_token_ids=())
ROOT = Path(__file__).resolve().parents[1]


def loss_and_grad_fn(graphdef):
    """``(state, ids [batch, L]) -> (next-token loss, its gradient)``: one LLM train step's work."""

    def loss_fn(state, ids):
        logits = nnx.merge(graphdef, state)(ids).logits
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

    return jax.value_and_grad(loss_fn)


def assert_trees_close(got, want, atol, rtol=0.0):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=rtol)


def test_constrain_maps_logical_names_under_a_mesh_only():
    x = jnp.zeros((4, 16, 8))
    assert sharding.constrain(x, ("activation_batch", "activation_length", "activation_heads")) is x
    mesh = sharding.make_mesh((1, 2, 4))
    with jax.set_mesh(mesh):
        got = jax.jit(lambda x: sharding.constrain(x, ("activation_batch", "activation_length",
                                                       "activation_heads")))(x)
        assert got.sharding.spec == P("fsdp", None, "tensor")
        # Sequence parallelism is a rules change.
        with nnx.logical_axis_rules((*sharding.DEFAULT_RULES, ("activation_length", "tensor"))):
            got = jax.jit(lambda x: sharding.constrain(x, ("activation_batch", "activation_length",
                                                           "activation_embed")))(x)
        assert got.sharding.spec == P("fsdp", "tensor")


def test_the_llm_traces_no_constraint_without_a_mesh():
    graphdef, state = nnx.split(LlamaForCausalLM(CONFIG))
    ids = jnp.zeros((2, 8), jnp.int32)
    forward = lambda state, ids: nnx.merge(graphdef, state)(ids).logits  # noqa: E731
    assert "sharding_constraint" not in str(jax.make_jaxpr(forward)(state, ids))
    with jax.set_mesh(sharding.make_mesh((1, 2, 4))):
        assert "sharding_constraint" in str(jax.make_jaxpr(forward)(state, ids))


def test_constraints_move_fewer_bytes_on_an_fsdp_tensor_mesh_and_keep_the_values():
    """Unconstrained, XLA's propagation splits activations along the sequence over the tensor axis
    and gathers them back (all-gathers and all-to-alls of whole activations); constrained, the
    batch stays on fsdp, heads / MLP / vocab on tensor, and the sequence whole."""
    mesh = sharding.make_mesh((1, 2, 4))
    graphdef, state = nnx.split(LlamaForCausalLM(CONFIG))
    state_shardings = jax.tree.map(lambda v: v.replace(value=sharding.variable_sharding(v, mesh)), state,
                                   is_leaf=lambda x: isinstance(x, nnx.Variable))
    ids = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (4, 32))
    sharded_state = jax.device_put(state, state_shardings)
    sharded_ids = jax.device_put(ids, sharding.batch_sharding(mesh, 2))
    step = jax.jit(loss_and_grad_fn(graphdef), out_shardings=(NamedSharding(mesh, P()), state_shardings))

    unconstrained = step.lower(sharded_state, sharded_ids).compile()
    with jax.set_mesh(mesh):
        constrained = step.lower(sharded_state, sharded_ids).compile()
        loss, grads = constrained(sharded_state, sharded_ids)
    before = {kind: c["bytes"] for kind, c in sharding.collectives(unconstrained.as_text()).items()}
    after = {kind: c["bytes"] for kind, c in sharding.collectives(constrained.as_text()).items()}
    print(f"collective bytes per device, unconstrained {before}, constrained {after}")
    assert sum(after.values()) < sum(before.values())
    assert after["all-gather"] <= before["all-gather"] and after["all-to-all"] <= before["all-to-all"]

    want_loss, want_grads = jax.jit(loss_and_grad_fn(graphdef))(state, ids)
    np.testing.assert_allclose(float(loss), float(want_loss), atol=1e-5, rtol=0)
    assert_trees_close(grads, want_grads, atol=1e-5)


def test_sequence_parallel_rules_keep_the_logits():
    mesh = sharding.make_mesh((1, 2, 4))
    model = LlamaForCausalLM(CONFIG)
    graphdef, state = nnx.split(model)
    ids = np.random.default_rng(1).integers(0, CONFIG.vocab_size, (4, 32))
    forward = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids).logits)
    with jax.set_mesh(mesh), nnx.logical_axis_rules((*sharding.DEFAULT_RULES, ("activation_length", "tensor"))):
        got = forward(state, jax.device_put(ids, sharding.batch_sharding(mesh, 2)))
    np.testing.assert_allclose(np.asarray(got), np.asarray(model(jnp.asarray(ids)).logits), atol=1e-5, rtol=0)


def test_greedy_generation_on_a_tensor_parallel_mesh_under_the_rules():
    """The KV-cache path traces the same constraints (one-token decode steps included) and decodes as
    one device does."""
    model = LlamaForCausalLM(CONFIG)
    prompts = [[3, 4, 5, 6], [7, 8]]
    want = model.generate(prompts, max_new_tokens=4).sequences
    mesh = sharding.make_mesh((1, 2, 4))
    graphdef, state = nnx.split(model)
    shardings = jax.tree.map(lambda v: v.replace(value=sharding.variable_sharding(v, mesh)), state,
                             is_leaf=lambda x: isinstance(x, nnx.Variable))
    sharded = nnx.merge(graphdef, jax.device_put(state, shardings))
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.DEFAULT_RULES):
        got = sharded.generate(prompts, max_new_tokens=4).sequences
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("remat", ["full", "dots_saveable"])
def test_remat_keeps_values_and_gradients(remat):
    ids = jnp.asarray(np.random.default_rng(2).integers(0, CONFIG.vocab_size, (2, 16)))
    results = []
    for policy in ("none", remat):
        graphdef, state = nnx.split(LlamaForCausalLM(CONFIG, remat=policy))
        results.append(jax.jit(loss_and_grad_fn(graphdef))(state, ids))
    # Recomputation fuses differently: equal to float32 rounding, not bit for bit.
    assert_trees_close(results[1], results[0], atol=1e-5)


def test_remat_is_checked_and_leaves_generation_alone():
    with pytest.raises(ValueError, match="remat='everything'"):
        LlamaForCausalLM(CONFIG, remat="everything")
    prompts = [[3, 4, 5, 6], [7, 8]]
    greedy = [LlamaForCausalLM(CONFIG, remat=policy).generate(prompts, max_new_tokens=4).sequences
              for policy in ("none", "full")]
    np.testing.assert_array_equal(np.asarray(greedy[0]), np.asarray(greedy[1]))


# XLA:CPU's default scheduler optimizes for concurrency: it runs each layer's recomputation as
# soon as the layer's input exists (during the forward pass), which keeps every layer's
# intermediates alive and hides what remat saves. Its memory-minimizing scheduler is a process
# flag, hence a fresh process.
TEMP_BYTES_SCRIPT = """
import json
import jax, jax.numpy as jnp, optax
from flax import nnx
from nvl_jax.models.llama import LlamaConfig, LlamaForCausalLM
config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4,
                     num_kv_heads=2, head_dim=16, bos_token_id=None, eos_token_ids=())
ids = jax.ShapeDtypeStruct((2, 256), jnp.int32)
temp = {}
for remat in ("none", "full"):
    graphdef, state = nnx.split(nnx.eval_shape(lambda: LlamaForCausalLM(config, remat=remat)))
    def loss_fn(state, ids):
        logits = nnx.merge(graphdef, state)(ids).logits
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()
    compiled = jax.jit(jax.value_and_grad(loss_fn)).lower(state, ids).compile()
    temp[remat] = compiled.memory_analysis().temp_size_in_bytes
print(json.dumps(temp))
"""


def test_full_remat_lowers_the_train_steps_temp_memory():
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_cpu_enable_concurrency_optimized_scheduler=false"}
    done = subprocess.run([sys.executable, "-c", TEMP_BYTES_SCRIPT], cwd=ROOT, env=env,
                          capture_output=True, text=True, check=True)
    temp = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"train step temp bytes, 4 layers x 256 tokens: {temp}")
    assert temp["full"] < 0.75 * temp["none"]
