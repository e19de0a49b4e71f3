"""Data pipelines: scan, image loaders (PIL / DALI), latent extraction, latent store + loader. See docs/data.md."""


class DataError(ValueError):
    """Bad data a user handed us (a corrupt shard, latents that do not fit the model, a folder made with other
    settings, non-finite latents); the message is one line and names the file, shard or folder."""
