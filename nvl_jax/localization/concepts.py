"""The concept target GradCAM scores against: a direction in the CLIP head's output space.

- Targets made by a real CLIP (``targets/targets.json`` says ``"random_init": false``): the CLIP
  text embedding of ``PROMPT_TEMPLATE`` filled with the concept, from the text tower of the same
  checkpoint (``targets.json`` ``"clip"``), so image and text share the space.
- Targets made by a random-weight CLIP stand-in (the in-silico demo): text embeddings mean nothing
  there, so the target is the concept's direction in target space, the mean CLIP target of the
  training stimuli that show the concept minus the mean of those that do not. Which stimuli show it
  comes from the scene graphs (``stimuli/scenes.json``).

Either way the result is one vector ``[clip_dim]`` and GradCAM runs the same code on it.
"""

from __future__ import annotations

import json

import numpy as np

from nvl_jax.data import format as data_format
from nvl_jax.data.synthetic import scenes

# CLIP's own zero-shot prompt (Radford et al., 2021); "a photo of a dog." for "dog".
PROMPT_TEMPLATE = "a photo of a {}."


def concept_presence(dataset: data_format.PreparedDataset) -> np.ndarray:
    """``float32 [n_stimuli, n_concepts]`` from ``stimuli/scenes.json`` (``scenes.concept_presence``)."""
    path = dataset.root / "stimuli" / "scenes.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no scene graphs, so which stimuli show a concept is unknown. Concept "
                                "directions need an in-silico dataset (python -m nvl_jax.data.synthetic); a real "
                                "CLIP's targets use its text embedding instead")
    graphs = json.loads(path.read_text())
    if len(graphs) != dataset.n_stimuli:
        raise ValueError(f"{path}: {len(graphs)} scene graphs for {dataset.n_stimuli} stimuli (dataset.json n_stimuli)")
    return scenes.concept_presence(graphs)


def showing(dataset: data_format.PreparedDataset, concept: str) -> np.ndarray:
    """``bool [n_stimuli]``: the stimuli whose scene graph shows ``concept``."""
    return concept_presence(dataset)[:, _index(concept)] > 0


def _index(concept: str) -> int:
    if concept not in scenes.CONCEPTS:
        raise ValueError(f"concept {concept!r}: the in-silico scene graphs know {list(scenes.CONCEPTS)}")
    return scenes.CONCEPTS.index(concept)


def concept_direction(dataset: data_format.PreparedDataset, concept: str) -> np.ndarray:
    """``float32 [clip_dim]``: mean CLIP target of the training stimuli showing ``concept`` minus that of the rest."""
    train = np.sort(dataset.split["train"])
    shown = showing(dataset, concept)[train]
    if shown.all() or not shown.any():
        raise ValueError(f"concept {concept!r}: needs training stimuli both with and without it")
    embeds = np.asarray(dataset.targets().clip_image_embeds[train], np.float32)
    return embeds[shown].mean(0) - embeds[~shown].mean(0)


def text_embeddings(clip_name: str, concepts: list[str]) -> np.ndarray:
    """``float32 [n_concepts, projection_dim]``: the CLIP text tower's embeddings of ``PROMPT_TEMPLATE``
    filled with each concept; ``clip_name`` a hub name or a local checkpoint folder."""
    import jax.numpy as jnp

    from nvl_jax.models import clip

    tokenizer = clip.load_tokenizer(clip_name)
    model = clip.CLIPTextModel.from_pretrained(clip_name)
    input_ids, attention_mask = clip.tokenize(tokenizer, [PROMPT_TEMPLATE.format(c) for c in concepts])
    return np.asarray(model(jnp.asarray(input_ids), jnp.asarray(attention_mask)).text_embeds, np.float32)


def concept_targets(dataset: data_format.PreparedDataset, concepts: list[str]) -> np.ndarray:
    """``float32 [n_concepts, clip_dim]``: text embeddings for a real CLIP's targets, concept directions otherwise."""
    info = dataset.targets().info
    if "random_init" not in info:
        raise ValueError(f"{dataset.root / 'targets' / 'targets.json'}: no 'random_init' field, so whether a real "
                         "CLIP made the targets is unknown")
    if info["random_init"]:
        return np.stack([concept_direction(dataset, c) for c in concepts])
    return text_embeddings(info["clip"], concepts)
