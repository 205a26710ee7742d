"""The prepared dataset's stimuli: NSD's images (nsd_stimuli.hdf5) and their COCO captions.

Prepared stimulus id i is the i-th smallest 73k id the chosen subjects saw; only those rows of
``imgBrick`` (73000 x 425 x 425 x 3 uint8, about 40 GB) are copied.
"""

from __future__ import annotations

from collections.abc import Sequence
import json
from pathlib import Path

import h5py
import numpy as np

from nvl_jax.data.nsd.layout import NSDError, coco_captions, require

# imgBrick rows per h5py read: h5py's fancy indexing wants increasing indices and gets slow on long lists.
_ROWS_PER_READ = 64


class SelectedImages:
    """``uint8 [len(ids), H, W, 3]``: the rows ``ids`` (increasing 73k ids) of imgBrick, read when sliced.

    DatasetWriter.write_stimuli copies any array that slices; this one reads only the wanted rows
    and reports each read to ``progress`` (a tqdm bar, or None).
    """

    def __init__(self, brick: h5py.Dataset, ids: np.ndarray, progress=None):
        self.brick, self.ids, self.progress = brick, np.asarray(ids, np.int64), progress
        self.shape = (len(self.ids), *brick.shape[1:])
        self.dtype = brick.dtype

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, rows: slice) -> np.ndarray:
        wanted = self.ids[rows]
        images = np.empty((len(wanted), *self.shape[1:]), self.dtype)
        for start in range(0, len(wanted), _ROWS_PER_READ):
            chunk = wanted[start:start + _ROWS_PER_READ]
            images[start:start + len(chunk)] = self.brick[chunk.tolist()]
            if self.progress is not None:
                self.progress.update(len(chunk))
        return images


def open_stimuli(path: Path, ids: np.ndarray) -> tuple[h5py.File, h5py.Dataset]:
    """The open file and its ``imgBrick`` ``uint8 [73000, H, W, 3]``, checked to hold rows ``ids``."""
    require(path, "NSD's stimuli, nsd_stimuli.hdf5 with dataset imgBrick")
    try:
        file = h5py.File(path, "r")
    except OSError as e:
        raise NSDError(f"{path}: not a readable HDF5 file ({e})") from e
    brick = file.get("imgBrick")
    if not isinstance(brick, h5py.Dataset) or brick.ndim != 4 or brick.shape[3] != 3 or brick.dtype != np.uint8:
        found = f"{brick.dtype} {brick.shape}" if isinstance(brick, h5py.Dataset) else f"entries {list(file)}"
        file.close()
        raise NSDError(f"{path}: expected dataset imgBrick uint8 [73000, H, W, 3], found {found}")
    if len(ids) and ids.max() >= brick.shape[0]:
        file.close()
        raise NSDError(f"{path}: imgBrick has {brick.shape[0]} images, the design shows 73k id {ids.max()}")
    return file, brick


def load_captions(coco_dir: Path, coco_ids: np.ndarray, coco_splits: Sequence[str]) -> list[list[str]]:
    """Per stimulus, its COCO captions in annotation-id order, stripped; stimulus i is COCO image
    ``coco_ids[i]`` of split ``coco_splits[i]`` (train2017 / val2017)."""
    by_image: dict[tuple[str, int], list[str]] = {}
    files = {}
    for coco_split in sorted(set(coco_splits)):
        path = files[coco_split] = coco_captions(coco_dir, coco_split)
        wanted = {int(c) for c, s in zip(coco_ids, coco_splits) if s == coco_split}
        try:
            annotations = json.loads(path.read_text())["annotations"]
            annotations = sorted((a for a in annotations if a["image_id"] in wanted), key=lambda a: a["id"])
            for a in annotations:
                by_image.setdefault((coco_split, a["image_id"]), []).append(a["caption"].strip())
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise NSDError(f"{path}: expected COCO caption annotations {{'annotations': [{{'image_id', 'id', "
                           f"'caption'}}, ...]}} ({type(e).__name__}: {e})") from e
    captions = []
    for coco_id, coco_split in zip(coco_ids, coco_splits):
        if not (found := by_image.get((coco_split, int(coco_id)))):
            raise NSDError(f"{files[coco_split]}: no caption of COCO image {coco_id} (expected at least one per "
                           "NSD stimulus)")
        captions.append(found)
    return captions
