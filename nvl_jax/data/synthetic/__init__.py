"""In-silico NSD: procedural scenes, NSD-like anatomy and a documented encoding model, written as a
prepared dataset. ``python -m nvl_jax.data.synthetic --out DIR``; the model: docs/synthetic.md."""

from nvl_jax.data.synthetic.generate import SyntheticConfig, generate, summarize

__all__ = ["SyntheticConfig", "generate", "summarize"]
