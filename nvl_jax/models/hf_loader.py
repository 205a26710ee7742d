"""Loads Hugging Face safetensors checkpoints (or GGUF files) into NNX modules, one tensor at a time.

Every model declares a :class:`KeyMap`: an ordered table of
``(checkpoint-key regex, NNX path template, transform)`` rows, plus regexes of
keys a checkpoint may hold that the model does not use (the other tower of a
full CLIP checkpoint, say). Loading:

1. builds the model abstractly (``nnx.eval_shape``: no memory, no compute);
2. maps every checkpoint key to an NNX path and checks every shape, after the
   transform, before reading any data; every missing key, unused key and wrong
   shape is reported together in one :class:`CheckpointMismatchError`;
3. reads the tensors one at a time, largest first, transforms and casts them on
   the host and places each straight onto its target sharding, so the host holds
   at most one tensor beyond what is already placed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
import gc
import json
import os
from pathlib import Path
import re
from typing import Protocol

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from tqdm.auto import tqdm

from nvl_jax import sharding as sharding_lib
from nvl_jax.models.safetensors_io import SafetensorsFile, TensorInfo

# A transform maps a PyTorch-layout tensor to the NNX layout. It uses only
# array methods (``.T``, ``.transpose``, ``.reshape``), so it runs on numpy
# arrays when loading and under ``jax.eval_shape`` when checking shapes.
Transform = Callable[[np.ndarray], np.ndarray]


def linear(w):
    """torch.nn.Linear weight ``[out, in]`` -> Dense kernel ``[in, out]``."""
    return w.T


def conv2d(w):
    """torch.nn.Conv2d weight ``[out, in, kh, kw]`` -> ``[kh, kw, in, out]``."""
    return w.transpose(2, 3, 1, 0)


def conv1x1_as_linear(w):
    """A 1x1 conv ``[out, in, 1, 1]`` or a Linear ``[out, in]`` weight -> Dense kernel ``[in, out]``."""
    return w.reshape(w.shape[0], w.shape[1]).T


@dataclasses.dataclass(frozen=True)
class KeyMap:
    """How one model's checkpoint keys map onto its NNX state.

    ``rules``: ``(key_regex, nnx_path_template, transform_or_None)``; the first
    rule whose regex fully matches a key wins; the template may use the regex's
    groups (``r"layers.\\1.attn.q_proj.kernel"``).
    ``ignore``: regexes of keys the checkpoint may hold that the model does not use.
    """

    rules: Sequence[tuple[str, str, Transform | None]]
    ignore: Sequence[str] = ()

    def __post_init__(self):
        object.__setattr__(self, "_compiled", [(re.compile(p), t, f) for p, t, f in self.rules])
        object.__setattr__(self, "_ignored", [re.compile(p) for p in self.ignore])

    def target(self, key: str) -> tuple[str, Transform | None] | None:
        for pattern, template, transform in self._compiled:
            match = pattern.fullmatch(key)
            if match:
                return match.expand(template), transform
        return None

    def ignores(self, key: str) -> bool:
        return any(p.fullmatch(key) for p in self._ignored)


class CheckpointMismatchError(ValueError):
    """The checkpoint's keys or shapes do not match the model; the message lists every problem."""


WEIGHT_INDEX_NAMES = ("model.safetensors.index.json", "diffusion_pytorch_model.safetensors.index.json")
WEIGHT_NAMES = ("model.safetensors", "diffusion_pytorch_model.safetensors")
HUB_PATTERNS = ("*.json", "*.safetensors", "*.txt", "*.model")


def resolve(path_or_name: str | os.PathLike, subfolder: str | None = None) -> Path:
    """A local checkpoint folder: ``path_or_name`` itself, or a hub snapshot of it.

    Hub downloads take only configs, safetensors and tokenizer files, never the
    duplicate ``.bin`` / ``.msgpack`` weights.
    """
    local = Path(path_or_name)
    if not local.exists():
        name = str(path_or_name)
        prefix = f"{subfolder}/" if subfolder else ""
        try:
            import huggingface_hub

            local = Path(huggingface_hub.snapshot_download(
                repo_id=name, allow_patterns=[prefix + p for p in HUB_PATTERNS]))
        except Exception as e:  # offline, gated, unknown repo: the message says which
            raise FileNotFoundError(
                f"{name!r} is not a local folder and could not be fetched from the Hugging Face hub "
                f"({type(e).__name__}: {e}). Pass a local checkpoint folder instead.") from e
    folder = local / subfolder if subfolder else local
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
    return folder


def read_config(folder: Path, filename: str = "config.json") -> dict:
    path = Path(folder) / filename
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing; a Hugging Face checkpoint folder holds its {filename}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def checkpoint_files(folder: Path) -> list[SafetensorsFile]:
    """The safetensors files of a checkpoint: the shards named by an index, or the single file."""
    folder = Path(folder)
    for index_name in WEIGHT_INDEX_NAMES:
        index_path = folder / index_name
        if index_path.exists():
            weight_map = json.loads(index_path.read_text()).get("weight_map")
            if not weight_map:
                raise ValueError(f"{index_path}: field 'weight_map' is missing or empty")
            shards = sorted(set(weight_map.values()))
            absent = [s for s in shards if not (folder / s).exists()]
            if absent:
                raise FileNotFoundError(f"{index_path}: names shards that are missing: {absent}")
            return [SafetensorsFile(folder / s) for s in shards]
    for name in WEIGHT_NAMES:
        if (folder / name).exists():
            return [SafetensorsFile(folder / name)]
    found = sorted(p.name for p in folder.iterdir())
    raise FileNotFoundError(
        f"{folder}: no {' or '.join(WEIGHT_NAMES)} and no safetensors index; found {found}. "
        "Only safetensors are read: convert .bin checkpoints once with "
        "`python -m nvl_jax.models.convert_to_safetensors SRC DST`.")


