"""The logical-axis rules and mesh construction."""

import jax
import pytest
from jax.sharding import PartitionSpec as P

from nvl_jax import sharding


def test_eight_virtual_devices():
    assert jax.device_count() == 8


def test_make_mesh_fills_minus_one():
    mesh = sharding.make_mesh((2, -1, 2))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_make_mesh_rejects_bad_shapes():
    with pytest.raises(ValueError, match="needs 12 devices"):
        sharding.make_mesh((3, 2, 2))
    with pytest.raises(ValueError, match="at most one entry may be -1"):
        sharding.make_mesh((-1, -1, 1))


def test_logical_to_spec_maps_and_replicates_what_does_not_divide():
    mesh = sharding.make_mesh((2, 2, 2))
    assert sharding.logical_to_spec(("embed", "mlp"), (64, 128), mesh) == P("fsdp", "tensor")
    assert sharding.logical_to_spec(("batch", None), (8, 3), mesh) == P(("data", "fsdp"), None)
    # 3 input channels cannot be split in two: replicated, not an error.
    assert sharding.logical_to_spec(("vocab", "embed"), (3, 64), mesh) == P(None, "fsdp")
    # a mesh axis is used once per array
    assert sharding.logical_to_spec(("heads", "mlp"), (8, 8), mesh) == P("tensor", None)
    assert sharding.logical_to_spec(None, (4,), mesh) == P()
