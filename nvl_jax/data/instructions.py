"""Instruction data for the brain-language model, stored in the prepared dataset (instructions/).

Either built offline, with no external LLM, for every stimulus: one conversation of each kind
(brief and detailed description, multi-round dialogue, complex reasoning, Stable Diffusion
prompt, concept localization; nvl_jax.data.instruction_templates) from the stimulus's captions and
objects (in-silico: stimuli/scenes.json; NSD: stimuli/objects.json, which prepare_nsd
--coco_instances writes from COCO's instances), deterministic for a seed. Or read from the
authors' LLaVA-format files (--llava).

    python -m nvl_jax.data.instructions --data DATA [--seed 0]
    python -m nvl_jax.data.instructions --data DATA --llava sft_data_tr.json --llava sft_data_te.json

LLaVA's ``image`` names a stimulus by the last run of digits in its file name: its source id
(stimuli/source_ids.npy: NSD's 0-based 73k id, the in-silico scene index), minus --llava_id_base
for files that count from 1. Entries of images the dataset does not hold are skipped and counted.
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Sequence
import json
from pathlib import Path
import re

import numpy as np

from nvl_jax.data import instruction_templates as templates
from nvl_jax.data.format import DatasetError, PreparedDataset, write_instructions
from nvl_jax.data.synthetic.scenes import SIZES
from nvl_jax.language.formats import IMAGE_PLACEHOLDER, check_conversation

LLAVA_ROLES = {"human": "user", "gpt": "assistant"}


class InstructionError(ValueError):
    """An input the instruction builder cannot use; the message names the file, entry and field."""


def _load_json(path: Path, what: str):
    if not path.is_file():
        raise InstructionError(f"{path}: missing (expected {what})")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InstructionError(f"{path}: not valid JSON ({e})") from e


def _scene_objects(path: Path, n_stimuli: int) -> list[list[templates.SceneObject]]:
    """stimuli/scenes.json (in-silico scene graphs, nvl_jax.data.synthetic.scenes) as SceneObjects."""
    scenes = _load_json(path, "the in-silico scene graphs")
    if not isinstance(scenes, list) or len(scenes) != n_stimuli:
        raise InstructionError(f"{path}: expected a list of {n_stimuli} scene graphs (dataset.json n_stimuli)")
    objects = []
    for i, scene in enumerate(scenes):
        try:
            objects.append([templates.SceneObject(o["shape"], o["colour"], ((o["cell"][1] + 0.5) / 3,
                                                                            (o["cell"][0] + 0.5) / 3),
                                                  np.pi * SIZES[o["size"]] ** 2) for o in scene["objects"]])
        except (KeyError, TypeError, IndexError) as e:
            raise InstructionError(f"{path}: scene {i}: expected {{'objects': [{{'shape', 'colour', 'size', 'cell'}}, "
                                   f"...]}} ({type(e).__name__}: {e})") from e
    return objects


def _coco_objects(path: Path, n_stimuli: int) -> list[list[templates.SceneObject]]:
    """stimuli/objects.json (prepare_nsd --coco_instances): per stimulus ``[{"category", "box": [x0, y0, x1, y1]}]``
    in fractions of the stimulus image."""
    stored = _load_json(path, "COCO's objects of each stimulus (python -m nvl_jax.data.prepare_nsd --coco_instances)")
    if not isinstance(stored, list) or len(stored) != n_stimuli:
        raise InstructionError(f"{path}: expected a list of {n_stimuli} object lists (dataset.json n_stimuli)")
    objects = []
    for i, entries in enumerate(stored):
        try:
            objects.append([templates.SceneObject(str(o["category"]), None,
                                                  ((o["box"][0] + o["box"][2]) / 2, (o["box"][1] + o["box"][3]) / 2),
                                                  (o["box"][2] - o["box"][0]) * (o["box"][3] - o["box"][1]))
                            for o in entries])
        except (KeyError, TypeError, IndexError) as e:
            raise InstructionError(f"{path}: stimulus {i}: expected [{{'category', 'box': [x0, y0, x1, y1]}}, ...] "
                                   f"({type(e).__name__}: {e})") from e
    return objects


def stimulus_objects(dataset: PreparedDataset) -> list[list[templates.SceneObject]]:
    """Each stimulus's objects: from stimuli/scenes.json (in-silico) or stimuli/objects.json (NSD)."""
    folder = dataset.root / "stimuli"
    if (folder / "scenes.json").is_file():
        return _scene_objects(folder / "scenes.json", dataset.n_stimuli)
    if (folder / "objects.json").is_file():
        return _coco_objects(folder / "objects.json", dataset.n_stimuli)
    raise InstructionError(f"{folder}: neither scenes.json (in-silico) nor objects.json (NSD: rerun "
                           "python -m nvl_jax.data.prepare_nsd with --coco_instances); dialogue, reasoning and concept "
                           "localization are built from the objects")


