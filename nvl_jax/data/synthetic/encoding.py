"""The in-silico encoding model: stimulus -> voxel responses -> noisy, per-session z-scored betas.

docs/synthetic.md gives the model and defends its defaults. In short, for voxel v
and stimulus s:

    signal[s, v] = gain[v] * (early[v] * retinotopic[s, v] / retinotopic_scale
                              + (1 - early[v]) * concept[s, v] / concept_scale)

retinotopic: a Gaussian receptive field, placed by the voxel's MNI position, over
maps of local contrast energy and of the three opponent channels of colour vision
(luminance, red-green, blue-yellow);
concept: the presence of each shape and colour (weighted by object size) through a
smooth concept -> voxel field, shared across subjects in MNI space plus an individual
part; early[v] falls from 1 to 0 from the occipital pole forwards. A trial adds
Gaussian noise of std ``std_s(signal[:, v]) / snr`` and a per-session gain and offset,
which per-session z-scoring (training-trial statistics) removes again.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

FEATURE_GRID = 16  # feature maps are pooled to 16 x 16 cells of the image
# Where retinotopic coding gives way to concept coding: y (MNI mm) of the midpoint, and the width of the change.
EARLY_MIDPOINT_Y, EARLY_WIDTH_MM = -82.0, 5.0
# Eccentricity grows from the occipital pole forwards over ECCENTRICITY_SPAN_MM; the calcarine sulcus
# (the horizontal meridian) lies near z = 5 mm.
OCCIPITAL_POLE_Y, ECCENTRICITY_SPAN_MM, CALCARINE_Z = -105.0, 35.0, 5.0
RF_JITTER = 0.05  # receptive-field centre scatter, in image half-widths
# Concept fields: white noise on a 2 mm MNI lattice covering the visual boxes, smoothed to ~8 mm patches.
FIELD_ORIGIN_MNI, FIELD_STEP_MM, FIELD_SHAPE = np.array([-64.0, -118.0, -38.0]), 2.0, (65, 45, 45)
FIELD_SMOOTHING_MM = 4.0
INDIVIDUAL_FIELD_WEIGHT = 0.5  # share of a concept field's std that is the subject's own
GAIN_LOG_STD = 0.3
OPPONENT_WEIGHT_STD = 0.7  # a voxel's weight on each opponent channel, relative to contrast energy's 1
# Session effects in units of the voxel's noise std (gain as a log std).
SESSION_GAIN_LOG_STD, SESSION_OFFSET_STD = 0.1, 1.0


CHANNELS = ("contrast energy", "luminance", "red-green", "blue-yellow")


def image_features(images: np.ndarray, chunk: int = 256) -> np.ndarray:
    """``float32 [n, len(CHANNELS), FEATURE_GRID**2]``: the CHANNELS' maps, pooled per cell.

    images ``uint8 [n, S, S, 3]`` with S a multiple of FEATURE_GRID.
    """
    n, size = images.shape[:2]
    cell = size // FEATURE_GRID
    sigma = size / 64  # about 2 px at 128: the scale of an edge, not of the whole object
    features = []
    for start in range(0, n, chunk):
        rgb = images[start:start + chunk].astype(np.float32) / 255.0
        luminance = rgb.mean(-1)
        contrast = luminance - ndimage.gaussian_filter(luminance, (0, sigma, sigma))
        energy = np.sqrt(ndimage.gaussian_filter(contrast**2, (0, sigma, sigma)))
        red_green = rgb[..., 0] - rgb[..., 1]
        blue_yellow = rgb[..., 2] - (rgb[..., 0] + rgb[..., 1]) / 2
        maps = np.stack([energy, luminance, red_green, blue_yellow], 1)
        pooled = maps.reshape(len(rgb), len(CHANNELS), FEATURE_GRID, cell, FEATURE_GRID, cell).mean((3, 5))
        features.append(pooled.reshape(len(rgb), len(CHANNELS), FEATURE_GRID**2))
    return np.concatenate(features).astype(np.float32)


def shared_concept_lattice(n_concepts: int, rng: np.random.Generator) -> np.ndarray:
    """``float32 [n_concepts, *FIELD_SHAPE]``: smooth unit-variance random fields on the MNI lattice."""
    noise = rng.standard_normal((n_concepts, *FIELD_SHAPE)).astype(np.float32)
    sigma = FIELD_SMOOTHING_MM / FIELD_STEP_MM
    fields = ndimage.gaussian_filter(noise, (0, sigma, sigma, sigma))
    return fields / fields.std(axis=(1, 2, 3), keepdims=True)


def _sample_lattice(lattice: np.ndarray, voxel_mni: np.ndarray) -> np.ndarray:
    """Lattice fields ``[K, ...]`` at MNI points ``[V, 3]`` -> ``[V, K]`` (trilinear)."""
    index = ((voxel_mni - FIELD_ORIGIN_MNI) / FIELD_STEP_MM).T
    return np.stack([ndimage.map_coordinates(field, index, order=1, mode="nearest") for field in lattice], 1)


@dataclasses.dataclass(frozen=True, eq=False)
class EncodingModel:
    """One subject's voxel tuning; every array has one row per stored voxel.

    early ``[V]`` in [0, 1]; rf_weights ``[V, FEATURE_GRID**2]`` (each row sums to 1);
    channel_weights ``[V, len(CHANNELS)]``;
    concept_field ``[V, n_concepts]``; gain ``[V]``.
    """

    early: np.ndarray
    rf_weights: np.ndarray
    channel_weights: np.ndarray
    concept_field: np.ndarray
    gain: np.ndarray

    @classmethod
    def build(cls, voxel_mni: np.ndarray, shared_lattice: np.ndarray, rng: np.random.Generator) -> EncodingModel:
        """The tuning of voxels at MNI positions ``[V, 3]``; the subject's own parts come from ``rng``."""
        x, y, z = voxel_mni.T
        early = 1.0 / (1.0 + np.exp((y - EARLY_MIDPOINT_Y) / EARLY_WIDTH_MM))
        # Retinotopy: each hemisphere sees the opposite half-field, cortex above the calcarine the lower
        # field (image y grows downwards), and eccentricity grows away from the pole.
        eccentricity = np.clip((y - OCCIPITAL_POLE_Y) / ECCENTRICITY_SPAN_MM, 0.05, 1.0)
        polar = np.arctan2(z - CALCARINE_Z, np.abs(x) + 10.0)
        centre = np.stack([np.where(x < 0, 1.0, -1.0) * eccentricity * np.cos(polar),
                           eccentricity * np.sin(polar)], 1) + rng.normal(0, RF_JITTER, (len(y), 2))
        rf_size = 0.08 + 0.25 * eccentricity
        cells = (np.arange(FEATURE_GRID) + 0.5) / FEATURE_GRID * 2 - 1
        grid = np.stack(np.meshgrid(cells, cells, indexing="xy"), -1).reshape(-1, 2)  # (x, y), row-major cells
        distance2 = ((centre[:, None, :] - grid[None]) ** 2).sum(-1)
        rf_weights = np.exp(-distance2 / (2 * rf_size[:, None] ** 2))
        rf_weights /= rf_weights.sum(1, keepdims=True)
        # Contrast drives every early voxel; the opponent channels, luminance included, with either sign.
        channel_weights = np.stack([1.0 + rng.normal(0, 0.2, len(y))]
                                   + [rng.normal(0, OPPONENT_WEIGHT_STD, len(y)) for _ in CHANNELS[1:]], 1)
        individual = shared_concept_lattice(len(shared_lattice), rng)
        concept_field = (np.sqrt(1 - INDIVIDUAL_FIELD_WEIGHT**2) * _sample_lattice(shared_lattice, voxel_mni)
                         + INDIVIDUAL_FIELD_WEIGHT * _sample_lattice(individual, voxel_mni))
        gain = np.exp(rng.normal(0, GAIN_LOG_STD, len(y)))
        return cls(early=early, rf_weights=rf_weights.astype(np.float32), channel_weights=channel_weights,
                   concept_field=concept_field, gain=gain)

    def retinotopic(self, features: np.ndarray) -> np.ndarray:
        """``float64 [n, V]``: the retinotopic part before scaling, for features ``[n, channels, cells]``."""
        return sum(self.channel_weights[:, c] * (features[:, c] @ self.rf_weights.T).astype(np.float64)
                   for c in range(features.shape[1]))

    def signal(self, features: np.ndarray, presence: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Noise-free responses ``float64 [n, V]`` to stimuli with features ``[n, 3, cells]`` and concept
        presence ``[n, n_concepts]``, and the concept maps ``[V, n_concepts]``: the exact weights of the
        concept part, so ``signal = retinotopic part + presence @ concept_maps.T``."""
        retinotopic = self.retinotopic(features)
        concept = presence.astype(np.float64) @ self.concept_field.T
        # Each pathway to unit variance across stimuli (averaged over voxels), so `early` alone sets the mix.
        retinotopic_scale, concept_scale = (np.sqrt(part.var(0).mean()) for part in (retinotopic, concept))
        concept_maps = (self.gain * (1 - self.early) / concept_scale)[:, None] * self.concept_field
        signal = (self.gain * self.early / retinotopic_scale) * retinotopic + presence @ concept_maps.T
        return signal, concept_maps.astype(np.float32)


def simulate_betas(signal: np.ndarray, trial_stimulus: np.ndarray, trial_session: np.ndarray,
                   train_trial: np.ndarray, snr: float, rng: np.random.Generator) -> list[np.ndarray]:
    """Single-trial betas, one ``float16 [n_trials_in_session, V]`` per session, z-scored per session.

    signal ``[n, V]``; trial_stimulus ``[T]`` (row of signal), trial_session ``[T]``, train_trial
    ``bool [T]`` (z-scoring statistics come from training trials only, as in the field's practice).
    """
    noise_std = signal.std(0) / snr
    n_sessions, n_voxels = int(trial_session.max()) + 1, signal.shape[1]
    session_gain = np.exp(rng.normal(0, SESSION_GAIN_LOG_STD, (n_sessions, n_voxels)))
    session_offset = rng.normal(0, SESSION_OFFSET_STD, (n_sessions, n_voxels)) * noise_std
    sessions = []
    for session in range(n_sessions):
        trials = np.flatnonzero(trial_session == session)
        noise = rng.standard_normal((len(trials), n_voxels)) * noise_std
        raw = session_gain[session] * (signal[trial_stimulus[trials]] + noise) + session_offset[session]
        train = raw[train_trial[trials]]
        sessions.append(((raw - train.mean(0)) / train.std(0)).astype(np.float16))
    return sessions
