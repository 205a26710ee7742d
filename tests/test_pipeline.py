"""The Grain input pipeline: records, MixUp, batches, iterator state, global arrays."""

import numpy as np
import pytest

from nvl_jax import sharding
from nvl_jax.data import pipeline
from nvl_jax.data.format import PreparedDataset


@pytest.fixture(scope="module")
def dataset(tiny_nsd):
    return PreparedDataset.open(tiny_nsd)


def _trial_betas(dataset, subject_index, trial):
    subject = list(dataset.subjects.values())[subject_index]
    return dataset.betas(subject.name, int(subject.trials.session[trial]), subject.trials.row[trial:trial + 1])[0]


def test_train_records_cover_every_training_trial_with_its_repeats(dataset):
    records = pipeline.build_records(dataset, "train", "train")
    train = set(dataset.split["train"].tolist())
    expected = sum(int(np.isin(s.trials.stimulus, list(train)).sum()) for s in dataset.subjects.values())
    assert len(records) == expected
    for i in range(0, len(records), 37):
        subject = list(dataset.subjects.values())[records.subject[i]]
        partners = records.partners[i][records.partners[i] >= 0]
        assert len(partners) == 2  # the other two of three repeats
        assert records.trials[i][0] not in partners
        assert (subject.trials.stimulus[partners] == records.stimulus[i]).all()


def test_test_records_average_repeats_or_take_the_first(dataset):
    multi = pipeline.build_records(dataset, "test", "multi_trial")
    single = pipeline.build_records(dataset, "test", "single_trial")
    n_test = len(dataset.split["test"])
    assert len(multi) == len(single) == n_test * len(dataset.subjects)
    assert ((multi.trials >= 0).sum(1) == 3).all() and ((single.trials >= 0).sum(1) == 1).all()
    source = pipeline.RecordSource(dataset.root, multi, max_voxels=4000)
    subject_index, trials = int(multi.subject[5]), multi.trials[5]
    expected = np.mean([_trial_betas(dataset, subject_index, t) for t in trials], axis=0)
    element = source[5]
    n = len(expected)
    np.testing.assert_allclose(element["betas"][:n], expected, rtol=1e-6)
    assert not element["betas"][n:].any()  # zero padding past the subject's voxels
    subjects = list(dataset.subjects.values())
    assert all(subjects[s].trials.repeat[t[0]] == 0 for s, t in zip(single.subject, single.trials))


def test_mixup_mixes_two_repeats_of_the_same_stimulus(dataset):
    records = pipeline.build_records(dataset, "train", "train")
    source = pipeline.RecordSource(dataset.root, records, max_voxels=4000)
    mixup = pipeline.MixUpRepeats(dataset.root, max_voxels=4000)
    element = source[3]
    mixed = mixup.random_map(dict(element), np.random.default_rng(1))
    own = element["betas"]
    partners = [_trial_betas(dataset, int(element["subject"]), p) for p in element["partners"] if p >= 0]
    n = len(partners[0])
    # mixed = lam * own + (1 - lam) * partner for one partner and some lam in [0, 1]
    fits = []
    for partner in partners:
        diff = own[:n] - partner
        lam = float(diff @ (mixed["betas"][:n] - partner) / (diff @ diff))
        fits.append((np.abs(lam * own[:n] + (1 - lam) * partner - mixed["betas"][:n]).max(), lam))
    residual, lam = min(fits)
    assert residual < 1e-4 and 0.0 <= lam <= 1.0
    np.testing.assert_array_equal(mixed["clip_target"], element["clip_target"])


def test_training_batches_are_seeded_and_resume_from_iterator_state(dataset):
    def batches(seed):
        return iter(pipeline.train_dataset(dataset.root, dataset, global_batch_size=8, seed=seed))

    it = batches(0)
    first = [next(it) for _ in range(3)]
    state = it.get_state()
    after = [next(it)["stimulus"] for _ in range(2)]
    assert set(first[0]) == {"betas", "subject", "stimulus", "clip_target", "vae_target"}
    assert first[0]["betas"].shape == (8, max(s.n_voxels for s in dataset.subjects.values()))
    again = batches(0)
    np.testing.assert_array_equal(next(again)["betas"], first[0]["betas"])
    resumed = batches(0)
    resumed.set_state(state)
    for expected in after:
        np.testing.assert_array_equal(next(resumed)["stimulus"], expected)
    assert not np.array_equal(next(batches(1))["stimulus"], first[0]["stimulus"])


def test_test_batches_cover_every_record_once(dataset):
    n = len(pipeline.build_records(dataset, "test", "single_trial"))
    seen = []
    for batch in pipeline.test_batches(dataset.root, dataset, "single_trial", global_batch_size=24):
        assert batch["betas"].shape[0] == 24
        seen += list(zip(batch["subject"][batch["valid"]], batch["stimulus"][batch["valid"]]))
    assert len(seen) == n == len(set(seen))


def test_global_batch_is_split_over_the_batch_axes(dataset):
    mesh = sharding.make_mesh((2, 2, 2))
    local = next(iter(pipeline.train_dataset(dataset.root, dataset, global_batch_size=8, seed=0)))
    batch = pipeline.global_batch(local, mesh)
    assert batch["betas"].sharding.spec[0] == ("data", "fsdp")
    np.testing.assert_array_equal(np.asarray(batch["betas"]), local["betas"])