def build(dataset: PreparedDataset, seed: int = 0) -> list[dict]:
    """One conversation per kind and stimulus (a stimulus without objects has no concept localization),
    as records ``{"id", "stimulus", "kind", "conversation"}``. Each stimulus and kind draws from its own
    generator, seeded by (seed, stimulus, kind): the result depends on nothing else."""
    objects, captions = stimulus_objects(dataset), dataset.captions()
    vocabulary = sorted({o.name for scene in objects for o in scene})
    records = []
    for stimulus in range(dataset.n_stimuli):
        if not captions[stimulus]:
            raise InstructionError(f"stimuli/captions.json: stimulus {stimulus} has no caption")
        for k, kind in enumerate(templates.KINDS):
            rng = np.random.default_rng([seed, stimulus, k])
            conversation = templates.BUILDERS[kind](captions[stimulus], objects[stimulus], rng,
                                                    vocabulary=vocabulary, source=dataset.info["source"])
            if conversation:
                records.append({"id": f"{stimulus}-{kind}", "stimulus": stimulus, "kind": kind,
                                "conversation": conversation})
    return records


def _llava_kind(conversation: Sequence[dict]) -> str:
    """The builder's kind when the first instruction is one of the paper's; "conversation" otherwise."""
    first = conversation[0]["content"].replace(IMAGE_PLACEHOLDER, "").strip()
    if first in templates.BRIEF_INSTRUCTIONS:
        return "brief"
    if first in templates.DETAILED_INSTRUCTIONS:
        return "detailed"
    if first == templates.SD_PROMPT_INSTRUCTION:
        return "sd_prompt"
    if first.startswith(templates.CONCEPT_INSTRUCTION.split("{")[0]):
        return "concept"
    return "dialogue" if len(conversation) > 2 else "conversation"


