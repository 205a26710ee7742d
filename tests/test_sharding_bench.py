"""Sharding experiments: the HLO collective counter; two meshes of the tiny stage-1 step whose
collectives differ as their layouts say they must; and a tiny stage-2 step whose activation
constraints change its collectives on a tensor-parallel mesh, never its loss."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from nvl_jax import sharding
from nvl_jax.bench import sharding as bench
from nvl_jax.training import loop, steps, tasks

from test_training import ROOT, tiny_config

HLO = """
  %all-gather.1 = f32[8,64]{1,0} all-gather(f32[2,64]{1,0} %p0), channel_id=1, replica_groups=[2,4]<=[8], dimensions={0}
  %ag2 = (pred[8]{0}, f8e4m3fn[4]{0}) all-gather(pred[2]{0} %m, f8e4m3fn[1]{0} %n), dimensions={0}
  %ags = (bf16[8,16]{1,0}, bf16[16,16]{1,0}) all-gather-start(bf16[8,16]{1,0} %p), dimensions={0}
  %agd = bf16[16,16]{1,0} all-gather-done((bf16[8,16]{1,0}, bf16[16,16]{1,0}) %ags)
  %ars = f32[16]{0} all-reduce-start(f32[16]{0} %p1), channel_id=2, to_apply=%add
  %ard = f32[16]{0} all-reduce-done(f32[16]{0} %ars)
  %ar2 = (bf16[4,4]{1,0}, s32[2]{0}) all-reduce(bf16[4,4]{1,0} %a, s32[2]{0} %b), channel_id=3, to_apply=%add
  ROOT %rs = f32[2,64]{1,0} reduce-scatter(f32[8,64]{1,0} %p0), channel_id=4, dimensions={0}, to_apply=%add
  %a2a = (f32[1,2]{1,0}, s32[3]{0}) all-to-all(f32[1,2]{1,0} %x, s32[3]{0} %y), channel_id=5
  %cps = (f32[4]{0}, f32[4]{0}, u32[], u32[]) collective-permute-start(f32[4]{0} %z), source_target_pairs={{0,1}}
  %cpd = f32[4]{0} collective-permute-done((f32[4]{0}, f32[4]{0}, u32[], u32[]) %cps)
  %add.3 = f32[8,64]{1,0} add(f32[8,64]{1,0} %all-gather.1, f32[8,64]{1,0} %all-gather.1)
