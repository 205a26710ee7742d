"""CLIP-S and RefCLIP-S (Hessel et al., 2021, "CLIPScore") with the project's CLIP towers.

For a caption ``c`` of image ``v`` with reference captions ``R``, all texts
prefixed with ``"A photo depicts "`` (clipscore embeds the references through the
same prefixed dataset as the candidates) and cos the cosine of CLIP embeddings:

    CLIP-S(c, v)       = 2.5 * max(cos(c, v), 0)
    RefCLIP-S(c, R, v) = harmonic mean of CLIP-S(c, v) and max(max_{r in R} cos(c, r), 0)

The text-text side carries no 2.5 weight. Both are averaged over images. The
protocol's CLIP is ViT-B/32 (``openai/clip-vit-base-patch32``), with its bicubic
short-side resize to 224 and center crop.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import os

import numpy as np
from flax import nnx

from nvl_jax.models import clip, hf_loader
from nvl_jax.models.clip.image_processor import CLIPImageProcessor

PREFIX = "A photo depicts "
W = 2.5


@nnx.jit
def _image_embeds(model: clip.CLIPVisionModel, pixels):
    return model(pixels).image_embeds


@nnx.jit
def _text_embeds(model: clip.CLIPTextModel, input_ids, attention_mask):
    return model(input_ids, attention_mask).text_embeds


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _padded_size(n: int, batch_size: int) -> int:
    """Batches are padded to a power of two (at most ``batch_size``), so few shapes compile."""
    return min(batch_size, 1 << (n - 1).bit_length())


class CLIPScorer:
    """CLIP-S and RefCLIP-S with one CLIP checkpoint's towers, tokenizer and preprocessing."""

    def __init__(self, vision: clip.CLIPVisionModel, text: clip.CLIPTextModel, tokenizer,
                 processor: CLIPImageProcessor, *, batch_size: int = 64):
        self.vision, self.text, self.tokenizer, self.processor = vision, text, tokenizer, processor
        self.batch_size = batch_size

    @classmethod
    def from_pretrained(cls, path_or_name: str | os.PathLike, *, batch_size: int = 64) -> CLIPScorer:
        """From a full ``CLIPModel`` checkpoint folder (or hub name) with its tokenizer and
        ``preprocessor_config.json``."""
        folder = hf_loader.resolve(path_or_name)
        return cls(clip.CLIPVisionModel.from_pretrained(folder), clip.CLIPTextModel.from_pretrained(folder),
                   clip.load_tokenizer(folder), CLIPImageProcessor.from_pretrained(folder), batch_size=batch_size)

    def _batched(self, n: int, embed) -> np.ndarray:
        """Runs ``embed(start, stop, padded_size)`` over ``[0, n)`` in batches; float64 ``[n, dim]``."""
        out = []
        for start in range(0, n, self.batch_size):
            stop = min(start + self.batch_size, n)
            out.append(np.asarray(embed(start, stop, _padded_size(stop - start, self.batch_size)))[:stop - start])
        return np.concatenate(out).astype(np.float64)

    def embed_images(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Unit-norm image embeddings ``[n, projection_dim]`` of uint8 ``[height, width, 3]`` images."""

        def embed(start, stop, size):
            pixels = self.processor(list(images[start:stop]))
            return _image_embeds(self.vision, np.pad(pixels, ((0, size - len(pixels)), (0, 0), (0, 0), (0, 0))))

        return _unit(self._batched(len(images), embed))

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-norm text embeddings ``[n, projection_dim]``; texts longer than the context are truncated."""

        def embed(start, stop, size):
            ids, mask = clip.tokenize(self.tokenizer, list(texts[start:stop]),
                                      self.text.config.max_position_embeddings)
            # Padding rows repeat the first row: every row needs its end-of-text token.
            rows = np.concatenate([np.arange(len(ids)), np.zeros(size - len(ids), int)])
            return _text_embeds(self.text, ids[rows], mask[rows])

        return _unit(self._batched(len(texts), embed))

    def __call__(self, candidates: Mapping[str, str], references: Mapping[str, Sequence[str]],
                 images: Mapping[str, np.ndarray]) -> dict[str, float]:
        """``{"clip_s", "refclip_s"}`` averaged over the ids of ``candidates``.

        ``references``: ``{id: [caption, ...]}`` and ``images``: ``{id: uint8 [height, width, 3]}``,
        both with the ids of ``candidates``.
        """
        from nvl_jax.evaluation.captions import check_inputs

        ids = check_inputs(candidates, references)
        missing = [i for i in ids if i not in images]
        extra = [i for i in images if i not in candidates]
        if missing or extra:
            raise ValueError(f"images must have the ids of candidates: missing {missing[:10]}, extra {extra[:10]}")
        image = self.embed_images([np.asarray(images[i]) for i in ids])
        candidate = self.embed_texts([PREFIX + candidates[i] for i in ids])
        reference = self.embed_texts([PREFIX + r for i in ids for r in references[i]])
        owner = np.repeat(np.arange(len(ids)), [len(references[i]) for i in ids])
        clip_s = W * np.maximum(np.sum(image * candidate, axis=1), 0.0)
        text_text = np.full(len(ids), -np.inf)
        np.maximum.at(text_text, owner, np.sum(candidate[owner] * reference, axis=1))
        text_text = np.maximum(text_text, 0.0)
        total = clip_s + text_text
        refclip_s = np.divide(2 * clip_s * text_text, total, out=np.zeros_like(total), where=total > 0)
        return {"clip_s": float(clip_s.mean()), "refclip_s": float(refclip_s.mean())}
