"""In-silico stimuli: scene graphs of 1-3 coloured shapes, their images and their captions.

A scene graph is plain JSON: a list of objects, each a shape, a colour, a size and
a cell of a 3 x 3 grid (objects never share a cell, so they never overlap), on a
uniform mid-grey background, the classic display of object-vision experiments: all
of a scene's variance is in its objects. Images are drawn from the graph alone, and
the five captions of each image are generated from it.
"""

from __future__ import annotations

import numpy as np

SHAPES = ("circle", "square", "triangle", "cross", "star")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 215, 40),
           "purple": (140, 60, 180), "orange": (245, 140, 30)}
BACKGROUND = 128  # mid-grey
SIZES = {"small": 0.08, "large": 0.14}  # radius as a fraction of the image side
# A concept's presence weight per object: a large object drives the concept voxels about twice as hard.
SIZE_WEIGHTS = {"small": 0.5, "large": 1.0}
CONCEPTS = SHAPES + tuple(COLOURS)
GRID = 3
CELL_NAMES = {(0, 0): "in the top left corner", (0, 1): "at the top", (0, 2): "in the top right corner",
              (1, 0): "on the left", (1, 1): "in the center", (1, 2): "on the right",
              (2, 0): "in the bottom left corner", (2, 1): "at the bottom", (2, 2): "in the bottom right corner"}
COUNT_WORDS = {1: "one shape", 2: "two shapes", 3: "three shapes"}


def sample_scene(rng: np.random.Generator) -> dict:
    """A random scene graph: 1-3 objects of distinct (shape, colour) in distinct cells."""
    n_objects = int(rng.integers(1, 4))
    cells = rng.choice(GRID * GRID, n_objects, replace=False)
    kinds = rng.choice(len(SHAPES) * len(COLOURS), n_objects, replace=False)
    objects = [{"shape": SHAPES[kind // len(COLOURS)], "colour": list(COLOURS)[kind % len(COLOURS)],
                "size": str(rng.choice(list(SIZES))), "cell": [int(cell // GRID), int(cell % GRID)],
                # Jitter within the cell, small enough that two large shapes in neighbouring cells never touch.
                "offset": [float(v) for v in rng.uniform(-1 / 48, 1 / 48, 2)]}
               for cell, kind in zip(cells, kinds)]
    return {"objects": objects}


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Pixels inside a unit-radius ``shape`` at offsets ``dx, dy`` (in radii; y grows downwards)."""
    if shape == "circle":
        return dx**2 + dy**2 <= 1.0
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.8
    if shape == "triangle":  # apex up, vertices on the unit circle
        return (dy <= 0.5) & (dy >= -1.0 + np.sqrt(3.0) * np.abs(dx))
    if shape == "cross":
        return ((np.abs(dx) <= 0.3) & (np.abs(dy) <= 0.95)) | ((np.abs(dy) <= 0.3) & (np.abs(dx) <= 0.95))
    if shape == "star":  # five points, one up: the radius falls from 1 at a tip to 0.45 between tips
        sector = 2 * np.pi / 5
        phase = np.mod(np.arctan2(dx, -dy), sector) / sector
        return np.hypot(dx, dy) <= 0.45 + 0.55 * np.abs(2 * phase - 1)
    raise ValueError(f"unknown shape {shape!r}")


def object_centre(obj: dict, image_size: int) -> tuple[float, float]:
    """Pixel centre (x, y) of an object."""
    row, col = obj["cell"]
    return ((col + 0.5) / GRID + obj["offset"][0]) * image_size, ((row + 0.5) / GRID + obj["offset"][1]) * image_size


def draw_scene(scene: dict, image_size: int) -> np.ndarray:
    """The scene's image, ``uint8 [image_size, image_size, 3]``."""
    image = np.full((image_size, image_size, 3), BACKGROUND, np.uint8)
    ys, xs = np.mgrid[:image_size, :image_size] + 0.5
    for obj in scene["objects"]:
        cx, cy = object_centre(obj, image_size)
        radius = SIZES[obj["size"]] * image_size
        image[_shape_mask(obj["shape"], (xs - cx) / radius, (ys - cy) / radius)] = COLOURS[obj["colour"]]
    return image


def _with_article(phrase: str) -> str:
    return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


def _words(obj: dict, with_size: bool = True) -> str:
    return " ".join(([obj["size"]] if with_size else []) + [obj["colour"], obj["shape"]])


def _name(obj: dict, with_size: bool = True) -> str:
    return _with_article(_words(obj, with_size))


def relation(a: dict, b: dict) -> str:
    """Where ``a`` is relative to ``b``: "left of", "right of", "above" or "below" (columns first)."""
    (row_a, col_a), (row_b, col_b) = a["cell"], b["cell"]
    if col_a != col_b:
        return "left of" if col_a < col_b else "right of"
    return "above" if row_a < row_b else "below"


def _listing(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def captions(scene: dict, rng: np.random.Generator) -> list[str]:
    """Five captions of the scene; each names every object by colour and shape."""
    objects = [scene["objects"][i] for i in rng.permutation(len(scene["objects"]))]
    chain = _name(objects[0]) if len(objects) > 1 else f"a single {_words(objects[0])}"
    for k, (previous, obj) in enumerate(zip(objects, objects[1:])):
        chain += (" " if k == 0 else ", which is ") + f"{relation(previous, obj)} {_name(obj)}"
    return [
        _listing([_name(o) for o in objects]),
        chain,
        _listing([f"{_name(o, with_size=False)} {CELL_NAMES[tuple(o['cell'])]}" for o in objects]),
        f"{COUNT_WORDS[len(objects)]}: {_listing([_name(o, with_size=False) for o in objects])}",
        f"{_listing([_name(o) for o in objects])} on a gray background",
    ]


def concept_presence(scenes: list[dict]) -> np.ndarray:
    """``float32 [n_scenes, len(CONCEPTS)]``: per concept, the summed size weights of the objects showing it."""
    presence = np.zeros((len(scenes), len(CONCEPTS)), np.float32)
    for i, scene in enumerate(scenes):
        for obj in scene["objects"]:
            for concept in (obj["shape"], obj["colour"]):
                presence[i, CONCEPTS.index(concept)] += SIZE_WEIGHTS[obj["size"]]
    return presence
