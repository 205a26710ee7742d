"""Caption metrics with the field's protocol: pycocoevalcap's COCO caption evaluation.

As UMBRAE/BrainHub and the paper score brain captions: pycocoevalcap's
``PTBTokenizer`` (Stanford CoreNLP 3.4.1, lower-cased, punctuation dropped) on the
candidates and on the references, then ``Bleu(4)``, ``Meteor``, ``Rouge`` and
``Cider`` on the tokenized text, and ``Spice`` when it can run. Values are on
pycocoevalcap's own scale: fractions in [0, 1], CIDEr as its ``Cider`` reports it
(CIDEr-D, idf from the scored references, so it depends on which images are
scored). The paper's tables print these times 100.

pycocoevalcap runs Java: the tokenizer and METEOR (whose process loads a
paraphrase table, ~17 s, once per Python process: it is shared between calls).
CLIP-S and RefCLIP-S come from ``nvl_jax.evaluation.clip_score``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import os
import shutil
import subprocess

import numpy as np

METRIC_KEYS = ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider")


def _require_java() -> None:
    if shutil.which("java") is None:
        raise RuntimeError("pycocoevalcap runs Java for PTB tokenization, METEOR and SPICE, and no `java` is on "
                           "PATH: install a Java runtime (e.g. `apt-get install default-jre-headless`)")


_meteor = None


def shared_meteor():
    """pycocoevalcap's ``Meteor``: one Java process per Python process, started on first use
    (and again if it has exited)."""
    global _meteor
    if _meteor is None or _meteor.meteor_p.poll() is not None:
        from pycocoevalcap.meteor.meteor import Meteor

        _require_java()
        _meteor = Meteor()
    return _meteor


def check_inputs(candidates: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> list[str]:
    """The scored ids, in the order of ``candidates``; raises on any mismatch or malformed entry."""
    if not candidates:
        raise ValueError("candidates is empty: there is nothing to score")
    missing_refs = [i for i in candidates if i not in references]
    missing_cands = [i for i in references if i not in candidates]
    if missing_refs or missing_cands:
        raise ValueError("candidates and references must have the same ids: "
                         f"{len(missing_refs)} candidate ids have no references {missing_refs[:10]}, "
                         f"{len(missing_cands)} reference ids have no candidate {missing_cands[:10]}")
    for i, caption in candidates.items():
        if not isinstance(caption, str):
            raise ValueError(f"candidates[{i!r}] must be one caption string, got {type(caption).__name__}")
    for i, refs in references.items():
        if isinstance(refs, str) or not refs or not all(isinstance(r, str) for r in refs):
            raise ValueError(f"references[{i!r}] must be a non-empty list of caption strings, got {refs!r}")
    return list(candidates)


def ptb_tokenize(captions: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """pycocoevalcap's ``PTBTokenizer`` on ``{id: [caption, ...]}``.

    Every whitespace run becomes one space first: the tokenizer reads one caption
    per line and pairs lines with ids by position, so a carriage return or a
    Unicode line separator inside a caption would silently shift every later
    caption onto the wrong id. Spaces separate tokens anyway, so the tokens are
    unchanged.
    """
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    _require_java()
    tokenized = PTBTokenizer().tokenize(
        {i: [{"caption": " ".join(c.split())} for c in caps] for i, caps in captions.items()})
    wrong = [i for i, caps in captions.items() if len(tokenized.get(i, ())) != len(caps)]
    if wrong:
        raise RuntimeError(f"PTBTokenizer returned the wrong number of captions for ids {wrong[:10]}")
    return tokenized


def spice_unavailable() -> str | None:
    """Why pycocoevalcap's ``Spice`` cannot run here, or None when it can be tried.

    ``Spice`` needs Stanford CoreNLP 3.6.0 (code and models jars) in its
    ``spice/lib`` folder, and downloads them there on first use when the code
    jar is absent; offline, that download fails. It is never attempted here.
    """
    from pycocoevalcap.spice import get_stanford_models as stanford

    lib = os.path.join(os.path.abspath(stanford.SPICEDIR), stanford.SPICELIB)
    absent = [name for name in (f"{stanford.JAR}.jar", f"{stanford.JAR}-models.jar")
              if not os.path.exists(os.path.join(lib, name))]
    if absent:
        return (f"Stanford CoreNLP is not installed for SPICE: {', '.join(absent)} not in {lib} "
                "(pycocoevalcap would download it on first use; put both jars there to compute SPICE)")
    return None


def _spice(gts: dict[str, list[str]], res: dict[str, list[str]]) -> tuple[float | None, str | None]:
    """``(SPICE, None)``, or ``(None, reason)`` when it cannot be computed."""
    reason = spice_unavailable()
    if reason is not None:
        return None, reason
    from pycocoevalcap.spice.spice import Spice

    try:
        return float(Spice().compute_score(gts, res)[0]), None
    except subprocess.CalledProcessError as error:
        return None, (f"SPICE's Java process failed ({error}); SPICE 1.0's -cache option, which "
                      "pycocoevalcap always passes, is known to fail on Java >= 16")


def score(candidates: Mapping[str, str], references: Mapping[str, Sequence[str]], *, spice: bool = True,
          clip=None, images: Mapping[str, np.ndarray] | None = None) -> dict:
    """Corpus-level caption metrics of one caption per id against that id's reference captions.

    Args:
      candidates: ``{id: caption}``, one generated caption per image.
      references: ``{id: [caption, ...]}``, the same ids, at least one reference each.
      spice: try SPICE (see :func:`spice_unavailable`).
      clip: a :class:`nvl_jax.evaluation.clip_score.CLIPScorer` or a CLIP checkpoint
        folder (the protocol's is ViT-B/32); with ``images``, adds CLIP-S and RefCLIP-S.
      images: ``{id: uint8 [height, width, 3]}``, the same ids; needed with ``clip``.

    Returns:
      ``bleu1``..``bleu4``, ``meteor``, ``rouge_l``, ``cider`` (floats); ``spice`` when
      computed; ``clip_s`` and ``refclip_s`` when ``clip`` is given; and, when some
      metric was asked for but not computed, ``not_computed: {metric: reason}``.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    ids = check_inputs(candidates, references)
    if (clip is None) != (images is None):
        raise ValueError("CLIP-S needs both `clip` (a CLIPScorer or CLIP checkpoint folder) and `images`")
    # Started first: METEOR's process loads its paraphrase table while the rest is computed.
    meteor = shared_meteor()
    # Tokenized separately, as pycocoevalcap's COCOEvalCap does.
    gts = ptb_tokenize({i: references[i] for i in ids})
    res = ptb_tokenize({i: [candidates[i]] for i in ids})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    metrics = {f"bleu{n + 1}": float(b) for n, b in enumerate(bleu)}
    rouge_l = float(Rouge().compute_score(gts, res)[0])
    cider = float(Cider().compute_score(gts, res)[0])
    extra, not_computed = {}, {}
    if spice:
        value, reason = _spice(gts, res)
        if reason is None:
            extra["spice"] = value
        else:
            not_computed["spice"] = reason
    else:
        not_computed["spice"] = "not requested (spice=False)"
    if clip is not None:
        from nvl_jax.evaluation import clip_score

        scorer = clip if isinstance(clip, clip_score.CLIPScorer) else clip_score.CLIPScorer.from_pretrained(clip)
        extra.update(scorer(candidates, references, images))
    metrics.update(meteor=float(meteor.compute_score(gts, res)[0]), rouge_l=rouge_l, cider=cider, **extra)
    if not_computed:
        metrics["not_computed"] = not_computed
    return metrics
