"""Retrieval and identification metrics on similarity matrices whose answers are known."""

import numpy as np
import pytest

from nvl_jax.evaluation import retrieval


def test_perfect_and_reversed_retrieval():
    image = np.eye(5) + 0.01
    assert retrieval.top1(retrieval.cosine_similarity(image, image)) == (1.0, 1.0)
    # every brain sample points at the next image: no hit in either direction
    shifted = np.roll(image, 1, axis=0)
    assert retrieval.top1(retrieval.cosine_similarity(shifted, image)) == (0.0, 0.0)


def test_directions_differ_when_one_image_attracts_every_brain_sample():
    similarity = np.array([[0.9, 0.8, 0.1],
                           [0.95, 0.9, 0.1],
                           [0.9, 0.2, 0.5]])
    brain_to_image, image_to_brain = retrieval.top1(similarity)
    assert brain_to_image == pytest.approx(1 / 3)  # only row 0 picks its own image
    assert image_to_brain == pytest.approx(2 / 3)  # columns 1 and 2 pick their own brain sample


def test_two_way_identification_is_mindeyes_pearson_protocol():
    rng = np.random.default_rng(3)
    targets = rng.normal(size=(7, 12))
    predictions = targets + rng.normal(scale=1.5, size=targets.shape)
    # Written out as the field's code does it: rows are variables, one per image.
    n = len(targets)
    expected = []
    for j in range(n):
        own = np.corrcoef(targets[j], predictions[j])[0, 1]
        others = [np.corrcoef(targets[i], predictions[j])[0, 1] for i in range(n) if i != j]
        expected.append(np.mean([o < own for o in others]))
    assert retrieval.two_way_identification(predictions, targets) == pytest.approx(np.mean(expected))
    # Pearson, not cosine: a per-row offset changes cosine similarity but not correlation.
    shifted = predictions + rng.normal(scale=5.0, size=(n, 1))
    assert retrieval.two_way_identification(shifted, targets) == pytest.approx(np.mean(expected))


def test_n_way_protocol_and_chance():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(400, 16))
    brain = image + 3.0 * rng.normal(size=image.shape)
    metrics = retrieval.retrieval_metrics(brain, image, way=300, draws=30)
    assert metrics["n_test"] == 400 and metrics["chance_top1"] == 1 / 400
    # fewer candidates make top-1 easier
    assert metrics["brain_to_image_top1_300way"] >= metrics["brain_to_image_top1"]
    random = retrieval.retrieval_metrics(rng.normal(size=(400, 16)), image, way=300, draws=30)
    assert random["brain_to_image_top1"] < 0.02 and abs(random["two_way_identification"] - 0.5) < 0.05
    assert "brain_to_image_top1_300way" not in retrieval.retrieval_metrics(brain[:100], image[:100])
