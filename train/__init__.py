"""Trainers (DiT, VA-VAE), the config system, checkpoints, FP8 and data pipelines."""
