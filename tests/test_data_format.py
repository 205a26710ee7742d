"""The prepared-dataset format: a written dataset reads back exactly, and every kind of damage is
reported by open() as a DatasetError that names the file and the field."""

from __future__ import annotations

import json
import pickle

import nibabel as nib
import numpy as np
import pytest

from nvl_jax.data import format as fmt

SHAPE = (6, 7, 5)
N_STIMULI = 12
AFFINE = np.array([[-2.0, 0, 0, 6], [0, 2.0, 0, -7], [0, 0, 2.0, -5], [0, 0, 0, 1]])


def _masks(seed: int):
    rng = np.random.default_rng(seed)
    nsdgeneral = rng.random(SHAPE) < 0.3
    voxel_mask = nsdgeneral | (rng.random(SHAPE) < 0.1)
    return nsdgeneral, voxel_mask


def _write(root, with_targets: bool = True) -> dict:
    """Two subjects: s1 with NSD-style int16 betas (scale 1/300), s2 with z-scored float16; returns what was
    written, to compare against what is read."""
    rng = np.random.default_rng(0)
    writer = fmt.DatasetWriter(root, "test", (8, 8, 3))
    images = rng.integers(0, 256, (N_STIMULI, 8, 8, 3), dtype=np.uint8)
    captions = [[f"stimulus {i}", f"image {i}"] for i in range(N_STIMULI)]
    writer.write_stimuli(images, captions, np.arange(N_STIMULI) * 7)
    written = {"images": images, "captions": captions, "betas": {}, "trials": {}}
    for name, dtype, scale, seed in (("s1", "int16", 1 / 300, 1), ("s2", "float16", 1.0, 2)):
        nsdgeneral, voxel_mask = _masks(seed)
        writer.write_subject(name, nsdgeneral, voxel_mask, AFFINE, ["session01", "session02"], dtype, scale, 1)
        n_voxels = int(voxel_mask.sum())
        stimulus = np.repeat(np.arange(N_STIMULI), 2)
        trials = fmt.Trials(session=np.repeat([0, 1], N_STIMULI).astype(np.int16),
                            row=np.tile(np.arange(N_STIMULI), 2).astype(np.int32),
                            stimulus=rng.permutation(stimulus).astype(np.int32),
                            repeat=np.zeros(2 * N_STIMULI, np.int8))
        for session in ("session01", "session02"):
            values = rng.normal(0, 1, (N_STIMULI, n_voxels))
            betas = (values * 300).astype(np.int16) if dtype == "int16" else values.astype(np.float16)
            writer.write_session(name, session, betas)
            written["betas"][name, session] = betas.astype(np.float32) * np.float32(scale)
        writer.write_trials(name, trials)
        written["trials"][name] = trials
    writer.write_split(range(3, N_STIMULI), range(3), "first three are test")
    if with_targets:
        fmt.write_targets(root, rng.normal(size=(N_STIMULI, 4)), rng.normal(size=(N_STIMULI, 2, 2, 4)),
                          {"clip": "random", "random_init": True})
    writer.finish(["s1", "s2"])
    return written


@pytest.fixture
def root(tmp_path):
    _write(tmp_path)
    return tmp_path


def test_round_trip(tmp_path):
    written = _write(tmp_path)
    dataset = fmt.PreparedDataset.open(tmp_path)
    assert list(dataset.subjects) == ["s1", "s2"] and dataset.n_stimuli == N_STIMULI
    np.testing.assert_array_equal(dataset.images(), written["images"])
    assert dataset.captions() == written["captions"]
    np.testing.assert_array_equal(dataset.split["test"], [0, 1, 2])
    for name, subject in dataset.subjects.items():
        nsdgeneral, voxel_mask = _masks({"s1": 1, "s2": 2}[name])
        np.testing.assert_array_equal(subject.nsdgeneral, nsdgeneral)
        np.testing.assert_array_equal(subject.voxel_mask, voxel_mask)
        np.testing.assert_allclose(subject.affine, AFFINE)
        assert subject.n_voxels == voxel_mask.sum() and subject.native_shape == SHAPE
        for field in ("session", "row", "stimulus", "repeat"):
            expected = getattr(written["trials"][name], field)
            np.testing.assert_array_equal(getattr(subject.trials, field), expected)
            assert getattr(subject.trials, field).dtype == fmt.TRIAL_DTYPES[field]
        rows = np.array([5, 0, 7])
        betas = dataset.betas(name, 1, rows)
        assert betas.dtype == np.float32 and betas.shape == (3, subject.n_voxels)
        np.testing.assert_array_equal(betas, written["betas"][name, "session02"][rows])
    targets = dataset.targets()
    assert targets.clip_image_embeds.shape == (N_STIMULI, 4) and targets.info["random_init"] is True
    assert not list(tmp_path.rglob(".partial-*"))


