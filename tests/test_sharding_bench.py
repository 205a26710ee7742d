"""Sharding experiments: the HLO collective counter, and two meshes of the tiny stage-1 step whose
collectives differ as their layouts say they must."""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from nvl_jax import sharding
from nvl_jax.bench import sharding as bench

from test_training import tiny_config

HLO = """
  %all-reduce.3 = f32[64,32]{1,0} all-reduce(f32[64,32]{1,0} %dot.1), channel_id=1, replica_groups={{0,1}}
  %ag = (bf16[8,16]{1,0}, bf16[16,16]{1,0}) all-gather-start(bf16[8,16]{1,0} %p), dimensions={0}
  %agd = bf16[16,16]{1,0} all-gather-done((bf16[8,16]{1,0}, bf16[16,16]{1,0}) %ag)
  ROOT %rs = f32[4]{0} reduce-scatter(f32[32]{0} %x), dimensions={0}, to_apply=%add
  %tuple.2 = (f32[2]{0}, s32[3]{0}) all-to-all(f32[2]{0} %a, s32[3]{0} %b)
"""


def test_collectives_counts_each_op_once_with_its_result_bytes():
    found = bench.collectives(HLO)
    assert found["all-reduce"] == {"count": 1, "bytes": 64 * 32 * 4}
    assert found["all-gather"] == {"count": 1, "bytes": 16 * 16 * 2}  # the -done is not counted again
    assert found["reduce-scatter"] == {"count": 1, "bytes": 16}
    assert found["all-to-all"] == {"count": 1, "bytes": 2 * 4 + 3 * 4}
    assert found["collective-permute"] == {"count": 0, "bytes": 0}


def test_collectives_of_a_compiled_sum_over_a_mesh():
    mesh = sharding.make_mesh((8, 1, 1))
    x = jax.device_put(jnp.ones((8, 128)), NamedSharding(mesh, P("data")))
    compiled = jax.jit(lambda x: x.sum(0), out_shardings=NamedSharding(mesh, P())).lower(x).compile()
    assert bench.collectives(compiled.as_text())["all-reduce"]["count"] >= 1


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
    assert "| (8,1,1) |" in table and "| (1,2,4) |" in table and table.count("\n") == 3


def test_meshes_flag_parses_and_rejects():
    assert bench.parse_meshes("(8,1,1) (1, 2, 4)") == [(8, 1, 1), (1, 2, 4)]
    with pytest.raises(ValueError, match="expected one or more"):
        bench.parse_meshes("8,1,1")
