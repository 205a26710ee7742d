"""Object F1 of an in-silico caption: the (colour, shape) pairs it names against the scene graph's.

A mention is a colour word directly followed by a shape word, singular or
plural ("red circle", "blue stars"), with the vocabulary of
``nvl_jax.data.synthetic.scenes``. Its count is the number word before it, size
words skipped ("two large red circles": 2; "a"/"an"/"single": 1); a plural without
one counts 2 (at least two), a singular 1. A pair named several times counts
as the most any mention of it says, so naming the same object again ("... left
of the red circle") is not a second object. Mentions without a colour ("a
square") or with two colours ("red and blue circles") are not read.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
import re

from nvl_jax.data.synthetic.scenes import COLOURS, SHAPES, SIZES

_SHAPE_FORMS = {**{s: (s, False) for s in SHAPES}, **{s + ("es" if s.endswith("s") else "s"): (s, True)
                                                     for s in SHAPES}}
_NUMBERS = {"a": 1, "an": 1, "one": 1, "single": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6,
            "seven": 7, "eight": 8, "nine": 9, "ten": 10}
_SIZE_WORDS = set(SIZES) | {"big", "tiny", "little"}


def mentioned_objects(caption: str) -> Counter:
    """``Counter({(colour, shape): count})`` of the objects ``caption`` names."""
    words = re.findall(r"[a-z]+|\d+", caption.lower())
    claimed = Counter()
    for k in range(len(words) - 1):
        if words[k] not in COLOURS or words[k + 1] not in _SHAPE_FORMS:
            continue
        shape, plural = _SHAPE_FORMS[words[k + 1]]
        j = k - 1
        while j >= 0 and words[j] in _SIZE_WORDS:
            j -= 1
        before = words[j] if j >= 0 else ""
        count = int(before) if before.isdigit() else _NUMBERS.get(before, 2 if plural else 1)
        pair = (words[k], shape)
        claimed[pair] = max(claimed[pair], count)
    return claimed


def object_f1(caption: str, scene_objects: Sequence[tuple[str, str]]) -> float:
    """F1 of the (colour, shape) objects ``caption`` names against ``scene_objects`` (counted with multiplicity).

    ``scene_objects``: the scene graph's ``[(colour, shape), ...]``, e.g.
    ``[(o["colour"], o["shape"]) for o in scene["objects"]]``.
    """
    if not scene_objects:
        raise ValueError("scene_objects is empty: a scene graph has at least one object")
    for colour, shape in scene_objects:
        if colour not in COLOURS or shape not in SHAPES:
            raise ValueError(f"scene object {(colour, shape)!r} is not a (colour, shape) of the in-silico scenes: "
                             f"colours {sorted(COLOURS)}, shapes {list(SHAPES)}")
    truth = Counter((colour, shape) for colour, shape in scene_objects)
    claimed = mentioned_objects(caption)
    hits = sum((truth & claimed).values())
    if hits == 0:
        return 0.0
    precision, recall = hits / sum(claimed.values()), hits / sum(truth.values())
    return 2 * precision * recall / (precision + recall)
