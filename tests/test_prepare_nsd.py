"""python -m nvl_jax.data.prepare_nsd on a miniature NSD (tests/nsd_tree.py): the prepared betas are the
hand-computed training-trial z-scores, the split, stimuli, trials and captions follow the design, every bad
input names its file, a killed run resumes to the same bytes, and the result trains."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import pathlib
import re
import shutil

import numpy as np
import pytest
import scipy.ndimage

import nsd_tree
from nvl_jax.data import format as fmt
from nvl_jax.data import prepare_nsd, targets
from nvl_jax.data.nsd import NSDError, PrepareOptions, layout, prepare, sessions, verify
from nvl_jax.training import experiment, loop

SUBJECTS = (1, 2)
TINY_CONFIG = pathlib.Path(__file__).with_name("configs") / "tiny.py"


def _options(tree, **overrides) -> PrepareOptions:
    return PrepareOptions(tree.root, tree.coco, subjects=SUBJECTS, sessions=nsd_tree.SESSIONS,
                          trials_per_session=nsd_tree.TRIALS_PER_SESSION, **overrides)


def _files(folder) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return nsd_tree.build(tmp_path_factory.mktemp("nsd_tree"))


@pytest.fixture(scope="module")
def prepared(tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "nsd"
    prepare(_options(tree), out, progress=False)
    return out


@pytest.fixture
def copy(tree, tmp_path):
    """A private copy of the miniature NSD, to damage."""
    shutil.copytree(tree.root, tmp_path / "nsd")
    shutil.copytree(tree.coco, tmp_path / "coco")
    return dataclasses.replace(tree, root=tmp_path / "nsd", coco=tmp_path / "coco")


def _stored_betas(dataset, name) -> np.ndarray:
    """float32 ``[n_trials, n_voxels]`` in trial order."""
    t = dataset.subjects[name].trials
    return np.concatenate([dataset.betas(name, k, t.row[t.session == k]) for k in range(nsd_tree.SESSIONS)])


def test_split_stimuli_trials_and_captions_follow_the_design(tree, prepared):
    dataset = fmt.PreparedDataset.open(prepared)
    seen = {s: set(tree.presented[s].tolist()) for s in SUBJECTS}
    assert set(nsd_tree.SHARED) & seen[1] & seen[2] == set(nsd_tree.SEEN_SHARED_BY_ALL)
    source_ids = np.load(prepared / "stimuli" / "source_ids.npy")
    np.testing.assert_array_equal(source_ids, sorted(seen[1] | seen[2]))
    assert source_ids.dtype == np.int64 and 24 not in source_ids  # shared, but shown to nobody
    np.testing.assert_array_equal(source_ids[dataset.split["test"]], nsd_tree.SEEN_SHARED_BY_ALL)
    assert 23 in source_ids[dataset.split["train"]]  # shared, but subject 2 never saw it
    assert len(dataset.split["train"]) + len(dataset.split["test"]) == dataset.n_stimuli == len(source_ids)
    np.testing.assert_array_equal(dataset.images(), tree.images[source_ids])
    assert dataset.captions() == [tree.captions[i] for i in source_ids]
    assert dataset.captions()[0] == ["image 0 caption 0."]
    for subject in SUBJECTS:
        t = dataset.subjects[layout.subject_name(subject)].trials
        np.testing.assert_array_equal(source_ids[t.stimulus], tree.presented[subject])
        trial = np.arange(nsd_tree.SESSIONS * nsd_tree.TRIALS_PER_SESSION)
        np.testing.assert_array_equal(t.session, trial // nsd_tree.TRIALS_PER_SESSION)
        np.testing.assert_array_equal(t.row, trial % nsd_tree.TRIALS_PER_SESSION)
        shown = list(tree.presented[subject])
        np.testing.assert_array_equal(t.repeat, [shown[:i].count(shown[i]) for i in range(len(shown))])
        assert t.repeat.max() == 2


def _expected_zscores(tree, subject, voxel_mask) -> np.ndarray:
    """float64 ``[n_trials, n_voxels]``: per session, betas / 300 z-scored with the training trials' mean and std."""
    values = tree.betas[subject][:, voxel_mask] / 300.0  # trials x voxels, C order of the X, Y, Z mask
    train = ~tree.test_trials(subject)
    expected = np.empty_like(values)
    for k in range(nsd_tree.SESSIONS):
        rows = slice(k * nsd_tree.TRIALS_PER_SESSION, (k + 1) * nsd_tree.TRIALS_PER_SESSION)
        session, session_train = values[rows], values[rows][train[rows]]
        std = session_train.std(0)
        expected[rows] = (session - session_train.mean(0)) / np.where(std == 0, 1.0, std)
    return expected


