"""Brain <-> image retrieval and two-way identification in CLIP space.

For one subject with n test stimuli: ``brain [n, d]`` are the CLIP-head outputs
(row i answers stimulus i) and ``image [n, d]`` the stimuli's CLIP image
embeddings, in the same order. Retrieval ranks by cosine similarity; two-way
identification correlates (Pearson), as the field's code does.

The space is the model's CLIP ViT-L/14 head (768-d image embeddings), not MindEye2's
OpenCLIP ViT-bigG token space (256 x 1664): its 300-way figures (98.8 / 98.3) are
not directly comparable with these.
"""

from __future__ import annotations

import numpy as np


def cosine_similarity(brain: np.ndarray, image: np.ndarray) -> np.ndarray:
    """``[n_brain, n_image]``: entry (i, j) compares brain sample i with image j."""
    b = brain / np.linalg.norm(brain, axis=1, keepdims=True).clip(1e-12)
    i = image / np.linalg.norm(image, axis=1, keepdims=True).clip(1e-12)
    return b @ i.T


def top1(similarity: np.ndarray) -> tuple[float, float]:
    """``(brain_to_image, image_to_brain)`` top-1 accuracy of a square similarity matrix, truth on the diagonal."""
    truth = np.arange(len(similarity))
    return (float(np.mean(similarity.argmax(axis=1) == truth)),
            float(np.mean(similarity.argmax(axis=0) == truth)))


def top1_n_way(similarity: np.ndarray, way: int = 300, draws: int = 30, seed: int = 0) -> tuple[float, float]:
    """MindEye2's protocol: top-1 among ``way`` random stimuli, averaged over ``draws`` random subsets."""
    rng = np.random.default_rng(seed)
    results = [top1(similarity[np.ix_(subset, subset)])
               for subset in (rng.choice(len(similarity), way, replace=False) for _ in range(draws))]
    return tuple(float(x) for x in np.mean(results, axis=0))


def two_way_identification(predictions: np.ndarray, targets: np.ndarray) -> float:
    """The field's two-way identification (MindEye's code), Pearson correlation, not cosine.

    ``predictions [n, d]`` and ``targets [n, d]``, row i of each for stimulus i. For each
    prediction, the fraction of the other n - 1 targets that correlate less with it than its own
    target does (``r = corrcoef(targets, predictions)[:n, n:]``, success ``r < diag(r)`` counted
    per column, divided by n - 1), averaged over predictions.
    """
    n = len(predictions)
    r = np.corrcoef(np.asarray(targets, np.float64), np.asarray(predictions, np.float64))[:n, n:]
    return float(np.mean(np.sum(r < np.diag(r), axis=0) / (n - 1)))


def retrieval_metrics(brain: np.ndarray, image: np.ndarray, *, way: int = 300, draws: int = 30,
                      seed: int = 0) -> dict[str, float]:
    """All retrieval figures for one subject; the n-way ones only when there are at least ``way`` stimuli."""
    similarity = cosine_similarity(brain, image)
    b2i, i2b = top1(similarity)
    metrics = {"brain_to_image_top1": b2i, "image_to_brain_top1": i2b, "chance_top1": 1.0 / len(similarity),
               "two_way_identification": two_way_identification(brain, image), "n_test": len(similarity)}
    if len(similarity) >= way:
        b2i, i2b = top1_n_way(similarity, way, draws, seed)
        metrics.update({f"brain_to_image_top1_{way}way": b2i, f"image_to_brain_top1_{way}way": i2b})
    return metrics
