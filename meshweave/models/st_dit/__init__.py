"""The `st_dit` kind: a spatial-temporal diffusion transformer on video latents (images are T=1)."""
