"""orbax checkpoints holding everything a run needs to resume exactly.

One checkpoint = parameters + optimizer state + the Grain iterator's position
+ the config and step, saved together, so a restarted run continues on the
exact next batch with the exact same state.
"""

from __future__ import annotations

import json
from pathlib import Path

import grain
import jax
import orbax.checkpoint as ocp

from nvl_jax.training.state import StateLayout


class Checkpointer:
    """Periodic and final saves under ``workdir/checkpoints``; keeps the newest ``keep``."""

    def __init__(self, workdir: str | Path, keep: int = 3):
        self.directory = Path(workdir).absolute() / "checkpoints"
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, params, opt_state, data_iterator, meta: dict) -> None:
        """Saves and waits, so a crash right after never leaves only a partial checkpoint as the newest."""
        self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            data=grain.checkpoint.CheckpointSave(data_iterator),
            meta=ocp.args.JsonSave(meta),
        ), force=True)
        self.manager.wait_until_finished()

    def restore(self, step: int, layout: StateLayout, data_iterator):
        """Restores onto the layout's shardings and moves ``data_iterator`` to the saved position.

        Returns ``(params, opt_state, meta)``.
        """
        params_target, opt_target = layout.restore_targets()
        items = {"params": ocp.args.StandardRestore(params_target),
                 "opt_state": ocp.args.StandardRestore(opt_target), "meta": ocp.args.JsonRestore()}
        moved = self._data_state_from_another_process_count(step)
        if moved is None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        if moved is not None:
            data_iterator.set_state(moved)
            data_iterator.start_prefetch()
        return restored.params, restored.opt_state, restored.meta

    def _data_state_from_another_process_count(self, step: int) -> dict | None:
        """The iterator state to resume with when the checkpoint was saved by a different number
        of processes (Grain names its files ``process_<i>-of-<n>.json``); None when this process's
        own file is there.

        Each process's iterator yields its share of every global batch, so its state counts global
        batches and all processes save the same one, valid for any process count. States that
        differ between processes are refused.
        """
        folder = self.directory / str(step) / "data"
        if (folder / f"process_{jax.process_index()}-of-{jax.process_count()}.json").exists():
            return None
        saved = {path.name: path.read_text() for path in sorted(folder.glob("process_*-of-*.json"))}
        if not saved:
            raise FileNotFoundError(f"{folder}: no data iterator state (process_<i>-of-<n>.json) in the checkpoint")
        states = {name: json.loads(text) for name, text in saved.items()}
        if any(state != next(iter(states.values())) for state in states.values()):
            raise ValueError(f"{folder}: the processes that saved this checkpoint stopped at different data "
                             f"positions ({states}); resume it with the same number of processes, {len(states)}")
        return next(iter(states.values()))

    def restore_params(self, step: int, layout: StateLayout):
        """Only the parameters (evaluation needs no optimizer or iterator)."""
        params_target, _ = layout.restore_targets()
        restored = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(params_target), meta=ocp.args.JsonRestore()))
        return restored.params, restored.meta

    def close(self) -> None:
        self.manager.close()
