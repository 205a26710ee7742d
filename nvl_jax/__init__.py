"""nvl_jax: Neuro-Vision to Language in JAX/Flax NNX."""

__version__ = "0.1.0"
