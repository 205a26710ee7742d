"""Evaluation protocols: retrieval and identification (stage 1); image reconstruction (MindEye's eight
metrics, ``reconstruction``)."""
