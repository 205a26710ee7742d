"""Area under the ROC curve of a localization map against the true voxels."""

from __future__ import annotations

import numpy as np
from scipy import stats


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """The probability that a true voxel scores above a false one (ties count half): the Mann-Whitney U
    over the product of the class sizes. ``scores [n]`` float, ``labels [n]`` bool; both classes needed."""
    scores, labels = np.asarray(scores, np.float64).ravel(), np.asarray(labels, bool).ravel()
    if scores.shape != labels.shape:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} must match")
    n_true = int(labels.sum())
    n_false = len(labels) - n_true
    if n_true == 0 or n_false == 0:
        raise ValueError(f"AUROC needs true and false voxels, got {n_true} true of {len(labels)}")
    ranks = stats.rankdata(scores)
    return float((ranks[labels].sum() - n_true * (n_true + 1) / 2) / (n_true * n_false))
