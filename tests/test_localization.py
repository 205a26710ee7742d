"""Concept localization: the exact transpose of the resampling, GradCAM continued from the penultimate
layer, a planted concept found at AUROC >= 0.95, NIfTI on the subject's grid, the true concept voxels
of the in-silico NSD, and both commands on a tiny trained run."""

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import optax
import pytest
from flax import nnx
from sklearn.metrics import roc_auc_score

from nvl_jax import evaluate_localization, localize
from nvl_jax.data import format as data_format, volumes
from nvl_jax.localization import adjoint, figures, gradcam, ground_truth, load_extractors
from nvl_jax.localization.metrics import auroc
from nvl_jax.models import vit3d
from nvl_jax.training import loop

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from test_training import tiny_config  # noqa: E402


def _random_masks(rng, grids):
    return [rng.random(grid) < 0.4 for grid in grids]


def test_back_projection_is_the_transpose_of_the_resampling():
    rng = np.random.default_rng(0)
    common, patch = (9, 11, 10), 4
    masks = _random_masks(rng, [(9, 11, 10), (7, 13, 12), (11, 8, 9)])  # identity, stretched and squeezed
    geometry = volumes.build_geometry(masks, common)
    active = volumes.active_patches(volumes.resample_masks_union(masks, common), patch)
    subject = jnp.asarray([0, 1, 2, 1], jnp.int32)
    x = jnp.asarray(rng.standard_normal((4, max(geometry.n_voxels))), jnp.float32)
    y = jnp.asarray(rng.standard_normal((4, len(active), patch**3)), jnp.float32)
    forward = volumes.betas_to_patches(x, subject, geometry, active, patch)
    backward = adjoint.patches_to_betas(y, subject, geometry, active, patch)
    # Voxels past a subject's own count are never read forward, so the transpose leaves them 0.
    for row, s in enumerate(subject.tolist()):
        assert not np.any(np.asarray(backward[row, geometry.n_voxels[s]:]))
    np.testing.assert_allclose(float(jnp.vdot(forward, y)), float(jnp.vdot(x, backward)), rtol=1e-5)
    # And it is the transpose JAX derives from the forward map.
    (transposed,) = jax.linear_transpose(lambda b: volumes.betas_to_patches(b, subject, geometry, active, patch), x)(y)
    np.testing.assert_allclose(np.asarray(backward), np.asarray(transposed), rtol=1e-5, atol=1e-6)


def test_auroc_equals_scikit_learn():
    rng = np.random.default_rng(1)
    labels = rng.random(500) < 0.3
    scores = np.round(rng.standard_normal(500) + labels, 1)  # ties included
    assert auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    with pytest.raises(ValueError, match="true and false"):
        auroc(scores, np.zeros(500, bool))


def _tiny_model(patch_grid, clip_dim=4):
    config = vit3d.ViT3DConfig(patch_size=4, patch_grid=patch_grid, width=32, depth=2, num_heads=2, clip_dim=clip_dim,
                               vae_latent_shape=(1, 1, 1), head_hidden=32)
    return vit3d.BrainEncoder(config, rngs=nnx.Rngs(0))


