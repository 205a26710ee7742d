"""Brain tokens into an LLM's input embeddings at the ``<image>`` placeholder (MaxText's
``merge_mm_embeddings``, LLaVA's ``prepare_inputs_labels_for_multimodal``).

Every row holds exactly one placeholder id: a multi-turn dialogue carries one image, in its
first human turn. Shapes stay static, so one jitted program serves every batch: a row of ``L``
text positions becomes ``L - 1 + N`` positions, its placeholder replaced by the ``N`` brain
tokens. Padding stays where it was (at the end for right-padded training batches, at the front
for left-padded prompts), the brain positions are attended (mask 1) and unsupervised (label
``IGNORE_INDEX``), and position ids follow from the merged mask, so rows of different lengths
line up as the LLM's own padding rules expect.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# LLaVA's conventions: the placeholder's id in input_ids, and the label of positions without loss.
IMAGE_TOKEN_INDEX = -200
IGNORE_INDEX = -100


def check_placeholders(input_ids: np.ndarray, image_token_id: int = IMAGE_TOKEN_INDEX) -> None:
    """Host-side check that every row of ``input_ids [batch, L]`` holds exactly one placeholder."""
    counts = (np.asarray(input_ids) == image_token_id).sum(axis=1)
    bad = np.flatnonzero(counts != 1)
    if bad.size:
        raise ValueError(f"input_ids rows {bad.tolist()} hold {counts[bad].tolist()} <image> placeholders "
                         f"(id {image_token_id}); every row needs exactly one")


def text_ids(input_ids: jax.Array, image_token_id: int = IMAGE_TOKEN_INDEX) -> jax.Array:
    """``input_ids`` with the placeholder replaced by 0, so the embedding lookup stays in range."""
    return jnp.where(input_ids == image_token_id, 0, input_ids)


def merge_brain_tokens(
    text_embeds: jax.Array,
    input_ids: jax.Array,
    brain_embeds: jax.Array,
    attention_mask: jax.Array,
    labels: jax.Array | None = None,
    image_token_id: int = IMAGE_TOKEN_INDEX,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Replaces each row's placeholder by its brain tokens.

    Args:
      text_embeds: ``[batch, L, hidden]``, the LLM's embeddings of ``text_ids(input_ids)``.
      input_ids: ``[batch, L]`` int, one ``image_token_id`` per row.
      brain_embeds: ``[batch, N, hidden]``, the projected brain tokens.
      attention_mask: ``[batch, L]``, 1 for real tokens, 0 for padding.
      labels: ``[batch, L]`` or None; ``IGNORE_INDEX`` where there is no loss.

    Returns ``(embeds [batch, L - 1 + N, hidden], attention_mask [batch, L - 1 + N],
    labels [batch, L - 1 + N] or None)``.
    """
    batch, length, _ = text_embeds.shape
    n = brain_embeds.shape[1]
    image_at = jnp.argmax(input_ids == image_token_id, axis=1)[:, None]  # [batch, 1]
    out = jnp.arange(length - 1 + n)[None, :]  # [1, L - 1 + N]
    is_brain = (out >= image_at) & (out < image_at + n)
    # Text position each output position reads: itself before the image, shifted by N - 1 after it.
    source = jnp.where(out < image_at, out, out - n + 1)
    source = jnp.clip(source, 0, length - 1)
    brain_index = jnp.clip(out - image_at, 0, n - 1)
    gathered_text = jnp.take_along_axis(text_embeds, source[..., None], axis=1)
    gathered_brain = jnp.take_along_axis(brain_embeds, brain_index[..., None], axis=1)
    embeds = jnp.where(is_brain[..., None], gathered_brain.astype(text_embeds.dtype), gathered_text)
    mask = jnp.where(is_brain, 1, jnp.take_along_axis(attention_mask, source, axis=1)).astype(attention_mask.dtype)
    merged_labels = None
    if labels is not None:
        merged_labels = jnp.where(is_brain, IGNORE_INDEX, jnp.take_along_axis(labels, source, axis=1))
    return embeds, mask, merged_labels
