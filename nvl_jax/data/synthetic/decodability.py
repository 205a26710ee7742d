"""How decodable an in-silico NSD's cached CLIP targets are, by ridge regression.

Two linear read-outs to the CLIP image embedding (``targets/clip_image_embeds.npy``),
each scored on the test split by brain -> image top-1 (cosine, argmax over the test
stimuli, ``nvl_jax.evaluation.retrieval``):

- features_to_clip: from the encoding model's own noise-free inputs of each stimulus,
  ``encoding.image_features`` of its image (4 maps x 16 x 16 cells) and
  ``scenes.concept_presence`` of its scene graph (``stimuli/scenes.json``), trained on
  every training stimulus: roughly the ceiling of a linear decoder of the betas, which are
  these inputs through the encoding model plus noise.
- betas_to_clip: from one subject's betas, repeats averaged per stimulus, trained on that
  subject's training stimuli and scored on its repeat-averaged test betas.

Each read-out z-scores its inputs with training statistics and fits closed-form ridge
regression with an intercept; the ridge strength is the one of ``--ridge`` with the best
top-1 on a seeded held-out part of the training stimuli, after which the model is refit
on all of them. Prints one JSON object: both read-outs (test top-1, chance, the chosen ridge,
the validation top-1 of each, the numbers of stimuli), the seed and the dataset.

    python -m nvl_jax.data.synthetic.decodability --data data/in_silico_nsd --out decodability.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from nvl_jax.data import format as fmt
from nvl_jax.data.synthetic import encoding, scenes
from nvl_jax.evaluation import retrieval

DEFAULT_RIDGE = (0.1, 1.0, 10.0, 100.0, 1e3, 1e4, 1e5)
VALIDATION_FRACTION = 0.2


def top1(predicted: np.ndarray, embeds: np.ndarray) -> float:
    """Brain -> image top-1 of ``predicted [n, d]`` against ``embeds [n, d]``, row i of each for stimulus i."""
    return retrieval.top1(retrieval.cosine_similarity(predicted, embeds))[0]


class Ridge:
    """Closed-form ridge regression ``[n, features] -> [n, targets]`` with an intercept, inputs z-scored
    with the fitting stimuli's statistics. One eigendecomposition of the smaller Gram matrix (features x
    features, or stimuli x stimuli when there are fewer stimuli than features) serves every strength."""

    def __init__(self, inputs: np.ndarray, targets: np.ndarray):
        inputs, targets = np.asarray(inputs, np.float64), np.asarray(targets, np.float64)
        self.input_mean, std = inputs.mean(0), inputs.std(0)
        # A feature that never varies (a cell no object reaches) carries nothing; keep it at zero.
        self.input_std = np.where(std > 0, std, 1.0)
        self.target_mean = targets.mean(0)
        x, y = self._standardize(inputs), targets - self.target_mean
        if x.shape[0] >= x.shape[1]:  # x.T x = V diag(e) V.T: weights = V diag(1 / (e + ridge)) V.T x.T y
            self.eigenvalues, self.basis = np.linalg.eigh(x.T @ x)
            self.projected = self.basis.T @ (x.T @ y)
        else:  # x x.T = U diag(e) U.T: the same weights as x.T U diag(1 / (e + ridge)) U.T y
            self.eigenvalues, u = np.linalg.eigh(x @ x.T)
            self.basis, self.projected = x.T @ u, u.T @ y

    def _standardize(self, inputs: np.ndarray) -> np.ndarray:
        return (np.asarray(inputs, np.float64) - self.input_mean) / self.input_std

    def predict(self, inputs: np.ndarray, ridge: float) -> np.ndarray:
        """``[n, targets]``: predictions for ``inputs [n, features]`` at ridge strength ``ridge`` > 0."""
        weights = self.basis @ (self.projected / (self.eigenvalues + ridge)[:, None])  # [features, targets]
        return self._standardize(inputs) @ weights + self.target_mean


def ridge_decodability(train_inputs: np.ndarray, train_embeds: np.ndarray, test_inputs: np.ndarray,
                       test_embeds: np.ndarray, ridge_grid: tuple[float, ...], seed: int) -> dict:
    """Ridge strength chosen on a held-out part of the training stimuli, then refit on all of them.

    train_inputs ``[n_train, features]``, train_embeds ``[n_train, clip_dim]``, test_inputs
    ``[n_test, features]``, test_embeds ``[n_test, clip_dim]``. Returns the test top-1, chance, the
    chosen ridge strength, the validation top-1 of each strength and the numbers of stimuli.
    """
    n_train = len(train_inputs)
    n_validation = int(round(VALIDATION_FRACTION * n_train))
    if n_validation < 2 or len(test_inputs) < 2:
        raise ValueError(f"too few stimuli for ridge selection and testing: {n_train} training "
                         f"({n_validation} held out), {len(test_inputs)} test")
    order = np.random.default_rng(seed).permutation(n_train)
    held_out, fitting = order[:n_validation], order[n_validation:]
    model = Ridge(train_inputs[fitting], train_embeds[fitting])
    validation = {ridge: top1(model.predict(train_inputs[held_out], ridge), train_embeds[held_out])
                  for ridge in ridge_grid}
    # Ties go to the strongest ridge, the simplest model that reaches the best score.
    best = max(sorted(ridge_grid, reverse=True), key=lambda ridge: validation[ridge])
    predicted = Ridge(train_inputs, train_embeds).predict(test_inputs, best)
    return {"brain_to_image_top1": top1(predicted, test_embeds), "chance_top1": 1.0 / len(test_inputs),
            "ridge": best, "validation_top1": {f"{ridge:g}": score for ridge, score in validation.items()},
            "n_train": n_train - n_validation, "n_validation": n_validation, "n_test": len(test_inputs),
            "n_features": int(train_inputs.shape[1])}


def stimulus_features(dataset: fmt.PreparedDataset) -> np.ndarray:
    """``float32 [n_stimuli, len(encoding.CHANNELS) * FEATURE_GRID**2 + len(scenes.CONCEPTS)]``: what the
    generator's encoding model sees of each stimulus, its pooled image maps and its concept presence."""
    path = dataset.root / "stimuli" / "scenes.json"
    if not path.is_file():
        raise fmt.DatasetError("stimuli/scenes.json: missing (only an in-silico NSD from "
                               "python -m nvl_jax.data.synthetic has scene graphs)")
    graphs = json.loads(path.read_text())
    if not isinstance(graphs, list) or len(graphs) != dataset.n_stimuli:
        raise fmt.DatasetError(f"stimuli/scenes.json: expected a list of {dataset.n_stimuli} scene graphs "
                               "(dataset.json n_stimuli)")
    maps = encoding.image_features(dataset.images())
    return np.concatenate([maps.reshape(len(maps), -1), scenes.concept_presence(graphs)], 1)