"""


def test_collectives_counts_each_op_once_with_its_result_bytes():
    # An async pair counts once, at its -done; a tuple result counts every element at its width.
    assert sharding.collectives(HLO) == {
        "all-gather": {"count": 3, "bytes": 8 * 64 * 4 + 8 + 4 + 16 * 16 * 2},
        "all-reduce": {"count": 2, "bytes": 16 * 4 + 4 * 4 * 2 + 2 * 4},
        "reduce-scatter": {"count": 1, "bytes": 2 * 64 * 4},
        "all-to-all": {"count": 1, "bytes": 2 * 4 + 3 * 4},
        "collective-permute": {"count": 1, "bytes": 4 * 4},
    }


def test_collectives_of_a_compiled_sum_over_a_mesh():
    mesh = sharding.make_mesh((8, 1, 1))
    x = jax.device_put(jnp.ones((8, 128)), NamedSharding(mesh, P("data")))
    compiled = jax.jit(lambda x: x.sum(0), out_shardings=NamedSharding(mesh, P())).lower(x).compile()
    assert sharding.collectives(compiled.as_text())["all-reduce"]["count"] >= 1


def test_meshes_of_the_tiny_step_differ_in_their_collectives(tiny_nsd):
    config = tiny_config(tiny_nsd)
    data_parallel = bench.measure(config, (8, 1, 1), repeats=1)
    sharded = bench.measure(config, (1, 2, 4), repeats=1)
    # Pure data parallelism all-reduces the gradients and gathers nothing; splitting the weights over
    # fsdp and tensor gathers them and holds less of them on each device.
    assert data_parallel["collectives"]["all-reduce"]["count"] > 0
    assert data_parallel["collectives"]["all-gather"]["count"] == 0
    assert sharded["collectives"]["all-gather"]["count"] + sharded["collectives"]["reduce-scatter"]["count"] > 0
    assert sharded["bytes"]["params"] < data_parallel["bytes"]["params"]
    assert data_parallel["step_s"] > 0 and sharded["step_s"] > 0
    table = bench.format_table([data_parallel, sharded], "cpu")
    assert "| (8,1,1) | on |" in table and "| (1,2,4) | on |" in table and table.count("\n") == 3


def test_meshes_flag_parses_and_rejects():
    assert bench.parse_meshes("(8,1,1) (1, 2, 4)") == [(8, 1, 1), (1, 2, 4)]
    with pytest.raises(ValueError, match="expected one or more"):
        bench.parse_meshes("8,1,1")


def test_without_activation_rules_keeps_the_weights_layout():
    rules = sharding.without_activation_rules(sharding.DEFAULT_RULES)
    assert dict(rules) == {k: v for k, v in sharding.DEFAULT_RULES if not k.startswith("activation_")}
    assert dict(rules)["heads"] == "tensor" and "activation_heads" not in dict(rules)


def _language_config(*args):
    spec = importlib.util.spec_from_file_location("tiny_language_sharding",
                                                  ROOT / "tests" / "configs" / "tiny_language_sharding.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(*args), module


@pytest.fixture(scope="module")
def stage2_config(tiny_nsd, tmp_path_factory):
    """The tiny stage-2 config on a finished tiny stage-1 run and a tiny tensor-divisible Llama."""
    stage1 = tmp_path_factory.mktemp("stage1")
    loop.train(tiny_config(tiny_nsd), stage1)
    _, module = _language_config()
    llm = module.save_tiny_llm(tmp_path_factory.mktemp("tiny_llm"))
    config, _ = _language_config(f"stage1={stage1},llm={llm}")
    return config


def _total_bytes(row) -> int:
    return sum(c["bytes"] for c in row["collectives"].values())


def test_activation_constraints_change_a_tiny_llm_steps_collectives(stage2_config):
    off = bench.measure(stage2_config, (1, 2, 4), repeats=0, activation_constraints=False)
    on = bench.measure(stage2_config, (1, 2, 4), repeats=0, activation_constraints=True)
    print(f"collective bytes per device, (1,2,4): off {off['collectives']}, on {on['collectives']}")
    # Unconstrained, the merged brain + text embeddings come split along their width and are re-laid
    # by batch (an all-to-all); pinned, the residual stream is batch-split from the merge on.
    assert _total_bytes(on) < _total_bytes(off)
    assert on["collectives"]["all-to-all"]["bytes"] < off["collectives"]["all-to-all"]["bytes"]
    table = bench.format_table([off, on], "cpu")
    assert "| (1,2,4) | off |" in table and "| (1,2,4) | on |" in table


def _loss_and_grads(config, mesh):
    task = tasks.get(config, mesh)
    layout, _, _ = loop.plan(task)
    params, frozen = task.initial_state(layout)
    batch = task.global_batch(next(task.train_iterator()))
    grad_fn = jax.jit(jax.value_and_grad(steps.make_loss_fn(task, layout), has_aux=True))
    (loss, _), grads = grad_fn(params, frozen, batch, task.constants(), jax.random.key(0))
    return float(loss), jax.tree.map(np.asarray, grads)


def test_activation_constraints_keep_the_stage2_loss_and_gradients(stage2_config):
    loss1, grads1 = _loss_and_grads(stage2_config, sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1]))
    loss8, grads8 = _loss_and_grads(stage2_config, sharding.make_mesh((1, 2, 4)))
    np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
    for g8, g1 in zip(jax.tree.leaves(grads8), jax.tree.leaves(grads1), strict=True):
        np.testing.assert_allclose(g8, g1, rtol=1e-4, atol=1e-6)
