"""Inference: the Predictor, the predict and export commands, and bundles (docs/inference.md)."""