@pytest.mark.parametrize("betas_format, dilation", [("nifti", 0), ("hdf5", 0), ("nifti", 1)])
def test_betas_are_zscores_over_the_training_trials(tree, tmp_path, betas_format, dilation):
    prepare(_options(tree, betas_format=betas_format, dilation=dilation), tmp_path / "out", progress=False)
    dataset = fmt.PreparedDataset.open(tmp_path / "out")
    for subject in SUBJECTS:
        name = layout.subject_name(subject)
        info = dataset.subjects[name]
        nsdgeneral = tree.nsdgeneral[subject] > 0  # -1 (outside the brain) is not in the ROI
        expected_mask = scipy.ndimage.binary_dilation(nsdgeneral, iterations=dilation) if dilation else nsdgeneral
        np.testing.assert_array_equal(info.nsdgeneral, nsdgeneral)
        np.testing.assert_array_equal(info.voxel_mask, expected_mask)
        np.testing.assert_allclose(info.affine, tree.affine[subject], atol=1e-5)
        assert info.betas_scale == 1.0 and info.mask_dilation == dilation
        assert np.load(tmp_path / "out" / "subjects" / name / "betas" / "session01.npy").dtype == np.float16
        stored = _stored_betas(dataset, name)
        np.testing.assert_allclose(stored, _expected_zscores(tree, subject, expected_mask), rtol=1e-3, atol=1e-3)
        # The voxel whose training trials never vary: std 1, so its test trials keep their distance in % change.
        column = np.ravel_multi_index(tree.constant_voxel[subject], expected_mask.shape)
        column = np.searchsorted(np.flatnonzero(expected_mask.ravel()), column)
        test = tree.test_trials(subject)
        assert (stored[~test, column] == 0).all()
        x, y, z = tree.constant_voxel[subject]
        raw = tree.betas[subject][test, x, y, z]
        np.testing.assert_allclose(stored[test, column], (raw - nsd_tree.CONSTANT_VALUE) / 300, rtol=1e-3)


def test_test_trials_do_not_change_the_training_statistics(tree, copy, prepared, tmp_path):
    session_rows = slice(nsd_tree.TRIALS_PER_SESSION, 2 * nsd_tree.TRIALS_PER_SESSION)  # session 2
    betas = tree.betas[1][session_rows].copy()
    test = tree.test_trials(1)[session_rows]
    assert test.any() and (~test).any()
    betas[test] = -betas[test] // 2 + 777
    nsd_tree.write_session(copy, 1, 2, betas, "nifti")
    prepare(_options(copy), tmp_path / "out", progress=False)
    original = np.load(prepared / "subjects" / "subj01" / "betas" / "session02.npy")
    changed = np.load(tmp_path / "out" / "subjects" / "subj01" / "betas" / "session02.npy")
    np.testing.assert_array_equal(changed[~test], original[~test])
    assert not np.allclose(changed[test], original[test], atol=0.1)