def repeat_averaged_betas(dataset: fmt.PreparedDataset, subject: str, stimuli: np.ndarray) -> np.ndarray:
    """``float32 [len(stimuli), n_voxels]``: the subject's betas of each stimulus, averaged over its repeats.
    Fails if the subject never saw one of them."""
    info = dataset.subjects[subject]
    t = info.trials
    betas = np.empty((len(t.row), info.n_voxels), np.float32)
    for session in np.unique(t.session):
        here = t.session == session
        betas[here] = dataset.betas(subject, session, t.row[here])
    sums = np.zeros((dataset.n_stimuli, info.n_voxels), np.float64)
    np.add.at(sums, t.stimulus, betas)
    counts = np.bincount(t.stimulus, minlength=dataset.n_stimuli)
    if len(unseen := stimuli[counts[stimuli] == 0]):
        raise ValueError(f"{subject} never saw stimulus {unseen[0]} ({len(unseen)} of {len(stimuli)} unseen)")
    return (sums[stimuli] / counts[stimuli, None]).astype(np.float32)


def measure(root: str | Path, subject: str = "subj01", ridge_grid: tuple[float, ...] = DEFAULT_RIDGE,
            seed: int = 0) -> dict:
    """Both read-outs of the dataset at ``root`` (which needs cached targets), as one JSON-ready dict."""
    dataset = fmt.PreparedDataset.open(root, check_values=False)
    if subject not in dataset.subjects:
        raise ValueError(f"{root}: no subject {subject!r}; dataset.json lists {list(dataset.subjects)}")
    targets = dataset.targets()  # names targets/targets.json if missing
    embeds = np.asarray(targets.clip_image_embeds, np.float32)
    train, test = dataset.split["train"], dataset.split["test"]
    features = stimulus_features(dataset)
    seen = np.zeros(dataset.n_stimuli, bool)
    seen[dataset.subjects[subject].trials.stimulus] = True
    subject_train = train[seen[train]]
    betas = repeat_averaged_betas(dataset, subject, np.concatenate([subject_train, test]))
    return {
        "dataset": str(root), "clip": targets.info.get("clip"), "seed": seed,
        "ridge_grid": list(ridge_grid), "validation_fraction": VALIDATION_FRACTION,
        "features_to_clip": ridge_decodability(features[train], embeds[train], features[test], embeds[test],
                                               ridge_grid, seed),
        "betas_to_clip": {"subject": subject, **ridge_decodability(
            betas[:len(subject_train)], embeds[subject_train], betas[len(subject_train):], embeds[test],
            ridge_grid, seed)},
    }


def _ridge_grid(text: str) -> tuple[float, ...]:
    try:
        grid = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ridge must be comma-separated numbers, got {text!r}") from None
    if not grid or min(grid) <= 0:
        raise argparse.ArgumentTypeError(f"--ridge strengths must be > 0, got {text!r}")
    return grid


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m nvl_jax.data.synthetic.decodability", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True,
                        help="an in-silico NSD with cached targets (python -m nvl_jax.data.synthetic, then "
                             "python -m nvl_jax.data.targets)")
    parser.add_argument("--subject", default="subj01", help="subject of betas_to_clip (default: %(default)s)")
    parser.add_argument("--ridge", type=_ridge_grid, default=DEFAULT_RIDGE,
                        help="comma-separated ridge strengths to choose from, on z-scored inputs "
                             f"(default: {','.join(f'{r:g}' for r in DEFAULT_RIDGE)})")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the held-out part of the training stimuli (default: %(default)s)")
    parser.add_argument("--out", help="also write the JSON object to this file")
    args = parser.parse_args(argv)
    result = measure(args.data, args.subject, args.ridge, args.seed)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
