"""Evaluation protocols: retrieval and identification (stage 1)."""
