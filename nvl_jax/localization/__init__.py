"""Concept localization (the paper's section 6): GradCAM from a concept on the ViT3D extractor's
penultimate layer, back to the subject's native voxels through the exact transpose of its
resampling, the ensemble of 1-3 extractors, and its accuracy on in-silico NSD. docs/localization.md."""

from nvl_jax.localization.ensemble import ConceptMap, Extractor, concept_maps, load_extractors, localize_concept

__all__ = ["ConceptMap", "Extractor", "concept_maps", "load_extractors", "localize_concept"]
