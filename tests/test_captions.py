"""Caption metrics against pycocoevalcap's scorers called directly, CLIP-S against transformers' CLIPModel,
and the in-silico object F1.

METEOR's Java process takes ~17 s to load its paraphrase table, so one module-scoped
``score`` call covers the whole corpus and the process is shared (``shared_meteor``).
"""

import json

import numpy as np
import pytest
import torch
import transformers
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.spice import get_stanford_models
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from nvl_jax.data.synthetic import scenes
from nvl_jax.evaluation import captions, clip_score
from nvl_jax.evaluation.object_f1 import mentioned_objects, object_f1

CANDIDATES = {
    "s0": "A large red circle on a gray background.",
    "s1": "two shapes: a blue star and a green cross",
    "s2": "A small Yellow square, which is left of a purple triangle!",
    "s3": "an orange cross",
    # Longer than CLIP's 77-token context once spelled out letter by letter: truncated on both sides.
    "s4": "a green circle in the top left corner and a blue square at the bottom, next to a red star on the right",
    "s5": "",
}


@pytest.fixture(scope="module")
def corpus():
    """Candidates, the generator's five captions per scene as references, and the scenes' images."""
    rng = np.random.default_rng(3)
    graphs = {i: scenes.sample_scene(rng) for i in CANDIDATES}
    references = {i: scenes.captions(g, rng) for i, g in graphs.items()}
    images = {i: scenes.draw_scene(g, 48) for i, g in graphs.items()}
    return CANDIDATES, references, images


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """A tiny random CLIPModel saved by transformers, with a letter-level CLIP tokenizer and a 32 px processor."""
    folder = tmp_path_factory.mktemp("clip")
    symbols = [*"abcdefghijklmnopqrstuvwxyz0123456789", *".,:;!?'-"]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in [*symbols, *(s + "</w>" for s in symbols)]:
        vocab[token] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    transformers.CLIPTokenizer.from_pretrained(folder).save_pretrained(folder)
    transformers.CLIPImageProcessor(size={"shortest_edge": 32},
                                    crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    torch.manual_seed(3)  # a seed whose image-text cosines are of both signs, so the clamp at 0 acts
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4),
        projection_dim=16)
    transformers.CLIPModel(config).eval().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def ours(corpus, clip_folder):
    candidates, references, images = corpus
    return captions.score(candidates, references, clip=clip_folder, images=images)


def test_equals_pycocoevalcap_called_directly(corpus, ours):
    """COCOEvalCap's steps by hand: PTB-tokenize each side, then each scorer; METEOR is pycocoevalcap's
    own ``Meteor`` (its process shared with ``score``: the EVAL command keeps no state between calls)."""
    candidates, references, _ = corpus
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": r} for r in refs] for i, refs in references.items()})
    res = tokenizer.tokenize({i: [{"caption": c}] for i, c in candidates.items()})
    bleu, _ = Bleu(4).compute_score(gts, res)
    expected = {"bleu1": bleu[0], "bleu2": bleu[1], "bleu3": bleu[2], "bleu4": bleu[3],
                "meteor": captions.shared_meteor().compute_score(gts, res)[0],
                "rouge_l": Rouge().compute_score(gts, res)[0], "cider": Cider().compute_score(gts, res)[0]}
    assert {k: ours[k] for k in captions.METRIC_KEYS} == expected
    assert all(isinstance(ours[k], float) for k in captions.METRIC_KEYS)
    assert 0 < ours["bleu4"] < ours["bleu1"] < 1 and 0 < ours["meteor"] < 1 and ours["cider"] > 0


def test_spice_is_reported_not_computed(ours):
    """Without Stanford CoreNLP's jars SPICE is absent from the scores and the reason says why."""
    assert "spice" not in ours
    assert "Stanford CoreNLP" in ours["not_computed"]["spice"]
    assert "stanford-corenlp-3.6.0-models.jar" in ours["not_computed"]["spice"]


