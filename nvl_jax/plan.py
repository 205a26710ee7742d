"""The memory planner: does a config's train step fit a device, on a mesh you may not have?

    python -m nvl_jax.plan --config=configs/demo.py --mesh "(1,8,1)" --devices 8 --device_memory_gb 80
    # before any data, checkpoint or weights exist (a task's for_planning: stage 2)
    python -m nvl_jax.plan --config=configs/nsd_language.py:stage=2b --from_config \\
        --stage1_config=configs/nsd.py --mesh "(1,8,1)" --devices 8

The train step of any task (``config.task``) is compiled ahead of time on a mesh of ``--devices``
virtual CPU devices (or the devices at hand) from abstract arrays: ``jax.ShapeDtypeStruct``s that
carry the layout's shardings, so no parameter, optimizer state or batch is allocated. XLA's
``memory_analysis`` of the compiled step gives the per-device figures; the verdict compares its
peak with ``--device_memory_gb``. When it does not fit, other remat policies and meshes are
planned too, and those that fit are named.

CPU figures count what an accelerator holds (every argument, output and temporary buffer); an
accelerator's compiler fuses differently, so treat them as estimates within some tens of percent
there. The command compiles with XLA CPU's memory-minimizing scheduler (``CPU_MEMORY_SCHEDULER``),
as accelerators schedule within their memory; XLA CPU's default one hides what remat saves. ``plan_memory`` is the function behind the command.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import jax
import numpy as np

from nvl_jax.training import loop, steps
from nvl_jax.training.task import Task

GB = 1e9
CPU_MEMORY_SCHEDULER = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def _shard_bytes(shape, dtype, sharding) -> int:
    return math.prod(sharding.shard_shape(tuple(shape))) * np.dtype(dtype).itemsize


def _abstract(tree, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def _tree_bytes(abstract_tree) -> int:
    """Per-device bytes of a tree of ``ShapeDtypeStruct``s with shardings (the first device's share)."""
    return sum(_shard_bytes(x.shape, x.dtype, x.sharding) for x in jax.tree.leaves(abstract_tree))


def batch_shapes(task: Task) -> dict[str, jax.ShapeDtypeStruct]:
    """The global shapes and dtypes of a training batch: this process's first batch, its batch axis
    times the process count (the task's data is read, one batch of it)."""
    local = next(task.train_iterator())
    return {k: jax.ShapeDtypeStruct((v.shape[0] * jax.process_count(), *v.shape[1:]), v.dtype)
            for k, v in local.items()}


@dataclasses.dataclass(frozen=True)
class CompiledStep:
    """A task's train step compiled from abstract arguments, and those arguments."""

    compiled: Any  # jax.stages.Compiled
    layout: Any  # nvl_jax.training.state.StateLayout
    tx: Any  # the optimizer (optax.GradientTransformation)
    args: tuple  # (params, opt_state, frozen, batch, constants, step), abstract but for constants


def compile_train_step(task: Task, batch: dict[str, jax.ShapeDtypeStruct] | None = None,
                       constants: Any = None) -> CompiledStep:
    """Compiles ``task``'s train step on ``task.mesh`` without allocating its state.

    ``batch``: global shapes of a batch (default: ``batch_shapes(task)``); ``constants``: the
    task's constants or their shapes (default: ``task.constants()``).
    """
    layout, tx, _ = loop.plan(task)
    batch = batch if batch is not None else batch_shapes(task)
    constants = constants if constants is not None else task.constants()
    shardings = task.batch_shardings()
    if batch.keys() != shardings.keys():
        raise ValueError(f"batch entries {sorted(batch)} differ from the task's batch_ndims {sorted(shardings)}")
    args = (
        _abstract(layout.abstract_params, layout.param_shardings),
        _abstract(layout.abstract_opt_state, layout.opt_shardings),
        _abstract(layout.abstract_frozen, layout.frozen_shardings),
        {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k]) for k, v in batch.items()},
        constants,
        jax.ShapeDtypeStruct((), np.int32, sharding=layout.replicated),
    )
    compiled = steps.make_train_step(task, layout, tx).lower(*args).compile()
    return CompiledStep(compiled, layout, tx, args)


