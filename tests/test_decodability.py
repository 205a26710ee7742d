"""python -m nvl_jax.data.synthetic.decodability: ridge read-outs of an in-silico NSD's CLIP targets."""

import json
import subprocess
import sys

import numpy as np
import pytest
from sklearn.linear_model import Ridge as SklearnRidge
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from nvl_jax.data import format as fmt
from nvl_jax.data import synthetic
from nvl_jax.data.synthetic import decodability


def test_ridge_matches_scikit_learn():
    rng = np.random.default_rng(0)
    inputs, targets = rng.normal(size=(80, 50)) * rng.uniform(0.1, 5, 50), rng.normal(size=(80, 7))
    inputs[:, 3] = 2.0  # a constant feature, as a cell no object reaches
    test = rng.normal(size=(9, 50))
    # Fewer stimuli than features (betas) and more (the encoding model's features): both forms.
    for n_fit in (30, 80):
        ours = decodability.Ridge(inputs[:n_fit], targets[:n_fit])
        for ridge in (0.1, 10.0, 1e4):
            reference = make_pipeline(StandardScaler(), SklearnRidge(alpha=ridge)).fit(inputs[:n_fit], targets[:n_fit])
            np.testing.assert_allclose(ours.predict(test, ridge), reference.predict(test), rtol=1e-6, atol=1e-8)


def test_cli_measures_both_read_outs(tiny_nsd, tmp_path, capsys):
    out = tmp_path / "decodability.json"
    result = decodability.main(["--data", str(tiny_nsd), "--subject", "subj02", "--ridge", "1,100,10000",
                                "--out", str(out)])
    assert json.loads(capsys.readouterr().out) == json.loads(out.read_text()) == result
    assert {"dataset", "clip", "seed", "ridge_grid", "features_to_clip", "betas_to_clip"} <= result.keys()
    features, betas = result["features_to_clip"], result["betas_to_clip"]
    # tiny_nsd: 4 subjects x 40 own training stimuli, 16 shared test stimuli.
    assert features["n_train"] + features["n_validation"] == 160 and features["n_test"] == 16
    assert betas["subject"] == "subj02" and betas["n_train"] + betas["n_validation"] == 40 and betas["n_test"] == 16
    for read_out in (features, betas):
        assert read_out["chance_top1"] == 1 / 16 and read_out["ridge"] in (1, 100, 10000)
        assert set(read_out["validation_top1"]) == {"1", "100", "10000"}
    # The encoding model's own features find 11 of the 16 test stimuli (11x chance) whatever the held-out
    # part; the betas of 40 stimuli, 1-2, so only their range is checked.
    assert features["brain_to_image_top1"] >= 3 * features["chance_top1"]
    assert 0 <= betas["brain_to_image_top1"] <= 1


def test_errors_name_what_is_missing(tmp_path):
    root = synthetic.generate(tmp_path / "data", synthetic.SyntheticConfig(
        scale=0.25, subjects=("subj01",), train_stimuli=8, test_stimuli=4, sessions=1, image_size=32),
        progress=False)
    with pytest.raises(fmt.DatasetError, match="targets/targets.json"):
        decodability.measure(root)
    with pytest.raises(ValueError, match="no subject 'subj02'"):
        decodability.measure(root, subject="subj02")
    with pytest.raises(SystemExit):
        decodability.main(["--data", str(root), "--ridge", "1,-1"])


def test_help():
    run = subprocess.run([sys.executable, "-m", "nvl_jax.data.synthetic.decodability", "--help"],
                         capture_output=True, text=True, check=True)
    assert "--data" in run.stdout and "--ridge" in run.stdout and "brain -> image top-1" in run.stdout
