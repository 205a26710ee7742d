"""Benchmarks against the PyTorch reference implementations (they import torch; runtime code never does)."""
