"""Latent reward model (LRM) on SD1.x/2.x and SDXL backbones, and the latent preference optimisation built on it."""
