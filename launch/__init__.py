"""Entrypoints, Accelerate/DeepSpeed configs and cluster scripts."""