def test_continuing_from_the_penultimate_layer_is_the_model():
    model = _tiny_model((2, 3, 2))
    coords = jnp.asarray(np.argwhere(np.ones((2, 3, 2))), jnp.int32)
    patches = jax.random.normal(jax.random.key(0), (3, len(coords), 64))
    tokens = gradcam.penultimate_tokens(model, patches, coords)
    normalized = model.vit.blocks[-1].norm1(tokens)
    np.testing.assert_allclose(np.asarray(gradcam.clip_head_from_penultimate(model, tokens, normalized)),
                               np.asarray(model(patches, coords).clip_embedding), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def planted():
    """Concept "A" raises the voxels of one 4^3 cube and sets the first target dimension; a distractor drives
    another cube and the second dimension. Returns a ViT3D trained on it and the setting."""
    rng = np.random.default_rng(0)
    common, patch = (12, 12, 12), 4
    mask = np.ones(common, bool)
    geometry = volumes.build_geometry([mask], common)
    active = volumes.active_patches(mask, patch)
    truth, distractor = np.zeros(common, bool), np.zeros(common, bool)
    truth[4:8, 0:4, 8:12] = True
    distractor[8:12, 8:12, 0:4] = True
    n = 512
    concept, other = rng.random(n) < 0.5, rng.random(n) < 0.5
    betas = rng.standard_normal((n, mask.sum())).astype(np.float32)
    betas += 1.5 * concept[:, None] * truth[mask] + 1.5 * other[:, None] * distractor[mask]
    targets = np.stack([2.0 * concept - 1, 2.0 * other - 1, np.zeros(n), np.zeros(n)], 1).astype(np.float32)
    patches = volumes.betas_to_patches(jnp.asarray(betas), jnp.zeros(n, jnp.int32), geometry, active, patch)
    model = _tiny_model((3, 3, 3))
    optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)
    coords = jnp.asarray(active)

    @nnx.jit
    def step(model, optimizer, x, y):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x, coords).clip_embedding - y) ** 2))(model)
        optimizer.update(model, grads)
        return loss

    for i in range(250):
        rows = (np.arange(64) + 64 * i) % n
        loss = step(model, optimizer, patches[rows], jnp.asarray(targets[rows]))
    assert float(loss) < 0.05
    direction = targets[concept].mean(0) - targets[~concept].mean(0)  # the concept direction in target space
    return dict(model=model, geometry=geometry, active=active, patch=patch, mask=mask, truth=truth,
                distractor=distractor, showing=patches[:128][concept[:128]], coords=coords, direction=direction)


def test_a_planted_concept_is_found_in_its_cube(planted):
    p = planted
    relevance, score = gradcam.relevance_fn(p["model"], "token")(p["showing"], p["coords"],
                                                                 jnp.asarray(p["direction"][None]))
    assert float(score.mean()) > 0.6  # outputs are (±1, ±1, 0, 0), the direction (2, 0, 0, 0): cosine 0.71
    native = adjoint.normalize(adjoint.patch_relevance_to_voxels(np.asarray(relevance[:, 0]).mean(0), 0,
                                                                 p["geometry"], p["active"], p["patch"]))
    assert native.min() == 0 and native.max() == 1
    mask = p["mask"]
    assert auroc(native, p["truth"][mask]) >= 0.95
    assert native[p["truth"][mask]].mean() == 1.0 > native[p["distractor"][mask]].mean()  # the distractor after it


def test_the_raw_residual_stream_gradient_is_orthogonal_to_each_token():
    """Why GradCAM reads the LayerNormed tokens: downstream of a pre-LN block, grad . token = 0 per token."""
    model = _tiny_model((2, 3, 2))
    coords = jnp.asarray(np.argwhere(np.ones((2, 3, 2))), jnp.int32)
    patches = jax.random.normal(jax.random.key(1), (2, len(coords), 64))
    tokens = gradcam.penultimate_tokens(model, patches, coords)
    target = jnp.ones(4)
    gradient = jax.grad(lambda t: gradcam.cosine_score(
        gradcam.clip_head_from_penultimate(model, t, model.vit.blocks[-1].norm1(t)), target).sum())(tokens)
    per_token = jnp.abs(jnp.sum(gradient * tokens, axis=-1))[:, 1:]
    assert float(per_token.max()) < 1e-4 * float(jnp.abs(gradient).max() * jnp.abs(tokens).max())