class TensorFile(Protocol):
    """A checkpoint file the loader reads: ``SafetensorsFile`` or ``gguf_io.GGUFFile``.

    ``tensors`` maps each key to an info with ``name``, ``shape``, ``dtype`` and
    ``nbytes`` (as ``read`` returns it); ``read(key)`` returns a fresh numpy array.
    """

    path: Path
    tensors: dict

    def read(self, key: str) -> np.ndarray: ...


@dataclasses.dataclass
class _Placement:
    file: TensorFile
    info: TensorInfo
    transform: Transform | None


def _transformed_shape(info: TensorInfo, transform: Transform | None) -> tuple[int, ...]:
    if transform is None:
        return info.shape
    return jax.eval_shape(transform, jax.ShapeDtypeStruct(info.shape, info.dtype)).shape


def _plan(files: Sequence[TensorFile], targets: dict, key_map: KeyMap, folder: Path, model_name: str):
    """Maps every checkpoint tensor to its NNX variable; raises one error listing every problem."""
    plan: dict[str, _Placement] = {}
    unused, wrong_shape, mismatched = [], [], set()
    for sf in files:
        for key, info in sf.tensors.items():
            hit = key_map.target(key)
            if hit is None:
                if not key_map.ignores(key):
                    unused.append(f"{sf.path.name}: {key} {list(info.shape)}")
                continue
            path, transform = hit
            if path not in targets:
                unused.append(f"{sf.path.name}: {key} (maps to {path}, which the model lacks)")
                continue
            if path in plan:
                unused.append(f"{sf.path.name}: {key} (maps to {path}, already set by {plan[path].info.name})")
                continue
            shape = _transformed_shape(info, transform)
            if shape != tuple(targets[path].shape):
                wrong_shape.append(f"{sf.path.name}: {key} has shape {list(info.shape)}, "
                                   f"model expects {list(targets[path].shape)} for {path}")
                mismatched.add(path)
                continue
            plan[path] = _Placement(sf, info, transform)
    missing = [f"{p} {list(v.shape)}" for p, v in targets.items() if p not in plan and p not in mismatched]
    if missing or unused or wrong_shape:
        lines = [f"checkpoint {folder} ({', '.join(f.path.name for f in files)}) does not match {model_name}:"]
        for title, items in (("missing from the checkpoint (model parameters)", missing),
                             ("unused checkpoint keys", unused), ("wrong shapes", wrong_shape)):
            if items:
                lines.append(f"  {title} ({len(items)}):")
                lines.extend(f"    {item}" for item in items)
        raise CheckpointMismatchError("\n".join(lines))
    return plan


def load_weights(
    abstract_model: nnx.Module,
    folder: Path,
    key_map: KeyMap,
    *,
    files: Sequence[TensorFile] | None = None,
    mesh: Mesh | None = None,
    rules: sharding_lib.Rules = sharding_lib.DEFAULT_RULES,
) -> nnx.Module:
    """Fills an abstract model (from ``nnx.eval_shape``) with a checkpoint's tensors.

    The tensors are ``folder``'s safetensors unless ``files`` are given (a
    :class:`~nvl_jax.models.gguf_io.GGUFFile`, say). Each tensor is cast to its
    variable's dtype (the dtype the model was built with) and placed onto that
    variable's sharding on ``mesh`` (one device if None).
    """
    files = checkpoint_files(folder) if files is None else files
    graphdef, abstract_state = nnx.split(abstract_model)
    flat = list(nnx.to_flat_state(abstract_state))
    targets = {".".join(map(str, path)): var for path, var in flat}
    plan = _plan(files, targets, key_map, Path(folder), type(abstract_model).__name__)

    # Largest first: the big embedding tables are read while little else is
    # placed, so the peak stays near the checkpoint's own size.
    order = sorted(plan, key=lambda p: -plan[p].info.nbytes)
    total = sum(plan[p].info.nbytes for p in order)
    placed = {}
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"loading {Path(folder).name}",
              disable=total < 2**28, leave=False) as bar:
        for path in order:
            placement, variable = plan[path], targets[path]
            array = placement.file.read(placement.info.name)
            if placement.transform is not None:
                array = placement.transform(array)
            array = np.ascontiguousarray(array, dtype=variable.dtype)
            placed[path] = jax.make_array_from_callback(
                array.shape, sharding_lib.variable_sharding(variable, mesh, rules), lambda idx: array[idx])
            # The transfer is asynchronous and the host buffer is only released
            # once it is done and the callback's references are collected; without
            # both, two large tensors overlap in host memory (1.5x peak, not 1.1x).
            placed[path].block_until_ready()
            del array
            gc.collect(0)
            bar.update(placement.info.nbytes)
    new_flat = [(path, var.replace(value=placed[".".join(map(str, path))])) for path, var in flat]
    return nnx.merge(graphdef, nnx.from_flat_state(new_flat))


def from_pretrained(
    build: Callable[[], nnx.Module],
    folder: Path,
    key_map: KeyMap,
    *,
    files: Sequence[TensorFile] | None = None,
    mesh: Mesh | None = None,
    rules: sharding_lib.Rules = sharding_lib.DEFAULT_RULES,
) -> nnx.Module:
    """Builds ``build()`` abstractly and loads ``folder``'s weights (or ``files``') into it."""
    return load_weights(nnx.eval_shape(build), folder, key_map, files=files, mesh=mesh, rules=rules)
