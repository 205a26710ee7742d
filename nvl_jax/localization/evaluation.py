"""Localization accuracy on an in-silico NSD, where the true concept voxels are known.

For every subject and concept: each run's map and the ensemble's, from the subject's test stimuli
that show the concept (betas averaged over repeats), scored by AUROC against the true voxels
(``ground_truth/<subject>_concept_voxels.nii.gz``). Chance baseline: the same truth scored with the
maps of the other concepts (their mean AUROC). Ablation (the paper's check): the ensemble's top-k %
voxels of a concept are zeroed in the betas and each extractor is run again; the drop in the
concept's score (cosine of the CLIP head's output with the concept target) and in the brain ->
image top-1 retrieval of the stimuli showing it (among all the subject's test stimuli), against
zeroing as many voxels drawn at random from the mask.
"""

from __future__ import annotations

import numpy as np
from tqdm.auto import tqdm

from nvl_jax.evaluation import retrieval
from nvl_jax.localization import adjoint, concepts as concepts_lib, ensemble as ensemble_lib, ground_truth
from nvl_jax.localization.metrics import auroc

ABLATION_PERCENT = (1, 5, 10)
RANDOM_DRAWS = 3


def _summary(per_subject: dict[str, dict[str, float]]) -> dict:
    """Means over subjects per concept, then over concepts; a concept a subject lacks is left out of its mean."""
    names = list(dict.fromkeys(c for s in per_subject.values() for c in s))
    per_concept = {c: float(np.mean([s[c] for s in per_subject.values() if c in s])) for c in names}
    return {"mean_auroc": float(np.mean(list(per_concept.values()))), "per_concept": per_concept,
            "per_subject": per_subject}


def _ablated(extractor, subject, betas, rows, target, test_images, zeroed) -> tuple[float, float]:
    """Concept score and retrieval of ``rows`` of ``betas`` with the voxels ``zeroed`` set to 0."""
    betas = betas[rows].copy()
    betas[:, zeroed] = 0.0
    embedding = extractor.clip_embeddings(subject, betas)
    score = float(np.mean(embedding @ target / (np.linalg.norm(embedding, axis=1) * np.linalg.norm(target))))
    similarity = retrieval.cosine_similarity(embedding, test_images)
    return score, float(np.mean(similarity.argmax(axis=1) == rows))


def evaluate(extractors: list, seed: int = 0) -> dict:
    """The contents of ``localization_eval.json`` for ``extractors`` (``ensemble.load_extractors``)."""
    dataset = extractors[0].dataset
    names = [e.name for e in extractors]
    truth_concepts = list(ground_truth.true_concept_voxels(dataset, next(iter(dataset.subjects))))
    targets = concepts_lib.concept_targets(dataset, truth_concepts)
    presence = concepts_lib.concept_presence(dataset) > 0
    clip_targets = dataset.targets().clip_image_embeds
    rng = np.random.default_rng(seed)
    per_run = {name: {} for name in names}
    ens, wrong = {}, {}
    ablation = {k: {key: [] for key in ("score", "random_score", "retrieval", "random_retrieval")}
                for k in ABLATION_PERCENT}
    for subject in tqdm(dataset.subjects, desc="subjects", unit="subject"):
        truth = ground_truth.true_concept_voxels(dataset, subject)
        test = ensemble_lib.subject_stimuli(dataset, subject, "test", "")
        betas, _ = ensemble_lib.read_betas(dataset, subject, test)
        test_images = np.asarray(clip_targets[test], np.float32)
        shows = presence[test]  # [n_test, n_concepts]
        # A concept is scored where some test stimulus shows it and its truth has both classes (always, at the
        # default scale; a tiny dataset may lack one).
        scored = [k for k, c in enumerate(truth_concepts) if shows[:, k].any() and 0 < truth[c].sum() < len(truth[c])]
        maps = {}
        for extractor in extractors:
            relevance, _ = extractor.relevance(subject, betas, targets)
            maps[extractor.name] = {k: extractor.to_voxels(subject, relevance[shows[:, k], k].mean(0)) for k in scored}
        ensemble = {k: adjoint.normalize(np.mean([maps[name][k] for name in names], axis=0)) for k in scored}
        for name in names:
            per_run[name][subject] = {truth_concepts[k]: auroc(maps[name][k], truth[truth_concepts[k]]) for k in scored}
        ens[subject] = {truth_concepts[k]: auroc(ensemble[k], truth[truth_concepts[k]]) for k in scored}
        wrong[subject] = {truth_concepts[k]: float(np.mean([auroc(ensemble[j], truth[truth_concepts[k]])
                                                            for j in scored if j != k]))
                          for k in scored if len(scored) > 1}
        n_voxels = betas.shape[1]
        for k in scored:
            rows = np.flatnonzero(shows[:, k])
            base = {e.name: _ablated(e, subject, betas, rows, targets[k], test_images, []) for e in extractors}
            for percent in ABLATION_PERCENT:
                count = max(1, round(n_voxels * percent / 100))
                top = np.argsort(-ensemble[k], kind="stable")[:count]
                draws = [rng.choice(n_voxels, count, replace=False) for _ in range(RANDOM_DRAWS)]
                for extractor in extractors:
                    zeroed = _ablated(extractor, subject, betas, rows, targets[k], test_images, top)
                    random = np.mean([_ablated(extractor, subject, betas, rows, targets[k], test_images, d)
                                      for d in draws], axis=0)
                    (score, retrieved), entry = base[extractor.name], ablation[percent]
                    entry["score"].append(score - zeroed[0]), entry["random_score"].append(score - random[0])
                    entry["retrieval"].append(retrieved - zeroed[1])
                    entry["random_retrieval"].append(retrieved - random[1])
    results = {"ensemble": _summary(ens)}
    results.update({name: _summary(per_run[name]) for name in names})
    wrong_summary = _summary(wrong)
    results["wrong_concept"] = {"mean_auroc": wrong_summary["mean_auroc"], "per_concept": wrong_summary["per_concept"]}
    results["ablation"] = {
        f"top_{percent}pct": {
            "concept_score_drop": float(np.mean(v["score"])),
            "random_voxels_concept_score_drop": float(np.mean(v["random_score"])),
            "retrieval_drop": float(np.mean(v["retrieval"])),
            "random_voxels_retrieval_drop": float(np.mean(v["random_retrieval"])),
        } for percent, v in ablation.items()}
    results["ablation"]["protocol"] = (
        "per subject, concept and run: the ensemble map's top k % voxels (or as many random voxels of the mask, "
        f"mean of {RANDOM_DRAWS} draws) set to 0 in the repeat-averaged test betas of the stimuli showing the "
        "concept; drops are before minus after, of the mean cosine of the CLIP head's output with the concept "
        "target and of brain -> image top-1 among the subject's test stimuli, averaged over runs, subjects and concepts")
    return results