def read_llava(path: str | Path, source_ids: np.ndarray, *, id_base: int = 0) -> tuple[list[dict], int]:
    """A LLaVA-format file ``[{"id", "image", "conversations": [{"from": "human"|"gpt", "value"}]}]`` as records
    (see ``build``), mapped to stimuli by ``source_ids`` (``int64 [n_stimuli]``, see the module docstring);
    returns them and the number of entries skipped because their image is not in the dataset."""
    path = Path(path)
    entries = _load_json(path, "a LLaVA-format instruction file")
    if not isinstance(entries, list):
        raise InstructionError(f"{path}: expected a list of entries {{'id', 'image', 'conversations'}}")
    stimulus_of = {int(s): i for i, s in enumerate(source_ids)}
    records, skipped = [], 0
    for index, entry in enumerate(entries):
        at = f"{path}: entry {index}"
        if not isinstance(entry, dict) or any(f not in entry for f in ("id", "image", "conversations")):
            raise InstructionError(f"{at}: expected the fields 'id', 'image' and 'conversations'")
        at = f"{path}: entry {index} (id {entry['id']!r})"
        digits = re.findall(r"\d+", Path(str(entry["image"])).stem)
        if not digits:
            raise InstructionError(f"{at}: field 'image' {entry['image']!r} holds no number to name a stimulus by")
        stimulus = stimulus_of.get(int(digits[-1]) - id_base)
        if stimulus is None:
            skipped += 1
            continue
        turns = entry["conversations"]
        if not isinstance(turns, list) or not all(isinstance(t, dict) and t.get("from") in LLAVA_ROLES
                                                  and isinstance(t.get("value"), str) for t in turns):
            raise InstructionError(f"{at}: field 'conversations' must be a list of {{'from': 'human' | 'gpt', "
                                   "'value': str}}")
        conversation = [{"role": LLAVA_ROLES[t["from"]], "content": t["value"]} for t in turns]
        try:
            check_conversation(conversation)
        except ValueError as e:
            raise InstructionError(f"{at}: field 'conversations': {e}") from e
        if IMAGE_PLACEHOLDER not in conversation[0]["content"] or conversation[-1]["role"] != "assistant":
            raise InstructionError(f"{at}: field 'conversations' must hold {IMAGE_PLACEHOLDER} in its first human turn "
                                   "and end with a gpt turn")
        records.append({"id": str(entry["id"]), "stimulus": stimulus, "kind": _llava_kind(conversation),
                        "conversation": conversation})
    if entries and not records:
        raise InstructionError(f"{path}: none of its {len(entries)} images is a stimulus of the dataset (by the last "
                               f"number in 'image', minus id base {id_base}, among stimuli/source_ids.npy); check "
                               "--llava_id_base")
    return records, skipped


def write(root: str | Path, *, seed: int = 0, llava: Sequence[str | Path] = (), llava_id_base: int = 0) -> dict:
    """Builds (or, with ``llava`` files, reads) the instruction data and stores it in the dataset at ``root``;
    returns instructions/instructions.json's content."""
    dataset = PreparedDataset.open(root, check_values=False)
    if llava:
        records, skipped = [], 0
        source_ids = np.load(dataset.root / "stimuli" / "source_ids.npy")
        for path in llava:
            found, missing = read_llava(path, source_ids, id_base=llava_id_base)
            records += found
            skipped += missing
        info = {"source": "llava", "files": [str(Path(p).resolve()) for p in llava], "id_base": llava_id_base,
                "skipped_entries": skipped}
    else:
        records = build(dataset, seed)
        info = {"source": "generated", "seed": seed}
    info["kinds"] = dict(sorted(Counter(r["kind"] for r in records).items()))
    info["stimuli"] = len({r["stimulus"] for r in records})
    write_instructions(dataset.root, records, info)
    PreparedDataset.open(root, check_values=False).instructions()  # the stored file reads back valid
    return {**info, "n_conversations": len(records)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m nvl_jax.data.instructions", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="a prepared dataset (docs/data_format.md)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the offline builder: the same seed gives the same bytes (default: %(default)s)")
    parser.add_argument("--llava", type=Path, action="append", default=[],
                        help="read this LLaVA-format file (e.g. the authors' sft_data_tr.json) instead of building; "
                             "repeat for several files")
    parser.add_argument("--llava_id_base", type=int, default=0, choices=(0, 1),
                        help="what the first image's number is in the --llava files' image names (default: "
                             "%(default)s, NSD's 0-based 73k ids)")
    args = parser.parse_args(argv)
    try:
        info = write(args.data, seed=args.seed, llava=args.llava, llava_id_base=args.llava_id_base)
    except (InstructionError, DatasetError) as e:
        raise SystemExit(f"instructions: error: {e}") from None
    kinds = ", ".join(f"{n} {kind}" for kind, n in info["kinds"].items())
    print(f"{args.data / 'instructions'}: {info['n_conversations']} conversations ({kinds}) for {info['stimuli']} "
          f"stimuli, {info['source']}" + (f"; {info['skipped_entries']} entries of other images skipped"
                                          if "skipped_entries" in info else ""))


if __name__ == "__main__":
    main()
