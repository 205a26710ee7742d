"""The common grid: named by a reference subject, in the stored X, Y, Z order, left as it is."""

import jax
import numpy as np
import pytest

from nvl_jax.configs import nsd
from nvl_jax.data import synthetic, volumes
from nvl_jax.training import experiment

from test_training import tiny_config


def test_the_reference_subject_is_not_resampled(tiny_nsd):
    config = tiny_config(tiny_nsd)
    dataset = experiment.prepare_dataset(config)
    grid = experiment.resolve_common_grid(config, dataset)
    subject = dataset.subjects["subj01"]
    assert grid == subject.native_shape == subject.voxel_mask.shape
    geometry = volumes.build_geometry([subject.voxel_mask], grid)
    betas = dataset.betas("subj01", 0, np.arange(3))
    resampled = np.asarray(jax.jit(volumes.to_common_grid)(betas, np.zeros(3, np.int32), geometry))
    volume = np.zeros((3, *grid), np.float32)
    volume[:, subject.voxel_mask] = betas
    np.testing.assert_allclose(resampled, volume, atol=1e-6)


def test_an_unknown_reference_subject_is_named_and_an_explicit_grid_is_read(tiny_nsd):
    config = tiny_config(tiny_nsd)
    dataset = experiment.prepare_dataset(config)
    config.data.common_grid = "subj03"
    with pytest.raises(ValueError, match="common_grid = 'subj03': not a subject .* subj01, subj02, subj05, subj07"):
        experiment.resolve_common_grid(config, dataset)
    config.data.common_grid = "21, 26,20"
    assert experiment.resolve_common_grid(config, dataset) == (21, 26, 20)


def test_nsd_config_resolves_to_subj01s_grid_on_a_full_scale_dataset(tmp_path):
    root = tmp_path / "full_scale"
    synthetic.generate(root, synthetic.SyntheticConfig(scale=1.0, train_stimuli=4, test_stimuli=4, repeats=2,
                                                       sessions=1, image_size=32), progress=False)
    config = nsd.get_config()
    config.data.root = str(root)
    grid = experiment.resolve_common_grid(config, experiment.data_format.PreparedDataset.open(root))
    assert grid == (81, 104, 83)  # X, Y, Z as nibabel reads subj01; the paper's 83 x 104 x 81 is Z, Y, X
    patch_grid = volumes.patch_grid(grid, config.data.patch_size)
    assert patch_grid == (6, 8, 6)
    assert tuple(n * config.data.patch_size for n in patch_grid) == (84, 112, 84)
