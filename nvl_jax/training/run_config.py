"""A run folder describes itself: ``<workdir>/config.json`` holds the resolved config of the run.

Training writes it before the first step; every later command (evaluate, chat, caption,
reconstruct, localize) reads it, so ``--workdir`` alone says everything. Resuming compares the
new config with it field by field and refuses a change of shapes, data or task; the fields in
``MAY_CHANGE`` (how long, how often to log and save, evaluation batching) may change, and the
file is then rewritten.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import ml_collections

from nvl_jax.data import format as data_format

FILENAME = "config.json"

# Fields a resumed run may change: none alters a shape, the data or the task. The sharding rules
# only lay the same arrays out differently (the checkpoint is restored onto the new layout).
MAY_CHANGE = ("total_steps", "epochs", "log_every_steps", "checkpoint_every_steps", "keep_checkpoints",
              "data.worker_count", "eval.batch_size", "eval.limit", "eval.max_new_tokens", "sharding_rules")
# Fields added after run folders were first written, with the value that means what their absence
# meant: an older run resumes under a config that holds them at that value.
ADDED_LATER = {"model.remat": "none", "llm.remat": "none"}


class ConfigMismatchError(ValueError):
    """A resumed run's config changes a field the checkpoint depends on."""


def resolved(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy with every path made absolute, so the run folder is read the same from anywhere."""
    config = ml_collections.ConfigDict(config.to_dict())
    for key in ("data.root", "stage1_workdir"):
        parent, _, leaf = key.rpartition(".")
        node = config[parent] if parent else config
        if leaf in node and node[leaf]:
            node[leaf] = str(Path(node[leaf]).absolute())
    return config


def _flat(tree, prefix: str = "") -> dict[str, object]:
    """``{"data.root": ..., ...}`` with tuples as lists, as JSON stores them."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, name + "."))
        else:
            out[name] = json.loads(json.dumps(value))
    return out


def changed_fields(saved: dict, new: dict) -> list[str]:
    """Dotted names of the fields that differ (present in one only, or with other values); a field of
    ``ADDED_LATER`` that ``saved`` lacks counts as holding its value there."""
    a, b = _flat(saved), _flat(new)
    a = {**{k: v for k, v in ADDED_LATER.items() if k in b}, **a}
    return sorted(k for k in a.keys() | b.keys() if a.get(k, "<absent>") != b.get(k, "<absent>"))


def path(workdir: str | Path) -> Path:
    return Path(workdir) / FILENAME


def save(workdir: str | Path, config: ml_collections.ConfigDict) -> None:
    """Writes the resolved config (process 0 only; the folder is shared by all processes)."""
    if jax.process_index() == 0:
        Path(workdir).mkdir(parents=True, exist_ok=True)
        data_format.save_json(path(workdir), resolved(config).to_dict(), indent=2)


def load(workdir: str | Path) -> ml_collections.ConfigDict:
    """The run's resolved config; a clear error when ``workdir`` is no run folder."""
    file = path(workdir)
    if not file.is_file():
        raise FileNotFoundError(f"{file}: missing; {workdir} is not a run folder of python -m nvl_jax.train "
                                "(train into it first)")
    try:
        return ml_collections.ConfigDict(json.loads(file.read_text()))
    except json.JSONDecodeError as error:
        raise ValueError(f"{file}: not valid JSON ({error})") from None


def check_resume(workdir: str | Path, config: ml_collections.ConfigDict) -> None:
    """Refuses to resume ``workdir`` with a config that changes anything but ``MAY_CHANGE``."""
    saved = load(workdir).to_dict()
    refused = [k for k in changed_fields(saved, resolved(config).to_dict()) if k not in MAY_CHANGE]
    if refused:
        old, new = _flat(saved), _flat(resolved(config).to_dict())
        old = {**{k: v for k, v in ADDED_LATER.items() if k in new}, **old}
        details = "; ".join(f"{k}: {old.get(k, '<absent>')!r} -> {new.get(k, '<absent>')!r}" for k in refused)
        raise ConfigMismatchError(
            f"{path(workdir)}: the checkpoints in {workdir} were trained with another config; resuming would "
            f"change {details}. Only {', '.join(MAY_CHANGE)} may change on resume: train into a new --workdir, "
            "or drop those overrides.")