def test_summary_checksums_and_verify(tree, prepared, tmp_path, capsys):
    summary = json.loads((prepared / "summary.json").read_text())
    assert (summary["subjects"], summary["sessions"], summary["format"]) == ([1, 2], 3, "nifti")
    rule = json.loads((prepared / "split.json").read_text())["rule"]
    assert summary["split"] == {"train": 18, "test": 4, "rule": rule}
    assert "every subject (subj01, subj02) saw in sessions 1-3" in rule
    assert summary["n_stimuli"] == 22 and summary["image_shape"] == list(nsd_tree.IMAGE_SHAPE)
    for subject, nsd_count in ((1, 15724), (2, 14278)):
        entry = summary["per_subject"][layout.subject_name(subject)]
        test = tree.test_trials(subject)
        assert entry["trials"] == 36 and entry["sessions"] == 3
        assert (entry["train_trials"], entry["test_trials"]) == ((~test).sum(), test.sum())
        assert entry["stimuli"] == len(set(tree.presented[subject].tolist())) and entry["test_stimuli"] == 4
        assert entry["nsdgeneral_voxels"] == entry["stored_voxels"] == (tree.nsdgeneral[subject] > 0).sum()
        assert entry["nsdgeneral_voxels_in_nsd"] == nsd_count
        folder = prepared / "subjects" / layout.subject_name(subject)
        assert entry["bytes"] == sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    written = _files(prepared)
    assert summary["total_bytes"] == sum(len(b) for f, b in written.items()
                                         if f not in ("summary.json", "checksums.json", "dataset.json"))

    checksums = json.loads((prepared / "checksums.json").read_text())
    assert checksums["algorithm"] == "sha256"
    assert set(checksums["files"]) == set(written) - {"checksums.json", "dataset.json"}
    assert all(hashlib.sha256(written[f]).hexdigest() == digest for f, digest in checksums["files"].items())

    ok, report = verify(prepared, progress=False)
    assert ok and report.endswith("OK") and "20 of 20 files match" in report

    damaged = tmp_path / "damaged"
    shutil.copytree(prepared, damaged)
    betas = damaged / "subjects" / "subj02" / "betas" / "session03.npy"
    data = bytearray(betas.read_bytes())
    data[-2:] = np.float16(np.nan).tobytes()  # the last voxel of the last trial becomes NaN
    betas.write_bytes(bytes(data))
    ok, report = verify(damaged, progress=False)
    assert not ok and "FAILED: 2 problems" in report
    assert "subjects/subj02/betas/session03.npy: NaN or inf in row 11" in report
    assert "subjects/subj02/betas/session03.npy: sha256" in report

    prepare_nsd.main(["--out", str(prepared), "--verify", "--quiet"])
    assert capsys.readouterr().out.rstrip().endswith("OK")
    with pytest.raises(SystemExit) as exit_code:
        prepare_nsd.main(["--out", str(damaged), "--verify", "--quiet"])
    assert exit_code.value.code == 1 and "FAILED" in capsys.readouterr().out


def _rewrite_session(grid=None, n_trials=None, dtype=None, betas_format="nifti"):
    """Replaces subject 2's session 2 with one of another grid, trial count or dtype."""
    def damage(tree):
        rng = np.random.default_rng(1)
        shape = (n_trials or nsd_tree.TRIALS_PER_SESSION, *(grid or nsd_tree.GRIDS[2]))
        betas = rng.normal(0, 300, shape).astype(dtype or np.int16)
        if dtype == np.float32:
            betas[0, 0, 0, 0] = np.nan
        return nsd_tree.write_session(tree, 2, 2, betas, betas_format)
    return damage


def _truncate(tree):
    path = tree.session_path(1, 2)
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
    return path


def _garble_hdf5(tree):
    path = tree.session_path(1, 2, "hdf5")
    path.write_bytes(b"not an HDF5 file" * 100)
    return path


def _delete(where):
    def damage(tree):
        path = where(tree)
        path.unlink()
        return path
    return damage


def _float16_overflow(tree):
    """A voxel whose training trials are 0 but one 1, and a test trial at 32000: |z| > 65504."""
    betas = tree.betas[1][:nsd_tree.TRIALS_PER_SESSION].copy()
    test = tree.test_trials(1)[:nsd_tree.TRIALS_PER_SESSION]
    x, y, z = np.argwhere(tree.nsdgeneral[1] > 0)[-1]
    betas[:, x, y, z] = 0
    betas[np.flatnonzero(~test)[0], x, y, z] = 1
    betas[np.flatnonzero(test)[0], x, y, z] = 32000
    return nsd_tree.write_session(tree, 1, 1, betas, "nifti")


