"""nvl_jax: Neuro-Vision to Language in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="nvl_jax",
    version="0.1.0",
    description=(
        "JAX/Flax reimplementation of Neuro-Vision to Language: fMRI -> ViT3D -> "
        "CLIP/VAE alignment, brain-language model, reconstruction."
    ),
    python_requires=">=3.11",
    packages=find_packages(include=["nvl_jax", "nvl_jax.*"]),
    install_requires=[
        # Lower bounds, not pins: a Python 3.12+ TPU VM or GPU box gets the newest.
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "grain>=0.2.18",
        "ml_collections>=1.1.0",
        "absl-py",
        "numpy>=2.0",
        "einops",
        "safetensors>=0.4",
        "huggingface_hub>=0.30",
        # Configs and tokenizers only; transformers 5 imports no torch for these.
        "transformers>=5",
        "nibabel>=5.2",
        # NSD's stimuli (nsd_stimuli.hdf5) and its HDF5 betas.
        "h5py",
        # The MNI152 grey-matter template (in-silico masks) and brain plots.
        "nilearn>=0.11",
        "scipy",
        "matplotlib",
        "tensorboardX",
        "tqdm",
        "psutil",
    ],
    extras_require={
        # PyTorch reference implementations for the parity tests. torch is pinned
        # exactly: the machines carry a local CPU wheel of this version.
        "test": [
            "torch==2.13.0",
            "transformers>=5",
            "diffusers>=0.42",
            "pillow",
            "pytest",
            "pytest-xdist",
            # Independent references for the reconstruction metrics: pytorchcv's model modules
            # import only torch (torchvision does not import next to the CPU torch).
            "pytorchcv",
            "scikit-image",
        ],
        # The reconstruction metrics compute in JAX; torch only reads the published .pth
        # checkpoints once (python -m nvl_jax.models.convert_feature_nets).
        "eval": [
            "torch==2.13.0",
        ],
    },
)
