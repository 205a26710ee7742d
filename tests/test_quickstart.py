"""The quickstart notebook runs from start to end and leaves its figures."""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_quickstart_notebook_executes(tmp_path):
    env = {**os.environ, "MPLBACKEND": "Agg", "NVL_QUICKSTART_DIR": str(tmp_path), "NVL_QUICKSTART_STEPS": "40"}
    env["XLA_FLAGS"] = ""  # the notebook runs on one device, as a user's kernel would
    result = subprocess.run([sys.executable, "notebooks/quickstart.py"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("subject_volume.png", "active_patches.png", "retrieval.png", "subj01_trial0_betas.nii.gz",
                 "train/eval.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert "patches are active" in result.stdout