def _activation_bytes(task: Task, step: CompiledStep) -> int:
    """Per-device bytes of the residuals the backward pass keeps (what remat trades for compute).

    Traced, not compiled: the loss's ``jax.vjp`` residuals that are not inputs themselves. Those
    with a batch-sized axis count as split over the mesh's batch axes, the others as replicated;
    XLA may keep somewhat fewer.
    """
    params, _, frozen, batch, constants, _ = step.args
    loss_fn = steps.make_loss_fn(task, step.layout)

    def residuals(params, frozen, batch, constants):
        _, vjp_fn, _ = jax.vjp(lambda p: loss_fn(p, frozen, batch, constants, jax.random.key(0)), params,
                               has_aux=True)
        return jax.tree.leaves(vjp_fn)

    jaxpr = jax.make_jaxpr(residuals)(params, frozen, batch, constants).jaxpr
    inputs = {id(v) for v in jaxpr.invars}
    global_batch = next(iter(batch.values())).shape[0]
    mesh = task.mesh
    batch_ways = mesh.shape["data"] * mesh.shape["fsdp"]
    total = 0
    for var in jaxpr.outvars:
        if id(var) in inputs:
            continue
        size = math.prod(var.aval.shape) * np.dtype(var.aval.dtype).itemsize
        total += size // batch_ways if global_batch in var.aval.shape else size
    return int(total)


def plan_memory(task: Task, *, batch: dict[str, jax.ShapeDtypeStruct] | None = None, constants: Any = None,
                device_memory_gb: float | None = None, step: CompiledStep | None = None) -> dict:
    """Per-device memory of ``task``'s train step on ``task.mesh``, planned without allocating.

    Returns a dict: ``mesh`` (axis sizes), ``devices``, ``platform``, ``bytes`` with ``params``,
    ``opt_state``, ``frozen``, ``batch`` and ``constants`` (each device's share of the state and
    inputs, from their shardings), ``activations`` (an estimate, see ``_activation_bytes``),
    ``gradients`` (as large as ``params``), the compiler's ``arguments``, ``outputs``,
    ``donated`` and ``temp`` (activations, gradients and scratch as XLA lays them out) and
    ``peak`` = arguments + outputs - donated + temp. With ``device_memory_gb``: ``fits`` and
    ``margin_gb`` (negative: short by that much). ``step``: a ``compile_train_step`` result to
    reuse instead of compiling again.
    """
    step = step or compile_train_step(task, batch, constants)
    params, opt_state, frozen, batch_args, constants_arg, _ = step.args
    analysis = step.compiled.memory_analysis()
    # Constants may come as arrays, or as shapes without a sharding: then they are counted replicated.
    constants_bytes = sum(_shard_bytes(x.shape, x.dtype, x.sharding) if getattr(x, "sharding", None) is not None
                          else math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(constants_arg))
    figures = {
        "params": _tree_bytes(params),
        "opt_state": _tree_bytes(opt_state),
        "frozen": _tree_bytes(frozen),
        "batch": _tree_bytes(batch_args),
        "constants": constants_bytes,
        "gradients": _tree_bytes(params),
        "activations": _activation_bytes(task, step),
        "arguments": int(analysis.argument_size_in_bytes),
        "outputs": int(analysis.output_size_in_bytes),
        "donated": int(analysis.alias_size_in_bytes),
        "temp": int(analysis.temp_size_in_bytes),
    }
    figures["peak"] = figures["arguments"] + figures["outputs"] - figures["donated"] + figures["temp"]
    devices = task.mesh.devices.flat
    plan = {"mesh": dict(task.mesh.shape), "devices": task.mesh.size, "platform": next(iter(devices)).platform,
            "bytes": figures}
    if device_memory_gb is not None:
        plan["device_memory_gb"] = device_memory_gb
        plan["fits"] = figures["peak"] <= device_memory_gb * GB
        plan["margin_gb"] = device_memory_gb - figures["peak"] / GB
    return plan


