"""Conversations -> token ids and labels, built segment by segment; batches of them, padded.

Labels are made while tokenizing: each segment of the rendered conversation (nvl_jax.language.formats)
is tokenized on its own (``add_special_tokens=False``) and its ids get labels by its kind: an
answer's tokens (with its end-of-turn token) are their own labels, every other token
``IGNORE_INDEX``. Nothing is re-counted afterwards (LLaVA's ``preprocess_v1`` re-counts round
lengths and, on a mismatch, silently masks the whole sample). The image placeholder becomes the one
id ``IMAGE_TOKEN_INDEX``, which the brain-language model's merge replaces by the brain tokens.

``check_segmentation`` proves, per conversation, that the segment-wise ids equal those of the
whole rendered text tokenized at once (between images), i.e. that no BPE merge crosses a segment
boundary.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses

import numpy as np

from nvl_jax.language.formats import ChatTemplateFormat, Segment, TemplateFormat, get_format
# LLaVA's ids, owned by the model whose merge consumes them: the image placeholder, a label outside the loss.
from nvl_jax.models.brain_lm.merge import IGNORE_INDEX, IMAGE_TOKEN_INDEX


@dataclasses.dataclass(frozen=True)
class TokenizedConversation:
    """input_ids ``int32 [length]`` (``IMAGE_TOKEN_INDEX`` at the image); labels ``int32 [length]``:
    the answer tokens' own ids, ``IGNORE_INDEX`` elsewhere (aligned with input_ids, not shifted:
    the loss predicts ``labels[t + 1]`` at position t); image_position: the index of
    ``IMAGE_TOKEN_INDEX``, -1 without an image; n_truncated: tokens cut from the end to fit
    ``max_length`` (0: nothing cut)."""

    input_ids: np.ndarray
    labels: np.ndarray
    image_position: int
    n_truncated: int


Format = TemplateFormat | ChatTemplateFormat


def _resolve(fmt: Format | str) -> Format:
    return get_format(fmt) if isinstance(fmt, str) else fmt


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def tokenize_conversation(conversation: Sequence[Mapping[str, str]], fmt: Format | str, tokenizer, *,
                          max_length: int) -> TokenizedConversation:
    """Tokenizes a conversation (see nvl_jax.language.formats) in format ``fmt`` (a format or its
    name). ``max_length`` bounds ``len(input_ids)``, the placeholder counting as one token (after the
    model's merge a sequence is ``len(input_ids) - 1 + n_brain_tokens`` long); longer sequences are
    cut at the end and report ``n_truncated``. A conversation that ends with a user turn gives a
    generation prompt (all labels ``IGNORE_INDEX``)."""
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    input_ids: list[int] = []
    labels: list[int] = []
    for segment in _resolve(fmt).render(conversation, tokenizer):
        if segment.kind == "image":
            input_ids.append(IMAGE_TOKEN_INDEX)
            labels.append(IGNORE_INDEX)
            continue
        ids = _ids(tokenizer, segment.text)
        input_ids += ids
        labels += ids if segment.kind == "answer" else [IGNORE_INDEX] * len(ids)
    n_truncated = max(0, len(input_ids) - max_length)
    image_position = input_ids.index(IMAGE_TOKEN_INDEX) if IMAGE_TOKEN_INDEX in input_ids else -1
    if image_position >= max_length:
        raise ValueError(f"max_length {max_length} cuts off the image placeholder at position {image_position}; "
                         "raise max_length")
    return TokenizedConversation(np.asarray(input_ids[:max_length], np.int32),
                                 np.asarray(labels[:max_length], np.int32), image_position, n_truncated)


def check_segmentation(conversation: Sequence[Mapping[str, str]], fmt: Format | str, tokenizer) -> None:
    """Raises ValueError unless tokenizing segment by segment gives the ids of tokenizing the rendered
    text whole (each stretch between images at once): then labels follow token boundaries exactly."""
    stretches: list[list[Segment]] = [[]]
    for segment in _resolve(fmt).render(conversation, tokenizer):
        if segment.kind == "image":
            stretches.append([])
        else:
            stretches[-1].append(segment)
    for k, stretch in enumerate(stretches):
        whole = _ids(tokenizer, "".join(s.text for s in stretch))
        pieces = [i for s in stretch for i in _ids(tokenizer, s.text)]
        if whole != pieces:
            first = next((i for i, (a, b) in enumerate(zip(whole, pieces)) if a != b), min(len(whole), len(pieces)))
            raise ValueError(f"format {_resolve(fmt).name!r}: text stretch {k} tokenizes differently whole and per "
                             f"segment from token {first}: {tokenizer.convert_ids_to_tokens(whole[first:first + 4])} "
                             f"vs {tokenizer.convert_ids_to_tokens(pieces[first:first + 4])} (segments "
                             f"{[s.text for s in stretch]})")


def collate(samples: Sequence[TokenizedConversation], *, pad_id: int, length: int | None = None,
            padding_side: str = "right", require_labels: bool = True) -> dict[str, np.ndarray]:
    """A padded batch of tokenized conversations, each array ``[batch, length]`` (length: ``length``,
    or the longest sample's when None) except image_position ``int32 [batch]``:

    - input_ids ``int32``: ``pad_id`` on padding, ``IMAGE_TOKEN_INDEX`` at each image;
    - labels ``int32``: ``IGNORE_INDEX`` on padding and on every non-answer token;
    - attention_mask ``int32``: 1 on the sample's tokens, 0 on padding;
    - image_position ``int32``: the image's index in its padded row, -1 without one.

    Training pads on the right; generation on the left (``padding_side="left"``), so every prompt
    ends at the last column. ``require_labels`` (training) makes a batch without a single answer
    token an error, not a silent zero loss.
    """
    if not samples:
        raise ValueError("collate: no samples")
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    longest = max(len(s.input_ids) for s in samples)
    length = longest if length is None else length
    if longest > length:
        raise ValueError(f"collate: a sample of {longest} tokens does not fit length {length} (tokenize with "
                         f"max_length <= {length})")
    batch = {"input_ids": np.full((len(samples), length), pad_id, np.int32),
             "labels": np.full((len(samples), length), IGNORE_INDEX, np.int32),
             "attention_mask": np.zeros((len(samples), length), np.int32),
             "image_position": np.full(len(samples), -1, np.int32)}
    for row, sample in enumerate(samples):
        start = 0 if padding_side == "right" else length - len(sample.input_ids)
        columns = slice(start, start + len(sample.input_ids))
        batch["input_ids"][row, columns] = sample.input_ids
        batch["labels"][row, columns] = sample.labels
        batch["attention_mask"][row, columns] = 1
        if sample.image_position >= 0:
            batch["image_position"][row] = start + sample.image_position
    if require_labels and (batch["labels"] == IGNORE_INDEX).all():
        truncated = sum(s.n_truncated > 0 for s in samples)
        raise ValueError(f"collate: every label of this batch of {len(samples)} conversations is IGNORE_INDEX (no "
                         f"answer token to learn from; {truncated} of them were truncated by max_length): a training "
                         "batch needs answers")
    return batch