def test_repr_is_deterministic_and_pickles_without_the_arrays(root):
    first, second = fmt.PreparedDataset.open(root), fmt.PreparedDataset.open(root)
    assert repr(first) == repr(second) == f"PreparedDataset(root={str(root)!r}, subjects=['s1', 's2'], n_stimuli=12)"
    first.betas("s1", 0, np.arange(4))
    first.targets()
    restored = pickle.loads(pickle.dumps(first))
    assert restored._memmaps == {} and restored._targets is None
    np.testing.assert_array_equal(restored.betas("s1", 0, np.arange(4)), first.betas("s1", 0, np.arange(4)))


def test_unfinished_dataset_has_no_dataset_json(tmp_path):
    writer = fmt.DatasetWriter(tmp_path, "test", (8, 8, 3))
    writer.write_stimuli(np.zeros((2, 8, 8, 3), np.uint8), [["a"], ["b"]], [0, 1])
    with pytest.raises(fmt.DatasetError, match=r"^dataset\.json: missing"):
        fmt.PreparedDataset.open(tmp_path)


def test_finish_on_an_invalid_dataset_leaves_it_unfinished(tmp_path):
    _write(tmp_path)
    (tmp_path / "subjects" / "s2" / "trials.npz").unlink()
    with pytest.raises(fmt.DatasetError, match=r"subjects/s2/trials\.npz: missing"):
        fmt.DatasetWriter(tmp_path, "test", (8, 8, 3)).finish(["s1", "s2"])
    assert not (tmp_path / "dataset.json").exists()


