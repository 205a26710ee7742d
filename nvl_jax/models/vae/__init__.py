"""The Stable Diffusion ``AutoencoderKL`` (``modeling``) and its key table (``params``)."""

from nvl_jax.models.vae.modeling import AutoencoderKL, AutoencoderKLConfig, DiagonalGaussian
