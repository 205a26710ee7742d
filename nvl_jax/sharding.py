"""Device meshes and the logical-axis -> mesh-axis rules.

Every parameter in nvl_jax carries logical axis names (``("embed", "mlp")``) as
its ``out_sharding`` metadata. A rules table maps each logical name onto zero,
one or several mesh axes of a ``("data", "fsdp", "tensor")`` mesh, so a new
parallelism layout is a config change, not a code change (MaxText's manner).
Activations are named the same way (``("activation_batch", "activation_length",
"activation_embed")``) and pinned by :func:`constrain` when a mesh is set.
"""

from __future__ import annotations

from collections.abc import Sequence
import math
import re

import jax
from flax.core import spmd
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes. Names absent from the table are replicated.
# Batch is split over data and fsdp; weights are split along their model
# dimension ("embed") over fsdp and along heads / MLP / vocab over tensor.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("conv_out", "tensor"),
    ("conv_in", None),
    ("norm", None),
    ("position", None),
    ("patch", None),
    # Activations: split over the batch, and over tensor where the weights are split over tensor
    # (heads, MLP hidden, vocab), so a tensor-parallel matmul never gathers its input. The
    # sequence stays whole; ("activation_length", "tensor") is sequence parallelism.
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_head_dim", None),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
)

Rules = Sequence[tuple[str, str | Sequence[str] | None]]
# Logical names of activations start with this; the rest name parameter and input dimensions.
ACTIVATION_PREFIX = "activation_"


def make_mesh(
    mesh_shape: Sequence[int] = (-1, 1, 1),
    axis_names: Sequence[str] = MESH_AXES,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """Builds a mesh with Auto axis types; one entry of ``mesh_shape`` may be -1 (the rest).

    Auto (not Explicit) axes: NNX sharding annotations are hints to XLA's
    propagation here, and Explicit axes reject them with ShardingTypeError.
    """
    devices = list(devices if devices is not None else jax.devices())
    shape = list(mesh_shape)
    if len(shape) != len(axis_names):
        raise ValueError(f"mesh_shape {tuple(mesh_shape)} must have one entry per axis {tuple(axis_names)}")
    if shape.count(-1) > 1:
        raise ValueError(f"mesh_shape {tuple(mesh_shape)}: at most one entry may be -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if len(devices) % known:
            raise ValueError(f"mesh_shape {tuple(mesh_shape)} does not divide {len(devices)} devices")
        shape[shape.index(-1)] = len(devices) // known
    if math.prod(shape) != len(devices):
        raise ValueError(f"mesh_shape {tuple(shape)} needs {math.prod(shape)} devices, {len(devices)} are visible")
    return jax.make_mesh(
        tuple(shape), tuple(axis_names), axis_types=(jax.sharding.AxisType.Auto,) * len(shape),
        devices=devices,
    )


def logical_to_spec(
    logical_axes: Sequence[str | None] | None,
    shape: Sequence[int],
    mesh: Mesh,
    rules: Rules = DEFAULT_RULES,
) -> PartitionSpec:
    """Maps logical axis names of an array of ``shape`` to a PartitionSpec on ``mesh``.

    A mesh axis is used at most once per array, and is dropped for a dimension
    it does not divide (a 3-channel conv input, a tiny test model): that
    dimension is then replicated instead of failing to shard.
    """
    if not logical_axes:
        return PartitionSpec()
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, size in zip(logical_axes, shape, strict=True):
        mesh_axes = table.get(name) if name is not None else None
        if mesh_axes is None:
            spec.append(None)
            continue
        mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
        kept = []
        for axis in mesh_axes:
            factor = mesh.shape[axis] * math.prod(mesh.shape[a] for a in kept)
            if axis not in used and mesh.shape[axis] > 1 and size % factor == 0:
                kept.append(axis)
        used.update(kept)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*spec)


def named_sharding(
    logical_axes: Sequence[str | None] | None,
    shape: Sequence[int],
    mesh: Mesh,
    rules: Rules = DEFAULT_RULES,
) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(logical_axes, shape, mesh, rules))


