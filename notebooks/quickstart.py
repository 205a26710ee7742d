# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # nvl_jax quickstart: from an in-silico NSD to brain -> image retrieval
#
# This notebook generates a small in-silico NSD in nvl_jax's prepared format, looks at one
# subject's volume, its nsdgeneral-like mask and the active patches the ViT3D sees, trains the
# stage-1 extractor for a few hundred steps on the CPU and plots retrieval on held-out stimuli.
# Open it with jupytext (`jupytext --to ipynb notebooks/quickstart.py`) or run it as a script;
# figures are saved next to the run (`NVL_QUICKSTART_DIR`, default `runs/quickstart`).

# %%
import os
from pathlib import Path

import matplotlib.pyplot as plt
import nibabel as nib
import numpy as np
from nilearn import plotting

from nvl_jax.configs import demo
from nvl_jax.data import format as data_format
from nvl_jax.data import synthetic, volumes
from nvl_jax.evaluation.retrieval import cosine_similarity
from nvl_jax.training import loop

RUN = Path(os.environ.get("NVL_QUICKSTART_DIR", "runs/quickstart"))
DATA = RUN / "data"
STEPS = int(os.environ.get("NVL_QUICKSTART_STEPS", "300"))

# %% [markdown]
# ## 1. A small in-silico NSD
# Four subjects with NSD's grids (here at a quarter of the resolution), different head
# positions, masks cut from the MNI152 grey-matter template, and responses from a documented
# encoding model (docs/synthetic.md).

# %%
if not (DATA / "dataset.json").exists():
    synthetic.generate(DATA, synthetic.SyntheticConfig(scale=0.25, train_stimuli=120, test_stimuli=30,
                                                       sessions=2, image_size=64))
dataset = data_format.PreparedDataset.open(DATA)
print(synthetic.summarize(dataset))

# %% [markdown]
# ## 2. One subject's volume, mask and first trial
# The prepared format stores only the voxels inside the mask; scattering them back into the
# native grid gives a NIfTI image that nilearn can draw.

# %%
subject = dataset.subjects["subj01"]
mask_img = nib.Nifti1Image(subject.nsdgeneral.astype(np.int16), subject.affine)
volume = np.zeros(subject.native_shape, np.float32)
volume[subject.voxel_mask] = dataset.betas(subject.name, 0, np.array([0]))[0]
betas_img = nib.Nifti1Image(volume, subject.affine)
fig, axes = plt.subplots(2, 1, figsize=(9, 6))
plotting.plot_roi(mask_img, bg_img=None, display_mode="ortho", axes=axes[0], title="subj01 nsdgeneral-like mask",
                  draw_cross=False, black_bg=False)
plotting.plot_stat_map(betas_img, bg_img=None, display_mode="ortho", axes=axes[1], title="subj01 trial 0 betas (z)",
                       draw_cross=False, black_bg=False)
fig.savefig(RUN / "subject_volume.png", dpi=80)
nib.save(betas_img, RUN / "subj01_trial0_betas.nii.gz")

# %% [markdown]
# ## 3. Active patches on the common grid
# Every subject is resampled (trilinear) onto one grid, subj01's own (X, Y, Z as stored), zero-padded
# and cut into P^3 cubes; only the cubes touching the union of the resampled masks are kept.

# %%
common_grid, patch = subject.native_shape, 7
union = volumes.resample_masks_union([s.nsdgeneral for s in dataset.subjects.values()], common_grid)
active = volumes.active_patches(union, patch)
print(f"{len(active)} of {np.prod(volumes.patch_grid(common_grid, patch))} patches are active")
z = int(np.argmax(union.sum((0, 1))))
fig, ax = plt.subplots(figsize=(5, 5))
ax.imshow(union[:, :, z].T, origin="lower", cmap="Greys")
for x, y, pz in active:
    if pz * patch <= z < (pz + 1) * patch:
        ax.add_patch(plt.Rectangle((x * patch - 0.5, y * patch - 0.5), patch, patch, fill=False, color="tab:red"))
ax.set_title(f"union of masks, slice z={z}; active patches in red")
fig.savefig(RUN / "active_patches.png", dpi=80)

# %% [markdown]
# ## 4. Train the stage-1 extractor
# `configs/demo.py` shrunk to this dataset; targets come from tiny random CLIP / VAE models (no
# download), computed on first use.

# %%
config = demo.get_config()
config.data.root = str(DATA)
config.data.synthetic.update(dict(scale=0.25, train_stimuli=120, test_stimuli=30, sessions=2, image_size=64))
config.targets.image_size = 64
config.data.patch_size = patch  # the common grid stays subj01's
config.model.update(dict(width=64, depth=2, num_heads=2, head_hidden=128))
config.total_steps, config.checkpoint_every_steps, config.log_every_steps = STEPS, STEPS, 25
results = loop.train(config, RUN / "train")

# %% [markdown]
# ## 5. Retrieval on held-out stimuli
# Cosine similarity between each test trial's predicted CLIP embedding (rows) and every test
# image's CLIP embedding (columns); a bright diagonal means the brain picks out its own image.

# %%
predictions = np.load(RUN / "train" / "predictions_multi_trial.npz")
rows = np.flatnonzero(predictions["subject"] == 0)
rows = rows[np.argsort(predictions["stimulus"][rows])]
similarity = cosine_similarity(predictions["clip_embedding"][rows],
                               dataset.targets().clip_image_embeds[predictions["stimulus"][rows]])
fig, axes = plt.subplots(1, 2, figsize=(10, 4))
axes[0].imshow(similarity, cmap="viridis")
axes[0].set(title="subj01 multi-trial: brain (rows) vs image (cols)", xlabel="image", ylabel="brain")
modes = list(results)
axes[1].bar(modes, [results[m]["brain_to_image_top1"] for m in modes], label="brain -> image top-1")
axes[1].axhline(results[modes[0]]["chance_top1"], color="k", linestyle="--", label="chance")
axes[1].legend()
fig.savefig(RUN / "retrieval.png", dpi=80)
print({m: round(results[m]["brain_to_image_top1"], 3) for m in modes})