def test_nifti_carries_the_subjects_grid_and_affine(tiny_nsd, tmp_path):
    dataset = data_format.PreparedDataset.open(tiny_nsd)
    subject = dataset.subjects["subj02"]
    values = np.linspace(0, 1, subject.n_voxels, dtype=np.float32)
    path = figures.write_nifti(values, subject, tmp_path / "map.nii.gz")
    image = nib.load(path)
    assert image.shape == subject.native_shape
    np.testing.assert_allclose(image.affine, subject.affine, atol=1e-5)
    np.testing.assert_allclose(np.asarray(image.dataobj)[subject.voxel_mask], values)
    assert not np.asarray(image.dataobj)[~subject.voxel_mask].any()
    with pytest.raises(ValueError, match="one value per stored voxel"):
        figures.write_nifti(values[:-1], subject, tmp_path / "bad.nii.gz")


def test_the_true_concept_voxels_include_the_colours_early_visual_path(tiny_nsd):
    """Colours reach early visual cortex through the opponent channels, where the concept maps are near 0."""
    dataset = data_format.PreparedDataset.open(tiny_nsd)
    for name, subject in dataset.subjects.items():
        truth = ground_truth.true_concept_voxels(dataset, name)
        assert list(truth)[:2] == ["circle", "square"] and len(truth) == 11
        maps = np.asarray(nib.load(tiny_nsd / "ground_truth" / f"{name}_concept_maps.nii.gz").dataobj)
        maps = np.abs(maps[subject.voxel_mask])
        weak = maps.max(axis=1) < np.quantile(maps.max(axis=1), 0.25)  # voxels the concept part barely drives
        colours = np.stack([truth[c] for c in ("red", "green", "blue", "yellow", "purple", "orange")], 1)
        shapes = np.stack([truth[c] for c in ("circle", "square", "triangle", "cross", "star")], 1)
        # Where the concept part is weakest, a colour marks a voxel about 4x as often as a shape (0.46 vs 0.11).
        assert colours[weak].mean() > 2.5 * shapes[weak].mean()


@pytest.fixture(scope="module")
def tiny_run(tiny_nsd, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("localize") / "run"
    loop.train(tiny_config(tiny_nsd), workdir)
    return workdir


def test_localize_writes_nifti_and_pngs(tiny_nsd, tiny_run, tmp_path):
    out = tmp_path / "maps"
    localize.main(["--workdir", str(tiny_run), "--subject", "subj05", "--concept", "red", "--stimuli", "test",
                   "--out", str(out)])
    names = sorted(p.name for p in out.iterdir())
    assert names == ["subj05_red.nii.gz", "subj05_red_glass_brain.png", "subj05_red_p7.nii.gz",
                     "subj05_red_slices.png"]
    dataset = data_format.PreparedDataset.open(tiny_nsd)
    image = nib.load(out / "subj05_red.nii.gz")
    subject = dataset.subjects["subj05"]
    assert image.shape == subject.native_shape and np.allclose(image.affine, subject.affine, atol=1e-5)
    values = np.asarray(image.dataobj)[subject.voxel_mask]
    assert values.min() == 0 and values.max() == pytest.approx(1)


def test_evaluate_localization_writes_the_eval_file(tiny_run, tmp_path):
    evaluate_localization.main(["--workdir", str(tiny_run), "--out", str(tmp_path)])
    results = json.loads((tmp_path / "localization_eval.json").read_text())
    assert set(results) == {"ensemble", "p7", "wrong_concept", "ablation"}
    assert 0 <= results["ensemble"]["mean_auroc"] <= 1 and 0 <= results["wrong_concept"]["mean_auroc"] <= 1
    assert set(results["ensemble"]["per_subject"]) == {"subj01", "subj02", "subj05", "subj07"}
    assert {"top_1pct", "top_5pct", "top_10pct"} <= set(results["ablation"])


def test_an_ensemble_refuses_runs_of_one_patch_size(tiny_run):
    with pytest.raises(ValueError, match="share a patch size"):
        load_extractors(f"{tiny_run},{tiny_run}")
    with pytest.raises(ValueError, match="1 to 3 runs"):
        load_extractors([tiny_run] * 4)


@pytest.mark.parametrize("module", ["nvl_jax.localize", "nvl_jax.evaluate_localization"])
def test_help(module):
    result = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, check=True)
    assert "--workdir" in result.stdout and "--out" in result.stdout