def variable_sharding(variable, mesh: Mesh | None, rules: Rules = DEFAULT_RULES) -> jax.sharding.Sharding:
    """The target sharding of one (possibly abstract) NNX variable.

    Without a mesh, everything lives on the first device.
    """
    if mesh is None:
        return jax.sharding.SingleDeviceSharding(jax.devices()[0])
    axes = variable.get_metadata().get("out_sharding")
    return named_sharding(axes, variable.shape, mesh, rules)


def batch_sharding(mesh: Mesh, ndim: int, rules: Rules = DEFAULT_RULES) -> NamedSharding:
    """Sharding of an input array whose leading axis is the batch."""
    mesh_axes = dict(rules).get("batch")
    return NamedSharding(mesh, PartitionSpec(mesh_axes, *([None] * (ndim - 1))))


def without_activation_rules(rules: Rules) -> tuple[tuple[str, str | Sequence[str] | None], ...]:
    """``rules`` less the entries of activation names (``activation_*``): the weights and batches keep
    their layout, and every activation is left to XLA's sharding propagation."""
    return tuple((name, axes) for name, axes in rules if not name.startswith(ACTIVATION_PREFIX))


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Pins activation ``x`` to the sharding its logical axis names map to on the current mesh.

    The mesh is the one ``jax.set_mesh`` (or, while tracing, ``jax.sharding.use_abstract_mesh``)
    set, the rules those of ``nnx.logical_axis_rules`` (else :data:`DEFAULT_RULES`); the trainer's
    step sets both (``nvl_jax.training.steps``). Without a mesh it returns ``x`` unchanged, so
    single-device code traces as before. A dimension whose name the rules do not list is left to
    XLA (unconstrained), and an array none of whose names they list is returned unchanged: rules
    without activation names (:func:`without_activation_rules`) switch the constraints off.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    if not mesh.are_all_axes_auto:
        raise ValueError(f"activation constraints need a mesh of Auto axes, got axis types {mesh.axis_types}; "
                         "build it with nvl_jax.sharding.make_mesh")
    rules = spmd.get_logical_axis_rules() or DEFAULT_RULES
    table = dict(rules)
    if not any(name in table for name in logical_axes):
        return x
    spec = logical_to_spec(logical_axes, x.shape, mesh, rules)
    spec = PartitionSpec(*(axes if name in table else PartitionSpec.UNCONSTRAINED
                           for name, axes in zip(logical_axes, spec, strict=True)))
    return jax.lax.with_sharding_constraint(x, spec)


COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
# HLO element types name their width (f32, bf16, s4, f8e4m3fn, c64), except these two.
_UNSIZED_TYPE_BITS = {"pred": 8, "token": 0}
# "%name = SHAPE op(" where SHAPE is one array type or a tuple of them. An async pair counts once,
# at its -done, whose result is exactly the collective's output (a -start's holds its operands too).
_COLLECTIVE_OP = re.compile(r"= (?P<shape>\S+|\(.*?\)) (?P<op>" + "|".join(COLLECTIVES) + r")(?:-done)?\(")
_ARRAY_TYPE = re.compile(r"\b([a-z]\w*)\[([\d,]*)\]")


def _element_bits(dtype: str, line: str) -> int:
    if dtype in _UNSIZED_TYPE_BITS:
        return _UNSIZED_TYPE_BITS[dtype]
    width = re.match(r"[a-z]+(\d+)", dtype)
    if width is None:
        raise ValueError(f"collectives: HLO element type {dtype!r} names no width, in: {line.strip()}")
    return int(width[1])


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """The collectives of a compiled module's HLO text (``jax.jit(f).lower(...).compile().as_text()``):
    ``{kind: {"count": ops, "bytes": bytes}}`` for every kind of :data:`COLLECTIVES`.

    Bytes are those of each op's result on one device (per-device shapes, after SPMD
    partitioning): an all-gather's gathered array, a reduce-scatter's scattered part.
    """
    found = {kind: {"count": 0, "bytes": 0} for kind in COLLECTIVES}
    for line in hlo_text.splitlines():
        match = _COLLECTIVE_OP.search(line)
        if match is None:
            continue
        entry = found[match["op"]]
        entry["count"] += 1
        for dtype, dims in _ARRAY_TYPE.findall(match["shape"]):
            entry["bytes"] += math.prod(int(d) for d in dims.split(",") if d) * _element_bits(dtype, line) // 8
    return found