def test_spice_failure_is_reported_not_raised(tmp_path, monkeypatch):
    """With the jars where ``Spice`` looks but unusable (empty files here), SPICE's Java process fails:
    the failure is reported, never raised, and no download is tried."""
    (tmp_path / "lib").mkdir()
    for name in ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar"):
        (tmp_path / "lib" / name).write_bytes(b"")
    monkeypatch.setattr(get_stanford_models, "SPICEDIR", str(tmp_path))
    assert captions.spice_unavailable() is None
    metrics = captions.score({"a": "a red circle"}, {"a": ["a red circle"]})
    assert "spice" not in metrics and "Java process failed" in metrics["not_computed"]["spice"]
    assert captions.score({"a": "x"}, {"a": ["y"]}, spice=False)["not_computed"] == {
        "spice": "not requested (spice=False)"}


def test_hand_checked_bleu():
    """"the cat sat on the mat" against "the cat is on the mat": 5/6 unigrams, 3/5 bigrams,
    1/4 trigrams and 0/3 four-grams match, equal lengths (no brevity penalty). PTB tokenization
    lower-cases and drops the punctuation first."""
    metrics = captions.score({"1": "The cat sat on the mat."}, {"1": ["the cat is on the mat"]}, spice=False)
    assert metrics["bleu1"] == pytest.approx(5 / 6, abs=1e-8)
    assert metrics["bleu2"] == pytest.approx(np.sqrt(5 / 6 * 3 / 5), abs=1e-8)
    assert metrics["bleu3"] == pytest.approx(0.5, abs=1e-8)  # (5/6 * 3/5 * 1/4) ** (1/3)
    assert metrics["bleu4"] < 1e-3  # no four-gram matches: only pycocoevalcap's 1e-15 smoothing remains
    # ROUGE-L: LCS "the cat on the mat" = 5 of 6 on both sides, so P = R = F = 5/6.
    assert metrics["rouge_l"] == pytest.approx(5 / 6, abs=1e-12)
    # A two-word candidate: unigram precision 1, brevity penalty exp(1 - 6/2).
    short = captions.score({"1": "the cat"}, {"1": ["the cat is on the mat"]}, spice=False)
    assert short["bleu1"] == pytest.approx(np.exp(-2), abs=1e-8)


def test_line_breaks_inside_captions_stay_with_their_id():
    """pycocoevalcap's tokenizer pairs output lines with ids by position: a carriage return or a
    Unicode line separator inside a caption would shift later captions onto the wrong ids."""
    tokenized = captions.ptb_tokenize({"1": ["a red\rcircle"], "2": ["blue\u2028star"], "3": ["Green\ncross."]})
    assert tokenized == {"1": ["a red circle"], "2": ["blue star"], "3": ["green cross"]}


def test_mismatched_ids_and_bad_entries_are_errors():
    refs = {"a": ["a red circle"], "b": ["a blue star"]}
    with pytest.raises(ValueError, match=r"candidate ids have no references \['c'\].*no candidate \['b'\]"):
        captions.score({"a": "x", "c": "y"}, refs)
    with pytest.raises(ValueError, match="candidates is empty"):
        captions.score({}, refs)
    with pytest.raises(ValueError, match=r"references\['a'\] must be a non-empty list"):
        captions.score({"a": "x"}, {"a": "a red circle"})
    with pytest.raises(ValueError, match=r"candidates\['a'\] must be one caption string"):
        captions.score({"a": ["x"]}, {"a": ["y"]})
    with pytest.raises(ValueError, match="needs both `clip`"):
        captions.score({"a": "x"}, {"a": ["y"]}, images={"a": np.zeros((8, 8, 3), np.uint8)})


