"""What the reconstruct command writes: PNGs, the stimulus | reconstruction grid, the beta plot."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def save_png(image: np.ndarray, path: Path) -> None:
    """Writes one uint8 image ``[height, width, 3]``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(image, np.uint8)).save(path)


def resized(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 ``[N, H, W, 3]`` -> ``[N, size[0], size[1], 3]`` (bicubic; unchanged if already that size)."""
    if images.shape[1:3] == tuple(size):
        return images
    return np.stack([np.asarray(Image.fromarray(im).resize((size[1], size[0]), Image.BICUBIC)) for im in images])


def grid(stimuli: np.ndarray, columns: list[np.ndarray], pad: int = 2) -> np.ndarray:
    """One row per record: the stimulus, then each column's image, all at the first column's size.

    ``stimuli`` and every column: uint8 ``[N, H, W, 3]``; returns uint8 ``[rows, cols, 3]`` on white.
    """
    size = columns[0].shape[1:3]
    panels = [resized(stimuli, size), *(resized(c, size) for c in columns)]
    n, (h, w) = len(stimuli), size
    out = np.full((n * (h + pad) + pad, len(panels) * (w + pad) + pad, 3), 255, np.uint8)
    for row in range(n):
        for col, images in enumerate(panels):
            y, x = pad + row * (h + pad), pad + col * (w + pad)
            out[y:y + h, x:x + w] = images[row]
    return out


def plot_sweep(betas: list[float], metrics: dict[str, dict[float, dict[str, float]]], path: Path) -> None:
    """One panel per metric against beta, a line per test mode. ``metrics[mode][beta][name]``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({name for by_beta in metrics.values() for m in by_beta.values() for name in m})
    fig, axes = plt.subplots(1, len(names), figsize=(3 * len(names), 2.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        for mode, by_beta in metrics.items():
            ax.plot(betas, [by_beta[b].get(name, np.nan) for b in betas], marker="o", label=mode)
        ax.set_title(name)
        ax.set_xlabel("beta")
    axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
