"""Sharding experiments: one config's train step on several meshes, side by side.

    python -m nvl_jax.bench.sharding --config=configs/demo.py --meshes "(8,1,1) (1,8,1) (2,2,2) (1,2,4)"

For each ``(data, fsdp, tensor)`` mesh: the per-device memory (``nvl_jax.plan``'s figures), the
collectives in the compiled step's optimized HLO (all-gather, reduce-scatter, all-reduce,
all-to-all, collective-permute: how many, and the bytes of their results per device), and the
median time of a step on the devices at hand. Virtual CPU devices (``--devices``) give relative
figures only; an accelerator host gives real ones. Prints a table; ``--json`` writes the rows.
Which logical axis goes to which mesh axis is ``config.sharding_rules`` (docs/sharding.md).

``--activation_constraints=both`` measures each mesh twice: with the rules' activation names
(the LLM pins its activations, ``sharding.constrain``) and without them (XLA propagates the
activations' layout from the weights' alone), the before and after of activation sharding.
"""

from __future__ import annotations

import re
import statistics
import time

import jax

from nvl_jax import sharding


def _step_seconds(task, compiled_step, repeats: int) -> float:
    """Median seconds of ``repeats`` runs of the compiled step on real (randomly initialised) state."""
    from nvl_jax.training import state as state_lib, steps

    layout, constants = compiled_step.layout, compiled_step.args[4]
    params, frozen = task.initial_state(layout)
    opt_state = state_lib.init_optimizer(compiled_step.tx, params, layout)
    batch = task.global_batch(next(task.train_iterator()))
    run = compiled_step.compiled
    times = []
    for i in range(repeats + 1):  # the first run warms up
        start = time.perf_counter()
        params, opt_state, metrics = run(params, opt_state, frozen, batch, constants, steps.step_counter(i))
        jax.block_until_ready((params, opt_state, metrics))
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def measure(config, mesh_shape: tuple[int, int, int], repeats: int = 3, activation_constraints: bool = True) -> dict:
    """One row: ``mesh``, ``activation_constraints``, ``bytes`` (``plan_memory``'s per-device figures),
    ``collectives`` (``sharding.collectives``) and ``step_s``.

    ``activation_constraints=False`` drops the activation names from ``config.sharding_rules``, so the
    model's ``sharding.constrain`` calls leave every activation to XLA's propagation.
    """
    from nvl_jax import plan as plan_lib
    from nvl_jax.training import tasks

    config = config.copy_and_resolve_references()
    config.mesh_shape = tuple(mesh_shape)
    if not activation_constraints:
        config.sharding_rules = sharding.without_activation_rules(config.sharding_rules)
    task = tasks.get(config)
    compiled_step = plan_lib.compile_train_step(task)
    memory = plan_lib.plan_memory(task, step=compiled_step)
    return {"mesh": tuple(mesh_shape), "activation_constraints": activation_constraints, "bytes": memory["bytes"],
            "collectives": sharding.collectives(compiled_step.compiled.as_text()),
            "step_s": _step_seconds(task, compiled_step, repeats) if repeats else None}


def format_table(rows: list[dict], platform: str) -> str:
    """A Markdown table: one line per row (a mesh, with or without activation constraints)."""
    from nvl_jax.plan import human_bytes

    names = {"all-gather": "all-gather", "reduce-scatter": "reduce-scatter", "all-reduce": "all-reduce",
             "all-to-all": "all-to-all", "collective-permute": "permute"}
    header = (["mesh (data,fsdp,tensor)", "activation constraints", "peak/device", "params+opt/device",
               "temp/device"] + [f"{names[op]} n / bytes" for op in sharding.COLLECTIVES]
              + ["collective bytes", f"step ({platform})"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        b = row["bytes"]
        cells = [str(row["mesh"]).replace(" ", ""), "on" if row["activation_constraints"] else "off",
                 human_bytes(b["peak"]), human_bytes(b["params"] + b["opt_state"]), human_bytes(b["temp"])]
        cells += [f"{c['count']} / {human_bytes(c['bytes'])}" if c["count"] else "-"
                  for c in (row["collectives"][op] for op in sharding.COLLECTIVES)]
        cells.append(human_bytes(sum(c["bytes"] for c in row["collectives"].values())))
        cells.append(f"{row['step_s'] * 1e3:.1f} ms" if row["step_s"] is not None else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_meshes(text: str) -> list[tuple[int, int, int]]:
    """``"(8,1,1) (1,8,1)"`` -> ``[(8, 1, 1), (1, 8, 1)]``."""
    from nvl_jax.plan import parse_mesh

    meshes = [parse_mesh(m) for m in re.findall(r"\([^)]*\)", text)]
    if not meshes:
        raise ValueError(f"meshes {text!r}: expected one or more (data,fsdp,tensor), e.g. \"(8,1,1) (2,2,2)\"")
    return meshes


def _main(argv) -> None:
    import json
    from pathlib import Path

    from absl import app

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.devices:
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", FLAGS.devices)
    settings = {"on": (True,), "off": (False,), "both": (False, True)}[FLAGS.activation_constraints]
    rows = []
    for mesh in parse_meshes(FLAGS.meshes):
        for constrained in settings:
            rows.append(measure(FLAGS.config, mesh, FLAGS.repeats, activation_constraints=constrained))
            print(f"{mesh}, activation constraints {'on' if constrained else 'off'}: done", flush=True)
    print(format_table(rows, jax.devices()[0].platform))
    if FLAGS.json:
        Path(FLAGS.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    from nvl_jax.training.experiment import DEFAULT_CONFIG

    # Defined here, not at import: other entry points define --config too.
    config_flags.DEFINE_config_file("config", str(DEFAULT_CONFIG), "ml_collections config file with an optional "
                                    "variant; fields settable as --config.FIELD=VALUE (e.g. --config.sharding_rules)")
    flags.DEFINE_string("meshes", "(8,1,1) (1,8,1) (2,2,2) (1,2,4)", "(data,fsdp,tensor) meshes, space-separated")
    flags.DEFINE_integer("devices", None, "run on this many virtual CPU devices (default: the devices at hand)",
                         lower_bound=1)
    flags.DEFINE_enum("activation_constraints", "on", ["on", "off", "both"],
                      "on: the config's rules; off: its rules without the activation names (activation_*), "
                      "so XLA propagates the activations' layout itself; both: one row of each per mesh")
    flags.DEFINE_integer("repeats", 3, "timed steps per mesh (after one warm-up); 0 skips timing", lower_bound=0)
    flags.DEFINE_string("json", None, "also write the rows as JSON to this file")
    FLAGS = flags.FLAGS
    app.run(_main)