def test_a_write_that_dies_leaves_no_file_under_the_final_name(root, monkeypatch):
    writer = fmt.DatasetWriter(root, "test", (8, 8, 3))
    path = root / "subjects" / "s2" / "betas" / "session01.npy"
    path.unlink()

    def dies_halfway(file, array):
        file.write(b"\x93NUMPY partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        writer.write_session("s2", "session01", np.zeros((N_STIMULI, int(_masks(2)[1].sum())), np.float16))
    assert not path.exists() and not writer.has_session("s2", "session01")
    assert not list(root.rglob(".partial-*"))


def test_missing_file(root):
    (root / "subjects" / "s2" / "trials.npz").unlink()
    with pytest.raises(fmt.DatasetError, match=r"subjects/s2/trials\.npz: missing"):
        fmt.PreparedDataset.open(root)


def test_missing_field(root):
    path = root / "subjects" / "s1" / "subject.json"
    info = json.loads(path.read_text())
    del info["n_voxels"]
    path.write_text(json.dumps(info))
    with pytest.raises(fmt.DatasetError, match=r"subjects/s1/subject\.json: missing field 'n_voxels'"):
        fmt.PreparedDataset.open(root)


def test_mask_shape_differs_from_subject_json(root):
    nib.save(nib.Nifti1Image(np.ones((6, 7, 4), np.int16), AFFINE), root / "subjects" / "s1" / "nsdgeneral.nii.gz")
    with pytest.raises(fmt.DatasetError, match=r"s1/nsdgeneral\.nii\.gz: shape \(6, 7, 4\) differs from subject\.json "
                                               r"native_shape \[6, 7, 5\]"):
        fmt.PreparedDataset.open(root)


def test_mask_affine_differs_from_subject_json(root):
    shifted = AFFINE.copy()
    shifted[0, 3] += 1.0
    mask = _masks(1)[1].astype(np.int16)
    nib.save(nib.Nifti1Image(mask, shifted), root / "subjects" / "s1" / "voxel_mask.nii.gz")
    with pytest.raises(fmt.DatasetError, match=r"s1/voxel_mask\.nii\.gz: affine .* differs from subject\.json affine"):
        fmt.PreparedDataset.open(root)


def test_voxel_count_differs_from_n_voxels(root):
    mask = _masks(2)[1]
    mask[np.unravel_index(np.flatnonzero(~mask.ravel())[0], SHAPE)] = True
    nib.save(nib.Nifti1Image(mask.astype(np.int16), AFFINE), root / "subjects" / "s2" / "voxel_mask.nii.gz")
    with pytest.raises(fmt.DatasetError, match=r"s2/voxel_mask\.nii\.gz: \d+ voxels > 0, subject\.json n_voxels"):
        fmt.PreparedDataset.open(root)


def test_betas_row_length_differs_from_n_voxels(root):
    path = root / "subjects" / "s2" / "betas" / "session01.npy"
    np.save(path, np.zeros((N_STIMULI, int(_masks(2)[1].sum()) + 1), np.float16))
    with pytest.raises(fmt.DatasetError, match=r"s2/betas/session01\.npy: .* \(subject\.json n_voxels"):
        fmt.PreparedDataset.open(root)


def test_betas_dtype_differs_from_subject_json(root):
    path = root / "subjects" / "s1" / "betas" / "session02.npy"
    np.save(path, np.load(path).astype(np.float32))
    with pytest.raises(fmt.DatasetError, match=r"s1/betas/session02\.npy: float32 .* betas_dtype"):
        fmt.PreparedDataset.open(root)


def test_betas_with_fewer_rows_than_the_trials_use(root):
    path = root / "subjects" / "s1" / "betas" / "session01.npy"
    np.save(path, np.load(path)[:-1])
    with pytest.raises(fmt.DatasetError, match=r"s1/betas/session01\.npy: 11 rows, but trials\.npz row points at "
                                               r"row 11"):
        fmt.PreparedDataset.open(root)


def test_truncated_betas(root):
    path = root / "subjects" / "s1" / "betas" / "session02.npy"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(fmt.DatasetError, match=r"s1/betas/session02\.npy: truncated"):
        fmt.PreparedDataset.open(root)


def test_nan_betas_name_the_first_bad_row(root):
    path = root / "subjects" / "s2" / "betas" / "session02.npy"
    betas = np.load(path)
    betas[[3, 8], 1] = np.nan
    np.save(path, betas)
    with pytest.raises(fmt.DatasetError, match=r"s2/betas/session02\.npy: NaN or inf in row 3"):
        fmt.PreparedDataset.open(root)
    fmt.PreparedDataset.open(root, check_values=False)


def test_trial_stimulus_out_of_range(root):
    path = root / "subjects" / "s1" / "trials.npz"
    trials = dict(np.load(path))
    trials["stimulus"][5] = N_STIMULI
    np.savez(path, **trials)
    with pytest.raises(fmt.DatasetError, match=r"s1/trials\.npz: stimulus 12 at trial 5 is outside \[0, 12\)"):
        fmt.PreparedDataset.open(root)


def test_trial_arrays_of_different_lengths(root):
    path = root / "subjects" / "s2" / "trials.npz"
    trials = dict(np.load(path))
    trials["repeat"] = trials["repeat"][:-1]
    np.savez(path, **trials)
    with pytest.raises(fmt.DatasetError, match=r"s2/trials\.npz: array lengths .* differ"):
        fmt.PreparedDataset.open(root)


def test_split_overlap(root):
    (root / "split.json").write_text(json.dumps({"train": [0, 4], "test": [0], "rule": "broken"}))
    with pytest.raises(fmt.DatasetError, match=r"split\.json: stimulus 0 is in both train and test"):
        fmt.PreparedDataset.open(root)


def test_targets_with_the_wrong_row_count(root):
    fmt.write_targets(root, np.zeros((N_STIMULI - 1, 4)), np.zeros((N_STIMULI - 1, 2, 2, 4)), {})
    with pytest.raises(fmt.DatasetError, match=r"targets/clip_image_embeds\.npy: .*rows: dataset\.json n_stimuli"):
        fmt.PreparedDataset.open(root)


def test_absent_targets(tmp_path):
    _write(tmp_path, with_targets=False)
    dataset = fmt.PreparedDataset.open(tmp_path)
    assert not dataset.has_targets()
    with pytest.raises(fmt.DatasetError, match=r"targets/targets\.json: missing"):
        dataset.targets()
