"""The brain-language model: ViT3D brain tokens -> projector -> a Llama-family LLM (the paper's §4).

The brain tokens are the extractor's penultimate-layer hidden states, every kept patch plus CLS
(``[batch, n_active + 1, width]``; LLaVA takes ``hidden_states[-2]`` too). The projector maps them
into the LLM's embedding width, and ``merge.merge_brain_tokens`` puts them where the prompt's
``<image>`` placeholder was. Generation runs through the LLM's KV-cache prefill / decode with the
merged embeddings as the prompt.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from nvl_jax.models import layers, llama, vit3d
from nvl_jax.models.brain_lm.merge import IGNORE_INDEX, IMAGE_TOKEN_INDEX, merge_brain_tokens, text_ids
from nvl_jax.models.brain_lm.projector import Projector


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """rank 0 = no adapters; targets: projection names of ``lora.LLAMA_TARGETS``."""

    rank: int = 0
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclasses.dataclass(frozen=True)
class BrainLMConfig:
    """``llm_remat``: what each LLM decoder layer keeps for the backward pass, one of
    ``layers.REMAT_POLICIES`` (the extractor's is ``extractor.remat``)."""

    extractor: vit3d.ViT3DConfig
    llm: llama.LlamaConfig
    lora: LoRAConfig = LoRAConfig()
    image_token_id: int = IMAGE_TOKEN_INDEX
    llm_remat: str = "none"

    def __post_init__(self):
        if self.extractor.depth < 2:
            raise ValueError(f"brain tokens are the penultimate layer's: the extractor needs depth >= 2, "
                             f"got {self.extractor.depth}")
        layers.check_remat(self.llm_remat)


@dataclasses.dataclass
class BrainLMOutput:
    """logits ``[batch, L - 1 + N, vocab]``; labels and attention_mask of the merged sequence."""

    logits: jax.Array
    labels: jax.Array | None
    attention_mask: jax.Array


class BrainLanguageModel(nnx.Module):
    """``encoder`` (the stage-1 ViT3D), ``projector`` and ``llm``; parameters of all three in one state."""

    def __init__(self, config: BrainLMConfig, *, dtype=jnp.float32, rngs: nnx.Rngs,
                 encoder: vit3d.ViT3D | None = None, llm: llama.LlamaForCausalLM | None = None):
        """Random parts, or the given ``encoder`` (a trained stage-1 ViT3D) and ``llm`` (a pretrained LLM,
        without adapters: LoRA is applied here, built with ``config.llm_remat``); the projector always
        starts random."""
        from nvl_jax.models.brain_lm import lora

        if llm is not None and llm.model.remat != config.llm_remat:
            raise ValueError(f"the given LLM was built with remat {llm.model.remat!r}, the config asks for "
                             f"llm_remat {config.llm_remat!r}: load it with remat={config.llm_remat!r}")
        self.config = config
        self.encoder = encoder if encoder is not None else vit3d.ViT3D(config.extractor, rngs=rngs)
        self.projector = Projector(config.extractor.width, config.llm.hidden_size, dtype=dtype, rngs=rngs)
        self.llm = llm if llm is not None else llama.LlamaForCausalLM(config.llm, dtype=dtype, rngs=rngs,
                                                                      remat=config.llm_remat)
        if config.lora.rank:
            lora.apply_lora(self.llm, config.lora.rank, config.lora.alpha, config.lora.targets, rngs=rngs)

    def brain_tokens(self, patches: jax.Array, coords: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        """``patches [batch, n_active, P**3]``, ``coords [n_active, 3]`` -> ``[batch, n_active + 1, hidden]``
        in the LLM's embedding space."""
        features = self.encoder(patches, coords, output_hidden_states=True, rngs=rngs)
        return self.projector(features.hidden_states[-2].astype(self.llm.dtype))

    def merged_inputs(self, patches, coords, input_ids, attention_mask, labels=None, rngs=None):
        """The prompt's embeddings with the brain tokens at ``<image>``: ``(embeds, mask, labels)``."""
        embeds = self.llm.embed(text_ids(input_ids, self.config.image_token_id))
        return merge_brain_tokens(embeds, input_ids, self.brain_tokens(patches, coords, rngs), attention_mask,
                                  labels, self.config.image_token_id)

    def __call__(self, patches: jax.Array, coords: jax.Array, input_ids: jax.Array, attention_mask: jax.Array,
                 labels: jax.Array | None = None, rngs: nnx.Rngs | None = None) -> BrainLMOutput:
        """``input_ids``, ``attention_mask``, ``labels``: ``[batch, L]`` with one ``<image>`` per row."""
        embeds, mask, labels = self.merged_inputs(patches, coords, input_ids, attention_mask, labels, rngs)
        logits = self.llm(inputs_embeds=embeds, attention_mask=mask).logits
        return BrainLMOutput(logits=logits, labels=labels, attention_mask=mask)


def next_token_loss(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean cross-entropy of predicting ``labels[:, 1:]`` from ``logits[:, :-1]`` where they are not
    ``IGNORE_INDEX``; returns ``(loss, number of supervised tokens)``. Computed in float32."""
    logits, targets = logits[:, :-1].astype(jnp.float32), labels[:, 1:]
    supervised = targets != IGNORE_INDEX
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(supervised, targets, 0))
    count = supervised.sum()
    return jnp.sum(jnp.where(supervised, losses, 0.0)) / jnp.maximum(count, 1), count
