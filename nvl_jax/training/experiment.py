"""What every task derives from a config before its first step.

The mesh (checked against the devices and the batch sizes before anything is compiled), the
prepared dataset (generated on first use for in-silico configs, with its targets), the common
grid, and the active patches (computed once and cached in the dataset).
"""

from __future__ import annotations

import math
from pathlib import Path
import re

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

import nvl_jax.configs as nvl_configs
from nvl_jax import sharding as sharding_lib
from nvl_jax.data import format as data_format
from nvl_jax.data import targets as targets_lib
from nvl_jax.data import volumes

# The entry points' default: the demo config, found in the installed package (not the source tree).
DEFAULT_CONFIG = Path(nvl_configs.__file__).with_name("demo.py")


def default_workdir(config_path: str) -> Path:
    """``runs/<config file stem>[-<variant>]`` for ``--config=configs/nsd.py[:patch=12]``."""
    name, _, arg = config_path.partition(":")
    variant = re.sub(r"[^A-Za-z0-9.]+", "", arg.replace(",", "-").replace("=", "")) if arg else ""
    return Path("runs") / (Path(name).stem + (f"-{variant}" if variant else ""))


PREPARE_HINT = (
    "Prepare a dataset in nvl_jax's format (docs/data_format.md) there, or point --config.data.root at one. "
    "From the Natural Scenes Dataset (docs/nsd.md): python -m nvl_jax.data.prepare_nsd --nsd_root NSD "
    "--coco_annotations COCO --out {root}. For an in-silico NSD: python -m nvl_jax.data.synthetic --out {root}")


def on_first_process(write, done) -> None:
    """Runs ``write()`` on process 0 unless ``done()`` finds its output there, the others waiting:
    a shared filesystem is written once.

    Every process calls it, whatever it sees on disk, and only process 0 asks ``done()``: a process
    that skipped the barrier because process 0 had already written would leave the others waiting.
    """
    if jax.process_index() == 0 and not done():
        write()
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(write.__name__)


def prepare_dataset(config: ml_collections.ConfigDict) -> data_format.PreparedDataset:
    """Opens ``config.data.root``; creates it (and its targets) first when the config says how."""
    root = Path(config.data.root)
    if not (root / "dataset.json").exists() and not config.data.get("synthetic"):
        raise FileNotFoundError(f"{root}: no prepared dataset (dataset.json missing). "
                                + PREPARE_HINT.format(root=root))

    def generate_in_silico_nsd():
        from nvl_jax.data import synthetic
        print(f"{root}: no dataset yet; generating in-silico NSD there (first use)")
        synthetic.generate(root, synthetic.SyntheticConfig(**config.data.synthetic.to_dict()))

    on_first_process(generate_in_silico_nsd, done=(root / "dataset.json").exists)
    dataset = data_format.PreparedDataset.open(root)
    had_targets = dataset.has_targets()
    if not had_targets and not config.targets.random_init and not (config.targets.clip and config.targets.vae):
        raise FileNotFoundError(
            f"{root / 'targets'}: no cached targets. Compute them with: python -m nvl_jax.data.targets "
            f"--data {root} --clip openai/clip-vit-large-patch14 --vae stabilityai/stable-diffusion-2-1-unclip-small "
            "--vae_subfolder vae")

    def cache_targets():
        targets_lib.cache_targets(root, clip_name=config.targets.clip, vae_name=config.targets.vae,
                                  vae_subfolder=config.targets.vae_subfolder or None,
                                  image_size=config.targets.image_size, random_init=config.targets.random_init,
                                  seed=config.seed)

    on_first_process(cache_targets, done=dataset.has_targets)
    return dataset if had_targets else data_format.PreparedDataset.open(root)


def active_patches(dataset: data_format.PreparedDataset, common_grid, patch_size: int) -> np.ndarray:
    """``int32 [n_active, 3]``: patches touching any subject's resampled nsdgeneral; cached in ``common/``."""
    grid = "x".join(map(str, common_grid))
    path = dataset.root / "common" / f"active_patches_{grid}_p{patch_size}.npy"

    def compute_active_patches():
        union = volumes.resample_masks_union([s.nsdgeneral for s in dataset.subjects.values()], common_grid)
        path.parent.mkdir(exist_ok=True)
        np.save(path, volumes.active_patches(union, patch_size))

    on_first_process(compute_active_patches, done=path.exists)
    return np.load(path)


def resolve_common_grid(config: ml_collections.ConfigDict,
                        dataset: data_format.PreparedDataset) -> tuple[int, int, int]:
    """``config.data.common_grid``: a subject's name (its native X, Y, Z grid) or an explicit grid
    ``"X,Y,Z"`` (a string, so that one config field holds either)."""
    grid = config.data.common_grid
    if re.fullmatch(r"\s*\d+\s*,\s*\d+\s*,\s*\d+\s*", grid):
        shape = tuple(int(n) for n in grid.split(","))
        if min(shape) < 1:
            raise ValueError(f"config.data.common_grid = {grid!r}: every axis must be > 0")
        return shape
    if grid not in dataset.subjects:
        raise ValueError(f"config.data.common_grid = {grid!r}: not a subject of {dataset.root} (subjects: "
                         f"{', '.join(dataset.subjects)}); name one, or give the grid as \"X,Y,Z\"")
    return tuple(int(n) for n in dataset.subjects[grid].native_shape)


def make_mesh(config: ml_collections.ConfigDict, devices=None) -> jax.sharding.Mesh:
    """The ``(data, fsdp, tensor)`` mesh of ``config.mesh_shape``, checked before anything compiles.

    Fails, naming the config fields, when the mesh does not fit the devices or a batch size does
    not split over the data x fsdp devices and the processes.
    """
    devices = list(devices if devices is not None else jax.devices())
    try:
        mesh = sharding_lib.make_mesh(tuple(config.mesh_shape), devices=devices)
    except ValueError as error:
        raise ValueError(f"config.mesh_shape = {tuple(config.mesh_shape)} does not fit the {len(devices)} "
                         f"visible {devices[0].platform} devices: {error}. Give (data, fsdp, tensor) whose "
                         "product is the device count, one entry may be -1.") from None
    batch_ways = mesh.shape["data"] * mesh.shape["fsdp"]
    for field in ("data.batch_size", "eval.batch_size"):
        parent, leaf = field.split(".")
        if parent not in config or leaf not in config[parent]:
            continue
        size = config[parent][leaf]
        ways = math.lcm(batch_ways, jax.process_count())
        if size < 1 or size % ways:
            raise ValueError(
                f"config.{field} = {size} does not split over the mesh's data x fsdp = {mesh.shape['data']} x "
                f"{mesh.shape['fsdp']} devices and {jax.process_count()} processes: use a multiple of {ways}, or "
                f"change config.mesh_shape = {tuple(config.mesh_shape)}.")
    return mesh
