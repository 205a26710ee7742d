"""python -m nvl_jax.reconstruct from a tiny stage-1 run with the tiny random unCLIP: PNGs, grids, npz, metrics."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from test_training import ROOT, tiny_config

from nvl_jax import reconstruct
from nvl_jax.data import format as data_format
from nvl_jax.data import pipeline
from nvl_jax.training import loop

LIMIT = 4


@pytest.fixture(scope="module")
def run(tiny_nsd, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("stage1") / "run"
    loop.train(tiny_config(tiny_nsd), workdir)
    return workdir


def _prompts(root, path):
    """A caption-command file for the first LIMIT records of each mode."""
    dataset = data_format.PreparedDataset.open(root, check_values=False)
    names = list(dataset.subjects)
    rows = []
    for mode in pipeline.TEST_MODES:
        records = pipeline.build_records(dataset, "test", mode)
        rows += [{"stimulus": int(t), "subject": names[s], "mode": mode, "task": "brief", "caption": f"the cat {i}"}
                 for i, (s, t) in enumerate(zip(records.subject[:LIMIT], records.stimulus[:LIMIT]))]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_reconstruct_writes_images_npz_and_metrics(run, tiny_nsd, tmp_path):
    pytest.importorskip("nvl_jax.evaluation.reconstruction", reason="needs the reconstruction metrics module")
    out = tmp_path / "recon"
    prompts = _prompts(tiny_nsd, tmp_path / "prompts.jsonl")
    metrics = reconstruct.main(["--workdir", str(run), "--unclip", "tiny-random", "--limit", str(LIMIT),
                                "--steps", "3", "--beta", "0.9,1.0", "--guidance", "3", "--blurry",
                                "--prompts", str(prompts), "--out", str(out)])

    saved = np.load(out / "reconstructions.npz")
    for mode in pipeline.TEST_MODES:
        for setting in ("beta0.9", "beta1", "blurry"):
            images = saved[f"{mode}_{setting}"]
            assert images.shape == (LIMIT, 64, 64, 3) and images.dtype == np.uint8
            pngs = sorted((out / mode / setting).glob("*.png"))
            assert len(pngs) == LIMIT
            stimulus = int(pngs[0].stem.split("_")[-1])
            row = int(np.flatnonzero(saved[f"{mode}_stimulus"] == stimulus)[0])
            np.testing.assert_array_equal(np.asarray(Image.open(pngs[0])), images[row])
        grid = np.asarray(Image.open(out / f"grid_{mode}.png"))
        assert grid.shape[0] > 4 * 64 and grid.shape[1] > 4 * 64  # stimulus | beta 0.9 | beta 1 | blurry
        for setting in ("beta=0.9", "beta=1", "blurry"):
            assert {"pixcorr", "ssim", "n", "per_subject"} <= set(metrics[mode][setting])
            assert -1 <= metrics[mode][setting]["pixcorr"] <= 1
            # No feature-network weights were given: those metrics are named as skipped, not faked.
            assert "alex2" in metrics[mode][setting]["skipped"] and "alex2" not in metrics[mode][setting]
    # The same noise at both betas: the start (and so the image) differs only through beta.
    assert np.any(saved["multi_trial_beta0.9"] != saved["multi_trial_beta1"])
    assert json.loads((out / "metrics.json").read_text())["settings"]["betas"] == [0.9, 1.0]
    assert (out / "metrics_vs_beta.png").stat().st_size > 0
    assert (out / "tiny_random_unclip" / "model_index.json").exists()


def test_prompts_file_must_cover_every_record(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"stimulus": 3, "subject": "subj09", "mode": "multi_trial", "caption": "a"}) + "\n")
    with pytest.raises(ValueError, match="subject 'subj09' is not one of"):
        reconstruct.read_prompts(path, ["subj01"])
    path.write_text('{"stimulus": 3}\n')
    with pytest.raises(ValueError, match="line 1: expected a JSON object"):
        reconstruct.read_prompts(path, ["subj01"])


def test_beta_list_and_tiny_random_checks():
    assert reconstruct.parse_betas("0.6,0.75,0.9,0.98,1.0") == [0.6, 0.75, 0.9, 0.98, 1.0]
    with pytest.raises(ValueError, match="distinct"):
        reconstruct.parse_betas("0.9,0.9")
    with pytest.raises(ValueError, match="expected numbers"):
        reconstruct.parse_betas("high")
    info = {"random_init": True, "vae": "random-init tiny AutoencoderKL (seed 4)"}
    assert reconstruct.tiny_random_seed(info) == 3
    with pytest.raises(ValueError, match="pass that model's unCLIP"):
        reconstruct.tiny_random_seed({"random_init": False, "vae": "stabilityai/stable-diffusion-2-1-unclip-small/vae"})


def test_metric_networks_are_named_folders():
    assert reconstruct.parse_metric_networks("alexnet=/w/alexnet, clip=openai/clip-vit-large-patch14") == {
        "alexnet": "/w/alexnet", "clip": "openai/clip-vit-large-patch14"}
    assert reconstruct.parse_metric_networks(None) == {}
    with pytest.raises(ValueError, match="NAME=FOLDER"):
        reconstruct.parse_metric_networks("vgg=/w/vgg")


def test_noise_is_per_record():
    latents, embeddings = reconstruct.record_noise(5, (2, 2, 4), 3, seed=1)
    first, _ = reconstruct.record_noise(2, (2, 2, 4), 3, seed=1)
    np.testing.assert_array_equal(latents[:2], first)
    assert embeddings.shape == (5, 3)


def test_help_names_the_flags():
    result = subprocess.run([sys.executable, "-m", "nvl_jax.reconstruct", "--help"], cwd=ROOT, capture_output=True,
                            text=True, check=True)
    for flag in ("--workdir", "--unclip", "--beta", "--beta_start", "--prompts", "--blurry", "--limit"):
        assert flag in result.stdout