def _flip_shared_flag(tree):
    path = layout.NSDLayout(tree.root).stim_info
    lines = path.read_text().splitlines()
    row = next(i for i, line in enumerate(lines) if line.startswith("30,"))
    lines[row] = lines[row].replace("False", "True")
    path.write_text("\n".join(lines) + "\n")
    return path


BAD_INPUTS = {
    "missing session": (_delete(lambda t: t.session_path(2, 3)), "nifti", ["missing", "session 3"]),
    "truncated nifti": (_truncate, "nifti", ["not a readable NIfTI file"]),
    "garbled hdf5": (_garble_hdf5, "hdf5", ["not a readable HDF5 file"]),
    "missing mask": (_delete(lambda t: layout.NSDLayout(t.root).nsdgeneral(2)), "nifti", ["missing", "nsdgeneral"]),
    "grid": (_rewrite_session(grid=(11, 12, 9)), "nifti", ["grid (11, 12, 9)", "differs", "grid (11, 12, 10)"]),
    "grid, hdf5": (_rewrite_session(grid=(11, 12, 9), betas_format="hdf5"), "hdf5",
                   ["grid (11, 12, 9)", "trials x Z x Y x X", "grid (11, 12, 10)"]),
    "trial count": (_rewrite_session(n_trials=11), "nifti", ["11 trials, expected 12"]),
    "dtype": (_rewrite_session(dtype=np.int32), "nifti", ["dtype int32, expected int16"]),
    "float with NaN, hdf5": (_rewrite_session(dtype=np.float32, betas_format="hdf5"), "hdf5",
                             ["dtype float32, expected int16"]),
    "float16 overflow": (_float16_overflow, "nifti", ["not finite in float16", "raw 32000"]),
    "missing expdesign": (_delete(lambda t: layout.NSDLayout(t.root).expdesign), "nifti", ["missing"]),
    "missing stim info": (_delete(lambda t: layout.NSDLayout(t.root).stim_info), "nifti", ["missing"]),
    "missing stimuli": (_delete(lambda t: layout.NSDLayout(t.root).stimuli), "nifti", ["missing"]),
    "missing captions": (_delete(lambda t: t.coco / "annotations" / "captions_val2017.json"), "nifti", ["missing"]),
    "shared1000 disagrees with sharedix": (_flip_shared_flag, "nifti", ["shared1000 flags 7", "sharedix lists 6",
                                                                        "73k id 30"]),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_each_bad_input_fails_naming_the_file(copy, tmp_path, case):
    damage, betas_format, expected = BAD_INPUTS[case]
    path = damage(copy)
    with pytest.raises(NSDError) as error:
        prepare(_options(copy, betas_format=betas_format), tmp_path / "out", progress=False)
    message = str(error.value)
    assert str(path) in message and all(part in message for part in expected), message
    assert not (tmp_path / "out" / "dataset.json").exists()


def test_cli_prints_the_error_and_exits_nonzero(copy, tmp_path):
    path = _rewrite_session(n_trials=11)(copy)
    with pytest.raises(SystemExit) as exit_code:
        prepare_nsd.main(["--nsd_root", str(copy.root), "--coco_annotations", str(copy.coco), "--subjects", "1,2",
                          "--sessions", "3", "--trials_per_session", "12", "--out", str(tmp_path / "out"), "--quiet"])
    assert exit_code.value.code == f"prepare_nsd: error: {path}: 11 trials, expected 12 (--trials_per_session)"


def test_killed_run_resumes_to_the_same_bytes_and_workers_do_not_matter(tree, prepared, tmp_path, monkeypatch):
    prepare_session, calls = sessions.prepare_session, []

    def killed_after_the_first_session(job):
        if calls:
            raise KeyboardInterrupt("killed")
        calls.append(job.session)
        prepare_session(job)

    monkeypatch.setattr(sessions, "prepare_session", killed_after_the_first_session)
    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        prepare(_options(tree), out, progress=False)
    assert not (out / "dataset.json").exists() and (out / "subjects/subj01/betas/session01.npy").is_file()
    assert not (out / "subjects/subj01/betas/session02.npy").exists()
    images_written = (out / "stimuli" / "images.npy").stat().st_mtime_ns
    # What a SIGKILL in the middle of writing session02 leaves behind: a half file under a temporary name.
    (out / "subjects/subj01/betas/.partial-session02.npy").write_bytes(b"\x93NUMPY half a file")

    resumed = []
    monkeypatch.setattr(sessions, "prepare_session", lambda job: (resumed.append(job.session), prepare_session(job)))
    prepare(_options(tree), out, progress=False)
    assert len(resumed) == 2 * nsd_tree.SESSIONS - 1  # the finished session is kept
    assert (out / "stimuli" / "images.npy").stat().st_mtime_ns == images_written  # and so are the stimuli
    assert _files(out) == _files(prepared)

    finished = (out / "dataset.json").stat().st_mtime_ns
    resumed.clear()
    prepare(_options(tree), out, progress=False)  # finished: nothing is redone
    assert not resumed and (out / "dataset.json").stat().st_mtime_ns == finished

    monkeypatch.undo()  # worker processes need the real, importable function
    prepare(_options(tree), tmp_path / "two_workers", workers=2, progress=False)
    assert _files(tmp_path / "two_workers") == _files(prepared)


def test_refuses_a_folder_of_other_arguments_or_of_something_else(tree, prepared, tmp_path):
    shutil.copytree(prepared, tmp_path / "other")
    with pytest.raises(NSDError, match=r"prepare.json: this folder was prepared with --dilation 0, not --dilation 1"):
        prepare(_options(tree, dilation=1), tmp_path / "other", progress=False)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(NSDError, match="not empty and holds no prepare.json"):
        prepare(_options(tree), tmp_path / "foreign", progress=False)


def test_captions_are_found_with_or_without_the_annotations_folder(tmp_path):
    (tmp_path / "captions_val2017.json").write_text("{}")
    assert layout.coco_captions(tmp_path, "val2017") == tmp_path / "captions_val2017.json"
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "captions_val2017.json").write_text("{}")
    assert layout.coco_captions(tmp_path, "val2017") == tmp_path / "annotations" / "captions_val2017.json"
    with pytest.raises(NSDError, match="captions_train2017.json: missing"):
        layout.coco_captions(tmp_path, "train2017")


