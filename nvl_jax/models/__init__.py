"""Flax NNX models that load the standard Hugging Face checkpoints.

- ``clip``: CLIP vision and text towers with their projections.
- ``vae``: the Stable Diffusion ``AutoencoderKL``.
- ``llama``: Llama-2 / Vicuna / Llama-3 causal language models, with generation.
- ``hf_loader``: the one safetensors -> NNX loader they all use.
"""
