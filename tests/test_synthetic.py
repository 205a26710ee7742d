"""The in-silico NSD: deterministic, a valid prepared dataset, NSD-like anatomy per subject, captions
true to the scene graphs, NSD's split rule, and betas that carry the encoding model's signal."""

from __future__ import annotations

import hashlib
import json
import re

import nibabel as nib
import numpy as np
import pytest

from nvl_jax.data.format import PreparedDataset
from nvl_jax.data.synthetic import SyntheticConfig, anatomy, generate, scenes
from nvl_jax.data.synthetic.__main__ import main

TINY = SyntheticConfig(scale=0.25, subjects=("subj01", "subj02", "subj05"), train_stimuli=40, test_stimuli=30,
                       sessions=2, image_size=32)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("insilico"), TINY, progress=False)


@pytest.fixture(scope="module")
def dataset(root):
    return PreparedDataset.open(root)


def _folder_hash(folder) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _trial_betas(dataset, name) -> np.ndarray:
    """``[n_trials, n_voxels]`` in trial order."""
    subject = dataset.subjects[name]
    t = subject.trials
    betas = np.empty((len(t.row), subject.n_voxels), np.float32)
    for session in range(len(subject.sessions)):
        here = t.session == session
        betas[here] = dataset.betas(name, session, t.row[here])
    return betas


