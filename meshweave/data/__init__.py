"""Data sources that need no download, packing, and the resumable distributed sampler."""