def _transformers_clip_scores(folder, candidates, references, images):
    """Hessel et al.'s clipscore.py computation, on transformers' CLIPModel in PyTorch."""
    model = transformers.CLIPModel.from_pretrained(folder).eval()
    tokenizer = transformers.CLIPTokenizer.from_pretrained(folder)
    processor = transformers.CLIPImageProcessor.from_pretrained(folder)

    def texts(batch):
        encoded = tokenizer(["A photo depicts " + t for t in batch], padding="max_length", max_length=77,
                            truncation=True, return_tensors="pt")
        return model.get_text_features(**encoded).pooler_output.numpy()

    ids = list(candidates)
    with torch.no_grad():
        pixels = processor(images=[images[i] for i in ids], return_tensors="pt")["pixel_values"]
        image = model.get_image_features(pixel_values=pixels).pooler_output.numpy()
        candidate = texts([candidates[i] for i in ids])
        refs = [texts(references[i]) for i in ids]
    unit = lambda x: x / np.sqrt(np.sum(x**2, axis=-1, keepdims=True))  # noqa: E731
    image, candidate = unit(image), unit(candidate)
    clip_s = 2.5 * np.clip(np.sum(image * candidate, axis=1), 0, None)
    best = np.array([max(np.max(unit(r) @ c), 0.0) for c, r in zip(candidate, refs)])
    refclip_s = 2 * clip_s * best / (clip_s + best)
    return clip_s, refclip_s


def test_clip_scores_match_transformers(corpus, clip_folder, ours):
    candidates, references, images = corpus
    clip_s, refclip_s = _transformers_clip_scores(clip_folder, candidates, references, images)
    assert (clip_s > 0).sum() >= 3 and (clip_s == 0).any(), clip_s
    assert ours["clip_s"] == pytest.approx(clip_s.mean(), abs=2e-6)
    assert ours["refclip_s"] == pytest.approx(refclip_s.mean(), abs=2e-6)


def test_clip_scorer_checks_image_ids(corpus, clip_folder):
    candidates, references, images = corpus
    scorer = clip_score.CLIPScorer.from_pretrained(clip_folder, batch_size=4)
    with pytest.raises(ValueError, match=r"missing \['s5'\]"):
        scorer(candidates, references, {i: v for i, v in images.items() if i != "s5"})
    # Batches of 4 padded to a power of two give the same embeddings as one batch.
    texts = [candidates[i] for i in candidates]
    np.testing.assert_allclose(scorer.embed_texts(texts),
                               clip_score.CLIPScorer.from_pretrained(clip_folder).embed_texts(texts), atol=1e-6)


@pytest.mark.parametrize("caption, expected", [
    ("a large red circle on a gray background", {("red", "circle"): 1}),
    ("two shapes: a blue star and a green cross", {("blue", "star"): 1, ("green", "cross"): 1}),
    ("two large red circles and three Yellow crosses", {("red", "circle"): 2, ("yellow", "cross"): 3}),
    ("some purple triangles", {("purple", "triangle"): 2}),
    ("a red circle left of a blue square, which is above the red circle", {("red", "circle"): 1,
                                                                           ("blue", "square"): 1}),
    ("a square and a circle", {}),
])
def test_mentioned_objects(caption, expected):
    assert mentioned_objects(caption) == expected


def test_object_f1():
    scene = [("red", "circle"), ("blue", "star")]
    assert object_f1("a red circle and a blue star", scene) == 1.0
    assert object_f1("a red circle", scene) == pytest.approx(2 / 3)  # P 1, R 1/2
    assert object_f1("a red circle and a green cross", scene) == pytest.approx(0.5)  # P 1/2, R 1/2
    assert object_f1("two red circles", scene) == pytest.approx(0.5)  # P 1/2, R 1/2
    assert object_f1("a gray background", scene) == 0.0
    # Every caption the generator writes names exactly the scene's objects.
    rng = np.random.default_rng(0)
    for _ in range(20):
        graph = scenes.sample_scene(rng)
        truth = [(o["colour"], o["shape"]) for o in graph["objects"]]
        assert all(object_f1(c, truth) == 1.0 for c in scenes.captions(graph, rng))
    with pytest.raises(ValueError, match="not a .colour, shape. of the in-silico scenes"):
        object_f1("a red circle", [("grey", "circle")])
    with pytest.raises(ValueError, match="scene_objects is empty"):
        object_f1("a red circle", [])
