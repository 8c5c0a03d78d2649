"""Sparse transcoders: the model, training from recordings, artifacts on disk (safetensors + JSON)."""

__all__: list[str] = []