def human_bytes(n: float) -> str:
    """``1234567`` -> ``"1.23 MB"`` (decimal units, as device memory is sold)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def format_plan(plan: dict, title: str) -> str:
    """The plan as a few aligned lines, per device."""
    b = plan["bytes"]
    mesh = ", ".join(f"{k} {v}" for k, v in plan["mesh"].items())
    rows = [
        ("parameters (trainable)", b["params"]), ("optimizer state", b["opt_state"]), ("frozen", b["frozen"]),
        ("batch + constants", b["batch"] + b["constants"]), ("gradients", b["gradients"]),
        ("activations (estimate)", b["activations"]), ("compiler temp", b["temp"]),
        ("peak = args + outputs - donated + temp", b["peak"]),
    ]
    lines = [f"{title}: mesh ({mesh}) on {plan['devices']} {plan['platform']} devices, per device:"]
    lines += [f"  {name:<40} {human_bytes(value):>10}" for name, value in rows]
    if "fits" in plan:
        verdict = "fits" if plan["fits"] else "does NOT fit"
        spare = "to spare" if plan["fits"] else "over"
        margin = human_bytes(abs(plan["margin_gb"]) * GB)
        lines.append(f"verdict: {verdict} in {plan['device_memory_gb']:g} GB, {margin} {spare}")
    return "\n".join(lines)


def parse_mesh(text: str) -> tuple[int, ...]:
    """``"(1,8,1)"`` or ``"1,8,1"`` -> ``(1, 8, 1)``: (data, fsdp, tensor), one entry may be -1."""
    try:
        shape = tuple(int(n) for n in text.strip().strip("()").split(",") if n.strip())
    except ValueError:
        shape = ()
    if len(shape) != 3:
        raise ValueError(f"mesh {text!r}: expected (data,fsdp,tensor), e.g. (1,8,1)")
    return shape


# The remat fields of the tasks' configs: stage 1's ViT3D blocks, stage 2's LLM decoder layers.
REMAT_FIELDS = ("model.remat", "llm.remat")


def _get(config, field: str):
    """``config``'s value at a dotted ``field``, None where it has none."""
    node = config
    for name in field.split("."):
        if name not in node:
            return None
        node = node[name]
    return node


def _remat_fields(config) -> list[str]:
    return [f for f in REMAT_FIELDS if _get(config, f) is not None]