def test_missing_dataset_hint_names_the_nsd_preparer():
    assert "python -m nvl_jax.data.prepare_nsd" in experiment.PREPARE_HINT
    assert "docs/nsd.md" in experiment.PREPARE_HINT


def test_two_training_steps_read_the_prepared_dataset(prepared, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(prepared, root)
    targets.cache_targets(root, image_size=16, batch_size=32, random_init=True)
    spec = importlib.util.spec_from_file_location("tiny_config", TINY_CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(f"root={root}")
    config.data.common_grid = "11,12,10"
    config.data.patch_size = 6
    config.total_steps = 2
    results = loop.train(config, tmp_path / "run")
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2] and all(np.isfinite(line["loss"]) for line in lines)
    assert results["multi_trial"]["n_test"] == 4 and len(results["single_trial"]["per_subject"]) == 2


def test_download_commands_in_the_docs_fetch_the_files_the_preparer_reads():
    docs = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "nsd.md").read_text()
    betas = layout.BETAS.replace("{subject}", "subj$s").replace("{session:02d}", "$n").replace("{suffix}", ".nii.gz")
    for path in (layout.EXPDESIGN, layout.STIM_INFO, layout.STIMULI, layout.NSDGENERAL.format(subject="subj$s"), betas):
        assert re.search(rf"get {re.escape(path)}\s", docs), path
