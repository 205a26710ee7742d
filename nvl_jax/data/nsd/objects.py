"""COCO's object instances of NSD's stimuli (``prepare_nsd --coco_instances``): stimuli/objects.json.

Per stimulus, its COCO annotations in annotation-id order as ``{"category": name, "box": [x0, y0, x1,
y1]}``, the box in fractions of the stimulus image: NSD cut ``cropBox`` (fractions of the COCO image
from its top, bottom, left and right) before resizing, so a COCO box ``[x, y, w, h]`` in pixels of a
W x H image becomes ``((x / W - left) / (1 - left - right), (y / H - top) / (1 - top - bottom), ...)``,
clipped to the image. Boxes cropped away entirely are dropped, and so are crowd annotations
(``iscrowd``: one box over many instances, which would falsify counts).
"""

from __future__ import annotations

from collections.abc import Sequence
import json
from pathlib import Path

import numpy as np

from nvl_jax.data.nsd.layout import NSDError, coco_annotations


def _stimulus_box(bbox: Sequence[float], width: float, height: float, crop: np.ndarray) -> list[float] | None:
    top, bottom, left, right = crop
    x, y, w, h = bbox
    xs = np.clip((np.array([x, x + w]) / width - left) / (1 - left - right), 0, 1)
    ys = np.clip((np.array([y, y + h]) / height - top) / (1 - top - bottom), 0, 1)
    if xs[1] <= xs[0] or ys[1] <= ys[0]:
        return None
    return [round(float(v), 4) for v in (xs[0], ys[0], xs[1], ys[1])]


def load_objects(coco_dir: Path, coco_ids: np.ndarray, coco_splits: Sequence[str],
                 crop_boxes: np.ndarray) -> list[list[dict]]:
    """Per stimulus i (COCO image ``coco_ids[i]`` of split ``coco_splits[i]``, NSD's ``crop_boxes[i]``
    ``[4]``), its objects as in the module docstring."""
    if np.isnan(crop_boxes).any():
        raise NSDError("nsd_stim_info_merged.csv: no cropBox column; --coco_instances needs it to place COCO's boxes "
                       "in NSD's cropped images")
    objects: dict[tuple[str, int], list[dict]] = {}
    for coco_split in sorted(set(coco_splits)):
        path = coco_annotations(coco_dir, "instances", coco_split)
        wanted = {int(c) for c, s in zip(coco_ids, coco_splits) if s == coco_split}
        crop_of = {int(c): crop for c, s, crop in zip(coco_ids, coco_splits, crop_boxes) if s == coco_split}
        try:
            content = json.loads(path.read_text())
            names = {c["id"]: c["name"] for c in content["categories"]}
            sizes = {i["id"]: (i["width"], i["height"]) for i in content["images"] if i["id"] in wanted}
            for a in sorted((a for a in content["annotations"] if a["image_id"] in wanted), key=lambda a: a["id"]):
                box = None if a.get("iscrowd") else _stimulus_box(a["bbox"], *sizes[a["image_id"]],
                                                                  crop_of[a["image_id"]])
                if box is not None:
                    objects.setdefault((coco_split, a["image_id"]), []).append(
                        {"category": names[a["category_id"]], "box": box})
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
            raise NSDError(f"{path}: expected COCO instance annotations {{'images': [{{'id', 'width', 'height'}}], "
                           f"'annotations': [{{'id', 'image_id', 'category_id', 'bbox', 'iscrowd'}}], 'categories': "
                           f"[{{'id', 'name'}}]}} ({type(e).__name__}: {e})") from e
    return [objects.get((s, int(c)), []) for c, s in zip(coco_ids, coco_splits)]
