"""Instruction data: the offline builder (every kind for every stimulus, answers true to the scene,
deterministic for a seed), its storage in the prepared dataset, the LLaVA-format reader and its errors,
and COCO's objects from prepare_nsd --coco_instances."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest

import nsd_tree
from nvl_jax.data import format as fmt
from nvl_jax.data import instruction_templates as templates
from nvl_jax.data import instructions, synthetic
from nvl_jax.data.nsd import PrepareOptions, objects, prepare
from nvl_jax.language import IGNORE_INDEX, check_segmentation, tokenize_conversation
from nvl_jax.language.llama3_tokenizer import load_llama3_tokenizer


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("insilico") / "data"
    synthetic.generate(root, synthetic.SyntheticConfig(scale=0.25, train_stimuli=24, test_stimuli=8, sessions=1,
                                                       image_size=32), progress=False)
    return root


@pytest.fixture
def dataset_copy(dataset_root, tmp_path):
    shutil.copytree(dataset_root, tmp_path / "data")
    return tmp_path / "data"


@pytest.fixture(scope="module")
def built(dataset_root):
    return instructions.build(fmt.PreparedDataset.open(dataset_root, check_values=False), seed=0)


def _scenes(root) -> list[dict]:
    return json.loads((root / "stimuli" / "scenes.json").read_text())


def test_every_stimulus_gets_every_kind_once(built, dataset_root):
    n_stimuli = fmt.PreparedDataset.open(dataset_root, check_values=False).n_stimuli
    kinds = {(r["stimulus"], r["kind"]) for r in built}
    assert len(built) == len(kinds) == n_stimuli * len(templates.KINDS)
    for record in built:
        first = record["conversation"][0]["content"]
        assert first.startswith("<image>\n") and record["conversation"][-1]["role"] == "assistant"
        assert record["id"] == f"{record['stimulus']}-{record['kind']}"
    rounds = [len(r["conversation"]) // 2 for r in built if r["kind"] == "dialogue"]
    assert min(rounds) >= 2 and max(rounds) <= 4


def test_answers_are_true_to_the_scene(built, dataset_root):
    scenes, captions = _scenes(dataset_root), fmt.PreparedDataset.open(dataset_root, check_values=False).captions()
    for record in built:
        scene, (question, answer) = scenes[record["stimulus"]]["objects"], (m["content"] for m in
                                                                           record["conversation"][:2])
        labels = [f"{o['colour']} {o['shape']}" for o in scene]
        if record["kind"] == "brief":
            assert question.removeprefix("<image>\n") in templates.BRIEF_INSTRUCTIONS
            assert answer in captions[record["stimulus"]]
        elif record["kind"] == "detailed":
            assert question.removeprefix("<image>\n") in templates.DETAILED_INSTRUCTIONS
            assert all(label in answer for label in labels)
        elif record["kind"] == "sd_prompt":
            assert question == "<image>\n" + templates.SD_PROMPT_INSTRUCTION
            assert all(label in answer for label in labels) and answer.endswith(templates.SD_STYLES["in-silico"])
        elif record["kind"] == "concept":
            assert question == f'<image>\nLocating the concept of "{answer}"'
            assert answer in {o["shape"] for o in scene} | {o["colour"] for o in scene}
        elif record["kind"] == "dialogue":
            turns = record["conversation"]
            for q, a in zip(turns[::2], turns[1::2]):
                if "How many" in q["content"]:
                    shape = next(s for s in ("circle", "square", "triangle", "cross", "star")
                                 if templates.plural(s) in q["content"])
                    n = sum(o["shape"] == shape for o in scene)
                    expected = f"There are no {templates.plural(shape)}" if n == 0 else templates.counted(
                        n, shape, exact=True)
                    assert expected in a["content"], (q, a)
                if "What objects" in q["content"]:
                    assert all(label in a["content"] for label in labels)


def test_the_builder_is_deterministic_for_a_seed(dataset_copy):
    instructions.write(dataset_copy, seed=3)
    first = (dataset_copy / "instructions" / "conversations.jsonl").read_bytes()
    instructions.write(dataset_copy, seed=3)
    assert (dataset_copy / "instructions" / "conversations.jsonl").read_bytes() == first
    instructions.write(dataset_copy, seed=4)
    assert (dataset_copy / "instructions" / "conversations.jsonl").read_bytes() != first


def test_stored_instructions_read_back_and_damage_is_named(dataset_copy, built):
    info = instructions.write(dataset_copy, seed=0)
    assert info["n_conversations"] == len(built) and info["kinds"]["concept"] == info["stimuli"]
    dataset = fmt.PreparedDataset.open(dataset_copy, check_values=False)
    assert dataset.has_instructions() and dataset.instructions() == built
    path = dataset_copy / "instructions" / "conversations.jsonl"
    lines = path.read_text().splitlines()
    for line, message in [
        ("{not json", "line 3: not valid JSON"),
        (json.dumps({**json.loads(lines[2]), "stimulus": 10**6}), "line 3: stimulus 1000000 is outside"),
        (json.dumps({**json.loads(lines[2]), "conversation": [{"role": "user", "content": "hi"}]}),
         r"line 3: conversation must hold <image>"),
        (json.dumps({**json.loads(lines[2]), "conversation": [{"role": "gpt", "content": "hi"}]}),
         "line 3: conversation: message 0: role must be one of"),
    ]:
        path.write_text("\n".join(lines[:2] + [line] + lines[3:]) + "\n")
        with pytest.raises(fmt.DatasetError, match=f"instructions/conversations.jsonl {message}"):
            fmt.PreparedDataset.open(dataset_copy, check_values=False)
    path.write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(fmt.DatasetError, match=f"{len(lines) - 1} lines, .* n_conversations is {len(lines)}"):
        fmt.PreparedDataset.open(dataset_copy, check_values=False)


def test_generated_conversations_tokenize_with_answer_labels(built):
    tokenizer = load_llama3_tokenizer()
    for record in built[:len(templates.KINDS) * 3]:
        for name in ("paper", "llama3"):
            check_segmentation(record["conversation"], name, tokenizer)
            sample = tokenize_conversation(record["conversation"], name, tokenizer, max_length=512)
            answers = [m["content"] for m in record["conversation"] if m["role"] == "assistant"]
            labelled = tokenizer.decode(sample.labels[sample.labels != IGNORE_INDEX])
            assert labelled.replace("<|eot_id|>", " ").split() == " ".join(answers).split()
            assert labelled.count("<|eot_id|>") == len(answers)


def _llava_file(path, entries):
    path.write_text(json.dumps(entries))
    return path


def _entry(image, question="<image>\nDescribe the image concisely.", answer="a red circle", **extra):
    return {"id": f"e-{image}", "image": image,
            "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}], **extra}


def test_llava_files_map_images_to_stimuli(dataset_copy, tmp_path):
    source_ids = np.load(dataset_copy / "stimuli" / "source_ids.npy")
    entries = [_entry("images/nsd_00005.png"), _entry("12.jpg", "What is shown?\n<image>", "shapes"),
               _entry("nsd_99999.png"),
               {"id": 7, "image": "scene-3.png", "conversations": [
                   {"from": "human", "value": "<image>\nHow many circles?"}, {"from": "gpt", "value": "One."},
                   {"from": "human", "value": "Where?"}, {"from": "gpt", "value": "On the left."}]},
               _entry("4.png", '<image>\nLocating the concept of "red"', "red")]
    records, skipped = instructions.read_llava(_llava_file(tmp_path / "sft.json", entries), source_ids)
    assert skipped == 1
    assert [(r["id"], r["stimulus"], r["kind"]) for r in records] == [
        ("e-images/nsd_00005.png", 5, "brief"), ("e-12.jpg", 12, "conversation"), ("7", 3, "dialogue"),
        ("e-4.png", 4, "concept")]
    assert records[2]["conversation"][3] == {"role": "assistant", "content": "On the left."}
    one_based, _ = instructions.read_llava(tmp_path / "sft.json", source_ids, id_base=1)
    assert [r["stimulus"] for r in one_based] == [4, 11, 2, 3]
    info = instructions.write(dataset_copy, llava=[tmp_path / "sft.json"])
    assert info["source"] == "llava" and info["skipped_entries"] == 1 and info["n_conversations"] == 4
    assert fmt.PreparedDataset.open(dataset_copy, check_values=False).instructions() == records


@pytest.mark.parametrize("entries, message", [
    ({"id": 1}, "expected a list of entries"),
    ([{"id": 1, "image": "1.png"}], r"entry 0: expected the fields 'id', 'image' and 'conversations'"),
    ([_entry("photo.png")], r"entry 0 \(id 'e-photo.png'\): field 'image' 'photo.png' holds no number"),
    ([_entry("1.png", question="Describe.")], r"entry 0 \(id 'e-1.png'\): field 'conversations' must hold <image>"),
    ([{**_entry("1.png"), "conversations": [{"from": "robot", "value": "x"}]}], "'from': 'human' | 'gpt'"),
    ([{**_entry("1.png"), "conversations": [{"from": "gpt", "value": "x"}]}],
     "field 'conversations': message 0: role 'assistant', expected 'user'"),
    ([_entry("5000.png")], "none of its 1 images is a stimulus of the dataset"),
])
def test_bad_llava_files_are_named(dataset_root, tmp_path, entries, message):
    path = _llava_file(tmp_path / "sft.json", entries)
    with pytest.raises(instructions.InstructionError, match=f"sft.json: {message}" if "entry" in message else message):
        instructions.read_llava(path, np.load(dataset_root / "stimuli" / "source_ids.npy"))


def test_cli_writes_the_data_and_reports_errors(dataset_copy, capsys, monkeypatch):
    instructions.main(["--data", str(dataset_copy), "--seed", "1"])
    assert "conversations (" in capsys.readouterr().out
    (dataset_copy / "stimuli" / "scenes.json").unlink()
    with pytest.raises(SystemExit, match="neither scenes.json .* nor objects.json .*--coco_instances"):
        instructions.main(["--data", str(dataset_copy)])
    monkeypatch.setattr(sys, "argv", ["instructions", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        instructions.main()
    assert exit_info.value.code == 0 and "--llava_id_base" in capsys.readouterr().out


def _instances(coco, tree_coco_ids, splits):
    """COCO instance files: image i (1000 x 500 pixels) has a dog at its left edge and, for even i, two cats
    and a crowd of people; annotations of other images too."""
    files = {split: {"images": [], "annotations": [], "categories": [{"id": 18, "name": "dog"},
                                                                     {"id": 17, "name": "cat"},
                                                                     {"id": 1, "name": "person"}]}
             for split in set(splits)}
    next_id = iter(range(10**6, 0, -1))
    for i, (coco_id, split) in enumerate(zip(tree_coco_ids, splits)):
        files[split]["images"].append({"id": int(coco_id), "width": 1000, "height": 500})
        boxes = [(18, [0, 100, 200, 100], 0)] + ([(17, [500, 0, 100, 250], 0), (17, [700, 250, 200, 250], 0),
                                                  (1, [0, 0, 1000, 500], 1)] if i % 2 == 0 else [])
        files[split]["annotations"] += [{"id": next(next_id), "image_id": int(coco_id), "category_id": c, "bbox": b,
                                         "iscrowd": crowd} for c, b, crowd in boxes]
    for split, content in files.items():
        (coco / "annotations" / f"instances_{split}.json").write_text(json.dumps(content))


def test_prepare_nsd_coco_instances_feed_the_builder(tmp_path):
    tree = nsd_tree.build(tmp_path / "tree")
    coco_ids = 100000 + 7 * np.arange(nsd_tree.N_IMAGES)
    splits = ["val2017" if i % 3 == 0 else "train2017" for i in range(nsd_tree.N_IMAGES)]
    _instances(tree.coco, coco_ids, splits)
    out = tmp_path / "prepared"
    prepare(PrepareOptions(tree.root, tree.coco, subjects=(1, 2), sessions=nsd_tree.SESSIONS,
                           trials_per_session=nsd_tree.TRIALS_PER_SESSION, coco_instances=True), out, progress=False)
    stored = json.loads((out / "stimuli" / "objects.json").read_text())
    source_ids = np.load(out / "stimuli" / "source_ids.npy")
    # nsd_tree's cropBox (0, 0, 0.1, 0.1) cuts a tenth from the left and the right: x' = (x / 1000 - 0.1) / 0.8.
    # Annotation ids fall in file order, so annotation-id order reverses it; the crowd is dropped.
    assert stored[0] == [{"category": "cat", "box": [0.75, 0.5, 1.0, 1.0]},
                         {"category": "cat", "box": [0.5, 0.0, 0.625, 0.5]},
                         {"category": "dog", "box": [0.0, 0.2, 0.125, 0.4]}]
    assert [len(s) for s in stored] == [3 if i % 2 == 0 else 1 for i in source_ids]
    assert "stimuli/objects.json" in json.loads((out / "checksums.json").read_text())["files"]
    records = instructions.build(fmt.PreparedDataset.open(out, check_values=False), seed=0)
    assert len(records) == len(source_ids) * len(templates.KINDS)
    first = {r["kind"]: r["conversation"] for r in records if r["stimulus"] == 0}
    assert first["concept"][1]["content"] in {"dog", "cat"}
    assert "two cats and a dog" in first["detailed"][1]["content"]


def test_objects_refuse_a_stim_info_without_crop_boxes(tmp_path):
    with pytest.raises(Exception, match="no cropBox column"):
        objects.load_objects(tmp_path, np.array([1]), ["val2017"], np.full((1, 4), np.nan))
