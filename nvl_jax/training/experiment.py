"""Everything a stage-1 run derives from its config before the first step.

The prepared dataset (generated on first use for in-silico configs, with its
targets), the mesh, the per-subject preprocessing geometry, the active
patches (computed once and cached in the dataset), and the ViT3D config whose
head sizes follow the cached targets.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from nvl_jax import sharding as sharding_lib
from nvl_jax.data import format as data_format
from nvl_jax.data import targets as targets_lib
from nvl_jax.data import volumes
from nvl_jax.models import vit3d
from nvl_jax.training.steps import Preprocessing

# The entry points' defaults: the demo config, and a run folder named after the config.
CONFIGS = Path(__file__).resolve().parents[2] / "configs"
DEFAULT_CONFIG = CONFIGS / "demo.py"


def default_workdir(config_path: str) -> Path:
    """``runs/<config file stem>`` for ``--config=configs/nsd.py[:args]``."""
    return Path("runs") / Path(config_path.split(":")[0]).stem


PREPARE_HINT = (
    "Prepare a dataset in nvl_jax's format (docs/data_format.md) there, or point --config.data.root at one. "
    "From the Natural Scenes Dataset (docs/nsd.md): python -m nvl_jax.data.prepare_nsd --nsd_root NSD "
    "--coco_annotations COCO --out {root}. For an in-silico NSD: python -m nvl_jax.data.synthetic --out {root}")


@dataclasses.dataclass(frozen=True)
class Experiment:
    config: ml_collections.ConfigDict
    dataset: data_format.PreparedDataset
    mesh: jax.sharding.Mesh
    prep: Preprocessing
    model_config: vit3d.ViT3DConfig

    @property
    def rules(self):
        return tuple(tuple(rule) for rule in self.config.sharding_rules)

    @property
    def batch_ndims(self) -> dict[str, int]:
        """Rank of every batch entry, for its sharding."""
        return {"betas": 2, "subject": 1, "stimulus": 1, "clip_target": 2,
                "vae_target": self.dataset.targets().vae_latents.ndim}


def _on_first_process(fn) -> None:
    """Runs ``fn`` on process 0 only, the others waiting: a shared filesystem is written once."""
    if jax.process_index() == 0:
        fn()
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(fn.__name__)


def prepare_dataset(config: ml_collections.ConfigDict) -> data_format.PreparedDataset:
    """Opens ``config.data.root``; creates it (and its targets) first when the config says how."""
    root = Path(config.data.root)
    if not (root / "dataset.json").exists():
        if not config.data.get("synthetic"):
            raise FileNotFoundError(f"{root}: no prepared dataset (dataset.json missing). "
                                    + PREPARE_HINT.format(root=root))

        def generate_in_silico_nsd():
            from nvl_jax.data import synthetic
            print(f"{root}: no dataset yet; generating in-silico NSD there (first use)")
            synthetic.generate(root, synthetic.SyntheticConfig(**config.data.synthetic.to_dict()))

        _on_first_process(generate_in_silico_nsd)
    dataset = data_format.PreparedDataset.open(root)
    if not dataset.has_targets():
        if not config.targets.random_init and not (config.targets.clip and config.targets.vae):
            raise FileNotFoundError(
                f"{root / 'targets'}: no cached targets. Compute them with: python -m nvl_jax.data.targets "
                f"--data {root} --clip openai/clip-vit-large-patch14 --vae stabilityai/sd-vae-ft-mse")

        def cache_targets():
            targets_lib.cache_targets(root, clip_name=config.targets.clip, vae_name=config.targets.vae,
                                      vae_subfolder=config.targets.vae_subfolder or None,
                                      image_size=config.targets.image_size, random_init=config.targets.random_init,
                                      seed=config.seed)

        _on_first_process(cache_targets)
        dataset = data_format.PreparedDataset.open(root)
    return dataset


def active_patches(dataset: data_format.PreparedDataset, common_grid, patch_size: int) -> np.ndarray:
    """``int32 [n_active, 3]``: patches touching any subject's resampled nsdgeneral; cached in ``common/``."""
    grid = "x".join(map(str, common_grid))
    path = dataset.root / "common" / f"active_patches_{grid}_p{patch_size}.npy"

    def compute_active_patches():
        union = volumes.resample_masks_union([s.nsdgeneral for s in dataset.subjects.values()], common_grid)
        path.parent.mkdir(exist_ok=True)
        np.save(path, volumes.active_patches(union, patch_size))

    if not path.exists():
        _on_first_process(compute_active_patches)
    return np.load(path)


def build(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None) -> Experiment:
    """``mesh`` defaults to one of ``config.mesh_shape`` over all devices."""
    dataset = prepare_dataset(config)
    common_grid, patch_size = tuple(config.data.common_grid), config.data.patch_size
    geometry = volumes.build_geometry([s.voxel_mask for s in dataset.subjects.values()], common_grid)
    active = active_patches(dataset, common_grid, patch_size)
    targets = dataset.targets()
    m = config.model
    model_config = vit3d.ViT3DConfig(
        patch_size=patch_size, patch_grid=volumes.patch_grid(common_grid, patch_size), width=m.width,
        depth=m.depth, num_heads=m.num_heads, mlp_ratio=m.mlp_ratio, head_hidden=m.head_hidden,
        clip_dim=targets.clip_image_embeds.shape[1], vae_latent_shape=tuple(targets.vae_latents.shape[1:]),
        compute_dtype=m.compute_dtype)
    mesh = mesh or sharding_lib.make_mesh(tuple(config.mesh_shape))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    prep = jax.device_put(Preprocessing(geometry, np.asarray(active, np.int32), patch_size), replicated)
    return Experiment(config, dataset, mesh, prep, model_config)
