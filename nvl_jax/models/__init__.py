"""Flax NNX models, one folder each (bonsai's layout): ``modeling.py`` (the modules and a frozen
config with presets), ``params.py`` (the Hugging Face key table) and a processor or tokenizer
where the model has one.

- ``clip/``: CLIP vision and text towers with their projections, and the image processor.
- ``vae/``: the Stable Diffusion ``AutoencoderKL``.
- ``unet/``: the Stable Diffusion 2.x / Stable unCLIP ``UNet2DConditionModel``.
- ``llama/``: Llama-2 / Vicuna / Llama-3 causal language models, with KV-cache generation.
- ``vit3d/``: the fMRI extractor with its CLIP / VAE alignment heads.
- ``alexnet/``, ``inception/``, ``efficientnet/``, ``resnet/``: torchvision-layout image classifiers up to
  the features the reconstruction metrics read (``cnn_layers`` holds their layers;
  ``convert_feature_nets`` converts their published checkpoints once).

Shared beside them: ``layers`` (NNX layers with logical sharding axes), ``hf_loader`` (the one
safetensors -> NNX loader), ``safetensors_io`` and ``convert_to_safetensors``.
"""
