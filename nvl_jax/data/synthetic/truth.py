"""The true concept voxels of the in-silico NSD: where a concept reaches the noise-free response.

A concept reaches a voxel along two paths of the encoding model (docs/synthetic.md):

- the concept part, ``presence[s, c] * concept_maps[v, c]``, for every concept;
- for a colour, also the retinotopic part: its objects' pixels drive the red-green and blue-yellow
  opponent channels of early visual cortex. Painting those pixels in the grey of equal luminance
  leaves luminance and contrast energy exactly as they were and removes only the colour's
  chromatic signal, so that signal is the difference the colour makes there.

A shape reaches early cortex only through the luminance and contrast that every object makes;
counting that would mark every early voxel for every shape, so a shape's path is its concept part.

``effect[v, c]`` is the std over the subject's stimuli of the change in the noise-free signal when
concept c is taken out of every scene along those paths; voxel v carries concept c when the effect
is at least ``TRUE_FRACTION`` of the std of its whole noise-free signal.
"""

from __future__ import annotations

import numpy as np

from nvl_jax.data.synthetic import encoding, scenes

# A voxel carries a concept when the concept moves its noise-free response by at least this fraction
# of the response's std across stimuli (a fraction of 0.3 is 9 % of the variance: about what each of
# the 11 concepts would explain were they all equally strong).
TRUE_FRACTION = 0.3
RED_GREEN, BLUE_YELLOW = encoding.CHANNELS.index("red-green"), encoding.CHANNELS.index("blue-yellow")


def colour_cover(images: np.ndarray) -> np.ndarray:
    """``float32 [len(COLOURS), n, FEATURE_GRID**2]``: per colour, the fraction of each feature cell its
    pixels cover in images ``uint8 [n, S, S, 3]`` (objects are flat colours on grey, so a pixel shows
    a colour exactly when it equals the colour's RGB)."""
    n, size = images.shape[:2]
    cell = size // encoding.FEATURE_GRID
    covers = []
    for rgb in scenes.COLOURS.values():
        inside = np.all(images == np.asarray(rgb, np.uint8), axis=-1).astype(np.float32)
        pooled = inside.reshape(n, encoding.FEATURE_GRID, cell, encoding.FEATURE_GRID, cell).mean((2, 4))
        covers.append(pooled.reshape(n, -1))
    return np.stack(covers)


def concept_effects(model: encoding.EncodingModel, features: np.ndarray, presence: np.ndarray,
                    covers: np.ndarray) -> np.ndarray:
    """``float64 [V, n_concepts]``: the std over stimuli of what each concept adds to the noise-free signal.

    features ``[n, channels, cells]``, presence ``[n, n_concepts]`` and covers ``[n_colours, n, cells]``
    (``colour_cover``) of the subject's stimuli, in one order.
    """
    _, concept_maps = model.signal(features, presence)
    retinotopic_scale = np.sqrt(model.retinotopic(features).var(0).mean())
    early_gain = model.gain * model.early / retinotopic_scale
    effects = np.empty((len(model.gain), len(scenes.CONCEPTS)))
    for c, concept in enumerate(scenes.CONCEPTS):
        change = presence[:, c:c + 1].astype(np.float64) * concept_maps[:, c].astype(np.float64)
        if concept in scenes.COLOURS:
            rgb = np.asarray(scenes.COLOURS[concept], np.float64) / 255.0
            # The grey of equal luminance has no chromatic signal: the colour's pixels lose exactly this much.
            chroma = {RED_GREEN: rgb[0] - rgb[1], BLUE_YELLOW: rgb[2] - (rgb[0] + rgb[1]) / 2}
            seen = covers[list(scenes.COLOURS).index(concept)] @ model.rf_weights.T  # [n, V]
            change = change + early_gain * sum(model.channel_weights[:, k] * value * seen
                                               for k, value in chroma.items())
        effects[:, c] = change.std(0)
    return effects


def true_concept_voxels(model: encoding.EncodingModel, features: np.ndarray, presence: np.ndarray,
                        covers: np.ndarray) -> np.ndarray:
    """``bool [V, n_concepts]``: the voxels that carry each concept (``concept_effects`` >= ``TRUE_FRACTION``
    of the voxel's noise-free signal std)."""
    signal, _ = model.signal(features, presence)
    return concept_effects(model, features, presence, covers) >= TRUE_FRACTION * signal.std(0)[:, None]
