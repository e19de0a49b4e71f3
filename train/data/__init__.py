"""Data pipelines: scan, image loaders (PIL / DALI), latent extraction, latent store + loader. See docs/data.md."""