def alternatives(config, devices: int | None = None) -> list[tuple[str, dict]]:
    """Changes worth planning when a config does not fit: a remat policy (in every remat field the
    config has, ``REMAT_FIELDS``) and a fully sharded mesh, unless the config has it already
    (``devices`` resolves a -1 in ``config.mesh_shape``).

    Each is ``(description, {dotted config field: value})``.
    """
    fields = _remat_fields(config)
    current = {_get(config, f) for f in fields}
    policies = [p for p in ("dots_with_no_batch_dims_saveable", "full") if fields and current != {p}]
    fsdp = (1, -1, 1)
    mesh = tuple(config.mesh_shape)
    if devices and -1 in mesh:
        mesh = tuple(devices // -math.prod(mesh) if n == -1 else n for n in mesh)
    fully_sharded = mesh == fsdp or mesh == (1, devices, 1)
    out = []
    for new_mesh in [None] if fully_sharded else [None, fsdp]:
        for policy in [None, *policies]:
            change = {**({"mesh_shape": new_mesh} if new_mesh else {}),
                      **({f: policy for f in fields} if policy else {})}
            if change:
                out.append((", ".join(f"--config.{k}={v}" for k, v in change.items()), change))
    return out


def _apply(config, change: dict):
    config = config.copy_and_resolve_references()
    for field, value in change.items():
        *parents, leaf = field.split(".")
        node = config
        for name in parents:
            node = node[name]
        node[leaf] = value
    return config


def _main(argv) -> None:
    import json
    from pathlib import Path

    from absl import app

    from nvl_jax.training import tasks

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # Before JAX starts its backend. XLA CPU's default scheduler favours concurrency over memory and
    # then keeps every decoder layer's recomputed activations alive together: remat saved nothing in
    # its temp (measured on Llama-3-8B cut to 2 and 4 layers). Accelerators' compilers schedule
    # within their memory, as this one does.
    os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), CPU_MEMORY_SCHEDULER]).strip()
    if FLAGS.devices:
        # Before JAX starts its backend: that many virtual CPU devices, whatever the host has.
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", FLAGS.devices)
    if FLAGS.stage1_config is not None and not FLAGS.from_config:
        raise app.UsageError("--stage1_config plans stage 2 from the config alone: give --from_config too")
    config = FLAGS.config
    if FLAGS.mesh:
        config.mesh_shape = parse_mesh(FLAGS.mesh)
    title = FLAGS["config"].config_filename

    def plan_config(config) -> dict:
        if FLAGS.from_config:
            task, batch, constants = tasks.for_planning(config, upstream=FLAGS.stage1_config)
            return plan_memory(task, batch=batch, constants=constants, device_memory_gb=FLAGS.device_memory_gb)
        return plan_memory(tasks.get(config), device_memory_gb=FLAGS.device_memory_gb)

    plan = plan_config(config)
    print(format_plan(plan, title))
    plan["suggestions"] = []
    if not plan["fits"]:
        print("other settings:")
        for description, change in alternatives(config, jax.device_count()):
            try:
                other = plan_config(_apply(config, change))
            except ValueError as error:  # a batch that does not split over that mesh
                print(f"  {description}: not possible ({error})")
                continue
            plan["suggestions"].append({"change": change, "peak_gb": other["bytes"]["peak"] / GB,
                                        "fits": other["fits"]})
            print(f"  {description}: peak {human_bytes(other['bytes']['peak'])} per device, "
                  f"{'fits' if other['fits'] else 'does not fit'}")
        if not any(s["fits"] for s in plan["suggestions"]):
            print("  none of these fits: more devices, a smaller batch or bfloat16 (--config.model.compute_dtype, "
                  "--config.llm.dtype)")
    if FLAGS.json:
        Path(FLAGS.json).write_text(json.dumps(plan, indent=2))


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    from nvl_jax.training.experiment import DEFAULT_CONFIG

    # Defined here, not at import: nvl_jax.train defines --config too, and both import in one process.
    config_flags.DEFINE_config_file("config", str(DEFAULT_CONFIG), "ml_collections config file with an optional "
                                    "variant; any field settable as --config.FIELD=VALUE "
                                    "(e.g. --config.model.remat=full)")
    flags.DEFINE_bool("from_config", False, "plan from the config alone, before any data, checkpoint or weights "
                      "exist (the task's for_planning; stage 2: the LLM's architecture from its config.json or "
                      "a published one by hub name, the extractor from the stage-1 run or --stage1_config, every "
                      "patch of its grid counted as active)")
    config_flags.DEFINE_config_file("stage1_config", None, "with --from_config, for stage 2 when "
                                    "config.stage1_workdir holds no run: the extractor's stage-1 config file with "
                                    "an optional variant, e.g. configs/nsd.py (default: config.stage1_config)")
    flags.DEFINE_string("mesh", None, "(data,fsdp,tensor) to plan, e.g. \"(1,8,1)\"; default: config.mesh_shape")
    flags.DEFINE_integer("devices", None, "plan on this many virtual CPU devices (default: the devices at hand)",
                         lower_bound=1)
    flags.DEFINE_float("device_memory_gb", 80.0, "memory of one device, GB (1e9 bytes)")
    flags.DEFINE_string("json", None, "also write the plan as JSON to this file")
    FLAGS = flags.FLAGS
    app.run(_main)