def _columnwise_r(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a - a.mean(0), b - b.mean(0)
    return (a * b).sum(0) / np.sqrt((a**2).sum(0) * (b**2).sum(0))


def test_same_seed_writes_identical_files(root, tmp_path):
    assert _folder_hash(generate(tmp_path / "again", TINY, progress=False)) == _folder_hash(root)
    other_seed = SyntheticConfig(**{**TINY.__dict__, "seed": 1})
    assert _folder_hash(generate(tmp_path / "other", other_seed, progress=False)) != _folder_hash(root)


def test_output_is_a_valid_prepared_dataset(dataset):
    assert list(dataset.subjects) == list(TINY.subjects)
    assert dataset.n_stimuli == TINY.test_stimuli + len(TINY.subjects) * TINY.train_stimuli
    assert dataset.images().shape == (dataset.n_stimuli, 32, 32, 3)
    for subject in dataset.subjects.values():
        assert subject.sessions == ("session01", "session02") and subject.betas_scale == 1.0
        assert len(subject.trials.row) == (TINY.train_stimuli + TINY.test_stimuli) * TINY.repeats


def test_grids_and_masks_differ_between_subjects_and_match_subject_json(root, dataset):
    masks = {}
    for name, subject in dataset.subjects.items():
        info = json.loads((root / "subjects" / name / "subject.json").read_text())
        assert subject.native_shape == tuple(info["native_shape"]) == anatomy.grid_shape(name, TINY.scale)
        np.testing.assert_allclose(np.abs(np.diag(subject.affine)[:3]), 1.8 / TINY.scale)
        image = nib.load(root / "subjects" / name / "nsdgeneral.nii.gz")
        np.testing.assert_allclose(image.affine, info["affine"], atol=1e-5)
        assert subject.nsdgeneral.sum() > 50 and subject.n_voxels == subject.voxel_mask.sum()
        masks[name] = subject.nsdgeneral
    # subj01 and subj02 share a grid at this scale; their head positions still differ.
    assert masks["subj01"].shape == masks["subj02"].shape
    assert (masks["subj01"] != masks["subj02"]).sum() > 0.2 * masks["subj01"].sum()
    assert masks["subj05"].shape != masks["subj01"].shape


def test_nsdgeneral_at_full_scale_has_nsd_voxel_counts():
    for k, name in enumerate(("subj01", "subj07")):
        count = anatomy.build_anatomy(name, 1.0, 0, np.random.default_rng(k)).nsdgeneral.sum()
        assert 12_000 <= count <= 17_000, (name, count)


def test_images_and_captions_agree_with_scene_graphs(root, dataset):
    graphs = json.loads((root / "stimuli" / "scenes.json").read_text())
    images, captions = dataset.images(), dataset.captions()
    named = re.compile(rf"\b({'|'.join(scenes.COLOURS)}) ({'|'.join(scenes.SHAPES)})\b")
    for graph, image, texts in zip(graphs, images, captions):
        objects = {(o["colour"], o["shape"]): o for o in graph["objects"]}
        assert len(texts) == 5
        for text in texts:
            assert sorted(named.findall(text)) == sorted(objects), (text, graph)
        for obj in graph["objects"]:
            x, y = scenes.object_centre(obj, 32)
            assert tuple(image[int(y), int(x)]) == scenes.COLOURS[obj["colour"]]
            assert f"{obj['colour']} {obj['shape']} {scenes.CELL_NAMES[tuple(obj['cell'])]}" in texts[2]
        chain = [named.findall(part) for part in re.split(r" (?:left of|right of|above|below) ", texts[1])]
        relations = re.findall(r" (left of|right of|above|below) ", texts[1])
        for (a,), rel, (b,) in zip(chain, relations, chain[1:]):
            (row_a, col_a), (row_b, col_b) = objects[a]["cell"], objects[b]["cell"]
            holds = {"left of": col_a < col_b, "right of": col_a > col_b,
                     "above": col_a == col_b and row_a < row_b, "below": col_a == col_b and row_a > row_b}
            assert holds[rel], (texts[1], graph)
        assert texts[3].startswith(scenes.COUNT_WORDS[len(objects)])
        assert texts[4].endswith(" on a gray background")
        # Objects never reach the corners, and they cover less than half of the uniform grey.
        assert (image[[0, 0, -1, -1], [0, -1, 0, -1]] == scenes.BACKGROUND).all()
        assert np.all(image == scenes.BACKGROUND, axis=-1).mean() > 0.5


def test_split_tests_on_the_shared_stimuli(dataset):
    test, train = set(dataset.split["test"].tolist()), set(dataset.split["train"].tolist())
    assert test == set(range(TINY.test_stimuli)) and not test & train
    assert test | train == set(range(dataset.n_stimuli))
    own = {}
    for name, subject in dataset.subjects.items():
        t = subject.trials
        counts = np.bincount(t.stimulus, minlength=dataset.n_stimuli)
        assert set(np.flatnonzero(counts)) >= test
        assert set(np.unique(counts)) == {0, TINY.repeats}
        for stimulus in np.flatnonzero(counts)[:10]:
            assert sorted(t.repeat[t.stimulus == stimulus]) == list(range(TINY.repeats))
        own[name] = set(np.flatnonzero(counts)) - test
        assert len(own[name]) == TINY.train_stimuli and own[name] <= train
    assert not own["subj01"] & own["subj02"] and not own["subj02"] & own["subj05"]


def test_betas_are_zscored_per_session_with_training_statistics(dataset):
    for name, subject in dataset.subjects.items():
        betas, t = _trial_betas(dataset, name), subject.trials
        for session in range(len(subject.sessions)):
            train = betas[(t.session == session) & np.isin(t.stimulus, dataset.split["train"])]
            np.testing.assert_allclose(train.mean(0), 0, atol=2e-3)
            np.testing.assert_allclose(train.std(0), 1, atol=2e-3)


def test_repeats_of_a_stimulus_correlate_more_than_different_stimuli(dataset):
    for name, subject in dataset.subjects.items():
        betas, t = _trial_betas(dataset, name), subject.trials
        first, second = (betas[np.flatnonzero(t.repeat == r)[np.argsort(t.stimulus[t.repeat == r])]]
                         for r in (0, 1))
        same = _columnwise_r(first.T, second.T).mean()  # pattern correlation over voxels, per stimulus
        different = _columnwise_r(first.T, np.roll(second, 1, axis=0).T).mean()
        # snr 0.4 predicts about 0.4**2 / (1 + 0.4**2) = 0.14 for the same stimulus, 0 for different ones.
        assert same > 0.07 and abs(different) < 0.03, (name, same, different)


def test_concept_voxels_follow_the_ground_truth_maps(root, dataset):
    concepts = json.loads((root / "ground_truth" / "concepts.json").read_text())["concepts"]
    assert concepts == list(scenes.CONCEPTS)
    presence = scenes.concept_presence(json.loads((root / "stimuli" / "scenes.json").read_text()))
    for name, subject in dataset.subjects.items():
        maps_image = nib.load(root / "ground_truth" / f"{name}_concept_maps.nii.gz")
        assert maps_image.shape == (*subject.native_shape, len(concepts))
        maps = np.asarray(maps_image.dataobj)[subject.voxel_mask]
        betas, t = _trial_betas(dataset, name), subject.trials
        stimuli = np.unique(t.stimulus)
        mean = np.stack([betas[t.stimulus == s].mean(0) for s in stimuli])
        strength = np.linalg.norm(maps, axis=1)
        concept_voxels = strength >= np.quantile(strength, 0.75)
        r = _columnwise_r(mean, presence[stimuli] @ maps.T)[concept_voxels]
        shuffled = maps[np.random.default_rng(0).permutation(len(maps))]
        r_shuffled = _columnwise_r(mean, presence[stimuli] @ shuffled.T)[concept_voxels]
        assert r.mean() > 0.35 and abs(r_shuffled.mean()) < 0.15, (name, r.mean(), r_shuffled.mean())


def test_cli_writes_and_summarizes(tmp_path, capsys):
    out = tmp_path / "cli"
    main(["--out", str(out), "--scale", "0.25", "--subjects", "subj07", "--train_stimuli", "8", "--test_stimuli",
          "4", "--sessions", "1", "--image_size", "32", "--quiet"])
    printed = capsys.readouterr().out
    assert "subj07: grid 20x24x20 at 7.20 mm" in printed and "12 stimuli (8 train, 4 test)" in printed
    with pytest.raises(FileExistsError, match="not empty"):
        main(["--out", str(out), "--quiet"])
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="no part of a prepared dataset"):
        main(["--out", str(out), "--overwrite", "--quiet"])


def test_config_rejects_impossible_values():
    for bad in ({"subjects": ("subj09",)}, {"image_size": 40}, {"repeats": 1}, {"snr": 0.0}):
        with pytest.raises(ValueError):
            SyntheticConfig(**bad)
